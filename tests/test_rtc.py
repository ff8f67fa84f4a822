"""Real-time chunking: the authors' numbers, one guided step against an independent VJP, batching,
and the server's stream memory, delays and refusals over a real channel."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from tests.helpers.pi0_checkpoints import write_tiny_openpi_checkpoint
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.client import VLAError, make_observation
from vla_inference.config import Settings
from vla_inference.models import rtc
from vla_inference.models.base import Observation
from vla_inference.models.common.init import init_random_weights
from vla_inference.models.pi0.model import SIZES, Pi0Batch, build
from vla_inference.models.pi0.policy import Pi0Policy

IMAGE = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the authors' values (rtc.md) -------------------------------------------------------------


def test_prefix_weights_match_the_reference_values() -> None:
    np.testing.assert_allclose(rtc.prefix_weights(2, 6, 10, "linear"), [1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0, 0])
    np.testing.assert_allclose(
        rtc.prefix_weights(2, 6, 10, "exp"), [1, 1, 0.5706, 0.2871, 0.1145, 0.0258, 0, 0, 0, 0], atol=5e-5
    )
    expected = [1, 1, 1, 1, 0.6766, 0.4335, 0.2563, 0.1335, 0.0550, 0.0128] + [0] * 40
    np.testing.assert_allclose(rtc.prefix_weights(4, 10, 50, "exp"), expected, atol=5e-5)
    np.testing.assert_array_equal(rtc.prefix_weights(3, 6, 8, "zeros"), [1, 1, 1, 0, 0, 0, 0, 0])
    clamped = rtc.prefix_weights(9, 6, 10)  # start is clamped to end
    np.testing.assert_allclose(clamped[:6], [1] * 6, rtol=0, atol=1e-12)
    assert clamped.max() <= 1.0  # clipped: never above 1, whatever SIMD kernel numpy picks


@pytest.mark.parametrize(
    ("steps", "beta", "expected"),
    [
        (10, 10.0, [10, 9.11, 4.25, 2.76, 2.17, 2.0, 2.17, 2.76, 4.25, 9.11]),
        (5, 5.0, [5, 4.25, 2.17, 2.17, 4.25]),
    ],
)
def test_guidance_weight_over_the_steps(steps: int, beta: float, expected: list[float]) -> None:
    tau = torch.arange(steps, dtype=torch.float64) / steps
    weights = rtc.guidance_weight(tau, torch.full((steps,), beta, dtype=torch.float64))
    np.testing.assert_allclose(weights.numpy(), expected, atol=5e-3)


def test_build_prefix_aligns_the_previous_chunk() -> None:
    previous = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    prefix = rtc.build_prefix(previous, executed=4, delay=2, horizon=8, method="guided", max_guidance=5.0)
    assert prefix.overlap == 6 and prefix.delay == 2
    np.testing.assert_array_equal(prefix.actions[:6], previous[4:10])
    assert not prefix.actions[6:].any()
    np.testing.assert_allclose(prefix.weights, rtc.prefix_weights(2, 6, 8))
    hard = rtc.build_prefix(previous, executed=4, delay=9, horizon=8, method="hard", max_guidance=5.0)
    assert hard.delay == 6 and hard.max_guidance == 0
    np.testing.assert_allclose(hard.weights, [1] * 6 + [0] * 2, rtol=0, atol=1e-12)


# ---- the sampler ------------------------------------------------------------------------------


def _tiny(seed: int = 0):  # type: ignore[no-untyped-def]
    cfg = SIZES["pi0_dummy"]
    model = build(cfg, dtype=torch.float64).eval()
    init_random_weights(model, seed)
    g = torch.Generator().manual_seed(seed)
    B, n, s = 2, len(cfg.image_slots), cfg.vision.image_size
    inputs = Pi0Batch(
        images=(torch.rand(B, n, 3, s, s, generator=g) * 2 - 1).double(),
        image_masks=torch.tensor([[True, False, False], [True, True, False]]),
        tokens=torch.randint(0, cfg.vocab_size, (B, 6), generator=g),
        token_masks=torch.ones(B, 6, dtype=torch.bool),
        state=torch.randn(B, cfg.action_dim, generator=g, dtype=torch.float64),
    )
    noise = torch.randn(B, cfg.action_horizon, cfg.action_dim, generator=g, dtype=torch.float64)
    previous = torch.randn(B, cfg.action_horizon, cfg.action_dim, generator=g, dtype=torch.float64)
    return cfg, model, inputs, noise, previous


def _guided_prefix(  # type: ignore[no-untyped-def]
    cfg, previous: torch.Tensor, delays: list[int], beta: float, jacobian: tuple[bool, ...] = (True, True)
) -> rtc.Chunking:
    H = cfg.action_horizon
    prefixes = [
        rtc.build_prefix(
            previous[i].numpy(),
            executed=0,
            delay=d,
            horizon=H,
            method="guided",
            max_guidance=beta,
            jacobian=jacobian[i],
        )
        for i, d in enumerate(delays)
    ]
    batch = rtc.Chunking.stack(prefixes, H, cfg.action_dim, torch.device("cpu"))
    assert batch is not None
    return batch.like(previous)


def test_guided_steps_equal_an_independent_vjp_in_float64() -> None:
    """Two Euler steps of the sampler against the formulas written out here: the velocity from the
    full recompute (no cache), the VJP from torch.autograd.functional.vjp, the weight from tau.

    Float64 weights; the model keeps its float32 norms, RoPE and time embedding (the reference's
    conventions), so the two paths agree to ~1e-6, far below what the guidance changes (~1e-1)."""
    cfg, model, inputs, noise, previous = _tiny()
    prefix = _guided_prefix(cfg, previous, [3, 5], beta=5.0)
    with torch.no_grad():
        ours, _ = model.sample(inputs, noise, 2, prefix)

    x, t, dt = noise.clone(), torch.ones(2, dtype=torch.float64), -0.5
    Y, W = prefix.actions, prefix.guide_weights[:, :, None]
    for _ in range(2):

        def estimate(x_in: torch.Tensor, t: torch.Tensor = t) -> torch.Tensor:  # A1 = x - t v (openpi time)
            return x_in - t[:, None, None] * model.velocity_full(inputs, x_in, t)

        _, g = torch.autograd.functional.vjp(estimate, x, v=((Y - estimate(x)) * W).detach())
        v = model.velocity_full(inputs, x, t).detach()
        tau = 1 - t
        c = torch.where(tau > 0, (1 - tau) / tau, torch.full_like(tau, math.inf))
        weight = torch.clamp(c * (tau**2 + (1 - tau) ** 2) / (1 - tau) ** 2, max=5.0)
        x = x + dt * (v - weight[:, None, None] * g)
        t = t + dt
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=0, check_dtype=False)  # the sampler's x is float32
    with torch.no_grad():
        plain, _ = model.sample(inputs, noise, 2)
    assert (ours - plain).abs().max() > 1e-2  # the guidance did something


def test_constant_velocity_guidance_is_the_weighted_error_without_a_backward_pass() -> None:
    """VLA_RTC_GUIDANCE_JACOBIAN=false (LeRobot's variant): v <- v + w (Y - A1) W, written out here;
    it runs under inference mode (no autograd at all), and a batch mixing it with the authors'
    variant gives each row the answer it gets alone."""
    cfg, model, inputs, noise, previous = _tiny(4)
    constant = _guided_prefix(cfg, previous, [3, 5], beta=5.0, jacobian=(False, False))
    assert constant.guided and not constant.needs_backward
    with torch.inference_mode():
        ours, _ = model.sample(inputs, noise, 2, constant)

    x, t, dt = noise.clone(), torch.ones(2, dtype=torch.float64), -0.5
    Y, W = constant.actions, constant.guide_weights[:, :, None]
    with torch.no_grad():
        for _ in range(2):
            v = model.velocity_full(inputs, x, t)  # openpi time: toward the noise
            err = (Y - (x - t[:, None, None] * v)) * W
            tau = 1 - t
            c = torch.where(tau > 0, (1 - tau) / tau, torch.full_like(tau, math.inf))
            weight = torch.clamp(c * (tau**2 + (1 - tau) ** 2) / (1 - tau) ** 2, max=5.0)
            x = x + dt * (v - weight[:, None, None] * err)
            t = t + dt
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=0, check_dtype=False)

    with torch.no_grad():
        authors, _ = model.sample(inputs, noise, 2, _guided_prefix(cfg, previous, [3, 5], 5.0))
        mixed, _ = model.sample(
            inputs,
            noise,
            2,
            _guided_prefix(cfg, previous, [3, 5], 5.0, jacobian=(False, True)),
        )
    assert (authors[0] - ours[0]).abs().max() > 1e-3  # the Jacobian matters on this network
    torch.testing.assert_close(mixed[0], ours[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(mixed[1], authors[1], atol=1e-9, rtol=0)


def test_zero_guidance_leaves_the_sampler_unchanged() -> None:
    cfg, model, inputs, noise, previous = _tiny(1)
    with torch.no_grad():
        plain, _ = model.sample(inputs, noise, 3)
        guided, _ = model.sample(inputs, noise, 3, _guided_prefix(cfg, previous, [2, 2], 0.0))
    torch.testing.assert_close(guided, plain, atol=1e-12, rtol=0)


def test_guidance_pulls_the_overlap_toward_the_previous_chunk() -> None:
    cfg, model, inputs, noise, previous = _tiny(2)
    prefix = _guided_prefix(cfg, previous, [4, 4], beta=5.0)
    with torch.no_grad():
        plain, _ = model.sample(inputs, noise, 10)
        guided, _ = model.sample(inputs, noise, 10, prefix)
    frozen = slice(0, 4)
    before = (plain[:, frozen] - previous[:, frozen]).abs().mean()
    after = (guided[:, frozen] - previous[:, frozen]).abs().mean()
    assert after < 0.5 * before


# ---- the policy: mixed batches ------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Pi0Policy:
    path = write_tiny_openpi_checkpoint(tmp_path_factory.mktemp("rtc") / "ckpt", seed=3)
    policy = Pi0Policy(Settings(chunk_size=50))
    policy.load(str(path), "cpu")
    return policy


def test_mixed_batch_rows_equal_their_single_row_answers(policy: Pi0Policy) -> None:
    H = policy.model_info.horizon
    rng = np.random.default_rng(5)
    previous = policy.normalize_actions(rng.normal(size=(H, 7)).astype(np.float32), "demo")
    specs = [("guided", 2, 0), ("hard", 3, 4), ("none", 0, 0), (None, 0, 0), ("guided", 6, 8)]
    samples = []
    for i, (method, delay, executed) in enumerate(specs):
        obs = Observation(
            images={"base": IMAGE},
            joint_positions=rng.normal(size=7).astype(np.float32),
            instruction="go",
            seed=i,
        )
        sample = policy.prepare(obs)
        if method is not None:
            sample.rtc = rtc.build_prefix(previous, executed, delay, H, method, 5.0)
        samples.append(sample)
    batched = policy.forward(samples)
    for sample, raw in zip(samples, batched, strict=True):
        alone = policy.forward([sample])[0]
        np.testing.assert_allclose(raw.actions, alone.actions, atol=2e-5, rtol=0)
    hard = batched[1].actions
    np.testing.assert_allclose(hard[:3], previous[4:7], atol=1e-6)  # hard rows keep d actions exactly


# ---- the server ---------------------------------------------------------------------------------


def _rtc(**fields) -> pb.RealTimeChunking:  # type: ignore[no-untyped-def]
    return pb.RealTimeChunking(**fields)


def _observation(request_id: str, seed: int, rtc_fields: pb.RealTimeChunking | None = None) -> pb.Observation:
    obs = make_observation(IMAGE, [0.1] * 7, "pick up the cup", request_id=request_id, seed=seed)
    if rtc_fields is not None:
        obs.rtc.CopyFrom(rtc_fields)
    return obs


def test_model_info_lists_the_methods(server_factory) -> None:  # type: ignore[no-untyped-def]
    running = server_factory(rtc_method="hard")
    with running.client() as client:
        info = client.info()
    assert list(info.rtc_methods) == ["none", "guided", "hard"] and info.rtc_default_method == "hard"


def test_stream_continues_the_chunk_it_sent(server_factory) -> None:  # type: ignore[no-untyped-def]
    running = server_factory(chunk_size=16)
    with running.client() as client:
        horizon = client.info().model_horizon
        hard = pb.RTC_METHOD_HARD
        with client.control() as session:
            first = session.act(_observation("a", 1))
            second = session.act(_observation("b", 2, _rtc(method=hard, executed_actions=3, delay_actions=4)))
            third = session.act(
                _observation("c", 3, _rtc(method=hard, executed_actions=2, previous_request_id="a"))
            )
    a = np.array([x.joint_commands for x in first.actions])
    b = np.array([x.joint_commands for x in second.actions])
    assert not first.HasField("rtc")
    assert (
        second.rtc.method == pb.RTC_METHOD_HARD
        and second.rtc.delay_actions == 4
        and not second.rtc.delay_estimated
    )
    assert second.rtc.overlap_actions == horizon - 3  # the server remembers the whole horizon
    np.testing.assert_allclose(b[:4], a[3:7], atol=1e-4)  # the 4 committed actions are kept exactly
    assert not np.allclose(b[4:8], a[7:11])
    # No delay given and no control rate to estimate it with: 0; "a" is still remembered.
    assert third.rtc.delay_estimated and third.rtc.delay_actions == 0
    assert third.rtc.method == pb.RTC_METHOD_HARD and third.rtc.overlap_actions == horizon - 2


def test_stream_estimates_the_delay_from_its_latency(server_factory) -> None:  # type: ignore[no-untyped-def]
    running = server_factory(chunk_size=16)
    with running.client() as client, client.control() as session:
        answers = [
            session.act(_observation("a", 1)),
            session.act(
                _observation(
                    "b", 2, _rtc(method=pb.RTC_METHOD_GUIDED, executed_actions=1, control_rate_hz=1000.0)
                )
            ),
        ]
    latency_ms = answers[0].timing.total_ms
    assert answers[1].rtc.delay_estimated and answers[1].rtc.method == pb.RTC_METHOD_GUIDED
    assert answers[1].rtc.delay_actions == min(math.ceil(latency_ms), answers[1].rtc.overlap_actions)


def test_predict_takes_the_previous_chunk_in_robot_units(server_factory) -> None:  # type: ignore[no-untyped-def]
    running = server_factory(chunk_size=16)
    previous = np.random.default_rng(1).normal(size=(10, 7)).astype(np.float32)
    with running.client() as client:
        obs = _observation("p", 4)
        obs.rtc.CopyFrom(_rtc(method=pb.RTC_METHOD_HARD, executed_actions=2, delay_actions=3))
        obs.rtc.previous_actions.extend(pb.Action(joint_commands=row.tolist()) for row in previous)
        chunk = client.predict_observation(obs)
    actions = np.array([x.joint_commands for x in chunk.actions])
    np.testing.assert_allclose(actions[:3], previous[2:5], atol=1e-4)
    assert chunk.rtc.overlap_actions == 8 and chunk.rtc.delay_actions == 3


def test_guided_rows_follow_the_jacobian_setting(server_factory) -> None:  # type: ignore[no-untyped-def]
    """The same guided Predict against servers with VLA_RTC_GUIDANCE_JACOBIAN true and false: both
    pull the first d actions toward the previous chunk, and the two variants answer differently."""
    previous = np.random.default_rng(2).normal(size=(10, 7)).astype(np.float32)
    obs = _observation("g", 5, _rtc(method=pb.RTC_METHOD_GUIDED, executed_actions=2, delay_actions=3))
    obs.rtc.previous_actions.extend(pb.Action(joint_commands=row.tolist()) for row in previous)
    plain = _observation("g", 5)
    answers = {}
    for jacobian in (True, False):
        running = server_factory(chunk_size=16, rtc_guidance_jacobian=jacobian)
        with running.client() as client:
            chunk = client.predict_observation(obs)
            alone = client.predict_observation(plain)
        assert chunk.rtc.method == pb.RTC_METHOD_GUIDED and chunk.rtc.delay_actions == 3
        actions = np.array([x.joint_commands for x in chunk.actions])
        unguided = np.array([x.joint_commands for x in alone.actions])
        target = previous[2:5]
        assert np.abs(actions[:3] - target).mean() < 0.5 * np.abs(unguided[:3] - target).mean()
        answers[jacobian] = actions
    assert np.abs(answers[True] - answers[False]).max() > 1e-4


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"control_rate_hz": float("nan")}, "rtc.control_rate_hz"),
        ({"max_guidance": -1.0}, "rtc.max_guidance"),
        ({"previous_actions": [pb.Action(joint_commands=[0.0] * 3)]}, "rtc.previous_actions[0]"),
        ({"method": 7}, "rtc.method"),
    ],
)
def test_bad_rtc_fields_are_invalid_argument(server_factory, fields, field_name) -> None:  # type: ignore[no-untyped-def]
    running = server_factory()
    obs = _observation("x", 1, _rtc(**fields))
    with running.client() as client, pytest.raises(VLAError) as err:
        client.predict_observation(obs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and field_name in err.value.message
    with running.client() as client:
        assert len(client.predict_observation(_observation("y", 1)).actions) > 0  # still serving


def test_unknown_previous_chunk_is_an_inline_stream_error(server_factory) -> None:  # type: ignore[no-untyped-def]
    running = server_factory()
    with running.client() as client, client.control() as session:
        session.act(_observation("a", 1))
        refused = session.act(_observation("b", 2, _rtc(executed_actions=1, previous_request_id="zz")))
        assert session.act(_observation("c", 3)).actions  # the session goes on
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "rtc.previous_request_id" in refused.error.message and "'zz'" in refused.error.message


def test_openvla_refuses_real_time_chunking(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.helpers.openvla_checkpoints import write_tiny_openvla_checkpoint

    path = write_tiny_openvla_checkpoint(tmp_path / "ovla")
    running = server_factory(model_type="openvla", model_path=str(path))
    with running.client() as client:
        info = client.info()
        assert list(info.rtc_methods) == [] and info.rtc_default_method == "none"
        dims = info.state_dims[info.default_embodiment]
        obs = make_observation(IMAGE, [0.0] * dims, "pick up the cup", seed=1)
        obs.rtc.CopyFrom(_rtc(method=pb.RTC_METHOD_GUIDED, executed_actions=1))
        with pytest.raises(VLAError) as err:
            client.predict_observation(obs)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "one action at a time" in err.value.message
        obs.rtc.method = pb.RTC_METHOD_UNSPECIFIED  # the server default does not apply to OpenVLA
        assert client.predict_observation(obs).rtc.method == pb.RTC_METHOD_NONE


def test_groot_mixed_batch_and_hard_prefix(tmp_path: Path) -> None:
    """GR00T (flow matching, tau = 0 noise -> 1 data) takes the same prefixes: batched rows equal
    their single answers, hard rows keep the previous chunk's committed actions in robot units."""
    from tests.helpers.groot_checkpoints import write_tiny_groot_checkpoint
    from vla_inference.models.groot.policy import GrootPolicy

    policy = GrootPolicy(Settings(chunk_size=16))
    policy.load(str(write_tiny_groot_checkpoint(tmp_path / "groot", seed=2)), "cpu")
    info = policy.model_info
    assert info.rtc_methods == rtc.FLOW_METHODS
    rng = np.random.default_rng(7)
    robot_previous = rng.uniform(-0.5, 0.5, size=(info.horizon, info.action_dim)).astype(np.float32)
    previous = policy.normalize_actions(robot_previous, "gr1")
    samples = []
    for i, (method, delay) in enumerate([("guided", 3), ("hard", 4), (None, 0)]):
        obs = Observation(
            images={"base": IMAGE},
            joint_positions=np.full(6, 0.1, np.float32),
            instruction="go",
            embodiment="gr1",
            seed=i,
        )
        sample = policy.prepare(obs)
        if method is not None:
            sample.rtc = rtc.build_prefix(previous, 2, delay, info.horizon, method, 5.0)
        samples.append(sample)
    batched = policy.forward(samples)
    for sample, raw in zip(samples, batched, strict=True):
        np.testing.assert_allclose(raw.actions, policy.forward([sample])[0].actions, atol=2e-5, rtol=0)
    hard = policy.finish(batched[1], samples[1]).actions
    np.testing.assert_allclose(hard[:4], robot_previous[2:6], atol=1e-4)
