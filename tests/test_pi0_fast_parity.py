"""Parity with LeRobot's own pi0_fast (huggingface/lerobot 7427f31, fp32, greedy, KV-cache decode),
recorded on a tiny checkpoint LeRobot saved itself: tests/fixtures/pi0_fast/README.md says how.

The fixture holds that checkpoint without its model.safetensors (LeRobot's PaliGemma keeps two
257152-row matrices even at toy width): the weights are regenerated here from the recorded seed by
the recorded rule, the solved LM-head rows applied, and checked bit for bit against the digest of
the file LeRobot wrote. Then, through our loader: the prompt ids are LeRobot's, the greedy tokens
are LeRobot's up to each row's "|" (rows of different prompt lengths and stop points in one batch),
their probabilities and the actions (normalised and un-normalised) within 1e-5; then the same
through the whole serving path (Pi0FastPolicy: prepare, forward, finish), alone and batched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vla_inference.config import Settings
from vla_inference.models.base import Observation
from vla_inference.models.pi0_fast import checkpoint as ckpt
from vla_inference.models.pi0_fast.fast_tokenizer import FastTokenizer
from vla_inference.models.pi0_fast.model import Pi0FastBatch, Rules
from vla_inference.models.pi0_fast.policy import FastRaw, Pi0FastPolicy
from vla_inference.models.pi0_fast.prompt import TextTokenizer, decode_prefix, detokenize, tokenize_prompt

FIXTURE = Path(__file__).parent / "fixtures" / "pi0_fast"


def seeded_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """The recording's rule: one numpy PCG64 stream over the sorted names; matrices N(0, 1/fan_in)
    (the LM head times 0.01), biases N(0, 0.01), other vectors 1 + N(0, 0.04)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        x = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) >= 2:
            x = x / np.float32(np.sqrt(np.prod(shape[1:])))
            if key.endswith("lm_head.weight"):
                x = x * np.float32(0.01)
        elif key.endswith("bias"):
            x = x * np.float32(0.1)
        else:
            x = np.float32(1.0) + np.float32(0.2) * x
        out[key] = x
    return out


def digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key], dtype=np.float32).tobytes())
    return h.hexdigest()


def _images(record: dict) -> np.ndarray:
    """The recorded frames (rows, cameras, 3, 224, 224) uint8: base_0_rgb, left_wrist_0_rgb."""
    rng = np.random.default_rng(record["image_seed"])
    return rng.integers(0, 256, size=(2, 2, 3, 224, 224), dtype=np.uint8)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    record = json.loads((FIXTURE / "record.json").read_text())
    path = Path(shutil.copytree(FIXTURE / "checkpoint", tmp_path_factory.mktemp("parity") / "checkpoint"))
    weights = seeded_weights({k: tuple(v[0]) for k, v in record["weights_layout"].items()}, record["seed"])
    rows = load_file(str(FIXTURE / "lm_head_rows.safetensors"))
    weights[ckpt.LM_HEAD_KEY][rows["ids"].numpy()] = rows["rows"].numpy()
    assert digest(weights) == record["weights_sha256"]  # bit for bit what LeRobot saved and ran
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(path / "model.safetensors"))
    return path, record, load_file(str(FIXTURE / "expected.safetensors"))


