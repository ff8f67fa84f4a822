"""GR00T N1.7's processor and policy on the tiny NVIDIA-format checkpoint (CPU, fp32 unless said).

The image transforms against OpenCV 4.11 / torchvision as Isaac-GR00T 626af89 runs them (the
recorded hashes); relative actions against the pose formulas written out here (no scipy); the
embodiment index read from embodiment_id.json; real-time chunking continuing a chunk across a
moved state; samples of two embodiments batched equal to each alone; VLA_COMPILE (aot_eager) equal
to eager, without recompiling, in fp32 and bf16; the version told by config.json through the
registry; what a broken checkpoint directory is told.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import make_settings
from tests.helpers.groot17_checkpoints import write_tiny_groot17_checkpoint
from vla_inference.models import registry, rtc
from vla_inference.models.base import InvalidObservation, ModelLoadError, ModelSettings, Observation
from vla_inference.models.groot.n17_checkpoint import ModalityConfig
from vla_inference.models.groot.n17_images import ImageTransform, resize_area
from vla_inference.models.groot.n17_policy import Groot17Policy
from vla_inference.models.groot.n17_processor import Limits, build_embodiments
from vla_inference.models.groot.static import Groot17Static

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "groot17"
DROID = "oxe_droid_relative_eef_relative_joint"
ATOL = 2e-5
BF16_ATOL = 0.05


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_groot17_checkpoint(tmp_path_factory.mktemp("groot17") / "tiny", seed=7)


def _policy(path: Path, **settings: Any) -> Groot17Policy:
    policy = Groot17Policy(ModelSettings(**{"model_type": "groot", "chunk_size": 16, **settings}))
    policy.load(str(path), "cpu")
    return policy


@pytest.fixture(scope="module")
def policy(ckpt: Path) -> Groot17Policy:
    return _policy(ckpt)


def _image(seed: int, h: int = 36, w: int = 44) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _libero(seed: int, joints: float = 0.3) -> Observation:
    return Observation(
        {"base": _image(seed), "wrist": _image(seed + 1, 32, 32)},
        np.full(7, joints, np.float32),
        "Pick up the red cube!",
        "libero_sim",
        seed=seed,
    )


def _droid(seed: int, joints: np.ndarray | None = None) -> Observation:
    state = joints if joints is not None else np.array([0.1, -0.2, 0.3, 0.0, 0.5], np.float32)
    return Observation(
        {"base": _image(seed)},
        state,
        "open the drawer",
        DROID,
        seed=seed,
        past_images={-15: {"exterior_image_1_left": _image(seed + 50)}},
    )


# ---- images ---------------------------------------------------------------------------------------


def _frame(h: int, w: int) -> np.ndarray:
    """The recorded frames: a gradient with hashed detail (integer arithmetic, any numpy)."""
    y, x, c = np.meshgrid(*(np.arange(n, dtype=np.uint64) for n in (h, w, 3)), indexing="ij")
    detail = (x * np.uint64(73856093)) ^ (y * np.uint64(19349663)) ^ (c * np.uint64(83492791))
    smooth = (x * np.uint64(3) + y * np.uint64(2) + c * np.uint64(50)) % np.uint64(256)
    return ((smooth + detail % np.uint64(64)) % np.uint64(256)).astype(np.uint8)


def test_image_transforms_equal_opencv_and_torchvision_as_upstream_runs_them() -> None:
    """Letterbox, INTER_AREA shrinks by 1.25, 2 (rounding halves up), 2.5, 3, enlargements, the
    crop; and the torchvision path (bilinear, antialias): OpenCV 4.11's output bit for bit."""
    recorded = json.loads((FIXTURES / "image_transforms_626af89.json").read_text())
    assert recorded["opencv"] == "4.11.0" and len(recorded["cases"]) == 10
    for case in recorded["cases"]:
        crop = case.get("crop", 0)
        transform = ImageTransform(
            case["albumentations"],
            case["side"],
            case.get("crop_fraction", 0.0),
            (crop, crop),
            1 / 255,
            (0.5,) * 3,
            (0.5,) * 3,
        )
        out = np.ascontiguousarray(transform.frame(_frame(case["height"], case["width"])))
        assert list(out.shape) == case["shape"]
        assert int(out.astype(np.int64).sum()) == case["sum"], case
        assert hashlib.sha256(out.tobytes()).hexdigest() == case["sha256"], case


