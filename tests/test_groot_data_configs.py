"""GR00T data configs, VLA_GROOT_DATA_CONFIG, embodiment ids and layouts, and the published base
checkpoint's metadata.json shape (eight gr1 body parts, 44 values per side).

Expected key lists are NVIDIA's N1.5 data configs (gr00t/experiment/data_config.py) written out
here; expected numbers are worked out by hand from the statistics the test helper writes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.groot_checkpoints import (
    base_model_metadata,
    tiny_metadata,
    tiny_statistics,
    write_tiny_groot_checkpoint,
)
from vla_inference.config import ConfigError, Settings
from vla_inference.models.base import InvalidObservation, ModelLoadError, Observation
from vla_inference.models.groot import data_configs as dc
from vla_inference.models.groot.embodiments import build_embodiments
from vla_inference.models.groot.model import GrootConfig
from vla_inference.models.groot.policy import GrootPolicy
from vla_inference.models.policy import Raw


def _settings(**kw: object) -> Settings:
    return Settings(model_type="groot", **kw)  # type: ignore[arg-type]


def _build(metadata: dict[str, Any], chosen: dict[str, str] | None = None, lerobot: bool = False) -> Any:
    return build_embodiments(metadata, chosen or {}, lerobot=lerobot, max_state_dim=64, max_action_dim=32)


# --- the named configs ------------------------------------------------------------------------------


def test_nvidia_configs_as_data() -> None:
    required = [
        "fourier_gr1_arms_only",
        "fourier_gr1_full_upper_body",
        "so100",
        "so100_dualcam",
        "unitree_g1",
        "bimanual_panda_gripper",
        "single_panda_gripper",
        "oxe_droid",
        "agibot_genie1",
    ]
    assert set(required) <= set(dc.DATA_CONFIGS)
    arms = dc.DATA_CONFIGS["fourier_gr1_arms_only"]
    assert [k.key for k in arms.state] == ["left_arm", "right_arm", "left_hand", "right_hand"]
    assert all(k.sin_cos and k.mode is None for k in arms.state)
    assert all(k.mode == "min_max" for k in arms.action) and arms.video == ("ego_view",)
    upper = dc.DATA_CONFIGS["fourier_gr1_full_upper_body"]
    assert [k.key for k in upper.action][-2:] == ["waist", "neck"] and upper.video == ("front_view",)
    assert dc.DATA_CONFIGS["so100_dualcam"].video == ("front", "wrist")
    assert dc.DATA_CONFIGS["so100"].video == ("webcam",)
    droid = dc.DATA_CONFIGS["oxe_droid"]
    assert [(k.key, k.mode, k.rotation) for k in droid.action] == [
        ("eef_position_delta", None, None),
        ("eef_rotation_delta", None, "axis_angle"),
        ("gripper_position", "binary", None),
    ]
    assert droid.state[1].rotation == "rotation_6d" and droid.state[1].mode is None
    genie = dc.DATA_CONFIGS["agibot_genie1"]
    assert len(genie.state) == 6 and genie.action[-1].key == "robot_velocity"
    panda = dc.DATA_CONFIGS["single_panda_gripper"]
    assert [k.mode for k in panda.action] == ["min_max", "min_max", "binary", "min_max", "binary"]
    assert all(c.crop_scale == 0.95 for c in dc.DATA_CONFIGS.values())


def test_defaults_per_tag() -> None:
    assert dc.choose("gr1", {}) == "fourier_gr1_arms_only"
    assert dc.choose("oxe_droid", {}) == "oxe_droid"
    assert dc.choose("agibot_genie1", {}) == "agibot_genie1"
    assert dc.choose("new_embodiment", {}) == dc.METADATA
    assert dc.choose("new_embodiment", {"new_embodiment": "so100_dualcam"}) == "so100_dualcam"


def test_setting_is_parsed_and_validated() -> None:
    s = _settings(groot_data_config=" gr1:fourier_gr1_full_upper_body , new_embodiment:so100 ")
    assert dc.parse_setting(s.groot_data_config) == {
        "gr1": "fourier_gr1_full_upper_body",
        "new_embodiment": "so100",
    }
    for bad, words in (
        ("gr1:fourier_gr1", "fourier_gr1_arms_only"),  # unknown name: the known ones are listed
        ("gr1", "tag:config"),
        ("gr1:so100,gr1:unitree_g1", "twice"),
    ):
        with pytest.raises(ConfigError) as err:
            Settings.from_env(model_type="groot", groot_data_config=bad)
        assert "VLA_GROOT_DATA_CONFIG" in str(err.value) and words in str(err.value)


# --- the published base checkpoint's metadata ------------------------------------------------------


def test_base_model_metadata_is_served_with_arms_only() -> None:
    embodiments, skipped = _build(base_model_metadata())
    gr1 = embodiments["gr1"]
    assert skipped == [] and gr1.id == 24 and gr1.data_config == "fourier_gr1_arms_only"
    assert (gr1.state_dim, gr1.model_state_dim, gr1.action_dim, gr1.model_action_dim) == (26, 52, 26, 26)
    names = gr1.action_names()
    assert names[:8] == (*(f"left_arm.{i}" for i in range(7)), "right_arm.0")
    assert names[-1] == "right_hand.5" and len(names) == 26 and gr1.state_names() == names
    assert gr1.cameras[0].key == "ego_view" and gr1.cameras[0].resolution == (256, 256)
    # Each key decodes with its own statistics, not by position in the alphabetical metadata:
    # action right_arm dim 0: min = 0.5 + 0.09 - 1 = -0.41, max = 0.59 + 2 = 2.59; model 0 -> 1.09.
    decoded = gr1.decode_actions(np.zeros((1, 32)))
    assert decoded[0, 7] == pytest.approx(1.09, abs=1e-6)
    right_arm = tiny_statistics("gr1", "action", "right_arm", 7, 0)
    assert right_arm["min"][0] == pytest.approx(-0.41) and right_arm["max"][0] == pytest.approx(2.59)


def test_base_model_metadata_with_every_body_part_is_refused_clearly() -> None:
    with pytest.raises(ModelLoadError) as err:
        _build(base_model_metadata(), {"gr1": dc.METADATA})
    assert "44 action values" in str(err.value) and "1..32" in str(err.value)
    assert "VLA_GROOT_DATA_CONFIG=gr1:" in str(err.value)


def test_other_configs_on_base_metadata() -> None:
    chosen = {"gr1": "fourier_gr1_full_upper_body"}
    with pytest.raises(ModelLoadError, match=r"lacks video\.front_view"):  # the base has ego_view only
        _build(base_model_metadata(), chosen)
    meta = base_model_metadata()
    meta["gr1"]["modalities"]["video"]["front_view"] = {"resolution": [320, 240]}
    upper = _build(meta, chosen)[0]["gr1"]
    # 7 + 7 + 6 + 6 + 3 + 3 = 32 values each way, min_max both ways
    assert (upper.state_dim, upper.model_state_dim, upper.action_dim) == (32, 32, 32)
    assert upper.state_names()[26:] == ("waist.0", "waist.1", "waist.2", "neck.0", "neck.1", "neck.2")
    assert upper.cameras[0].resolution == (320, 240)
    with pytest.raises(ModelLoadError) as err:  # so100's keys are not in gr1's metadata
        _build(base_model_metadata(), {"gr1": "so100"})
    assert "video.webcam" in str(err.value) and "state.single_arm" in str(err.value)
    assert "state.left_leg" in str(err.value)  # what it has instead


def test_base_model_shaped_checkpoint_loads_and_serves(tmp_path: Path) -> None:
    sizes = GrootConfig.named("tiny", max_state_dim=64, action_dim=32)
    path = write_tiny_groot_checkpoint(tmp_path / "base", metadata=base_model_metadata(), sizes=sizes)
    policy = GrootPolicy(_settings())
    policy.load(str(path), "cpu")
    info = policy.model_info
    assert info.embodiments == ("gr1",) and dict(info.state_dims) == {"gr1": 26} and info.action_dim == 26
    assert len(info.state_layouts["gr1"]) == 26 and "ego_view 256x256" in info.description
    joints = np.linspace(-1, 1, 26).astype(np.float32)
    for frame in (np.zeros((256, 256, 3), np.uint8), np.full((480, 640, 3), 90, np.uint8)):
        obs = Observation(images={"base": frame}, joint_positions=joints, instruction="pick", seed=1)
        sample = policy.prepare(obs)
        state = sample.inputs.state.numpy()
        np.testing.assert_allclose(state[:7], np.sin(joints[:7]), atol=1e-6)
        np.testing.assert_allclose(state[7:14], np.cos(joints[:7]), atol=1e-6)
        assert np.all(state[52:] == 0) and sample.inputs.embodiment_id == 24
        assert policy.predict(obs).actions.shape == (16, 26)


# --- embodiment ids ----------------------------------------------------------------------------------


def test_nvidia_ids_and_lerobot_only_when_the_checkpoint_says_so(caplog: pytest.LogCaptureFixture) -> None:
    meta = tiny_metadata(["gr1", "new_embodiment", "so100"])
    with caplog.at_level(logging.WARNING):
        embodiments, skipped = _build(meta)
    assert {t: e.id for t, e in embodiments.items()} == {"gr1": 24, "new_embodiment": 31}
    assert skipped == ["so100"]  # NVIDIA has no so100 tag: SO-100 fine-tunes are new_embodiment
    lerobot, skipped = _build(meta, lerobot=True)
    assert lerobot["so100"].id == 2 and skipped == []
    with pytest.raises(ModelLoadError, match="known: new_embodiment, oxe_droid, agibot_genie1, gr1"):
        _build(tiny_metadata(["so100"]))


def test_lerobot_checkpoint_uses_lerobot_ids(tmp_path: Path) -> None:
    path = write_tiny_groot_checkpoint(tmp_path / "lr", embodiments=("so100",), lerobot=True)
    policy = GrootPolicy(_settings())
    policy.load(str(path), "cpu")
    assert policy.model_info.embodiments == ("so100",)
    assert "LeRobot" in policy.model_info.description
    obs = Observation(
        images={"base": np.zeros((48, 64, 3), np.uint8), "wrist": np.zeros((48, 64, 3), np.uint8)},
        joint_positions=np.zeros(6, np.float32),
        instruction="wave",
    )
    assert policy.prepare(obs).inputs.embodiment_id == 2


def test_setting_naming_a_tag_the_checkpoint_lacks() -> None:
    with pytest.raises(ModelLoadError, match="VLA_GROOT_DATA_CONFIG names oxe_droid"):
        _build(tiny_metadata(["gr1"]), {"oxe_droid": "oxe_droid"})


# --- rotations, pass-through and binary keys through a checkpoint ----------------------------------


@pytest.fixture(scope="module")
def droid(tmp_path_factory: pytest.TempPathFactory) -> GrootPolicy:
    path = write_tiny_groot_checkpoint(tmp_path_factory.mktemp("droid") / "c", embodiments=("oxe_droid",))
    policy = GrootPolicy(_settings())
    policy.load(str(path), "cpu")
    return policy


def _droid_obs() -> Observation:
    # eef_position (3), eef_rotation as a quaternion (4), gripper_position (1)
    q = [math.cos(math.pi / 6), 0.0, 0.0, math.sin(math.pi / 6)]  # 60 degrees about z
    images = {name: np.zeros((48, 64, 3), np.uint8) for name in ("base", "exterior_image_2", "left_wrist")}
    return Observation(
        images=images, joint_positions=np.array([1.0, 2.0, 3.0, *q, 0.5], np.float32), instruction="go"
    )


def test_oxe_droid_state(droid: GrootPolicy) -> None:
    info = droid.model_info
    assert info.camera_names == ("base", "exterior_image_2", "left_wrist")
    assert info.state_dims["oxe_droid"] == 8 and info.action_dim == 7
    state = droid.prepare(_droid_obs()).inputs.state.numpy()
    pos = tiny_statistics("oxe_droid", "state", "eef_position", 3, 0)
    expected_pos = 2 * (np.array([1.0, 2.0, 3.0]) - pos["min"]) / (np.array(pos["max"]) - pos["min"]) - 1
    np.testing.assert_allclose(state[:3], expected_pos, atol=1e-6)
    # quaternion -> rotation_6d, not normalised: rows (c, -s, 0), (s, c, 0) of 60 degrees about z
    c, s = 0.5, math.sqrt(3) / 2
    np.testing.assert_allclose(state[3:9], [c, -s, 0, s, c, 0], atol=1e-6)
    # gripper_position min_max: min = 1.16 - 1 = 0.16, max = 3.16 -> 2 (0.5 - 0.16) / 3 - 1
    assert state[9] == pytest.approx(2 * 0.34 / 3 - 1, abs=1e-6)
    assert np.all(state[10:] == 0)


def test_invalid_rotation_is_a_clear_request_error(droid: GrootPolicy) -> None:
    obs = _droid_obs()
    zero_quaternion = np.array([1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.5], np.float32)
    with pytest.raises(InvalidObservation) as err:
        droid.prepare(Observation(**{**obs.__dict__, "joint_positions": zero_quaternion}))
    assert err.value.field == "joint_positions" and "quaternion" in err.value.message


def test_oxe_droid_actions(droid: GrootPolicy) -> None:
    # model action: eef_position_delta (3, as is), eef_rotation_delta (axis_angle 3 -> the
    # metadata's euler_angles_rpy), gripper_position (binary); the 8th model value is padding
    row = np.array([0.25, -3.0, 7.5, 0.0, 0.0, math.pi / 3, 0.7, 0.9], np.float32)
    raw = Raw(actions=np.tile(row, (16, 1)), confidence=1.0)
    actions = droid.finish(raw, droid.prepare(_droid_obs())).actions
    np.testing.assert_allclose(actions[0], [0.25, -3.0, 7.5, 0.0, 0.0, math.pi / 3, 1.0], atol=1e-6)
    row[6] = 0.2
    raw = Raw(actions=np.tile(row, (16, 1)), confidence=1.0)
    assert droid.finish(raw, droid.prepare(_droid_obs())).actions[0, 6] == 0.0
    assert droid.model_info.action_layouts["oxe_droid"][3:6] == (
        "eef_rotation_delta.0",
        "eef_rotation_delta.1",
        "eef_rotation_delta.2",
    )


def _panda_metadata(absolute: bool = True, continuous: bool = True) -> dict[str, Any]:
    keys = {
        "state": [
            ("end_effector_position_relative", 3, None),
            ("end_effector_rotation_relative", 4, "quaternion"),
            ("gripper_qpos", 2, None),
            ("base_position", 3, None),
            ("base_rotation", 4, "quaternion"),
        ],
        "action": [
            ("end_effector_position", 3, None),
            ("end_effector_rotation", 3, None),
            ("gripper_close", 1, None),
            ("base_motion", 4, None),
            ("control_mode", 1, None),
        ],
    }
    entry: dict[str, Any] = {"statistics": {}, "modalities": {}}
    entry["modalities"]["video"] = {
        v: {"resolution": [64, 48]} for v in ("left_view", "right_view", "wrist_view")
    }
    for kind, spec in keys.items():
        entry["statistics"][kind] = {k: tiny_statistics("x", kind, k, d, 0) for k, d, _ in spec}
        entry["modalities"][kind] = {
            k: {"shape": [d], "rotation_type": r, "absolute": absolute, "continuous": continuous}
            for k, d, r in spec
        }
    return {"new_embodiment": entry}


def test_normalised_rotation_uses_the_representations_bounds() -> None:
    """single_panda_gripper: a quaternion state converted to rotation_6d and normalised min_max
    with rotation_6d's fixed bounds [-1, 1] (upstream), i.e. unchanged: not the metadata's stats."""
    emb = _build(_panda_metadata(), {"new_embodiment": "single_panda_gripper"})[0]["new_embodiment"]
    assert emb.model_state_dim == 3 + 6 + 2 + 3 + 6 and emb.state_dim == 16
    q = [math.cos(math.pi / 6), 0.0, 0.0, math.sin(math.pi / 6)]
    state = emb.encode_state(np.array([0, 0, 0, *q, 0, 0, 0, 0, 0, 1, 0, 0, 0], np.float64))
    np.testing.assert_allclose(state[3:9], [0.5, -math.sqrt(3) / 2, 0, math.sqrt(3) / 2, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(state[14:20], [1, 0, 0, 0, 1, 0], atol=1e-6)  # identity quaternion


def test_relative_rotation_or_discrete_key_cannot_be_normalised() -> None:
    with pytest.raises(ModelLoadError, match="absolute"):
        _build(_panda_metadata(absolute=False), {"new_embodiment": "single_panda_gripper"})
    with pytest.raises(ModelLoadError, match="not continuous"):
        _build(_panda_metadata(continuous=False), {"new_embodiment": "single_panda_gripper"})
