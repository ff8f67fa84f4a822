"""Isaac-GR00T's observation and action formats <-> the server's Observation and action chunks.

The keys of an embodiment (`vocabulary`, from the model's ModelInfo):
  video   GR00T's video keys: ModelInfo.camera_keys (server camera name -> the checkpoint's key,
          e.g. base -> ego_view) when the family gives them; otherwise the server's camera names,
          and a frame sent under any other key goes to the model under that name (GR00T's
          families also take a camera under its own video key).
  state   ModelInfo.state_layouts names each joint_positions value "<key>.<index>" (GR00T's
          layouts: left_arm.0, left_arm.1, ...): the state keys, their widths and their order;
          without such a layout, one key "joint_positions" of the embodiment's state size.
  action  the same from action_layouts (one key "joint_commands" without one).
  time    the delta indices of video / state: ModelInfo.image_history / state_history (the
          offsets besides 0) and 0, ascending. Position t of the time axis is the frame / state
          `steps[t]` control steps away: offset 0 is Observation.images / joint_positions, the
          others past_images / past_joint_positions. A model without history takes T = 1.

Observations (`split`), either form, as Isaac-GR00T's clients send them:
  flat    N1.5's service and N1.6 / N1.7's Gr00tSimPolicyWrapper: {"video.<k>": uint8
          (B?, T?, H, W, 3), "state.<k>": (B?, T?, D), "<language key>": a string, [string] or
          B strings}; batched when the state arrays are 3-D (N1.5's rule; then video is 5-D);
  nested  N1.6 / N1.7's Gr00tPolicy: {"video": {k: uint8 (B, T, H, W, 3)}, "state": {k: (B, T, D)},
          "language": {k: [[string]] * B}}.
A batch is split into samples, each decoded alone (`observation`, in the engine's preprocessing
pool), and the answers re-collated (`actions`): flat -> {"action.<k>": (B, H, D)} ((H, D) for
N1.5's unbatched form), nested -> {k: (B, H, D)}; float32, in the robot's units.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_inference.config import Settings
from vla_inference.models.base import InvalidObservation, ModelDescription, Observation

LANGUAGE_KEY = "annotation.human.action.task_description"  # the key modality configs report
STATE_KEY = "joint_positions"  # the one state key of a model without "<key>.<index>" layouts
ACTION_KEY = "joint_commands"
# Model versions whose clients run the N1.5 service (gr00t/eval/service.py): its ModalityConfig
# encoding and "video." / "state." / "action." prefixed modality keys.
N15_VERSIONS = ("gr00t-n1.5",)
_EXTENSION_KEYS = ("seed",)  # our additions to a flat observation, never its instruction


@dataclass(frozen=True)
class Part:
    """One state or action key and how many values it holds."""

    key: str  # without "state." / "action."
    width: int


@dataclass(frozen=True)
class Keys:
    """One embodiment in GR00T's terms."""

    embodiment: str
    cameras: tuple[tuple[str, str], ...]  # (GR00T video key, server camera name), in model order
    named: bool  # cameras are the checkpoint's own keys (ModelInfo.camera_keys)
    state: tuple[Part, ...]
    action: tuple[Part, ...]
    video_steps: tuple[int, ...]  # delta indices, ascending, 0 included
    state_steps: tuple[int, ...]
    horizon: int  # actions per answer (ModelInfo.chunk_size)

    def describe_state(self) -> str:
        return ", ".join(f"state.{part.key} ({part.width})" for part in self.state) or "none"


def parts(names: Sequence[str], fallback: str, width: int) -> tuple[Part, ...]:
    """Names "<key>.<index>" (each key's indices 0, 1, ... in one run) -> the keys with their
    widths, in order; one `fallback` key of `width` values when the names have another form."""
    found: list[Part] = []
    for name in names:
        key, dot, index = name.rpartition(".")
        if not (dot and key and index.isdigit()):
            break
        if found and found[-1].key == key and int(index) == found[-1].width:
            found[-1] = Part(key, found[-1].width + 1)
        elif int(index) == 0 and all(part.key != key for part in found):
            found.append(Part(key, 1))
        else:
            break
    else:
        if found:
            return tuple(found)
    return (Part(fallback, width),) if width else ()


def _steps(history: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({*history, 0}))


def vocabulary(info: ModelDescription, embodiment: str) -> Keys:
    named = info.camera_keys.get(embodiment) or {}
    cameras = tuple((key, camera) for camera, key in named.items())
    return Keys(
        embodiment=embodiment,
        cameras=cameras or tuple((camera, camera) for camera in info.camera_names),
        named=bool(cameras),
        state=parts(info.state_layouts.get(embodiment, ()), STATE_KEY, info.state_dims.get(embodiment, 0)),
        action=parts(info.action_layouts.get(embodiment, ()), ACTION_KEY, info.action_dim),
        video_steps=_steps(info.image_history.get(embodiment, ())),
        state_steps=_steps(info.state_history.get(embodiment, ())),
        horizon=info.chunk_size,
    )