def test_area_resize_by_whole_factors_averages_cells() -> None:
    image = np.array([[[1], [2], [9], [9]], [[3], [4], [9], [9]]], np.uint8).repeat(3, axis=2)
    assert resize_area(image, 1, 2)[..., 0].tolist() == [[3, 9]]  # (1 + 2 + 3 + 4) / 4 = 2.5 -> 3
    three = np.arange(9, dtype=np.uint8).reshape(3, 3, 1).repeat(3, axis=2)
    assert resize_area(three, 1, 1)[0, 0, 0] == 4
    assert resize_area(three, 3, 3) is three


# ---- relative actions -----------------------------------------------------------------------------


def _rot6d_matrix(v: np.ndarray) -> np.ndarray:
    a = v[:3] / np.linalg.norm(v[:3])
    b = v[3:] - a.dot(v[3:]) * a
    b = b / np.linalg.norm(b)
    return np.stack([a, b, np.cross(a, b)])  # rows


def _rodrigues(w: np.ndarray) -> np.ndarray:
    theta = np.linalg.norm(w)
    k = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]]) / theta
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def _rotvec(r: np.ndarray) -> np.ndarray:
    theta = np.arccos((np.trace(r) - 1) / 2)
    return theta / (2 * np.sin(theta)) * np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])


def _eef_embodiment(fmt: str, dim: int) -> Any:
    stats = {
        "state": {"eef": {"min": [-2.0] * dim, "max": [2.0] * dim}, "grip": {"min": [0.0], "max": [1.0]}},
        "action": {"eef": {"min": [-2.0] * dim, "max": [2.0] * dim}, "grip": {"min": [0.0], "max": [1.0]}},
        "relative_action": {"eef": {"min": [-1.0] * dim, "max": [1.0] * dim}},
    }
    modalities = {
        "video": ModalityConfig((0,), ("cam",), {}),
        "state": ModalityConfig((0,), ("eef", "grip"), {}),
        "action": ModalityConfig(
            tuple(range(4)),
            ("eef", "grip"),
            {
                "action_configs": [
                    {"rep": "RELATIVE", "type": "EEF", "format": fmt, "state_key": "eef"},
                    {"rep": "ABSOLUTE", "type": "NON_EEF", "format": "DEFAULT"},
                ]
            },
        ),
        "language": ModalityConfig((0,), ("task",), {}),
    }
    kwargs = {"use_relative_action": True, "clip_outliers": True, "use_percentiles": False}
    served, skipped = build_embodiments(
        kwargs, {"arm": modalities}, {"arm": stats}, {"arm": 3}, Limits(32, 32, 8, 1, 32)
    )
    assert skipped == {} and served["arm"].relative
    return served["arm"]


