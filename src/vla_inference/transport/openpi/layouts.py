"""openpi's observation layouts: its DROID, LIBERO and ALOHA dictionaries -> the server's Observation.

`detect_layout` picks the layout from each observation's keys (or VLA_OPENPI_LAYOUT names one);
`observation_from_openpi` maps the cameras and the joint state (see LAYOUTS). Images may be HWC or
CHW, uint8 or float in [0, 1], as openpi accepts them. The embodiment is VLA_OPENPI_EMBODIMENT
(openpi observations name none). The "prompt" is the language instruction (a missing one is
refused by the engine's rule, as on gRPC). An optional integer "seed" key (our extension) fixes the
sampling noise like Observation.seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_inference.config import Settings
from vla_inference.models.base import InvalidObservation, ModelDescription, Observation


@dataclass(frozen=True)
class Layout:
    """Where one of openpi's example environments puts its cameras, state and prompt."""

    name: str
    cameras: tuple[tuple[str, str], ...]  # (key, our camera name); "a/b" inside a nested dict
    state: tuple[str, ...]  # keys whose values are concatenated into joint_positions, in order
    markers: tuple[str, ...]  # keys that identify the layout

    def describe(self) -> str:
        keys = [key for key, _ in self.cameras] + list(self.state) + ["prompt"]
        return f"{self.name.upper()} ({', '.join(keys)})"


LAYOUTS: dict[str, Layout] = {
    # openpi examples/droid: 7 joint positions + 1 gripper position; actions 7 joint velocities + gripper.
    "droid": Layout(
        "droid",
        cameras=(
            ("observation/exterior_image_1_left", "base"),
            ("observation/wrist_image_left", "left_wrist"),
        ),
        state=("observation/joint_position", "observation/gripper_position"),
        markers=("observation/joint_position", "observation/exterior_image_1_left"),
    ),
    # openpi examples/libero: 8-dim state (eef pose + gripper); 7-dim actions.
    "libero": Layout(
        "libero",
        cameras=(("observation/image", "base"), ("observation/wrist_image", "left_wrist")),
        state=("observation/state",),
        markers=("observation/state", "observation/image"),
    ),
    # openpi examples/aloha_real / aloha_sim: 14-dim state; cam_low is not used by pi0 (as in openpi).
    "aloha": Layout(
        "aloha",
        cameras=(
            ("images/cam_high", "base"),
            ("images/cam_left_wrist", "left_wrist"),
            ("images/cam_right_wrist", "right_wrist"),
        ),
        state=("state",),
        markers=("images",),
    ),
}


def detect_layout(obs: Mapping[str, Any], setting: str = "auto") -> Layout:
    """The layout VLA_OPENPI_LAYOUT names, or the first whose marker keys the observation has."""
    if setting != "auto":
        return LAYOUTS[setting]
    for layout in LAYOUTS.values():
        if any(marker in obs for marker in layout.markers):
            return layout
    shown = ", ".join(sorted(map(repr, obs))[:12]) or "none"
    raise InvalidObservation(
        "observation",
        f"unrecognised keys ({shown}); expected openpi's "
        + " or ".join(layout.describe() for layout in LAYOUTS.values()),
    )


def _lookup(obs: Mapping[str, Any], key: str) -> Any:
    if key in obs:
        return obs[key]
    head, _, rest = key.partition("/")
    inner = obs.get(head)
    if rest and isinstance(inner, Mapping):
        return inner.get(rest)
    return None