def test_matches_lerobot(recorded: tuple[Path, dict, dict[str, torch.Tensor]]) -> None:
    path, record, expected = recorded
    checkpoint = ckpt.load(path)
    assert checkpoint.config.vocab_size == 257152 and not checkpoint.config.tied_lm_head
    model = ckpt.load_model(checkpoint, "cpu", torch.float32)
    text = TextTokenizer.load(checkpoint.text_tokenizer)
    fast = FastTokenizer.load(checkpoint.action_tokenizer)

    # the prompt: state normalised with LeRobot's MEAN_STD in float32 (as its normalizer step does:
    # in float64 a value on a bin edge, 0.5 here, lands one bin off), 256 bins, BOS, right padding
    assert checkpoint.norms is not None
    state_norm, action_norm = checkpoint.norms
    state = state_norm.normalize(np.asarray(record["state"], np.float32))
    prompts = [
        tokenize_prompt(text, task, row, checkpoint.tokenizer_max_length)
        for task, row in zip(record["tasks"], state, strict=True)
    ]
    ids = np.stack([p[0] for p in prompts])
    mask = np.stack([p[1] for p in prompts])
    np.testing.assert_array_equal(ids, expected["prompt_ids"].numpy())
    np.testing.assert_array_equal(mask, expected["prompt_mask"].numpy())

    # LeRobot's images: uint8 / 255 in [0, 1], then * 2 - 1
    images = torch.from_numpy(_images(record)).float() / 255.0
    tokens, token_mask = decode_prefix(ids, mask, text.bos_id)
    batch = Pi0FastBatch(
        images * 2.0 - 1.0,
        torch.ones(2, 2, dtype=torch.bool),
        torch.from_numpy(tokens),
        torch.from_numpy(token_mask),
        torch.zeros(2, dtype=torch.long),
    )
    out = model.generate(batch, Rules(text.token_id("|"), text.pad_id), checkpoint.max_decoding_steps)
    lengths = expected["lengths"].tolist()
    assert out.lengths.tolist() == lengths and lengths[0] != lengths[1] and bool(out.stopped.all())
    for row, n in enumerate(lengths):
        assert out.tokens[row, :n].tolist() == expected["generated"][row, :n].tolist()
        torch.testing.assert_close(out.probs[row, :n], expected["probs"][row, :n], atol=1e-5, rtol=1e-5)

    for row, n in enumerate(lengths):
        result = detokenize(
            out.tokens[row, :n].numpy(),
            out.probs[row, :n].numpy(),
            text,
            fast,
            checkpoint.n_action_steps,
            checkpoint.action_dim,
            checkpoint.fast_skip_tokens,
        )
        np.testing.assert_allclose(result.actions, expected["actions"][row].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(  # LeRobot's MEAN_STD inverse, float32
            action_norm.unnormalize(result.actions),
            expected["actions_unnormalized"][row].numpy(),
            atol=1e-5,
            rtol=0,
        )
        assert 0 < result.confidence <= 1
    assert not (checkpoint.action_tokenizer / "EXECUTED_REMOTE_CODE").exists()


def test_the_policy_matches_lerobot(recorded: tuple[Path, dict, dict[str, torch.Tensor]]) -> None:
    """Observations as a robot sends them (uint8 frames under the server's camera names, raw joints,
    the tasks) through prepare -> forward -> finish: LeRobot's prompt ids, greedy tokens and actions,
    for the batch of two and for each row alone."""
    path, record, expected = recorded
    policy = Pi0FastPolicy(Settings(model_path=str(path), chunk_size=50))
    policy.load(str(path), "cpu")
    assert policy.model_info.family == "pi0_fast" and policy.model_info.chunk_size == 10
    frames = _images(record).transpose(0, 1, 3, 4, 2)  # (rows, cameras, H, W, 3)
    observations = [
        Observation(
            {"base": frames[row, 0], "left_wrist": frames[row, 1]},
            np.asarray(record["state"][row], np.float32),
            task,
            seed=row,
        )
        for row, task in enumerate(record["tasks"])
    ]
    samples = [policy.prepare(o) for o in observations]
    for row, sample in enumerate(samples):
        np.testing.assert_array_equal(sample.inputs.tokens[:-1], expected["prompt_ids"][row].numpy())
    lengths = expected["lengths"].tolist()
    for raws in (policy.forward(samples), [policy.forward([s])[0] for s in samples]):
        for row, (raw, sample) in enumerate(zip(raws, samples, strict=True)):
            assert isinstance(raw, FastRaw)
            n = lengths[row]
            assert raw.tokens.tolist() == expected["generated"][row, :n].tolist()
            np.testing.assert_allclose(raw.actions, expected["actions"][row].numpy(), atol=1e-5, rtol=0)
            prediction = policy.finish(raw, sample)
            np.testing.assert_allclose(
                prediction.actions, expected["actions_unnormalized"][row].numpy(), atol=1e-5, rtol=0
            )
            # the mean probability of the FAST tokens: after "Action", ":", "▁", before "|"
            fast_probs = expected["probs"][row, 3 : n - 1].double()
            assert prediction.confidence == pytest.approx(float(fast_probs.mean()), abs=1e-5)