@pytest.mark.parametrize(("fmt", "dim"), [("XYZ_ROT6D", 9), ("XYZ_ROTVEC", 6)])
def test_relative_eef_actions_compose_with_the_states_pose(fmt: str, dim: int) -> None:
    """T_abs = T_ref T_rel (Isaac-GR00T's EndEffectorActionChunk.to_absolute_chunking), the rotation
    as the first two rows of its matrix (rot6d, Gram-Schmidt) or a rotation vector."""
    emb = _eef_embodiment(fmt, dim)
    rng = np.random.default_rng(3)
    if fmt == "XYZ_ROT6D":
        ref_r, rel_r = _rot6d_matrix(rng.normal(size=6)), _rot6d_matrix(rng.normal(size=6))
        ref_rot, rel_rot = ref_r[:2].reshape(-1), rel_r[:2].reshape(-1) * 0.9  # rot6d rows need not be unit
    else:
        w_ref, w_rel = rng.normal(size=3) * 0.5, rng.normal(size=3) * 0.4
        ref_r, rel_r, ref_rot, rel_rot = _rodrigues(w_ref), _rodrigues(w_rel), w_ref, w_rel
    ref_t, rel_t = np.array([0.3, -0.2, 0.5]), np.array([0.1, 0.05, -0.2])
    state = np.concatenate([ref_t, ref_rot, [0.7]])
    rel = np.concatenate([rel_t, rel_rot])
    model = np.concatenate([rel, [0.25]])[None].repeat(2, axis=0)  # relative stats [-1, 1]: unchanged
    decoded = emb.decode(model, state)
    abs_r, abs_t = ref_r @ rel_r, ref_r @ rel_t + ref_t
    expected_rot = abs_r[:2].reshape(-1) if fmt == "XYZ_ROT6D" else _rotvec(abs_r)
    np.testing.assert_allclose(decoded[0, :3], abs_t, atol=1e-6)
    np.testing.assert_allclose(decoded[0, 3:dim], expected_rot, atol=1e-6)
    assert decoded[0, dim] == pytest.approx(0.625)  # absolute key: (0.25 + 1) / 2 over [0, 1]
    # Encoding back against the same state gives the model's values (rot6d normalised by the
    # composition: compare the rotation it stands for).
    again = emb.encode(decoded.astype(np.float64), state)
    np.testing.assert_allclose(again[:, :3], model[:, :3], atol=1e-5)
    np.testing.assert_allclose(again[:, dim], model[:, dim], atol=1e-6)


def test_relative_joint_actions_add_the_states_last_step(policy: Groot17Policy) -> None:
    emb = policy.loaded.embodiments[DROID]
    relative = {k.key: k.relative for k in emb.action}
    assert relative == {"joint_position": True, "gripper_position": False}
    actions = np.zeros((3, 16))
    state = np.array([0.1, -0.2, 0.3, 0.4, 0.9])
    out = emb.decode(actions, state)
    rel = policy.loaded.embodiments[DROID].action[0].normalizer.stats  # relative_action min / max
    middle = (rel.min + rel.max) / 2  # type: ignore[operator]
    np.testing.assert_allclose(out[:, :4], (middle + state[:4])[None].repeat(3, 0), atol=1e-6)


# ---- the embodiment index, history, errors ---------------------------------------------------------


def _variant(src: Path, dst: Path, edit: Any) -> Path:
    import shutil

    shutil.copytree(src, dst)
    files = {
        name: json.loads((dst / name).read_text())
        for name in ("processor_config.json", "embodiment_id.json", "config.json", "statistics.json")
    }
    edit(files)
    for name, data in files.items():
        (dst / name).write_text(json.dumps(data))
    return dst


def test_the_projector_index_comes_from_embodiment_id_json(
    ckpt: Path, policy: Groot17Policy, tmp_path: Path
) -> None:
    def edit(files: dict[str, Any]) -> None:
        files["embodiment_id.json"]["libero_sim"] = 5
        del files["embodiment_id.json"][DROID]  # not in the file: not served (no built-in fallback)

    other = _policy(_variant(ckpt, tmp_path / "ids", edit))
    assert other.model_info.embodiments == ("libero_sim",)
    sample = other.prepare(_libero(1))
    assert sample.inputs.projector == 5 and policy.prepare(_libero(1)).inputs.projector == 2
    assert np.abs(other.predict(_libero(1)).actions - policy.predict(_libero(1)).actions).max() > 1e-3