def choose_embodiment(info: ModelDescription, requested: str, state_keys: Collection[str]) -> str:
    """`requested` (options' embodiment_tag, else VLA_GROOT_EMBODIMENT) if given; otherwise the first
    embodiment, the model's default first, whose state keys the observation carries."""
    if requested:
        if requested not in info.embodiments:
            raise InvalidObservation(
                "embodiment_tag",
                f"unknown embodiment {requested!r}; this model serves: {', '.join(info.embodiments)}",
            )
        return requested
    order = [info.default_embodiment, *(tag for tag in info.embodiments if tag != info.default_embodiment)]
    for tag in order:
        if all(part.key in state_keys for part in vocabulary(info, tag).state):
            return tag
    return info.default_embodiment  # its decode step names the keys it misses


def n15_client(info: ModelDescription) -> bool:
    """Whether the model's clients run the N1.5 service (its ModalityConfig encoding and keys)."""
    return info.version in N15_VERSIONS


def modality_entries(keys: Keys, n15: bool) -> dict[str, tuple[list[int], list[str]]]:
    """get_modality_config: modality -> (delta indices, modality keys), prefixed for N1.5."""

    def name(modality: str, key: str) -> str:
        return f"{modality}.{key}" if n15 else key

    return {
        "video": (list(keys.video_steps), [name("video", key) for key, _ in keys.cameras]),
        "state": (list(keys.state_steps), [name("state", part.key) for part in keys.state]),
        "action": (list(range(keys.horizon)), [name("action", part.key) for part in keys.action]),
        "language": ([0], [LANGUAGE_KEY]),
    }


# ---- splitting a message into samples ------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One sample of a message: arrays are views of the message's bytes until `observation`."""

    video: Mapping[str, Any]  # GR00T video key -> (T, H, W, 3)
    state: Mapping[str, Any]  # state key -> (T, D)
    instruction: str
    language_key: str  # where the instruction came from (for the error that names it)


@dataclass(frozen=True)
class Batch:
    nested: bool
    batched: bool  # False: N1.5's unbatched flat form, answered without the batch axis
    samples: tuple[Sample, ...]

    @property
    def state_keys(self) -> set[str]:
        return set(self.samples[0].state) if self.samples else set()


def split(obs: Any, max_samples: int) -> Batch:
    """A get_action observation (either form) -> its samples; structure checked, nothing copied."""
    if not isinstance(obs, Mapping):
        raise InvalidObservation("observation", f"expected a map of observations, got {type(obs).__name__}")
    _string_keys(obs, "observation")
    if isinstance(obs.get("video"), Mapping) or isinstance(obs.get("state"), Mapping):
        batch = _split_nested(obs)
    else:
        batch = _split_flat(obs)
    if not batch.samples:
        raise InvalidObservation("observation", "the batch holds no sample")
    if len(batch.samples) > max_samples:
        raise InvalidObservation(
            "observation",
            f"a batch of {len(batch.samples)} samples, over VLA_MAX_QUEUE_SIZE={max_samples}; send fewer",
        )
    return batch


def _array(value: Any, field: str, dims: tuple[int, ...], what: str) -> Any:
    """A numeric array (a list of numbers is taken too) with one of the allowed numbers of dims."""
    if isinstance(value, list | tuple):
        try:
            value = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidObservation(field, f"expected {what}") from None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise InvalidObservation(field, f"expected {what}, got {type(value).__name__}")
    if value.ndim not in dims:
        raise InvalidObservation(field, f"expected {what}, got shape {value.shape}")
    return value


def _texts(value: Any, field: str, count: int | None) -> list[str]:
    """An instruction per sample: count=None (unbatched) takes "text", ["text"] or a 1-element text
    array; a batch takes B entries, each "text" or ["text"] (one string for all is taken too)."""
    if isinstance(value, str):
        return [value] * (count or 1)
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        value = value.reshape(-1).tolist() if count is None or value.size == count else None
    if isinstance(value, list | tuple):
        items = [item[0] if isinstance(item, list | tuple) and len(item) == 1 else item for item in value]
        if count is None and len(items) == 1 and isinstance(items[0], str):
            return items
        if count is not None and len(items) == count and all(isinstance(item, str) for item in items):
            return items
    want = "a string or [string]" if count is None else f"{count} strings (or [string] each), one per sample"
    raise InvalidObservation(field, f"expected {want}")


