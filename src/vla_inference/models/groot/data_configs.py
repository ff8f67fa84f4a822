"""NVIDIA's named GR00T N1.5 data configs, as data: which keys, in which order, transformed how.

Upstream (NVIDIA/Isaac-GR00T gr00t/experiment/data_config.py) picks one data config per
deployment (`--data-config` of its inference service). The config, not metadata.json, decides
which state / action / video keys the model sees and in which order; metadata.json only supplies
their statistics, shapes, rotation types and camera resolutions. The eval-time transforms are:

  video   u8 / 255 -> centre crop to int(scale H) x int(scale W) -> bilinear resize (antialias)
          to the model's 224 x 224 -> (x * 255).to(uint8) -> Eagle's (x / 255 - 0.5) / 0.5
          (colour jitter and noise are training-only)
  state   per key: rotation to a target representation, then a normalisation mode, or sin/cos
  action  per key: a normalisation mode (+ rotation) on the way in; the inverse on the way out

A key without a mode is not normalised (it passes through), as upstream. This module is pure
data and has no torch import, so config.py can validate VLA_GROOT_DATA_CONFIG against it.

Which config an embodiment gets (see `choose`): VLA_GROOT_DATA_CONFIG when it names the tag;
else NVIDIA's config for the base checkpoint's tags (gr1 -> fourier_gr1_arms_only,
oxe_droid -> oxe_droid, agibot_genie1 -> agibot_genie1); else (new_embodiment fine-tunes, and
any other tag) the metadata's own modalities in metadata order with min_max ("metadata").
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("min_max", "q99", "mean_std", "binary")
EULER_ORDERS = ("rpy", "ryp", "pry", "pyr", "yrp", "ypr")
ROTATIONS = (
    "axis_angle",
    "quaternion",
    "rotation_6d",
    "matrix",
    *(f"euler_angles_{o}" for o in EULER_ORDERS),
)
METADATA = "metadata"  # the config made from metadata.json's own modalities
CROP_SCALE = 0.95


@dataclass(frozen=True)
class KeySpec:
    """One state or action key and how upstream transforms it."""

    key: str  # without the "state." / "action." prefix, e.g. "left_arm"
    mode: str | None = None  # one of MODES; None = not normalised
    rotation: str | None = None  # target representation (from ROTATIONS); None = as stored
    sin_cos: bool = False  # state only: [sin(x), cos(x)] of the key's values, no statistics


@dataclass(frozen=True)
class DataConfig:
    name: str
    video: tuple[str, ...]  # video keys, without "video."
    state: tuple[KeySpec, ...]
    action: tuple[KeySpec, ...]
    crop_scale: float | None = CROP_SCALE  # None = no centre crop


def _keys(names: str, mode: str | None = "min_max", **extra: object) -> tuple[KeySpec, ...]:
    return tuple(KeySpec(name, mode, **extra) for name in names.split())  # type: ignore[arg-type]


def _config(name: str, video: str, state: tuple[KeySpec, ...], action: tuple[KeySpec, ...]) -> DataConfig:
    return DataConfig(name=name, video=tuple(video.split()), state=state, action=action)


_GR1_ARMS = "left_arm right_arm left_hand right_hand"
_G1_ARMS = "left_arm right_arm left_hand right_hand"
_GENIE1 = (
    "left_arm_joint_position right_arm_joint_position left_effector_position "
    "right_effector_position head_position waist_position"
)
_ROT6D = "rotation_6d"

DATA_CONFIGS: dict[str, DataConfig] = {
    c.name: c
    for c in (
        _config(
            "fourier_gr1_arms_only",
            "ego_view",
            _keys(_GR1_ARMS, None, sin_cos=True),
            _keys(_GR1_ARMS),
        ),
        _config(
            "fourier_gr1_arms_waist",
            "ego_view",
            _keys(_GR1_ARMS + " waist", None, sin_cos=True),
            _keys(_GR1_ARMS + " waist"),
        ),
        _config(
            "fourier_gr1_full_upper_body",
            "front_view",
            _keys(_GR1_ARMS + " waist neck"),
            _keys(_GR1_ARMS + " waist neck"),
        ),
        _config(
            "bimanual_panda_gripper",
            "right_wrist_view left_wrist_view front_view",
            (
                KeySpec("right_arm_eef_pos", "min_max"),
                KeySpec("right_arm_eef_quat", rotation=_ROT6D),
                KeySpec("right_gripper_qpos", "min_max"),
                KeySpec("left_arm_eef_pos", "min_max"),
                KeySpec("left_arm_eef_quat", rotation=_ROT6D),
                KeySpec("left_gripper_qpos", "min_max"),
            ),
            (
                KeySpec("right_arm_eef_pos"),
                KeySpec("right_arm_eef_rot"),
                KeySpec("right_gripper_close", "binary"),
                KeySpec("left_arm_eef_pos"),
                KeySpec("left_arm_eef_rot"),
                KeySpec("left_gripper_close", "binary"),
            ),
        ),
        _config(
            "bimanual_panda_hand",
            "right_wrist_view left_wrist_view ego_view",
            (
                KeySpec("right_arm_eef_pos", "min_max"),
                KeySpec("right_arm_eef_quat", rotation=_ROT6D),
                KeySpec("right_hand", "min_max"),
                KeySpec("left_arm_eef_pos", "min_max"),
                KeySpec("left_arm_eef_quat", rotation=_ROT6D),
                KeySpec("left_hand", "min_max"),
            ),
            (
                KeySpec("right_arm_eef_pos"),
                KeySpec("right_arm_eef_rot"),
                KeySpec("right_hand", "min_max"),
                KeySpec("left_arm_eef_pos"),
                KeySpec("left_arm_eef_rot"),
                KeySpec("left_hand", "min_max"),
            ),
        ),
        _config(
            "single_panda_gripper",
            "left_view right_view wrist_view",
            (
                KeySpec("end_effector_position_relative", "min_max"),
                KeySpec("end_effector_rotation_relative", "min_max", rotation=_ROT6D),
                KeySpec("gripper_qpos", "min_max"),
                KeySpec("base_position", "min_max"),
                KeySpec("base_rotation", "min_max", rotation=_ROT6D),
            ),
            (
                KeySpec("end_effector_position", "min_max"),
                KeySpec("end_effector_rotation", "min_max"),
                KeySpec("gripper_close", "binary"),
                KeySpec("base_motion", "min_max"),
                KeySpec("control_mode", "binary"),
            ),
        ),
        _config("so100", "webcam", _keys("single_arm gripper"), _keys("single_arm gripper")),
        _config("so100_dualcam", "front wrist", _keys("single_arm gripper"), _keys("single_arm gripper")),
        _config("unitree_g1", "rs_view", _keys(_G1_ARMS), _keys(_G1_ARMS)),
        _config(
            "unitree_g1_full_body",
            "rs_view",
            _keys("left_leg right_leg waist " + _G1_ARMS),
            _keys(_G1_ARMS),
        ),
        _config(
            "oxe_droid",
            "exterior_image_1 exterior_image_2 wrist_image",
            (
                KeySpec("eef_position", "min_max"),
                KeySpec("eef_rotation", rotation=_ROT6D),
                KeySpec("gripper_position", "min_max"),
            ),
            (
                KeySpec("eef_position_delta"),
                KeySpec("eef_rotation_delta", rotation="axis_angle"),
                KeySpec("gripper_position", "binary"),
            ),
        ),
        _config(
            "agibot_genie1",
            "top_head hand_left hand_right",
            _keys(_GENIE1),
            _keys(_GENIE1 + " robot_velocity"),
        ),
    )
}

# NVIDIA's configs for the embodiments the base checkpoint was pretrained on.
DEFAULT_FOR_TAG: dict[str, str] = {
    "gr1": "fourier_gr1_arms_only",
    "oxe_droid": "oxe_droid",
    "agibot_genie1": "agibot_genie1",
}

SETTING = "VLA_GROOT_DATA_CONFIG"


def known_names() -> tuple[str, ...]:
    return (*DATA_CONFIGS, METADATA)


def parse_setting(value: str) -> dict[str, str]:
    """ "gr1:fourier_gr1_arms_only,new_embodiment:so100_dualcam" -> {tag: config name}.

    Raises ValueError with what is allowed (config.py turns it into one line for the operator).
    """
    chosen: dict[str, str] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        tag, sep, name = (s.strip() for s in part.partition(":"))
        if not sep or not tag or not name:
            raise ValueError(f"comma-separated tag:config pairs (got {part!r})")
        if name not in known_names():
            raise ValueError(f"a data config out of {', '.join(known_names())} (got {name!r} for {tag})")
        if tag in chosen:
            raise ValueError(f"one data config per embodiment tag ({tag} appears twice)")
        chosen[tag] = name
    return chosen


def choose(tag: str, chosen: dict[str, str]) -> str:
    """The data config name an embodiment tag is served with (see the module docstring)."""
    return chosen.get(tag) or DEFAULT_FOR_TAG.get(tag, METADATA)


def metadata_config(
    tag: str, video: tuple[str, ...], state: tuple[str, ...], action: tuple[str, ...], modes: dict[str, str]
) -> DataConfig:
    """The default for fine-tunes: metadata.json's own keys in its order, min_max everywhere unless
    the entry's "normalization_modes" ({"state.key": mode, ...}, our extension) says otherwise."""
    return DataConfig(
        name=METADATA,
        video=video,
        state=tuple(KeySpec(k, modes.get(f"state.{k}", "min_max")) for k in state),
        action=tuple(KeySpec(k, modes.get(f"action.{k}", "min_max")) for k in action),
    )