def test_state_history_is_read_from_delta_indices(ckpt: Path, tmp_path: Path) -> None:
    def edit(files: dict[str, Any]) -> None:
        for modality in files["processor_config.json"]["processor_kwargs"]["modality_configs"].values():
            modality["state"]["delta_indices"] = [-2, 0]  # one state_history_length for all tags
        files["config.json"]["state_history_length"] = 2

    path = _variant(ckpt, tmp_path / "state-history", edit)
    import tests.helpers.groot17_checkpoints as helper

    cfg = dataclasses.replace(helper.TINY, head=dataclasses.replace(helper.TINY.head, state_history=2))
    from safetensors.torch import save_file

    for shard in path.glob("model-*.safetensors"):
        shard.unlink()
    save_file(helper.tiny_state_dict(7, cfg), str(path / "model.safetensors"))
    (path / "model.safetensors.index.json").unlink()
    history = _policy(path)
    assert history.model_info.state_history == {"libero_sim": (-2,), DROID: (-2,)}
    with pytest.raises(
        InvalidObservation, match=r"history: .*libero_sim.*steps \[-2\].*missing offsets \[-2\]"
    ):
        history.prepare(_libero(1))
    full = dataclasses.replace(_libero(1), past_joint_positions={-2: np.full(7, -0.5, np.float32)})
    sample = history.prepare(full)
    assert tuple(sample.inputs.state.shape) == (2, 16)
    assert not torch.equal(sample.inputs.state[0], sample.inputs.state[1])
    assert np.isfinite(history.predict(full).actions).all()


def test_droid_needs_its_frame_fifteen_steps_back(policy: Groot17Policy) -> None:
    without = dataclasses.replace(_droid(1), past_images={})
    with pytest.raises(InvalidObservation) as err:
        policy.prepare(without)
    assert err.value.field == "history" and "[-15]" in err.value.message
    wrong = dataclasses.replace(_droid(1), past_images={-15: {"left_wrist": _image(3)}})
    with pytest.raises(InvalidObservation, match=r"offset -15: .*missing 'base'"):
        policy.prepare(wrong)


def test_a_checkpoint_without_the_backbone_files_names_them(ckpt: Path, tmp_path: Path) -> None:
    path = _variant(ckpt, tmp_path / "no-backbone", lambda files: None)
    for name in ("tokenizer.json", "chat_template.jinja"):
        (path / name).unlink()
    with pytest.raises(ModelLoadError) as err:
        _policy(path)
    message = str(err.value)
    assert "\n" not in message and "tokenizer.json" in message and "chat_template.jinja" in message
    assert "gated" in message and "VLA_TOKENIZER_PATH" in message
    fine = _policy(path, tokenizer_path=str(ckpt))  # the files elsewhere
    assert fine.model_info.version == "gr00t-n1.7"


def test_the_registry_tells_n17_from_config_json(ckpt: Path) -> None:
    family, cls = registry.resolve(make_settings(model_path=str(ckpt)))
    assert (family, cls) == ("groot", Groot17Policy)
    with pytest.raises(ModelLoadError, match="'Gr00tN1d7' checkpoint, served by VLA_MODEL_TYPE=groot"):
        registry.resolve(make_settings(model_type="pi0", model_path=str(ckpt)))


# ---- batching, real-time chunking, compile ----------------------------------------------------------


def test_two_embodiments_batched_equal_each_alone(policy: Groot17Policy) -> None:
    samples = [policy.prepare(_libero(1)), policy.prepare(_droid(2))]
    batch = policy.collate(samples)
    assert batch.input_ids.shape[0] == 2 and not bool(batch.attention_mask[1, 0])  # left-padded row
    together = policy.forward(samples)
    for sample, raw in zip(samples, together, strict=True):
        np.testing.assert_allclose(raw.actions, policy.forward([sample])[0].actions, rtol=0, atol=ATOL)


