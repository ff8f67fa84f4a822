"""pi0-FAST served: Pi0FastPolicy's steps, batched decoding with per-row stops, the errors of a
decode without an action, VLA_COMPILE against eager, and a real server serving a tiny LeRobot
checkpoint (VLA_MODEL_TYPE left unset: the checkpoint's "type": "pi0_fast" picks the policy).

The tiny checkpoint is random except for the LM-head rows of the answers' ids, taught by least
squares so that greedy decoding writes a chosen answer for each of four observations
(tests/helpers/pi0_fast_checkpoints.py `teach_answers`): two valid chunks of different token counts,
one answer without the "Action:" start, one with too few DCT coefficients.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from tests.conftest import RunningServer
from tests.helpers import pi0_fast_checkpoints as helpers
from vla_inference.client import AsyncVLAClient, VLAError
from vla_inference.config import Settings
from vla_inference.models import registry
from vla_inference.models.base import ModelLoadError, NoValidAction, Observation
from vla_inference.models.pi0_fast.fast_tokenizer import FastTokenizer
from vla_inference.models.pi0_fast.policy import CONFIDENCE_DEFINITION, FastRaw, Pi0FastPolicy, Undecodable
from vla_inference.models.pi0_fast.prompt import TextTokenizer, decode_prefix, tokenize_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKEND = "aot_eager"


@dataclass(frozen=True)
class Case:
    observation: Observation
    answer: list[int]
    chunk: np.ndarray | None  # the chunk a valid answer encodes (None: no action)


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Case]]:
    path = helpers.write_tiny_checkpoint(tmp_path_factory.mktemp("pi0fast") / "ckpt", seed=3)
    text = TextTokenizer.load(path / "tokenizer" / "tokenizer.json")
    fast = FastTokenizer.load(path / "action_tokenizer")
    rng = np.random.default_rng(21)

    def frame(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def state() -> np.ndarray:
        return rng.uniform(-1, 1, 5).astype(np.float32)

    a, b, c = (helpers.synthetic_chunks(1, seed=s)[0] for s in (31, 32, 33))
    cases = {
        "a": Case(Observation({"base": frame(96, 128)}, state(), "pick up the red block"), [], a),
        "b": Case(
            Observation({"base": frame(64, 64), "wrist": frame(48, 64)}, state(), "open the drawer"), [], b
        ),
        "no_start": Case(Observation({"base": frame(80, 80)}, state(), "place it in the bin"), [], None),
        "too_few": Case(Observation({"left_wrist": frame(64, 96)}, state(), "open the drawer"), [], None),
    }
    answers = {
        "a": helpers.answer_ids(text, fast, a),
        "b": helpers.answer_ids(text, fast, b),
        "no_start": helpers.answer_ids(text, fast, c, start=False),
        "too_few": helpers.answer_ids(text, fast, c, keep=2),
    }
    cases = {k: Case(v.observation, answers[k], v.chunk) for k, v in cases.items()}
    helpers.teach_answers(path, [(case.observation, case.answer) for case in cases.values()])
    return path, cases


def _policy(path: Path, **settings: object) -> Pi0FastPolicy:
    policy = Pi0FastPolicy(Settings(model_path=str(path), **settings))  # type: ignore[arg-type]
    policy.load(str(path), "cpu")
    return policy


@pytest.fixture(scope="module")
def policy(taught: tuple[Path, dict[str, Case]]) -> Pi0FastPolicy:
    return _policy(taught[0])


def _fast_decoded(policy: Pi0FastPolicy, chunk: np.ndarray) -> np.ndarray:
    """What the FAST tokens of `chunk` decode to (its DCT coefficients rounded to 1 / scale)."""
    fast = policy.loaded.fast
    return fast.decode(fast.encode(chunk), *chunk.shape).actions


# ---- the policy's steps --------------------------------------------------------------------------


def test_the_checkpoint_picks_the_pi0_fast_variant_of_the_pi0_family(
    taught: tuple[Path, dict[str, Case]],
) -> None:
    path = str(taught[0])
    assert registry.resolve(Settings(model_path=path)) == ("pi0", Pi0FastPolicy)
    assert registry.resolve(Settings(model_type="pi0", model_path=path)) == ("pi0", Pi0FastPolicy)
    with pytest.raises(ModelLoadError, match=r"'pi0_fast' checkpoint, served by VLA_MODEL_TYPE=pi0"):
        registry.resolve(Settings(model_type="openvla", model_path=path))


def test_model_info_and_prepare(policy: Pi0FastPolicy, taught: tuple[Path, dict[str, Case]]) -> None:
    info = policy.model_info
    assert (info.family, info.action_dim, info.horizon, info.chunk_size) == ("pi0_fast", 3, 10, 10)
    assert info.camera_names == ("base", "left_wrist") and info.state_dims == {"default": 5}
    assert info.rtc_methods == () and "Real-time chunking does not apply" in info.description
    assert info.confidence_definition == CONFIDENCE_DEFINITION and "greedy" in info.description

    case = taught[1]["b"]
    sample = policy.prepare(case.observation)
    inputs = sample.inputs
    assert inputs.image_masks.tolist() == [True, True] and inputs.images.shape == (2, 3, 224, 224)
    assert float(inputs.images.min()) >= -1 and float(inputs.images.max()) <= 1
    # LeRobot's prompt: the state normalised in float32 with the checkpoint's MEAN_STD, 48 tokens
    # padded, then the decode-time BOS
    stats = helpers.tiny_stats(5, 3)["observation.state"]
    mean, std = (np.asarray(stats[k], np.float32) for k in ("mean", "std"))
    state = (case.observation.joint_positions - mean) / (std + np.float32(1e-8))
    text = policy.loaded.text
    ids, mask = decode_prefix(*tokenize_prompt(text, "open the drawer", state, 48), text.bos_id)
    np.testing.assert_array_equal(inputs.tokens, ids)
    np.testing.assert_array_equal(inputs.token_mask, mask)
    assert (
        inputs.tokens.shape == (49,)
        and inputs.tokens[-1] == text.bos_id
        and inputs.prompt_tokens == mask[:-1].sum()
    )
    one_camera = policy.prepare(taught[1]["too_few"].observation).inputs
    assert one_camera.image_masks.tolist() == [False, True] and not one_camera.images[0].any()


def test_a_decoded_chunk_in_robot_units(policy: Pi0FastPolicy, taught: tuple[Path, dict[str, Case]]) -> None:
    case = taught[1]["a"]
    assert case.chunk is not None
    raw = policy.forward([policy.prepare(case.observation)])[0]
    assert isinstance(raw, FastRaw)
    assert raw.tokens.tolist() == case.answer  # the taught answer, up to and including "|"
    expected = _fast_decoded(policy, case.chunk)
    np.testing.assert_allclose(raw.actions, expected, atol=1e-6)
    assert np.abs(raw.actions - case.chunk).max() < 0.1  # FAST's quantisation (scale 10)
    stats = helpers.tiny_stats(5, 3)["action"]
    prediction = policy.predict(case.observation)
    np.testing.assert_allclose(
        prediction.actions, expected * np.asarray(stats["std"]) + np.asarray(stats["mean"]), atol=1e-5
    )
    assert prediction.actions.shape == (10, 3) and 0.5 < prediction.confidence <= 1
    short = _policy(taught[0], chunk_size=4)
    assert short.predict(case.observation).actions.shape == (4, 3)  # min(VLA_CHUNK_SIZE, horizon)


def test_a_mixed_batch_equals_each_row_alone(
    policy: Pi0FastPolicy, taught: tuple[Path, dict[str, Case]]
) -> None:
    """Rows of different prompt lengths, cameras and answer lengths, valid and not, decode together,
    each stopping on its own; each row's answer is the one it gets alone."""
    cases = taught[1]
    order = ["a", "no_start", "b", "too_few"]
    samples = [policy.prepare(cases[k].observation) for k in order]
    batched = policy.forward(samples)
    alone = [policy.forward([s])[0] for s in samples]
    assert len(cases["a"].answer) != len(cases["b"].answer)  # the rows stop at different steps
    for name, together, single in zip(order, batched, alone, strict=True):
        assert type(together) is type(single)
        np.testing.assert_array_equal(together.tokens, single.tokens)
        assert together.tokens.tolist() == cases[name].answer
        if isinstance(together, FastRaw):
            np.testing.assert_allclose(together.actions, single.actions, atol=1e-6)
            assert together.confidence == pytest.approx(single.confidence, abs=1e-6)
        else:
            assert together.reason == single.reason


