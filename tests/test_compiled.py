"""VLA_COMPILE: the static-shape paths (models/common/static.py) on the CPU, tiny models.

For pi0 / pi0.5, GR00T and OpenVLA:
- the static path (batch buckets, padded prefix, persistent caches) gives the eager answers, run
  eagerly (no compiler: the padding and bucketing logic) and compiled;
- torch.compile(fullgraph=True) captures each piece without a graph break (torch._dynamo.explain
  counts none; fullgraph would raise on one);
- a second call of a bucket does not recompile (torch.compiler.set_stance("fail_on_recompile")
  raises on a recompile; dynamo's graph counter stays), and a batch of 3 runs in the bucket of 4;
- the policies behind VLA_COMPILE answer as the eager policies, guided real-time chunking and
  over-long prompts falling back to eager; the pi0 server serves with VLA_COMPILE=1.

Compiles use the "aot_eager" backend (the same dynamo capture and AOT graph as inductor, no code
generation; policies and servers get it as VLA_COMPILE_BACKEND, compile_backend in their settings):
CPU inductor compiles take minutes on a small machine. One test compiles the
smallest pi0 with inductor, the serving backend. Tolerances: float32 on the CPU, where the
padded prefix changes only the summation order (observed ~1e-6 after 3-10 Euler steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import RunningServer
from tests.helpers.groot_checkpoints import write_tiny_groot_checkpoint
from tests.helpers.openvla_checkpoints import write_tiny_openvla_checkpoint
from tests.helpers.pi0_checkpoints import write_tiny_openpi_checkpoint
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.client import make_observation
from vla_inference.config import Settings
from vla_inference.models import rtc
from vla_inference.models.base import Observation
from vla_inference.models.common import flow, static
from vla_inference.models.common.init import init_random_weights
from vla_inference.models.groot.model import GR00TN15, GrootBatch, GrootConfig
from vla_inference.models.groot.policy import GrootPolicy
from vla_inference.models.groot.static import GrootStatic
from vla_inference.models.openvla.model import STATIC_PROMPT_TOKENS, DecodeState, OpenVLA, OpenVLAConfig
from vla_inference.models.openvla.policy import OpenVLAPolicy
from vla_inference.models.openvla.static import OpenVLAStatic
from vla_inference.models.pi0.model import SIZES, Pi0Batch, Pi0Model, build
from vla_inference.models.pi0.policy import Pi0Policy
from vla_inference.models.pi0.static import Pi0Static

ATOL = 2e-5
BF16_ATOL = 0.05  # bf16 keeps ~3 significant digits; actions are O(1)
BACKEND = "aot_eager"

Rows = TypeVar("Rows", Pi0Batch, GrootBatch)  # a sampler's batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Each test starts with no compiled code (so the recompile limit is never reached across
    tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _rows(batch: Rows, n: int) -> Rows:
    """The first n rows of a sampler's batch (a named tuple of tensors, rows first)."""
    return type(batch)(*(t[:n] for t in batch))


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0)


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


# ---- buckets -----------------------------------------------------------------------------------


def test_buckets_pieces_and_padding() -> None:
    assert [static.bucket_for(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert static.pieces(3) == [(0, 3, 4)]
    assert static.pieces(11) == [(0, 8, 8), (8, 11, 4)]
    assert static.buckets_up_to(1) == (1,) and static.buckets_up_to(3) == (1, 2, 4)
    assert static.buckets_up_to(64) == (1, 2, 4, 8)
    rows = torch.arange(6).view(3, 2)
    assert static.pad_rows(rows, 4).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5]]
    assert static.pad_columns(rows, 4, -1).tolist() == [[0, 1, -1, -1], [2, 3, -1, -1], [4, 5, -1, -1]]
    with pytest.raises(ValueError, match="largest bucket"):
        static.bucket_for(9)


# ---- pi0 / pi0.5 -------------------------------------------------------------------------------