def _language(entries: Sequence[tuple[str, Any]], count: int | None) -> tuple[str, list[str]]:
    if not entries:
        return LANGUAGE_KEY, [""] * (count or 1)  # the engine's instruction rule decides
    key, value = entries[0]  # as upstream: the first language key is the instruction
    return key, _texts(value, key, count)


def _is_text(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind == "U"
    if isinstance(value, list | tuple) and value:
        first = value[0]
        return isinstance(first, str) or (
            isinstance(first, list | tuple) and bool(first) and isinstance(first[0], str)
        )
    return False


def _split_flat(obs: Mapping[str, Any]) -> Batch:
    video_raw = {key[6:]: value for key, value in obs.items() if key.startswith("video.")}
    state_raw = {key[6:]: value for key, value in obs.items() if key.startswith("state.")}
    language = [
        (key, value)
        for key, value in obs.items()
        if not key.startswith(("video.", "state.")) and key not in _EXTENSION_KEYS and _is_text(value)
    ]
    if not video_raw and not state_raw:
        shown = ", ".join(sorted(map(repr, obs))[:12]) or "none"
        raise InvalidObservation(
            "observation",
            f"unrecognised keys ({shown}); expected GR00T's flat form (video.<key>, state.<key>, "
            "annotation.<key>) or its nested form (video, state, language maps)",
        )
    state = {
        k: _array(v, f"state.{k}", (1, 2, 3), "(B, T, D), (T, D) or (D,) numbers")
        for k, v in state_raw.items()
    }
    if state:
        batched = any(array.ndim == 3 for array in state.values())
    else:
        batched = any(isinstance(v, np.ndarray) and v.ndim == 5 for v in video_raw.values())
    if batched:
        state = {
            k: _array(v, f"state.{k}", (3,), "(B, T, D) numbers like the other state keys")
            for k, v in state.items()
        }
        video = {
            k: _array_u8(v, f"video.{k}", (5,), "uint8 frames (B, T, H, W, 3)") for k, v in video_raw.items()
        }
        return _unbatch(video, state, language, nested=False)
    video = {
        k: _array_u8(v, f"video.{k}", (3, 4), "uint8 frames (T, H, W, 3) or (H, W, 3)")
        for k, v in video_raw.items()
    }
    key, texts = _language(language, None)
    sample = Sample(
        {k: v if v.ndim == 4 else v[None] for k, v in video.items()},
        {k: v if v.ndim == 2 else v[None] for k, v in state.items()},
        texts[0],
        key,
    )
    return Batch(nested=False, batched=False, samples=(sample,))


def _array_u8(value: Any, field: str, dims: tuple[int, ...], what: str) -> Any:
    if not isinstance(value, np.ndarray) or value.ndim not in dims:
        shape = f"shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise InvalidObservation(field, f"expected {what}, got {shape}")
    if value.dtype != np.uint8:
        raise InvalidObservation(field, f"expected {what}, got {value.dtype} pixels")
    return value


def _string_keys(value: Mapping[Any, Any], field: str) -> None:
    wrong = next((key for key in value if not isinstance(key, str)), None)
    if wrong is not None:
        raise InvalidObservation(field, f"keys must be strings, got {wrong!r}")


def _modality(obs: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = obs.get(name, {})
    if not isinstance(value, Mapping):
        raise InvalidObservation(name, f"expected a map of {name} keys, got {type(value).__name__}")
    _string_keys(value, name)
    return value


def _split_nested(obs: Mapping[str, Any]) -> Batch:
    video = {
        k: _array_u8(v, f"video.{k}", (5,), "uint8 frames (B, T, H, W, 3)")
        for k, v in _modality(obs, "video").items()
    }
    state = {
        k: _array(v, f"state.{k}", (3,), "(B, T, D) numbers") for k, v in _modality(obs, "state").items()
    }
    return _unbatch(video, state, list(_modality(obs, "language").items()), nested=True)


def _unbatch(
    video: Mapping[str, Any], state: Mapping[str, Any], language: Sequence[tuple[str, Any]], nested: bool
) -> Batch:
    """(B, ...) arrays and B instructions -> B samples (views along the batch axis)."""
    sizes = {f"video.{k}": len(v) for k, v in video.items()} | {
        f"state.{k}": len(v) for k, v in state.items()
    }
    if not sizes:
        raise InvalidObservation("observation", "no video or state arrays")
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{field}: {size}" for field, size in sizes.items())
        raise InvalidObservation("observation", f"the batch sizes differ ({shown})")
    count = next(iter(sizes.values()))
    key, texts = _language(language, count)
    samples = tuple(
        Sample({k: v[i] for k, v in video.items()}, {k: v[i] for k, v in state.items()}, texts[i], key)
        for i in range(count)
    )
    return Batch(nested=nested, batched=True, samples=samples)


# ---- one sample -> Observation (the decode step) ------------------------------------------------


def _frames(value: Any, field: str, steps: Sequence[int], max_pixels: int) -> Any:
    frames = _array_u8(value, field, (4,), "uint8 frames (T, H, W, 3)")
    if frames.shape[0] != len(steps):
        raise InvalidObservation(
            field,
            f"{frames.shape[0]} frames on the time axis; this model reads {len(steps)} "
            f"(delta_indices {list(steps)})",
        )
    height, width, channels = frames.shape[1:]
    if channels != 3:
        raise InvalidObservation(field, f"expected 3 colour channels, got shape {frames.shape}")
    if height == 0 or width == 0:
        raise InvalidObservation(field, f"image has no pixels (shape {frames.shape})")
    if height * width > max_pixels:
        raise InvalidObservation(
            field, f"image is {width}x{height} pixels, over the limit of {max_pixels} (VLA_MAX_IMAGE_PIXELS)"
        )
    return frames


def _state(value: Any, field: str, steps: Sequence[int], width: int) -> np.ndarray:
    array = _array(value, field, (2,), "(T, D) numbers")
    if array.shape != (len(steps), width):
        raise InvalidObservation(
            field,
            f"shape {array.shape}: this model reads {len(steps)} step(s) (delta_indices {list(steps)}) "
            f"of {width} value(s)",
        )
    out = array.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise InvalidObservation(field, "values must be finite (found NaN or inf)")
    return out


def observation(sample: Sample, keys: Keys, settings: Settings, seed: int | None) -> Observation:
    """One sample -> the server's Observation (frames copied out of the message)."""
    if keys.named:
        missing = [key for key, _ in keys.cameras if key not in sample.video]
        if missing:
            raise InvalidObservation(
                f"video.{missing[0]}",
                f"missing: embodiment {keys.embodiment!r} takes "
                + ", ".join(f"video.{key}" for key, _ in keys.cameras),
            )
        cameras = list(keys.cameras)
    else:
        cameras = [(key, key) for key in sample.video]
    if len(cameras) > settings.max_cameras:
        raise InvalidObservation("video", f"{len(cameras)} cameras, over the limit of {settings.max_cameras}")
    now = keys.video_steps.index(0)
    images: dict[str, np.ndarray] = {}
    past_images: dict[int, dict[str, np.ndarray]] = {}
    for key, camera in cameras:
        frames = _frames(sample.video[key], f"video.{key}", keys.video_steps, settings.max_image_pixels)
        images[camera] = frames[now].copy()  # out of the message's (read-only) bytes
        for t, offset in enumerate(keys.video_steps):
            if offset:
                past_images.setdefault(offset, {})[camera] = frames[t].copy()
    columns = []
    for part in keys.state:
        field = f"state.{part.key}"
        if part.key not in sample.state:
            raise InvalidObservation(
                field, f"missing: embodiment {keys.embodiment!r} takes {keys.describe_state()}"
            )
        columns.append(_state(sample.state[part.key], field, keys.state_steps, part.width))
    rows = np.concatenate(columns, axis=1) if columns else np.zeros((len(keys.state_steps), 0), np.float32)
    if rows.shape[1] > settings.max_joints:
        raise InvalidObservation("state", f"at most {settings.max_joints} values")
    if len(sample.instruction) > settings.max_instruction_chars:
        raise InvalidObservation(
            sample.language_key,
            f"{len(sample.instruction)} characters, over the limit of {settings.max_instruction_chars}",
        )
    now = keys.state_steps.index(0)
    return Observation(
        images=images,
        joint_positions=np.ascontiguousarray(rows[now]),
        instruction=sample.instruction,
        embodiment=keys.embodiment,
        seed=seed,
        past_images=past_images,
        past_joint_positions={
            offset: np.ascontiguousarray(rows[t]) for t, offset in enumerate(keys.state_steps) if offset
        },
    )


# ---- answers ------------------------------------------------------------------------------------


def actions(chunks: Sequence[np.ndarray], keys: Keys, batch: Batch) -> dict[str, np.ndarray]:
    """The samples' action chunks (H, D) -> GR00T's action map, re-collated along the batch axis."""
    stacked = np.stack([np.asarray(chunk, dtype=np.float32) for chunk in chunks])  # (B, H, D)
    width = stacked.shape[2]
    layout = keys.action if sum(part.width for part in keys.action) == width else (Part(ACTION_KEY, width),)
    out: dict[str, np.ndarray] = {}
    start = 0
    for part in layout:
        block = stacked[:, :, start : start + part.width]
        start += part.width
        out[part.key if batch.nested else f"action.{part.key}"] = np.ascontiguousarray(
            block if batch.batched else block[0]
        )
    return out
