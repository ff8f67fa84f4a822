"""SmolVLAPolicy on tiny LeRobot-format checkpoints: ModelInfo, the preprocessing steps (cameras by
the checkpoint's names, missing cameras, statistics and the base checkpoint's dataset keys, the
tokenizer), the registry, batching across robots, real-time chunking through the shared sampler,
the compiled static path against eager (aot_eager, explicit warm_up), and bfloat16.

Parity with LeRobot itself is tests/test_smolvla_parity.py; the server, tests/test_smolvla_server.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.smolvla_checkpoints import BACKBONE_DIR, tiny_stats, write_tiny_smolvla
from vla_inference.config import Settings
from vla_inference.models import registry, rtc
from vla_inference.models.base import InvalidObservation, ModelLoadError, Observation, PreparedSample
from vla_inference.models.smolvla.model import SmolVLABatch
from vla_inference.models.smolvla.policy import SmolVLAPolicy, image_to_model_input
from vla_inference.models.smolvla.static import SmolVLAStatic

ATOL = 2e-5  # float32 on the CPU: batching and static padding change only the summation order
BACKEND = "aot_eager"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def image(seed: int, height: int = 48, width: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def joints(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=6).astype(np.float32)


def observation(
    seed: int, cameras: tuple[str, ...] = ("base", "camera2"), task: str = "pick up the red cube"
):  # type: ignore[no-untyped-def]
    return Observation({c: image(seed + i) for i, c in enumerate(cameras)}, joints(seed), task, seed=seed)


def loaded(path: Path, **settings: Any) -> SmolVLAPolicy:
    policy = SmolVLAPolicy(Settings(**{"chunk_size": 50, **settings}))
    policy.load(str(path), "cpu")
    return policy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_smolvla(tmp_path_factory.mktemp("smolvla") / "tiny", seed=1)


@pytest.fixture(scope="module")
def policy(checkpoint: Path) -> SmolVLAPolicy:
    return loaded(checkpoint)


# ---- ModelInfo, registry -------------------------------------------------------------------------


def test_model_info(policy: SmolVLAPolicy) -> None:
    info = policy.model_info
    assert (info.family, info.action_dim, info.chunk_size, info.horizon) == ("smolvla", 5, 6, 6)
    assert info.camera_names == ("base", "camera2")  # camera1 is the first non-wrist camera
    assert info.embodiments == ("default",) and info.state_dims == {"default": 6}
    assert info.rtc_methods == ("none", "guided", "hard") and info.takes_language
    assert info.image_size == (64, 64) and info.dtype == "float32"
    assert "base (observation.images.camera1)" in info.description
    assert "normalised with the checkpoint's statistics" in info.description
    assert info.state_layouts == {} and info.action_layouts == {}  # LeRobot's config names no values


def test_the_checkpoints_kind_picks_the_family(checkpoint: Path) -> None:
    assert registry.resolve(Settings(model_path=str(checkpoint))) == ("smolvla", SmolVLAPolicy)
    assert registry.resolve(Settings(model_type="smolvla", model_path=str(checkpoint)))[1] is SmolVLAPolicy
    with pytest.raises(ModelLoadError, match=r"VLA_MODEL_TYPE=pi0 but .*'smolvla'.*VLA_MODEL_TYPE=smolvla"):
        registry.resolve(Settings(model_type="pi0", model_path=str(checkpoint)))


def test_layouts_when_the_features_name_their_values(tmp_path: Path) -> None:
    path = write_tiny_smolvla(tmp_path / "named", seed=1)
    config = json.loads((path / "config.json").read_text())
    config["input_features"]["observation.state"]["names"] = [f"joint{i}" for i in range(6)]
    config["output_features"]["action"]["names"] = {"motors": [f"motor{i}" for i in range(5)]}
    (path / "config.json").write_text(json.dumps(config))
    info = loaded(path).model_info
    assert info.state_layouts == {"default": tuple(f"joint{i}" for i in range(6))}
    assert info.action_layouts == {"default": tuple(f"motor{i}" for i in range(5))}


# ---- the steps: cameras, images, state, prompt ----------------------------------------------------


def test_cameras_are_taken_under_the_checkpoints_names(policy: SmolVLAPolicy) -> None:
    frame = image(3)
    prepared = [
        policy.prepare(Observation({name: frame}, joints(0), "go", seed=0)).inputs
        for name in ("base", "camera1", "observation.images.camera1", "main")
    ]
    for other in prepared[1:]:
        assert np.array_equal(other.images, prepared[0].images)
    assert prepared[0].image_masks.tolist() == [True, False]
    assert (prepared[0].images[1] == -1).all()  # the missing camera: LeRobot's filler value, masked
    second = policy.prepare(Observation({"observation.images.camera2": frame}, joints(0), "go")).inputs
    assert second.image_masks.tolist() == [False, True]
    with pytest.raises(InvalidObservation, match=r"unknown camera.*'top'.*base, camera2") as err:
        policy.prepare(Observation({"base": frame, "top": frame}, joints(0), "go"))
    assert err.value.field == "cameras"
    with pytest.raises(InvalidObservation, match="at least 1 camera"):
        policy.prepare(Observation({}, joints(0), "go"))


def test_a_missing_camera_changes_nothing_but_its_own_slot(policy: SmolVLAPolicy) -> None:
    """A camera that is not sent is a masked slot, like LeRobot's filler images: whatever its pixels,
    the answer is the same; sending it changes the answer."""
    alone = policy.prepare(observation(5, cameras=("base",)))
    inputs = alone.inputs
    noisy = PreparedSample(
        type(inputs)(
            np.stack([inputs.images[0], np.random.default_rng(0).uniform(-1, 1, inputs.images[1].shape)]),
            inputs.image_masks,
            inputs.tokens,
            inputs.token_mask,
            inputs.state,
        ),
        alone.embodiment,
        alone.seed,
    )
    both = policy.prepare(observation(5))
    a, b, c = (policy.forward([s])[0].actions for s in (alone, noisy, both))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_images_are_padded_left_and_top() -> None:
    """LeRobot's resize_with_pad: 48 x 80 -> 38 x 64 (sizes truncated), 26 rows of padding on top
    (-1 after the scaling), none at the bottom; a square image of the tower's size is only scaled."""
    white = np.full((48, 80, 3), 255, np.uint8)
    out = image_to_model_input(white, 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    assert (out[:, :26] == -1).all() and np.allclose(out[:, 26:], 1.0)
    tall = image_to_model_input(np.full((80, 48, 3), 255, np.uint8), 64)
    assert (tall[:, :, :26] == -1).all() and np.allclose(tall[:, :, 26:], 1.0)
    square = image(7, 64, 64)
    np.testing.assert_array_equal(
        image_to_model_input(square, 64), (square.transpose(2, 0, 1) / np.float32(255.0)) * 2 - 1
    )


def test_state_and_actions_use_the_checkpoints_statistics(policy: SmolVLAPolicy) -> None:
    stats = tiny_stats(6, 5)
    mean, std = (np.float32(stats["observation.state"][k]) for k in ("mean", "std"))
    x = joints(2)
    sample = policy.prepare(Observation({"base": image(0)}, x, "go", seed=1))
    np.testing.assert_array_equal(sample.inputs.state[:6], (x - mean) / (std + np.float32(1e-8)))
    raw = policy.forward([sample])[0]
    actions = policy.finish(raw, sample).actions
    a_mean, a_std = (np.float32(stats["action"][k]) for k in ("mean", "std"))
    np.testing.assert_allclose(actions, raw.actions[:6, :5] * a_std + a_mean, rtol=0, atol=1e-6)
    back = policy.normalize_actions(actions, "default")
    assert back.shape == (6, 32) and not back[:, 5:].any()
    np.testing.assert_allclose(back[:, :5], raw.actions[:, :5], atol=1e-5, rtol=0)
    with pytest.raises(InvalidObservation, match="expected 6 values"):
        policy.prepare(Observation({"base": image(0)}, np.zeros(7, np.float32), "go"))


def test_prompts_are_truncated_and_padded_as_lerobot(policy: SmolVLAPolicy) -> None:
    long = policy.prepare(observation(0, task="grasp the green bottle; open the gripper slowly " * 3))
    short = policy.prepare(observation(0, task="lift the lid"))
    assert long.inputs.tokens.shape == short.inputs.tokens.shape == (12,)  # pad_language_to max_length
    assert long.inputs.token_mask.all() and not short.inputs.token_mask.all()
    assert short.inputs.tokens[-1] == policy.loaded.pad_id == 2


# ---- statistics: the base checkpoint's dataset keys ---------------------------------------------


def test_dataset_keyed_statistics_are_refused_without_a_key(tmp_path: Path) -> None:
    path = write_tiny_smolvla(tmp_path / "base", dataset_keys=("so100", "so101"))
    with pytest.raises(ModelLoadError) as err:
        loaded(path)
    message = str(err.value)
    assert "\n" not in message and "no statistics for observation.state and action" in message
    assert "so100, so101" in message and "VLA_NORM_STATS_KEY" in message
    with pytest.raises(ModelLoadError, match=r"VLA_NORM_STATS_KEY='so102'.*so100, so101"):
        loaded(path, norm_stats_key="so102")


def test_dataset_keyed_statistics_served_with_the_chosen_key(tmp_path: Path) -> None:
    path = write_tiny_smolvla(tmp_path / "base", dataset_keys=("so100", "so101"))
    policy = loaded(path, norm_stats_key="so101")
    info = policy.model_info
    assert info.embodiments == ("so101",) and info.state_dims == {"so101": 6}
    assert "dataset 'so101'" in info.description
    stats = tiny_stats(6, 5)  # the helper writes dataset i's statistics as the plain ones + i
    x = joints(3)
    sample = policy.prepare(Observation({"camera2": image(1)}, x, "go", embodiment="so101", seed=2))
    mean, std = (np.float32(stats["observation.state"][k]) + 1 for k in ("mean", "std"))
    np.testing.assert_array_equal(sample.inputs.state[:6], (x - mean) / (std + np.float32(1e-8)))
    raw = policy.forward([sample])[0]
    a_mean, a_std = (np.float32(stats["action"][k]) + 1 for k in ("mean", "std"))
    np.testing.assert_allclose(
        policy.finish(raw, sample).actions, raw.actions[:6, :5] * a_std + a_mean, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    ("changes", "settings", "message"),
    [
        ({"stats": {}}, {}, r"no statistics for observation\.state and action.*policy_preprocessor_step"),
        ({}, {"norm_stats_key": "so100"}, r"VLA_NORM_STATS_KEY='so100'.*keeps no statistics per dataset"),
        ({}, {"action_dim": 7}, r"VLA_ACTION_DIM=7 but .*config\.json says the action has 5 values"),
    ],
)
def test_refused_at_start(tmp_path: Path, changes: dict, settings: dict, message: str) -> None:
    path = write_tiny_smolvla(tmp_path / "ckpt", **changes)
    with pytest.raises(ModelLoadError, match=message):
        loaded(path, **settings)


def test_legacy_buffers_are_served(tmp_path: Path) -> None:
    path = write_tiny_smolvla(tmp_path / "old", legacy_stats=True, seed=1)
    old, new = loaded(path), loaded(write_tiny_smolvla(tmp_path / "new", seed=1))
    a, b = (p.predict(observation(4)).actions for p in (old, new))
    np.testing.assert_array_equal(a, b)


def test_a_missing_tokenizer_is_one_line_naming_it(tmp_path: Path) -> None:
    path = write_tiny_smolvla(tmp_path / "ckpt")
    (path / BACKBONE_DIR / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError) as err:
        loaded(path)
    message = str(err.value)
    assert "\n" not in message and "missing tokenizer tokenizer.json" in message
    assert "VLA_TOKENIZER_PATH" in message and "HuggingFaceTB/SmolVLM2-500M-Video-Instruct" in message


# ---- batching and real-time chunking -------------------------------------------------------------


def rtc_prefix(policy: SmolVLAPolicy, method: str, seed: int, jacobian: bool = True) -> rtc.Prefix:
    """A previous chunk (robot units) in model units; 1 action executed, 3 of delay."""
    horizon = policy.config.chunk_size
    previous = np.random.default_rng(seed).normal(size=(horizon, 5)).astype(np.float32)
    return rtc.build_prefix(
        policy.normalize_actions(previous, "default"), 1, 3, horizon, method, 5.0, jacobian=jacobian
    )


def mixed_samples(policy: SmolVLAPolicy) -> list[PreparedSample]:
    """Robots with other cameras, prompts, states, seeds and real-time chunking methods."""
    specs = [
        (("base", "camera2"), "pick up the red cube", None),
        (("camera2",), "stack the blocks: blue on yellow, yellow on red, then more", "guided"),
        (("base",), "lift", "hard"),
        (("base", "camera2"), "put the toy in the bin", "none"),
        (("camera1",), "open the gripper slowly", "guided"),
    ]
    samples = []
    for i, (cameras, task, method) in enumerate(specs):
        sample = policy.prepare(observation(10 + i, cameras, task))
        if method is not None:
            sample.rtc = rtc_prefix(policy, method, i)
        samples.append(sample)
    return samples


def test_a_mixed_batch_equals_each_request_alone(policy: SmolVLAPolicy) -> None:
    samples = mixed_samples(policy)
    batched = policy.forward(samples)
    for sample, raw in zip(samples, batched, strict=True):
        alone = policy.forward([sample])[0]
        np.testing.assert_allclose(raw.actions, alone.actions, atol=ATOL, rtol=0)
        assert raw.confidence == pytest.approx(alone.confidence, abs=1e-5)


def test_real_time_chunking_methods(policy: SmolVLAPolicy) -> None:
    """hard keeps the d committed actions exactly; guided pulls them toward the previous chunk;
    the two guided variants (with the Jacobian, velocity held constant) differ; none changes nothing."""
    base = policy.prepare(observation(20))
    plain = policy.forward([base])[0].actions
    out = {}
    for method, jacobian in (("none", True), ("hard", True), ("guided", True), ("guided", False)):
        base.rtc = rtc_prefix(policy, method, 7, jacobian)
        out[method, jacobian] = (policy.forward([base])[0].actions, base.rtc.actions)
    np.testing.assert_array_equal(out["none", True][0], plain)
    hard, target = out["hard", True]
    np.testing.assert_array_equal(hard[:3], target[:3])
    assert np.abs(hard[3:] - plain[3:]).max() > 1e-4
    guided, target = out["guided", True]
    assert np.abs(guided[:3] - target[:3]).mean() < 0.5 * np.abs(plain[:3] - target[:3]).mean()
    assert np.abs(out["guided", False][0] - guided).max() > 1e-4


# ---- VLA_COMPILE: the static path ---------------------------------------------------------------


@pytest.fixture
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_equals_eager(
    checkpoint: Path, policy: SmolVLAPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    compiled = loaded(checkpoint, compile=True, batch_size=2, compile_backend=BACKEND)
    assert isinstance(compiled.static, SmolVLAStatic) and policy.static is None
    assert compiled.static.prefix_len == 2 * 4 + 12 + 1  # both slots, the padded prompt, the state
    with caplog.at_level(logging.INFO, logger="vla_inference.models.common.static"):
        compiled.warm_up(2)  # what the engine calls before SERVING
    assert "SmolVLA sampler compiled for batch buckets 1, 2" in caplog.text
    samples = mixed_samples(compiled)
    for sample in samples:  # guided with the Jacobian runs eagerly: held constant here
        if sample.rtc is not None and sample.rtc.method == "guided":
            sample.rtc = rtc_prefix(compiled, "guided", 3, jacobian=False)
    with torch.compiler.set_stance("fail_on_recompile"):  # warmed up: nothing left to compile
        got = compiled.forward(samples[:2])
        alone = compiled.forward(samples[2:3])
    for raw, want in zip([*got, *alone], policy.forward(samples[:3]), strict=True):
        np.testing.assert_allclose(raw.actions, want.actions, atol=ATOL, rtol=0)
        assert raw.confidence == pytest.approx(want.confidence, abs=1e-5)

    samples[1].rtc = rtc_prefix(compiled, "guided", 3)  # the Jacobian: eager, the same numbers
    with torch.compiler.set_stance("fail_on_recompile"):
        guided = compiled.forward(samples[:2])
    np.testing.assert_array_equal(guided[1].actions, policy.forward(samples[:2])[1].actions)


def test_the_static_runner_pads_the_prompt_and_refuses_longer_ones(policy: SmolVLAPolicy) -> None:
    runner = SmolVLAStatic(policy.loaded.network, slots=(0, 1), compile=False)
    batch = policy.collate([policy.prepare(observation(1, task="lift"))])
    assert batch.tokens.shape[1] < 12 and runner.fits(batch)
    padded = runner.pad(batch)
    assert padded.tokens.shape == padded.token_masks.shape == (1, 12)
    longer = SmolVLABatch(
        *batch[:2], torch.zeros(1, 13, dtype=torch.long), torch.ones(1, 13, dtype=torch.bool), batch.state
    )
    assert not runner.fits(longer)
    noise = torch.randn(1, 6, 32)
    with torch.inference_mode():
        eager, _ = policy.loaded.network.sample(batch, noise, 10)
    static, _ = runner.sample(batch, noise, 10)
    torch.testing.assert_close(static, eager, atol=ATOL, rtol=0)


# ---- bfloat16 -----------------------------------------------------------------------------------


def test_bfloat16_runs_close_to_float32(checkpoint: Path, policy: SmolVLAPolicy) -> None:
    bf16 = loaded(checkpoint, dtype="bfloat16")
    assert bf16.model_info.dtype == "bfloat16" and bf16.loaded.network.dtype == torch.bfloat16
    samples = [bf16.prepare(observation(30 + i)) for i in range(2)]
    for raw, want in zip(bf16.forward(samples), policy.forward(samples), strict=True):
        assert raw.actions.dtype == np.float32 and np.isfinite(raw.actions).all()
        assert np.abs(raw.actions - want.actions).max() < 0.1