def test_real_time_chunking_continues_a_chunk_across_a_moved_state(policy: Groot17Policy) -> None:
    """Hard inpainting of d rows: the new chunk's first d actions are the previous chunk's next d,
    in the robot's frame, although the relative joint actions are relative to another state now;
    the same from the stream's memory and from the robot's own copy (Predict)."""
    first = policy.predict(_droid(1))
    executed, delay = 2, 3
    moved = np.array([0.3, -0.1, 0.2, 0.2, 0.5], np.float32)
    sample = policy.prepare(_droid(2, moved))
    memory = rtc.build_prefix(first.model_actions, executed, delay, 16, rtc.HARD, 0.0)  # type: ignore[arg-type]
    sent = rtc.build_prefix(
        policy.normalize_actions(first.actions, DROID), executed, delay, 16, rtc.HARD, 0.0
    )
    assert memory.overlap == sent.overlap == 16 - executed
    sample.rtc = sent
    from_robot = policy.rtc_prefix(sample)
    sample.rtc = memory
    in_frame = policy.rtc_prefix(sample)
    assert in_frame is not None and from_robot is not None
    rows = memory.overlap
    np.testing.assert_allclose(from_robot.actions[:rows, :4], in_frame.actions[:rows, :4], rtol=0, atol=1e-5)
    assert np.abs(in_frame.actions[:rows, :4] - memory.actions[:rows, :4]).max() > 1e-2  # re-expressed
    np.testing.assert_array_equal(
        in_frame.actions[:, 4:], memory.actions[:, 4:]
    )  # absolute keys as they were
    continued = policy.finish(policy.forward([sample])[0], sample)
    # The previous actions, as far as the new state's relative range reaches (upstream clips the
    # normalised relative actions to [-1, 1]; the tiny random model's often sit at its edge).
    rel = policy.loaded.embodiments[DROID].action[0].normalizer.stats
    expected = first.actions[executed : executed + delay].copy()
    expected[:, :4] = np.clip(expected[:, :4] - moved[:4], rel.min, rel.max) + moved[:4]
    np.testing.assert_allclose(continued.actions[:delay], expected, rtol=0, atol=1e-5)
    inside = np.abs(expected[:, :4] - first.actions[executed : executed + delay, :4]) < 1e-6
    assert inside.sum() >= 6  # most of them continue exactly


@pytest.fixture
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
def test_compiled_policy_equals_eager(
    ckpt: Path, policy: Groot17Policy, caplog: pytest.LogCaptureFixture
) -> None:
    compiled = _policy(ckpt, compile=True, batch_size=2, compile_backend="aot_eager")
    assert isinstance(compiled.static, Groot17Static) and compiled.static.images_per_row == 2
    with caplog.at_level(logging.INFO, logger="vla_inference.models.common.static"):
        compiled.warm_up(2)
    assert "groot sampler compiled for batch buckets 1, 2" in caplog.text
    samples = [compiled.prepare(_libero(3)), compiled.prepare(_droid(4))]
    previous = policy.predict(_libero(5))
    samples[0].rtc = rtc.build_prefix(previous.model_actions, 1, 3, 16, rtc.HARD, 0.0)  # type: ignore[arg-type]
    samples[1].rtc = rtc.build_prefix(
        np.ones((16, 16), np.float32) * 0.1, 0, 2, 16, rtc.GUIDED, 5.0, jacobian=False
    )
    with torch.compiler.set_stance("fail_on_recompile"):  # warmed up: nothing left to compile
        got = compiled.forward(samples)
    for raw, want in zip(got, policy.forward(samples), strict=True):
        np.testing.assert_allclose(raw.actions, want.actions, rtol=0, atol=ATOL)
        assert raw.confidence == pytest.approx(want.confidence, abs=1e-6)
    long = compiled.prepare(dataclasses.replace(_libero(6), instruction="pick " * 120))
    assert not compiled.static.fits(compiled.collate([long]))  # runs eagerly
    np.testing.assert_allclose(
        compiled.forward([long])[0].actions, policy.forward([long])[0].actions, atol=ATOL, rtol=0
    )


@pytest.mark.usefixtures("_fresh_dynamo")
def test_bf16_compiled_equals_bf16_eager_and_stays_near_fp32(ckpt: Path, policy: Groot17Policy) -> None:
    eager = _policy(ckpt, dtype="bfloat16")
    compiled = _policy(ckpt, dtype="bfloat16", compile=True, batch_size=1, compile_backend="aot_eager")
    assert eager.loaded.network.dtype == torch.bfloat16 and eager.model_info.dtype == "bfloat16"
    compiled.warm_up(1)
    sample = eager.prepare(_droid(7))
    bf16 = eager.forward([sample])[0].actions
    with torch.compiler.set_stance("fail_on_recompile"):
        np.testing.assert_allclose(compiled.forward([sample])[0].actions, bf16, rtol=0, atol=BF16_ATOL)
    np.testing.assert_allclose(bf16, policy.forward([sample])[0].actions, rtol=0, atol=0.25)
    assert np.isfinite(bf16).all()
