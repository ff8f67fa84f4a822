"""The FAST action tokenizer and pi0-FAST's text conventions, on tiny tokenizers built in the tests.

References: the DCT written out as its defining sum (and scipy's when installed); the published
FAST formula (round(DCT(x) * scale), chr(c - min_token), BPE); LeRobot's prompt and detokenising
rules (policies/pi0_fast/processor_pi0_fast.py, modeling_pi0_fast.py detokenize_actions).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import pi0_fast_checkpoints as helpers
from vla_inference.models.base import InvalidObservation, ModelLoadError
from vla_inference.models.pi0.policy import discretize_state, state_prompt
from vla_inference.models.pi0_fast import fast_tokenizer as fast
from vla_inference.models.pi0_fast import prompt
from vla_inference.models.pi0_fast.prompt import TextTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> fast.FastTokenizer:
    return helpers.fast_tokenizer(seed=0)


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    return TextTokenizer(helpers.text_tokenizer())


# ---- DCT ------------------------------------------------------------------------------------------


def test_dct_matrix_is_the_orthonormal_dct_ii_sum() -> None:
    n = 7
    x = np.random.default_rng(0).normal(size=(n, 3))
    by_sum = np.zeros_like(x)
    for k in range(n):
        scale = math.sqrt((1 if k == 0 else 2) / n)
        for t in range(n):
            by_sum[k] += scale * math.cos(math.pi * (2 * t + 1) * k / (2 * n)) * x[t]
    np.testing.assert_allclose(fast.dct(x), by_sum, atol=1e-12)
    np.testing.assert_allclose(fast.idct(fast.dct(x)), x, atol=1e-12)
    c = fast.dct_matrix(n)
    np.testing.assert_allclose(c @ c.T, np.eye(n), atol=1e-12)


def test_dct_matches_scipy() -> None:
    scipy_fft = pytest.importorskip("scipy.fft")
    x = np.random.default_rng(1).normal(size=(10, 4))
    np.testing.assert_allclose(fast.dct(x), scipy_fft.dct(x, axis=0, norm="ortho"), atol=1e-12)
    np.testing.assert_allclose(fast.idct(x), scipy_fft.idct(x, axis=0, norm="ortho"), atol=1e-12)


# ---- encode / decode ---------------------------------------------------------------------------------


def test_encode_decode_round_trip_is_the_published_formula(tokenizer: fast.FastTokenizer) -> None:
    for chunk in helpers.synthetic_chunks(20, seed=11):
        quantised = np.around(fast.dct(chunk) * tokenizer.scale)  # (H, D)
        ids = tokenizer.encode(chunk)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert len(ids) < quantised.size  # BPE compresses the coefficient string
        # the tokens spell chr(c - min_token) of the row-major coefficients
        spelled = tokenizer.bpe.decode(ids)
        assert spelled == "".join(chr(int(c) - tokenizer.min_token) for c in quantised.reshape(-1))
        np.testing.assert_array_equal(tokenizer.decode_coefficients(ids), quantised.reshape(-1))
        decoded = tokenizer.decode(ids, *chunk.shape)
        assert (decoded.padded, decoded.truncated, decoded.coefficients) == (0, 0, chunk.size)
        expected = fast.idct(quantised / tokenizer.scale)  # the published inverse
        np.testing.assert_allclose(decoded.actions, expected, atol=1e-6)
        assert decoded.actions.dtype == np.float32
        # quantisation error only: at most half a step per coefficient, spread by the orthonormal DCT
        assert np.abs(decoded.actions - chunk).max() < 0.5 / tokenizer.scale * math.sqrt(chunk.shape[0])


def test_relaxed_decoding_pads_and_truncates(tokenizer: fast.FastTokenizer) -> None:
    chunk = helpers.synthetic_chunks(1, seed=3)[0]  # (10, 3)
    ids = tokenizer.encode(chunk)
    coeffs = tokenizer.decode_coefficients(ids)
    short = ids[: len(ids) // 2]
    kept = tokenizer.decode_coefficients(short).size
    decoded = tokenizer.decode(short, 10, 3)
    assert decoded.padded == 30 - kept > 0 and decoded.truncated == 0
    padded = np.zeros(30)
    padded[:kept] = coeffs[:kept]
    np.testing.assert_allclose(decoded.actions, fast.idct(padded.reshape(10, 3) / tokenizer.scale), atol=1e-6)
    # a shorter horizon than the tokens hold: the coefficients are cut (LeRobot's n_action_steps)
    cut = tokenizer.decode(ids, 4, 3)
    assert cut.truncated == 18 and cut.padded == 0
    np.testing.assert_allclose(cut.actions, fast.idct(coeffs[:12].reshape(4, 3) / tokenizer.scale), atol=1e-6)
    with pytest.raises(fast.FastDecodeError, match="needs 30"):
        tokenizer.decode(short, 10, 3, relaxed=False)


def test_tokens_outside_the_vocabulary_are_an_error(tokenizer: fast.FastTokenizer) -> None:
    with pytest.raises(fast.FastDecodeError, match="outside the FAST vocabulary"):
        tokenizer.decode([3, tokenizer.vocab_size], 10, 3)
    with pytest.raises(fast.FastDecodeError, match="outside"):
        tokenizer.decode([-1], 10, 3)


def test_paligemma_id_mapping() -> None:
    assert fast.fast_to_text_ids(np.array([0]), 257152)[0] == 257023
    assert fast.fast_to_text_ids(np.array([2047]), 257152)[0] == 254976
    ids = np.arange(300)
    np.testing.assert_array_equal(fast.text_to_fast_ids(fast.fast_to_text_ids(ids, 1024), 1024), ids)


def test_load_reads_the_numbers_and_never_runs_the_code(
    tmp_path: Path, tokenizer: fast.FastTokenizer
) -> None:
    directory = helpers.write_fast_tokenizer(tmp_path / "fast", tokenizer)
    loaded = fast.FastTokenizer.load(directory)
    assert (loaded.scale, loaded.min_token, loaded.vocab_size) == (10.0, tokenizer.min_token, 300)
    assert (loaded.time_horizon, loaded.action_dim) == (10, 3)
    chunk = helpers.synthetic_chunks(1, seed=5)[0]
    assert loaded.encode(chunk) == tokenizer.encode(chunk)
    assert not (directory / helpers.EXECUTED_MARKER).exists()
    assert "processing_action_tokenizer" not in sys.modules


def test_load_names_the_missing_file(tmp_path: Path, tokenizer: fast.FastTokenizer) -> None:
    directory = helpers.write_fast_tokenizer(tmp_path / "fast", tokenizer)
    (directory / fast.BPE_DIR / fast.BPE_FILE).unlink()
    with pytest.raises(ModelLoadError, match=r"missing bpe_tokenizer/tokenizer\.json in .*fast"):
        fast.FastTokenizer.load(directory)
    (directory / fast.CONFIG_FILE).unlink()
    with pytest.raises(ModelLoadError, match=r"missing processor_config\.json"):
        fast.FastTokenizer.load(directory)


# ---- the prompt ---------------------------------------------------------------------------------------


def test_prompt_text_is_lerobots() -> None:
    state = np.array([-1.5, -1.0, 0.0, 0.999, 1.0])
    text = state_prompt("  Pick_up the\nRed block ", state)
    # case kept (openpi lower-cases), "_" and newlines become spaces, strip; 256 bins over [-1, 1]
    assert text == "Task: Pick up the Red block, State: -1 0 128 255 255;\n"
    bins = np.linspace(-1, 1, 257)[:-1]
    x = np.random.default_rng(0).uniform(-1, 1, 50)
    np.testing.assert_array_equal(discretize_state(x), np.digitize(x, bins) - 1)
    # the bin edge LeRobot's float32 normaliser lands on (the parity fixture's 0.5): one bin up
    # from the float64 value just below it
    edge = np.float32(0.5)
    assert discretize_state(np.array([edge]))[0] == 192
    assert discretize_state(np.array([np.nextafter(0.5, 0.0)]))[0] == 191


def test_tokenize_prompt_bos_and_right_padding(text: TextTokenizer) -> None:
    state = np.array([0.1, -0.2])
    ids, mask = prompt.tokenize_prompt(text, "pick up the red block", state, 40)
    expected = [text.bos_id, *text.encode(state_prompt("pick up the red block", state))]
    assert ids.shape == mask.shape == (40,)
    assert ids[: len(expected)].tolist() == expected
    assert mask.tolist() == [True] * len(expected) + [False] * (40 - len(expected))
    assert set(ids[len(expected) :].tolist()) == {text.pad_id}
    assert text.tokenizer.encode(state_prompt("pick up the red block", state)).ids == expected  # HF's BOS
    with_bos, with_bos_mask = prompt.decode_prefix(ids[None], mask[None], text.bos_id)
    assert with_bos.shape == (1, 41) and with_bos[0, -1] == text.bos_id and with_bos_mask[0, -1]
    with pytest.raises(InvalidObservation, match="at most 20"):
        prompt.tokenize_prompt(text, "pick up the red block", state, 20)


# ---- the answer ---------------------------------------------------------------------------------------


def _answer(text: TextTokenizer, fast_ids: list[int], *, end: bool = True) -> np.ndarray:
    ids = text.encode("Action: ") + fast.fast_to_text_ids(np.array(fast_ids), text.vocab_size).tolist()
    return np.array(ids + ([text.token_id("|"), text.eos_id] if end else []))


def test_action_tokens_follow_lerobots_rules(text: TextTokenizer, tokenizer: fast.FastTokenizer) -> None:
    chunk = helpers.synthetic_chunks(1, seed=9)[0]
    ids = tokenizer.encode(chunk)
    answer = _answer(text, ids)
    found = prompt.action_tokens(answer, text)
    assert found.fast.tolist() == ids
    assert found.positions.tolist() == list(range(3, 3 + len(ids)))  # after "Action", ":", "▁"
    # "Action: " repeated inside the answer is removed; what follows "|" is ignored
    repeated = np.concatenate([answer[:5], np.array(text.encode("Action: ")), answer[5:], answer[:4]])
    assert prompt.action_tokens(repeated, text).fast.tolist() == ids
    probs = np.linspace(0.1, 0.9, answer.size)
    result = prompt.detokenize(answer, probs, text, tokenizer, 10, 3)
    np.testing.assert_allclose(result.actions, tokenizer.decode(ids, 10, 3).actions)
    assert result.confidence == pytest.approx(probs[3 : 3 + len(ids)].mean())
    assert result.tokens == len(ids)


def test_answers_without_an_action_are_errors(text: TextTokenizer, tokenizer: fast.FastTokenizer) -> None:
    ids = tokenizer.encode(helpers.synthetic_chunks(1, seed=2)[0])
    with pytest.raises(fast.FastDecodeError, match="does not start with 'Action:'"):
        prompt.action_tokens(_answer(text, ids)[1:], text)
    with pytest.raises(fast.FastDecodeError, match="no end-of-action"):
        prompt.action_tokens(_answer(text, ids, end=False), text)
    bad = _answer(text, ids)
    bad[4] = text.encode("red")[0]  # a text token where a FAST token belongs
    with pytest.raises(fast.FastDecodeError, match="outside the FAST vocabulary"):
        prompt.detokenize(bad, None, text, tokenizer, 10, 3)
    # too few coefficients for the chunk: LeRobot pads them with zeros; here an error
    with pytest.raises(fast.FastDecodeError, match=r"holds \d+ of the 30 DCT coefficients .* 10 x 3 chunk"):
        prompt.detokenize(_answer(text, ids[:2]), None, text, tokenizer, 10, 3)
    with pytest.raises(fast.FastDecodeError, match="holds 0 of the 30"):
        prompt.detokenize(_answer(text, []), None, text, tokenizer, 10, 3)
    # more than the chunk needs: cut, as LeRobot does (the chunk's own are all there)
    cut = prompt.detokenize(_answer(text, ids), None, text, tokenizer, 5, 3)
    assert cut.decoded.truncated == 15 and cut.actions.shape == (5, 3)