def image_from_openpi(value: Any, key: str, max_pixels: int) -> np.ndarray:
    """An openpi image (HWC or CHW; uint8, or float in [0, 1]) -> (H, W, 3) uint8."""
    if not isinstance(value, np.ndarray) or value.ndim != 3:
        raise InvalidObservation(key, "expected an image array of shape (H, W, 3) or (3, H, W)")
    image = value
    if image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)  # CHW -> HWC, as openpi's _parse_image does
    if image.shape[-1] != 3:
        raise InvalidObservation(key, f"expected 3 colour channels, got shape {value.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise InvalidObservation(key, f"image has no pixels (shape {value.shape})")
    if height * width > max_pixels:
        raise InvalidObservation(
            key, f"image is {width}x{height} pixels, over the limit of {max_pixels} (VLA_MAX_IMAGE_PIXELS)"
        )
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind == "f":
        if not np.all(np.isfinite(image)):
            raise InvalidObservation(key, "float image has NaN or inf values")
        return np.ascontiguousarray((np.clip(image, 0.0, 1.0) * 255).astype(np.uint8))
    raise InvalidObservation(key, f"expected uint8 (or float in [0, 1]) pixels, got {image.dtype}")


def _state_part(value: Any, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
    elif isinstance(value, list | tuple | int | float) and not isinstance(value, bool):
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidObservation(key, "expected numbers") from None
    else:
        raise InvalidObservation(key, f"expected an array of numbers, got {type(value).__name__}")
    if array.dtype.kind not in "biuf" or array.ndim > 1:
        raise InvalidObservation(key, f"expected a 1-D array of numbers, got shape {array.shape}")
    array = array.astype(np.float32).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise InvalidObservation(key, "values must be finite (found NaN or inf)")
    return array


def observation_from_openpi(
    obs: Any, settings: Settings, info: ModelDescription, layout_setting: str = "auto"
) -> Observation:
    """Map an openpi observation dict to the server's Observation (cameras the model does not use,
    like ALOHA's cam_low, are dropped as openpi's own policies drop them)."""
    if not isinstance(obs, Mapping):
        raise InvalidObservation("observation", f"expected a dict, got {type(obs).__name__}")
    layout = detect_layout(obs, layout_setting)
    images: dict[str, np.ndarray] = {}
    for key, camera in layout.cameras:
        value = _lookup(obs, key)
        if value is None or camera not in info.camera_names:
            continue
        images[camera] = image_from_openpi(value, key, settings.max_image_pixels)
    if not images:
        keys = ", ".join(key for key, camera in layout.cameras if camera in info.camera_names)
        raise InvalidObservation("observation", f"no camera image: send at least one of {keys}")
    parts = []
    for key in layout.state:
        value = _lookup(obs, key)
        if value is None:
            raise InvalidObservation(key, f"missing (the {layout.name.upper()} layout needs it)")
        parts.append(_state_part(value, key))
    joints = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if joints.size > settings.max_joints:
        raise InvalidObservation(layout.state[0], f"at most {settings.max_joints} values")
    embodiment = settings.openpi_embodiment or info.default_embodiment
    expected = info.state_dims.get(embodiment)
    if expected is not None and joints.size != expected:
        raise InvalidObservation(
            " + ".join(layout.state),
            f"{joints.size} state values ({layout.name.upper()} layout); embodiment {embodiment!r} of "
            f"this model takes {expected}",
        )
    prompt = obs.get("prompt")
    if prompt is None:
        prompt = ""  # the engine's instruction rule decides (VLA_ALLOW_EMPTY_INSTRUCTION)
    if not isinstance(prompt, str):
        raise InvalidObservation("prompt", f"expected a string (the task), got {type(prompt).__name__}")
    if len(prompt) > settings.max_instruction_chars:
        raise InvalidObservation(
            "prompt", f"{len(prompt)} characters, over the limit of {settings.max_instruction_chars}"
        )
    seed = obs.get("seed")  # our extension (Observation.seed); openpi clients send none
    if seed is not None:
        if isinstance(seed, np.integer):
            seed = int(seed)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise InvalidObservation("seed", "expected a whole number in [0, 2**64)")
    return Observation(
        images=images,
        joint_positions=joints,
        instruction=prompt,
        embodiment=settings.openpi_embodiment,
        seed=seed,
    )