# ---- early stop and the budget ---------------------------------------------------------------------


def test_rows_stop_early_and_the_budget_bounds_a_decode(
    taught: tuple[Path, dict[str, Case]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, cases = taught
    policy = _policy(path)
    network = policy.loaded.network
    steps: list[int] = []
    original = network.decode_step

    def counted(*args: object) -> object:
        steps.append(1)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(network, "decode_step", counted)
    a, b = (policy.prepare(cases[k].observation) for k in ("a", "b"))
    policy.forward([a, b])
    # the first token comes from the prefill; the loop ends with the longer answer, not the budget 64
    assert len(steps) == max(len(cases["a"].answer), len(cases["b"].answer)) - 1 < 63

    n = len(cases["a"].answer)
    assert isinstance(_policy(path, fast_max_tokens=n).forward([a])[0], FastRaw)  # "|" is the n-th
    tight = _policy(path, fast_max_tokens=n - 1)
    assert tight.loaded.budget == n - 1
    raw = tight.forward([a])[0]
    assert isinstance(raw, Undecodable) and raw.tokens.tolist() == cases["a"].answer[: n - 1]
    with pytest.raises(NoValidAction, match=rf"no end-of-action '\|' within the budget of {n - 1} tokens"):
        tight.finish(raw, a)


# ---- a decode without an action ---------------------------------------------------------------------


def test_answers_without_an_action_are_clear_errors(
    policy: Pi0FastPolicy, taught: tuple[Path, dict[str, Case]]
) -> None:
    cases = taught[1]
    for name, message in (
        ("no_start", r"pi0-FAST wrote no action: the answer does not start with 'Action:'"),
        ("too_few", r"pi0-FAST wrote no action: the answer holds \d+ of the 30 DCT coefficients"),
    ):
        sample = policy.prepare(cases[name].observation)
        raw = policy.forward([sample])[0]
        assert isinstance(raw, Undecodable)
        with pytest.raises(NoValidAction, match=message + r".*greedy decoding: the same observation"):
            policy.finish(raw, sample)


# ---- VLA_COMPILE ---------------------------------------------------------------------------------------


def test_compiled_decoding_equals_eager(taught: tuple[Path, dict[str, Case]]) -> None:
    """The static runner (every slot, the whole 48-token prompt + BOS, budget 64, buckets 1-4)
    compiled with aot_eager answers as the eager decoder: the same tokens (valid or not), the
    actions and confidences; warm_up compiles prefill and step once per bucket, nothing later."""
    torch._dynamo.reset()
    path, cases = taught
    eager = _policy(path)
    compiled = _policy(path, compile=True, compile_backend=BACKEND, batch_size=4)
    assert compiled.static is not None and compiled.static.length == 2 * 64 + 49 + 63
    before = int(counters["stats"]["unique_graphs"])
    compiled.warm_up(4)
    assert int(counters["stats"]["unique_graphs"]) - before == 2 * 3  # prefill + step, buckets 1, 2, 4
    order = ["a", "no_start", "b"]
    samples = [compiled.prepare(cases[k].observation) for k in order]
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled.forward(samples)  # bucket 4
        pair = compiled.forward(samples[:2])  # bucket 2
    for together, expected in zip(
        [*got, *pair], eager.forward(samples) + eager.forward(samples[:2]), strict=True
    ):
        assert type(together) is type(expected)
        np.testing.assert_array_equal(together.tokens, expected.tokens)
        if isinstance(together, FastRaw):
            np.testing.assert_allclose(together.actions, expected.actions, atol=1e-6)
            assert together.confidence == pytest.approx(expected.confidence, abs=1e-5)
    torch._dynamo.reset()


def test_sampling_compiled_equals_eager_and_follows_the_seed(taught: tuple[Path, dict[str, Case]]) -> None:
    """VLA_FAST_TEMPERATURE: each row draws from its own seed, the same compiled and eager, alone
    and batched."""
    torch._dynamo.reset()
    path, cases = taught
    eager = _policy(path, fast_temperature=1.5, fast_max_tokens=8)
    compiled = _policy(
        path, fast_temperature=1.5, fast_max_tokens=8, compile=True, compile_backend=BACKEND, batch_size=2
    )
    compiled.warm_up(2)

    def sample(seed: int) -> object:
        observation = cases["a"].observation
        return eager.prepare(
            Observation(observation.images, observation.joint_positions, observation.instruction, seed=seed)
        )

    rows = [sample(1), sample(2)]
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled.forward(rows)
    expected = eager.forward(rows)
    for together, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(together.tokens, want.tokens)
    assert expected[0].tokens.tolist() != expected[1].tokens.tolist()  # two seeds, two draws
    np.testing.assert_array_equal(eager.forward([rows[1]])[0].tokens, expected[1].tokens)
    np.testing.assert_array_equal(eager.forward([sample(1)])[0].tokens, expected[0].tokens)
    torch._dynamo.reset()


# ---- a real server ---------------------------------------------------------------------------------------


def _png(frame: np.ndarray) -> bytes:
    """PNG bytes (decoded exactly by the server, unlike the client's JPEG for arrays)."""
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def served(server_factory, taught: tuple[Path, dict[str, Case]]) -> Iterator[RunningServer]:  # type: ignore[no-untyped-def]
    # VLA_MODEL_TYPE left unset: the registry reads the checkpoint's kind
    yield server_factory(model_path=str(taught[0]), batch_size=4, batch_timeout_ms=300.0, timeout_ms=60_000)


def test_a_server_serves_a_fleet(served: RunningServer, taught: tuple[Path, dict[str, Case]]) -> None:
    """Four robots at once: one batch; the two with an action get their chunks, the two without
    get INTERNAL naming why, and the batch was not run again for them."""
    cases = taught[1]
    model = served.server.model
    assert isinstance(model, Pi0FastPolicy)
    calls: list[int] = []
    forward = model.forward

    def counted(samples):  # type: ignore[no-untyped-def]
        calls.append(len(samples))
        return forward(samples)

    model.forward = counted  # type: ignore[method-assign]

    async def robot(client: AsyncVLAClient, name: str) -> object:
        observation = cases[name].observation
        images = {k: _png(v) for k, v in observation.images.items()}
        base = images.pop("base", None)
        try:
            return await client.predict(
                base, observation.joint_positions.tolist(), observation.instruction, cameras=images, seed=1
            )
        except VLAError as error:
            return error

    async def fleet() -> tuple[object, ...]:
        async with AsyncVLAClient(served.target, timeout=60) as client:
            info = await client.info()
            assert (info.model_family, info.action_dim, info.chunk_size) == ("pi0_fast", 3, 10)
            assert list(info.rtc_methods) == [] and list(info.camera_names) == ["base", "left_wrist"]
            return await asyncio.gather(*(robot(client, name) for name in ("a", "no_start", "b", "too_few")))

    a, no_start, b, too_few = served.call(fleet(), timeout=120)
    assert calls == [4]  # one batch, never re-run
    for reply, name in ((a, "a"), (b, "b")):
        chunk = cases[name].chunk
        assert chunk is not None and not isinstance(reply, VLAError), reply
        actions = np.array([x.joint_commands for x in reply.actions])  # type: ignore[attr-defined]
        stats = helpers.tiny_stats(5, 3)["action"]
        expected = _fast_decoded(model, chunk) * np.asarray(stats["std"]) + np.asarray(stats["mean"])
        np.testing.assert_allclose(actions, expected, atol=1e-5)
        assert reply.timing.batch_size == 4  # type: ignore[attr-defined]
    for reply, why in ((no_start, "does not start with 'Action:'"), (too_few, "of the 30 DCT coefficients")):
        assert isinstance(reply, VLAError) and reply.code == grpc.StatusCode.INTERNAL
        assert (
            reply.message.startswith("no valid action: pi0-FAST wrote no action: ") and why in reply.message
        )