def _pi0(cfg_name: str, batch: int, seed: int = 0) -> tuple[Pi0Model, Pi0Batch, torch.Tensor]:
    cfg = SIZES[cfg_name]
    model = build(cfg).eval()
    init_random_weights(model, seed)
    g = torch.Generator().manual_seed(seed)
    n, s = len(cfg.image_slots), cfg.vision.image_size
    images = torch.rand(batch, n, 3, s, s, generator=g) * 2 - 1
    image_masks = torch.tensor([[True, False, True], [True, True, False], [False, True, False]] * 4)[:batch]
    tokens = torch.randint(0, cfg.vocab_size, (batch, 12), generator=g)
    token_masks = torch.arange(12)[None] < torch.tensor([5, 12, 8, 3] * 3)[:batch, None]
    state = torch.randn(batch, cfg.action_dim, generator=g)
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=g)
    return model, Pi0Batch(images, image_masks, tokens, token_masks, state), noise


def _eager_pi0(
    model: Pi0Model, batch: Pi0Batch, noise: torch.Tensor, steps: int, chunking: rtc.Chunking | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model.sample(batch, noise, steps, chunking)


@pytest.mark.parametrize("batch", [3, 9])
def test_pi0_static_shapes_equal_eager_without_a_compiler(batch: int) -> None:
    """Buckets (3 -> 4; 9 -> 8 + 1), the prompt padded to max_token_len and every slot in the
    prefix change no valid value: the static path run eagerly equals Pi0Model.sample."""
    model, inputs, noise = _pi0("pi0_dummy", batch)
    runner = Pi0Static(model, compile=False)
    assert runner.prefix_len == 3 * 64 + 48
    expected, expected_v = _eager_pi0(model, inputs, noise, steps=3)
    actions, velocity = runner.sample(inputs, noise, 3)
    assert actions.shape == expected.shape
    np.testing.assert_allclose(actions, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(velocity, expected_v, atol=ATOL, rtol=0)
    assert sorted(runner._caches) == sorted({b for _, _, b in static.pieces(batch)})


@pytest.mark.parametrize("cfg_name", ["pi0_dummy", "pi05_dummy"])
def test_pi0_compiled_equals_eager_and_does_not_recompile(cfg_name: str) -> None:
    model, inputs, noise = _pi0(cfg_name, 4)
    runner = Pi0Static(model, backend=BACKEND)
    three, noise3 = _rows(inputs, 3), noise[:3]
    expected, expected_v = _eager_pi0(model, three, noise3, steps=3)

    before = _graphs()
    actions, velocity = runner.sample(three, noise3, 3)  # bucket 4, one padding row
    assert _graphs() - before == 2  # prefix + step: the 3 steps replay one graph
    np.testing.assert_allclose(actions, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(velocity, expected_v, atol=ATOL, rtol=0)
    assert not torch.allclose(actions[0], actions[1])

    compiled = _graphs()
    with torch.compiler.set_stance("fail_on_recompile"):
        again, _ = runner.sample(three, noise3, 3)
        four, _ = runner.sample(inputs, noise, 3)  # the same bucket, other rows
    assert _graphs() == compiled
    torch.testing.assert_close(again, actions, rtol=0, atol=0)
    np.testing.assert_allclose(four, _eager_pi0(model, inputs, noise, steps=3)[0], atol=ATOL, rtol=0)

    with pytest.raises(Exception, match="recompil"), torch.compiler.set_stance("fail_on_recompile"):
        runner.sample(_rows(inputs, 1), noise[:1], 3)  # bucket 1: a new graph


def _mixed_prefix(previous: torch.Tensor) -> rtc.Chunking:
    """Row 0 hard (d = 4), row 1 none, row 2 guided with the velocity held constant (d = 2)."""
    _, H, A = previous.shape
    prefixes = [
        rtc.build_prefix(previous[0].numpy(), 0, 4, H, "hard", 0.0),
        None,
        rtc.build_prefix(previous[2].numpy(), 0, 2, H, "guided", 5.0, jacobian=False),
    ]
    batch = rtc.Chunking.stack(prefixes, H, A, torch.device("cpu"))
    assert batch is not None and batch.hard and batch.guided and not batch.needs_backward
    return batch


def test_pi0_chunking_is_compiled_guidance_with_the_jacobian_is_refused() -> None:
    """Hard and constant-velocity guided rows share the plain rows' graphs and equal eager."""
    model, inputs, noise = _pi0("pi0_dummy", 3)
    cfg = model.cfg
    previous = torch.randn(3, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(5))
    runner = Pi0Static(model, backend=BACKEND)
    plain, _ = runner.sample(inputs, noise, 3)
    compiled = _graphs()
    mixed = _mixed_prefix(previous)
    with torch.compiler.set_stance("fail_on_recompile"):
        actions, _ = runner.sample(inputs, noise, 3, mixed)
    assert _graphs() == compiled
    np.testing.assert_allclose(actions, _eager_pi0(model, inputs, noise, 3, mixed)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(actions[0, :4], previous[0, :4])  # the committed rows, exactly
    torch.testing.assert_close(actions[1], plain[1])
    pulled = (actions[2, :2] - previous[2, :2]).abs().mean()
    assert pulled < 0.5 * (plain[2, :2] - previous[2, :2]).abs().mean()  # the guidance ran

    guided = rtc.Chunking.stack(
        [rtc.build_prefix(previous[0].numpy(), 0, 3, cfg.action_horizon, "guided", 5.0)],
        cfg.action_horizon,
        cfg.action_dim,
        torch.device("cpu"),
    )
    with pytest.raises(ValueError, match="Jacobian"):
        Pi0Static(model, compile=False).sample(_rows(inputs, 1), noise[:1], 3, guided)


def _explain(fn: Callable[..., Any], *args: Any) -> Any:
    with torch.inference_mode():
        return torch._dynamo.explain(fn)(*args)


def test_every_compiled_piece_is_one_graph() -> None:
    """torch._dynamo.explain over each family's compiled functions: one graph, no break."""
    pi0, inputs, noise = _pi0("pi05_dummy", 2)
    runner = Pi0Static(pi0, compile=False)
    cache = runner.cache(2)
    length = pi0.cfg.max_token_len
    padded = inputs._replace(
        tokens=static.pad_columns(inputs.tokens, length),
        token_masks=static.pad_columns(inputs.token_masks, length, False),
    )
    assert runner.slots == (0, 1, 2)
    explained = [_explain(pi0.prefix, padded, cache, runner.slots)]
    with torch.inference_mode():
        context = pi0.prefix(padded, cache, runner.slots)
    time = flow.StepTime(torch.zeros(2), torch.ones(2))  # tau, openpi's t = 1 - tau
    chunking = rtc.Chunking.zeros(noise)
    explained.append(_explain(pi0.euler_step, cache, context, padded, noise, time, noise, chunking, 0.1))

    groot, gbatch, gnoise = _groot(2)
    grunner = GrootStatic(groot, 64, 2, compile=False)
    kv = grunner.cache(2)
    assert gbatch.pixels.shape[1] == grunner.images_per_row  # row 0: one view and one zero image
    gpadded = gbatch._replace(
        input_ids=static.pad_columns(gbatch.input_ids, 64),
        attention_mask=static.pad_columns(gbatch.attention_mask, 64, False),
    )
    explained.append(_explain(groot.prefix, gpadded, kv))
    with torch.inference_mode():
        state_features = groot.prefix(gpadded, kv)
    gchunking = rtc.Chunking.zeros(gnoise)
    gtime = flow.StepTime(torch.zeros(2), torch.zeros(2, dtype=torch.long))  # tau, the DiT's bucket
    explained.append(
        _explain(groot.euler_step, kv, state_features, gpadded, gnoise, gtime, gnoise, gchunking, 0.25)
    )

    vla, (vpixels, _) = _openvla(2)
    vrunner = OpenVLAStatic(vla, 24, 7, compile=False)
    vcache = vrunner.cache(2)
    prompts = [torch.tensor([1, 5, 6]), torch.tensor([1, 7])]
    vbatch = vla.layout(vpixels, prompts, width=23)
    explained.append(_explain(vla.prefill, vbatch, vcache))
    state = DecodeState(
        torch.tensor([7, 9]),
        torch.ones(2),
        torch.ones(2, vrunner.length, dtype=torch.bool),
        torch.tensor([30, 40]),
    )
    explained.append(_explain(vla.decode_step, vcache, state, torch.tensor([vrunner.start])))
    for out in explained:
        assert out.graph_break_count == 0 and out.graph_count == 1, out.break_reasons


@pytest.mark.slow
def test_inductor_compiles_the_smallest_pi0() -> None:
    """The serving backend (inductor; no CUDA graphs on the CPU) on pi0_demo, bucket 1."""
    model, inputs, noise = _pi0("pi0_demo", 1)
    runner = Pi0Static(model, backend="inductor")
    expected, _ = _eager_pi0(model, inputs, noise, steps=2)
    actions, _ = runner.sample(inputs, noise, 2)
    np.testing.assert_allclose(actions, expected, atol=1e-4, rtol=0)
    with torch.compiler.set_stance("fail_on_recompile"):
        again, _ = runner.sample(inputs, noise, 2)
    torch.testing.assert_close(again, actions, rtol=0, atol=0)


# ---- GR00T -------------------------------------------------------------------------------------


def _groot(batch: int, seed: int = 0) -> tuple[GR00TN15, GrootBatch, torch.Tensor]:
    """Rows of 1, 2, 1, 2 camera views (pixels (B, 2, ...), zero images after a row's own) and
    prompts of 30, 44, 37, 40 tokens (right-padded), each with its views' image ids."""
    cfg = GrootConfig.named("tiny")
    eagle, size = cfg.backbone, cfg.image_size
    model = GR00TN15(cfg).eval()
    init_random_weights(model, seed)
    g = torch.Generator().manual_seed(seed)
    views, lengths = [1, 2, 1, 2][:batch], [30, 44, 37, 40][:batch]
    ids = torch.zeros(batch, max(lengths), dtype=torch.long)
    mask = torch.zeros(batch, max(lengths), dtype=torch.bool)
    pixels = torch.zeros(batch, max(views), 3, size, size)
    for row, (v, n) in enumerate(zip(views, lengths, strict=True)):
        seq = torch.randint(0, eagle.vocab_size - 2, (n,), generator=g)
        seq[3 : 3 + v * eagle.num_image_tokens] = eagle.image_token_id
        ids[row, :n], mask[row, :n] = seq, True
        pixels[row, :v] = torch.rand(v, 3, size, size, generator=g) * 2 - 1
    state = torch.randn(batch, 1, cfg.max_state_dim, generator=g)
    emb = torch.tensor([0, 3, 1, 0][:batch])
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=g)
    return model, GrootBatch(pixels, ids, mask, state, emb), noise


def _eager_groot(
    model: GR00TN15, batch: GrootBatch, noise: torch.Tensor, chunking: rtc.Chunking | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model.sample(batch, noise, 4, chunking)


def test_groot_static_shapes_equal_eager_without_a_compiler() -> None:
    """The bucket (3 -> 4), the prompt padded to 64 tokens and the images to 3 per row (one more
    zero view than the batch has) change no valid value."""
    model, inputs, noise = _groot(3)
    expected, expected_v = _eager_groot(model, inputs, noise)
    runner = GrootStatic(model, 64, 3, compile=False)
    actions, velocity = runner.sample(inputs, noise, 4)
    np.testing.assert_allclose(actions, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(velocity, expected_v, atol=ATOL, rtol=0)
    assert sorted(runner._caches) == [4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groot_compiled_equals_eager_and_does_not_recompile(dtype: torch.dtype) -> None:
    """bf16 as on a GPU: the noise runs in bf16, and a real-time-chunking batch (hard and guided
    with the velocity held constant) reuses the graph."""
    model, inputs, noise = _groot(4)
    model.to(dtype)
    atol = ATOL if dtype == torch.float32 else BF16_ATOL
    three, noise3 = _rows(inputs, 3), noise[:3]
    cfg = model.cfg
    previous = torch.randn(3, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(1))
    hard = _mixed_prefix(previous[[1, 0, 2]])  # row 0 hard, row 2 guided
    runner = GrootStatic(model, 64, 2, backend=BACKEND)
    longer = three._replace(
        input_ids=static.pad_columns(three.input_ids, 65),
        attention_mask=static.pad_columns(three.attention_mask, 65, False),
    )
    more_views = three._replace(pixels=torch.cat([three.pixels, three.pixels[:, :1]], dim=1))
    assert runner.fits(three) and not runner.fits(longer) and not runner.fits(more_views)

    before = _graphs()
    actions, velocity = runner.sample(three, noise3, 4)  # bucket 4: one padding row, 6 of 8 images
    assert _graphs() - before == 2
    expected, expected_v = _eager_groot(model, three, noise3)
    _close(actions, expected, atol)
    _close(velocity, expected_v, atol)

    compiled = _graphs()
    with torch.compiler.set_stance("fail_on_recompile"):
        with_hard, _ = runner.sample(three, noise3, 4, hard)
        four, _ = runner.sample(inputs, noise, 4)
    assert _graphs() == compiled
    _close(with_hard, _eager_groot(model, three, noise3, hard)[0], atol)
    torch.testing.assert_close(with_hard[0, :4], previous[1, :4].to(dtype))
    _close(four, _eager_groot(model, inputs, noise)[0], atol)


# ---- OpenVLA -----------------------------------------------------------------------------------


def _openvla(batch: int, seed: int = 0) -> tuple[OpenVLA, tuple[torch.Tensor, list[torch.Tensor]]]:
    cfg = OpenVLAConfig.named("tiny")
    model = OpenVLA(cfg).eval()
    init_random_weights(model, seed)
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for n in [12, 20, 9, 16][:batch]:
        prompt = torch.randint(3, 32000, (n,), generator=g)
        prompt[0] = 1  # BOS
        prompts.append(prompt)
    pixels = torch.randn(batch, 6, cfg.dino.image_size, cfg.dino.image_size, generator=g)
    return model, (pixels, prompts)


def test_openvla_static_decoder_equals_generate() -> None:
    model, (pixels, prompts) = _openvla(4)
    eager = model.generate(pixels[:3], prompts[:3], 7)
    plain = OpenVLAStatic(model, 24, 7, compile=False).generate(pixels[:3], prompts[:3], 7)
    torch.testing.assert_close(plain.tokens, eager.tokens, rtol=0, atol=0)
    torch.testing.assert_close(plain.probs, eager.probs, rtol=1e-4, atol=0)

    runner = OpenVLAStatic(model, 24, 7, backend=BACKEND)
    assert runner.length == 16 + 24 + 7 and not runner.fits(25, 7) and not runner.fits(24, 8)
    before = _graphs()
    out = runner.generate(pixels[:3], prompts[:3], 7)  # bucket 4
    assert _graphs() - before == 2  # prefill + decode: the 6 decode steps replay one graph
    torch.testing.assert_close(out.tokens, eager.tokens, rtol=0, atol=0)
    torch.testing.assert_close(out.probs, eager.probs, rtol=1e-4, atol=0)
    assert len({tuple(row) for row in out.tokens.tolist()}) == 3

    with torch.compiler.set_stance("fail_on_recompile"):
        four = runner.generate(pixels, prompts, 7)
        fewer = runner.generate(pixels[:3], prompts[:3], 4)  # 4 action tokens: 3 decode steps
    torch.testing.assert_close(four.tokens, model.generate(pixels, prompts, 7).tokens, rtol=0, atol=0)
    torch.testing.assert_close(fewer.tokens, eager.tokens[:, :4], rtol=0, atol=0)


# ---- the policies ------------------------------------------------------------------------------


def _pi0_observations(n: int) -> list[Observation]:
    rng = np.random.default_rng(0)
    cams = [{"base": (224, 224)}, {"base": (480, 640), "left_wrist": (120, 160)}, {"right_wrist": (64, 64)}]
    return [
        Observation(
            images={k: rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for k, shape in cams[i % 3].items()},
            joint_positions=rng.normal(size=7).astype(np.float32),
            instruction=["pick up the cup", "open the drawer", ""][i % 3],
            seed=20 + i,
        )
        for i in range(n)
    ]


def test_pi0_policy_with_compile(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tiny_openpi_checkpoint(tmp_path / "ckpt", "pi0", seed=1)
    eager, compiled = (
        Pi0Policy(Settings(chunk_size=50)),
        Pi0Policy(Settings(chunk_size=50, compile=True, batch_size=2, compile_backend=BACKEND)),
    )
    eager.load(str(path), "cpu")
    compiled.load(str(path), "cpu")
    assert isinstance(compiled.static, Pi0Static) and eager.static is None
    samples = [compiled.prepare(o) for o in _pi0_observations(2)]
    with caplog.at_level(logging.INFO, logger="vla_inference.models.common.static"):
        compiled.warm_up(2)  # what the engine calls before SERVING
    assert "compiled for batch buckets 1, 2" in caplog.text
    with torch.compiler.set_stance("fail_on_recompile"):  # warmed up: nothing left to compile
        got = compiled.forward(samples)
    for raw, want in zip(got, eager.forward(samples), strict=True):
        np.testing.assert_allclose(raw.actions, want.actions, atol=ATOL, rtol=0)
        assert raw.confidence == pytest.approx(want.confidence, abs=1e-6)

    # guided real-time chunking: eager on both (the same computation, the same numbers)
    cfg = compiled.config
    previous = np.random.default_rng(3).normal(size=(cfg.action_horizon, cfg.action_dim)).astype(np.float32)
    samples[0].rtc = rtc.build_prefix(previous, 0, 3, cfg.action_horizon, "guided", 5.0)
    with torch.compiler.set_stance("fail_on_recompile"):
        guided = compiled.forward(samples)
        plain = compiled.forward(samples[1:])
    np.testing.assert_array_equal(guided[0].actions, eager.forward(samples)[0].actions)
    np.testing.assert_allclose(plain[0].actions, got[1].actions, atol=ATOL, rtol=0)

    # guided with the velocity held constant: through the compiled graphs, no recompile
    samples[0].rtc = rtc.build_prefix(previous, 0, 3, cfg.action_horizon, "guided", 5.0, jacobian=False)
    with torch.compiler.set_stance("fail_on_recompile"):
        constant = compiled.forward(samples)
    np.testing.assert_allclose(constant[0].actions, eager.forward(samples)[0].actions, atol=ATOL, rtol=0)
    assert np.abs(constant[0].actions - guided[0].actions).max() > 1e-4  # not the Jacobian variant


def test_pi0_server_with_compile(
    server_factory: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    """VLA_COMPILE=1 through the real server (random demo model): the warm-up compiles the
    buckets, Predict answers what the eager server answers, also for a guided real-time-chunking
    request with the velocity held constant (which runs compiled)."""
    answers, guided = [], []
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    previous = np.random.default_rng(1).normal(size=(10, 7)).astype(np.float32)
    observation = make_observation(image, [0.1] * 7, "pick up the cup", seed=7)
    observation.rtc.CopyFrom(
        pb.RealTimeChunking(method=pb.RTC_METHOD_GUIDED, executed_actions=2, delay_actions=3)
    )
    observation.rtc.previous_actions.extend(pb.Action(joint_commands=row.tolist()) for row in previous)
    for compile_model in (False, True):
        with caplog.at_level(logging.INFO, logger="vla_inference.models.common.static"):
            running = server_factory(
                compile=compile_model,
                compile_backend=BACKEND,
                batch_size=2,
                warmup_batches=1,
                rtc_guidance_jacobian=False,
            )
        assert ("compiled for batch buckets 1, 2" in caplog.text) == compile_model
        with running.client() as client:
            chunk = client.predict(image, [0.1] * 7, "pick up the cup", seed=7)
            with torch.compiler.set_stance("fail_on_recompile" if compile_model else "default"):
                rtc_chunk = client.predict_observation(observation)
        assert rtc_chunk.rtc.method == pb.RTC_METHOD_GUIDED
        answers.append(np.array([a.joint_commands for a in chunk.actions]))
        guided.append(np.array([a.joint_commands for a in rtc_chunk.actions]))
        running.stop()
    np.testing.assert_allclose(answers[1], answers[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(guided[1], guided[0], atol=1e-4, rtol=0)
    assert np.abs(guided[0] - answers[0]).max() > 1e-3


def test_groot_policy_with_compile(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_tiny_groot_checkpoint(tmp_path / "groot", seed=1)
    eager, compiled = (
        GrootPolicy(Settings(model_type="groot")),
        GrootPolicy(Settings(model_type="groot", compile=True, batch_size=2, compile_backend=BACKEND)),
    )
    eager.load(str(path), "cpu")
    compiled.load(str(path), "cpu")
    rng = np.random.default_rng(0)

    def image() -> np.ndarray:
        return rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)

    observations = [
        Observation(
            {"base": image()}, np.linspace(0, 1, 6).astype(np.float32), "pick up the cube", "gr1", seed=1
        ),
        Observation(
            {"base": image(), "left_wrist": image()}, np.ones(6, np.float32), "wave", "new_embodiment", seed=2
        ),
    ]
    samples = [compiled.prepare(o) for o in observations]
    assert isinstance(compiled.static, GrootStatic) and compiled.static.images_per_row == 2
    assert eager.static is None
    with caplog.at_level(logging.INFO, logger="vla_inference.models.common.static"):
        compiled.warm_up(2)  # what the engine calls before SERVING
    assert "groot sampler compiled for batch buckets 1, 2" in caplog.text
    with torch.compiler.set_stance("fail_on_recompile"):  # warmed up: nothing left to compile
        got = compiled.forward(samples)
    for raw, want in zip(got, eager.forward(samples), strict=True):
        np.testing.assert_allclose(raw.actions, want.actions, atol=ATOL, rtol=0)
        assert raw.confidence == pytest.approx(want.confidence, abs=1e-6)

    long = Observation({"base": image()}, np.zeros(6, np.float32), "go " * 200, "gr1", seed=3)
    sample = compiled.prepare(long)
    assert not compiled.static.fits(compiled.collate([sample]))
    with torch.compiler.set_stance("fail_on_recompile"):  # eager: nothing to compile
        np.testing.assert_allclose(
            compiled.forward([sample])[0].actions, eager.forward([sample])[0].actions, atol=ATOL, rtol=0
        )


def test_openvla_policy_with_compile(tmp_path: Path) -> None:
    path = write_tiny_openvla_checkpoint(tmp_path / "openvla", seed=0)
    eager = OpenVLAPolicy(Settings(model_type="openvla"))
    compiled = OpenVLAPolicy(
        Settings(model_type="openvla", compile=True, batch_size=2, compile_backend=BACKEND)
    )
    eager.load(str(path), "cpu")
    compiled.load(str(path), "cpu")
    compiled.warm_up(2)
    rng = np.random.default_rng(0)
    observations = [
        Observation(
            {"base": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)}, np.zeros(0, np.float32), text
        )
        for text in ("pick up the red cup", "put the spoon in the drawer")
    ]
    samples = [compiled.prepare(o) for o in observations]
    with torch.compiler.set_stance("fail_on_recompile"):  # the warm-up compiled buckets 1 and 2
        got = compiled.forward(samples)
    for raw, expected in zip(got, eager.forward(samples), strict=True):
        np.testing.assert_array_equal(raw.actions, expected.actions)  # the same greedy tokens
        assert raw.confidence == pytest.approx(expected.confidence, rel=1e-4)

    long = compiled.prepare(
        Observation(observations[0].images, np.zeros(0, np.float32), "go to the left " * 30)
    )
    assert long.inputs.input_ids.numel() > STATIC_PROMPT_TOKENS  # decoded eagerly
    with torch.compiler.set_stance("fail_on_recompile"):
        np.testing.assert_array_equal(compiled.forward([long])[0].actions, eager.forward([long])[0].actions)
