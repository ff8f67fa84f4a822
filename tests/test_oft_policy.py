"""OpenVLA-OFT served by the openvla family (OpenVLAOFTPolicy), tiny converted checkpoints, fp32, CPU.

Proves: the registry picks the OFT policy from the directory (an action head beside the merged weights)
or VLA_OPENVLA_VARIANT, and plain OpenVLA otherwise; ModelInfo reports the chunk, the dims, the cameras,
no real-time chunking and the constant confidence; each step of prepare (cameras in upstream's order, the
evaluation image pipeline, the proprio through the shared normaliser, the prompt) and of finish
(un-normalisation, VLA_CHUNK_SIZE) does what it says and refuses what it cannot serve; a mixed batch
(different prompt lengths, image sizes, datasets' statistics) equals its rows served one by one; the
server never unpickles (torch.load is never called while loading); VLA_COMPILE's static path, compiled
with aot_eager by an explicit warm_up, equals eager and does not recompile.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.oft_checkpoints import DATASET, STEP, pattern_image, write_pt, write_tiny_oft_checkpoint
from tests.helpers.openvla_checkpoints import write_tiny_openvla_checkpoint
from vla_inference.config import Settings
from vla_inference.models import registry
from vla_inference.models.base import InvalidObservation, ModelLoadError, Observation
from vla_inference.models.openvla.model import STATIC_PROMPT_TOKENS
from vla_inference.models.openvla.policy import OpenVLAOFTPolicy, OpenVLAPolicy, preprocess_image
from vla_inference.preprocessing.tf_resize import oft_eval_image

ATOL = 2e-5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "ckpt", seed=1, convert=True)


def _policy(path: Path, **settings: object) -> OpenVLAOFTPolicy:
    policy = OpenVLAOFTPolicy(Settings(model_type="openvla", **settings))  # type: ignore[arg-type]
    policy.load(str(path), "cpu")
    return policy


@pytest.fixture(scope="module")
def policy(checkpoint: Path) -> OpenVLAOFTPolicy:
    return _policy(checkpoint)


def _robot(i: int, size: tuple[int, int] = (224, 224), text: str = "pick up the red block") -> Observation:
    rng = np.random.default_rng(50 + i)
    return Observation(
        images={"base": pattern_image(*size, seed=i), "wrist": pattern_image(*size, seed=i + 5)},
        joint_positions=rng.uniform(-1.5, 1.5, 8).astype(np.float32),
        instruction=text,
        seed=i,
    )


ROBOTS = [
    _robot(
        0, (224, 224), "pick up the black bowl between the plate and the ramekin and place it on the plate"
    ),
    _robot(1, (256, 256), "open the drawer"),
    _robot(2, (120, 160), "put the cup on the plate"),
]


# ---- the registry ------------------------------------------------------------------------------


def test_the_directory_or_the_setting_picks_the_oft_policy(checkpoint: Path, tmp_path: Path) -> None:
    assert registry.resolve(Settings(model_path=str(checkpoint))) == ("openvla", OpenVLAOFTPolicy)
    forced = Settings(model_path=str(checkpoint), openvla_variant="openvla")
    assert registry.resolve(forced)[1] is OpenVLAPolicy
    plain = write_tiny_openvla_checkpoint(tmp_path / "plain")
    assert registry.resolve(Settings(model_path=str(plain)))[1] is OpenVLAPolicy
    oft = Settings(model_path=str(plain), openvla_variant="oft")
    assert registry.resolve(oft)[1] is OpenVLAOFTPolicy
    with pytest.raises(ModelLoadError, match=r"no action_head--<step>_checkpoint\.safetensors \(or \.pt\)"):
        registry.create_model(oft).load(str(plain), "cpu")


# ---- ModelInfo ---------------------------------------------------------------------------------


def test_model_info_reports_what_the_checkpoint_says(policy: OpenVLAOFTPolicy, checkpoint: Path) -> None:
    info = policy.model_info
    assert (info.family, info.name, info.action_dim, info.chunk_size, info.horizon) == (
        "openvla",
        "ckpt",
        7,
        8,
        8,
    )
    assert info.state_dims == {DATASET: 8} and info.embodiments == (DATASET,)
    assert info.default_embodiment == DATASET and info.camera_names == ("base", "left_wrist")
    assert info.rtc_methods == () and "Real-time chunking does not apply" in info.description
    assert "always 1.0" in info.confidence_definition and info.image_size == (224, 224)
    # a JPEG twice the model input or larger is decoded at reduced scale (VLA_JPEG_SCALED_DECODE; false:
    # the full frame, bit-exact with the evaluation pipeline)
    assert info.decode_size == (224, 224)

    short = _policy(checkpoint, chunk_size=3, oft_num_images=1, norm_stats_key=DATASET)
    assert (short.model_info.chunk_size, short.model_info.horizon) == (3, 8)
    assert short.model_info.camera_names == ("base",)
    single = Observation({"base": ROBOTS[0].images["base"]}, ROBOTS[0].joint_positions, "open it")
    assert short.predict(single).actions.shape == (3, 7)
    with pytest.raises(ModelLoadError, match="VLA_ACTION_DIM=6 but the checkpoint's action head"):
        _policy(checkpoint, action_dim=6)
    with pytest.raises(ModelLoadError, match="VLA_NORM_STATS_KEY='bridge' is not in the checkpoint"):
        _policy(checkpoint, norm_stats_key="bridge")


# ---- prepare -------------------------------------------------------------------------------------


def test_prepare_composes_the_steps(policy: OpenVLAOFTPolicy) -> None:
    robot = ROBOTS[1]  # 256 px: JPEG round trip + Lanczos-3, then the centre crop
    sample = policy.prepare(robot)
    spec = policy.loaded.checkpoint.base.image
    base, wrist = (preprocess_image(oft_eval_image(robot.images[n]), spec) for n in ("base", "wrist"))
    torch.testing.assert_close(sample.inputs.pixels, torch.stack([base, wrist]), rtol=0, atol=0)
    naive = preprocess_image(robot.images["base"], spec)  # the processor alone: not what OFT evaluates
    assert (naive - base).abs().max() > 0.05
    stats = json.loads((policy.loaded.checkpoint.path / "dataset_statistics.json").read_text())[DATASET]
    q01, q99 = np.array(stats["proprio"]["q01"]), np.array(stats["proprio"]["q99"])
    x = robot.joint_positions.astype(np.float64)
    expected = np.clip(2 * (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)  # upstream's normalize_proprio
    np.testing.assert_allclose(sample.inputs.proprio.numpy(), expected, rtol=0, atol=1e-6)
    assert (expected == 1).any() or (expected == -1).any()  # the clip is exercised
    assert sample.inputs.input_ids.tolist() == policy.tokenize("open the drawer").tolist()
    assert sample.embodiment == DATASET and sample.batch_key == "openvla-oft"

    swapped = policy.prepare(
        Observation(
            {"left_wrist": robot.images["base"], "main": robot.images["wrist"]}, x.astype(np.float32), "a"
        )
    )
    torch.testing.assert_close(swapped.inputs.pixels, torch.stack([wrist, base]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"images": {"base": pattern_image(224, 224)}}, "cameras", "missing 'left_wrist'"),
        ({"images": {**ROBOTS[0].images, "right_wrist": pattern_image(8, 8)}}, "cameras", "unknown camera"),
        ({"joint_positions": np.zeros(7, np.float32)}, "joint_positions", "expected 8 values"),
        ({"joint_positions": np.full(8, np.nan, np.float32)}, "joint_positions", "finite"),
        ({"instruction": "  "}, "language_instruction", "OpenVLA-OFT needs a language instruction"),
        ({"instruction": "go left " * 300}, "language_instruction", "too long"),
        ({"embodiment": "aloha"}, "embodiment_tag", "unknown embodiment 'aloha'"),
    ],
)
def test_prepare_refuses_what_it_cannot_serve(
    policy: OpenVLAOFTPolicy, change: dict[str, object], field: str, words: str
) -> None:
    robot = ROBOTS[0]
    values = {
        "images": robot.images,
        "joint_positions": robot.joint_positions,
        "instruction": robot.instruction,
        "embodiment": "",
    }
    with pytest.raises(InvalidObservation, match=words) as err:
        policy.prepare(Observation(**(values | change)))  # type: ignore[arg-type]
    assert err.value.field == field


# ---- forward and finish ------------------------------------------------------------------------


def test_a_mixed_batch_equals_its_rows_one_by_one(policy: OpenVLAOFTPolicy) -> None:
    samples = [policy.prepare(robot) for robot in ROBOTS]
    assert len({s.inputs.input_ids.numel() for s in samples}) == 3
    batch = policy.predict_batch(samples)
    rows = [policy.predict_batch([sample])[0] for sample in samples]
    for together, alone in zip(batch, rows, strict=True):
        assert together.actions.shape == (8, 7) and together.actions.dtype == np.float32
        np.testing.assert_allclose(together.actions, alone.actions, rtol=0, atol=1e-5)
        assert together.model_actions is not None and alone.model_actions is not None
        np.testing.assert_allclose(together.model_actions, alone.model_actions, rtol=0, atol=1e-5)
        assert together.confidence == 1.0
    assert np.abs(batch[0].actions - batch[1].actions).max() > 1e-3  # the robots get their own answers


def test_finish_unnormalises_with_the_datasets_bounds(policy: OpenVLAOFTPolicy) -> None:
    sample = policy.prepare(ROBOTS[0])
    (raw,) = policy.forward([sample])
    assert raw.actions.shape == (8, 7)
    stats = json.loads((policy.loaded.checkpoint.path / "dataset_statistics.json").read_text())[DATASET]
    q01, q99 = np.array(stats["action"]["q01"]), np.array(stats["action"]["q99"])
    mask = np.array(stats["action"]["mask"])
    a = raw.actions.astype(np.float64)
    expected = np.where(mask, 0.5 * (a + 1) * (q99 - q01 + 1e-8) + q01, a)  # upstream, gripper passed
    np.testing.assert_allclose(policy.finish(raw, sample).actions, expected, rtol=1e-6, atol=1e-6)


# ---- safety of loading -------------------------------------------------------------------------


def test_loading_never_unpickles(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server called torch.load")

    monkeypatch.setattr(torch, "load", refuse)
    assert _policy(checkpoint).model_info.action_dim == 7  # safetensors and JSON only
    unconverted = write_tiny_oft_checkpoint(tmp_path / "pt")
    with pytest.raises(ModelLoadError) as err:
        _policy(unconverted)
    message = str(err.value)
    assert (
        f"convert it once with `vla-inference convert oft {unconverted}`" in message and "\n" not in message
    )


def test_a_film_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "film", convert=True)
    write_pt(
        path / f"vision_backbone--{STEP}_checkpoint.pt", {"featurizer.blocks.0.scale.weight": torch.zeros(2)}
    )
    with pytest.raises(ModelLoadError, match=r"uses FiLM .* which vla-inference does not implement") as err:
        _policy(path)
    assert "\n" not in str(err.value)


# ---- VLA_COMPILE ---------------------------------------------------------------------------------


def test_compiled_equals_eager_and_does_not_recompile(checkpoint: Path, policy: OpenVLAOFTPolicy) -> None:
    compiled = _policy(checkpoint, compile=True, batch_size=4, compile_backend="aot_eager")
    assert compiled.static is not None and compiled.static.compiled
    compiled.warm_up(4)  # buckets 1, 2, 4
    samples = [compiled.prepare(robot) for robot in ROBOTS]
    with torch.compiler.set_stance("fail_on_recompile"):
        three = compiled.forward(samples)  # bucket 4, one padding row
        one = compiled.forward(samples[1:2])
    eager = policy.forward(samples)
    for got, expected in zip([*three, *one], [*eager, eager[1]], strict=True):
        np.testing.assert_allclose(got.actions, expected.actions, rtol=0, atol=ATOL)

    long = compiled.prepare(_robot(3, text="move the pot to the left of the stove " * 8))
    assert long.inputs.input_ids.numel() > STATIC_PROMPT_TOKENS  # over the static prompt: run eagerly
    with torch.compiler.set_stance("fail_on_recompile"):
        (got,) = compiled.forward([long])
    np.testing.assert_allclose(got.actions, policy.forward([long])[0].actions, rtol=0, atol=ATOL)
