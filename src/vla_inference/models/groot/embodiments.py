"""GR00T embodiments: metadata.json + the chosen data config -> what a robot sends and receives.

metadata.json (experiment_cfg/), per embodiment tag (upstream DatasetMetadata):

    {"gr1": {"statistics": {"state": {"left_arm": {"min": [...], "max": [...], "mean": [...],
                                                   "std": [...], "q01": [...], "q99": [...]}, ...},
                            "action": {...}},
             "modalities": {"video": {"ego_view": {"resolution": [256, 256], ...}},
                            "state": {"left_arm": {"shape": [7], "absolute": true,
                                                   "rotation_type": null, "continuous": true}, ...},
                            "action": {...}},
             "embodiment_tag": "gr1"}}

The published base checkpoint lists every gr1 body part it was pretrained on (arms, hands, legs,
neck, waist; 44 action values, more than the model's 32); the data config picks the ones served
(data_configs.py). The robot sends the chosen state keys' values concatenated in the config's
order and receives the action keys' values likewise; GetModelInfo names each value
"<key>.<index>" (e.g. "left_arm.0" .. "left_arm.6").

Embodiment ids (the projector index of the category-specific layers): NVIDIA's N1.5 mapping
(gr00t/data/embodiment_tags.py): gr1 24, oxe_droid 17, agibot_genie1 26, new_embodiment 31.
NVIDIA has no so100 / unitree_g1 tags (SO-100 and G1 fine-tunes are new_embodiment); LeRobot's
port gives so100 = 2 and unitree_g1 = 3, which we use only for a checkpoint whose config.json
says it is LeRobot's ("type": "groot", how LeRobot marks its GR00T policy configs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla_inference.models.base import ModelLoadError
from vla_inference.models.groot import data_configs as dc
from vla_inference.models.groot import rotations as rot
from vla_inference.preprocessing import normalize as nz

METADATA_PATH = Path("experiment_cfg") / "metadata.json"

NVIDIA_EMBODIMENT_IDS: dict[str, int] = {
    "new_embodiment": 31,
    "oxe_droid": 17,
    "agibot_genie1": 26,
    "gr1": 24,
}
LEROBOT_EMBODIMENT_IDS: dict[str, int] = {**NVIDIA_EMBODIMENT_IDS, "so100": 2, "unitree_g1": 3}


def embodiment_ids(lerobot: bool) -> dict[str, int]:
    return LEROBOT_EMBODIMENT_IDS if lerobot else NVIDIA_EMBODIMENT_IDS


@dataclass(frozen=True)
class KeyTransform:
    """One state / action key: robot values (raw_dim) <-> model values (model_dim): a rotation
    conversion, then the key's normaliser (a data config mode, or sin/cos), either optional."""

    key: str
    raw_dim: int
    model_dim: int
    normalizer: nz.Normalizer | None = None
    rotation: tuple[str, str] | None = None  # (representation in the data, representation served)
    mode: str = ""  # the data config's name of the normalisation (for describe)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(..., raw_dim) robot units -> (..., model_dim) model units."""
        x = np.asarray(x, dtype=np.float64)
        if self.rotation:
            x = rot.convert_rotation(x, *self.rotation)
        return self.normalizer.normalize(x) if self.normalizer is not None else x

    def decode(self, y: np.ndarray) -> np.ndarray:
        """(..., model_dim) model units -> (..., raw_dim) robot units."""
        y = np.asarray(y, dtype=np.float64)
        if self.normalizer is not None:
            y = self.normalizer.unnormalize(y)
        if self.rotation:
            y = rot.convert_rotation(y, self.rotation[1], self.rotation[0])
        return y

    def names(self) -> list[str]:
        return [f"{self.key}.{i}" for i in range(self.raw_dim)]

    def describe(self) -> str:
        how = self.mode or "as is"
        if self.rotation:
            how = f"{self.rotation[0]} -> {self.rotation[1]}, {how}"
        return f"{self.key}({self.raw_dim}, {how})"


@dataclass(frozen=True)
class Camera:
    key: str  # video key without "video.", e.g. "ego_view"
    resolution: tuple[int, int] | None  # (width, height) from metadata.json; None = not given


@dataclass(frozen=True)
class Embodiment:
    tag: str
    id: int
    data_config: str
    state: tuple[KeyTransform, ...]
    action: tuple[KeyTransform, ...]
    cameras: tuple[Camera, ...]
    crop_scale: float | None

    @property
    def state_dim(self) -> int:  # values the robot sends
        return sum(k.raw_dim for k in self.state)

    @property
    def action_dim(self) -> int:  # values the robot receives
        return sum(k.raw_dim for k in self.action)

    @property
    def model_state_dim(self) -> int:
        return sum(k.model_dim for k in self.state)

    @property
    def model_action_dim(self) -> int:
        return sum(k.model_dim for k in self.action)

    @property
    def video_keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.cameras)

    def encode_state(self, joints: np.ndarray) -> np.ndarray:
        """(state_dim,) robot values -> (model_state_dim,) float32."""
        return _apply(self.state, joints, "encode", lambda k: k.raw_dim).astype(np.float32)

    def encode_actions(self, actions: np.ndarray) -> np.ndarray:
        """(T, action_dim) robot actions -> (T, model_action_dim) model units (real-time chunking)."""
        return _apply(self.action, actions, "encode", lambda k: k.raw_dim).astype(np.float32)

    def decode_actions(self, normalised: np.ndarray) -> np.ndarray:
        """(T, >= model_action_dim) model actions -> (T, action_dim) float32 robot actions."""
        rows = normalised[:, : self.model_action_dim]
        return _apply(self.action, rows, "decode", lambda k: k.model_dim).astype(np.float32)

    def state_names(self) -> tuple[str, ...]:
        return tuple(n for k in self.state for n in k.names())

    def action_names(self) -> tuple[str, ...]:
        return tuple(n for k in self.action for n in k.names())

    def describe(self) -> str:
        cameras = ", ".join(
            c.key + (f" {c.resolution[0]}x{c.resolution[1]}" if c.resolution else "") for c in self.cameras
        )
        return (
            f"{self.tag} (id {self.id}, data config {self.data_config}): cameras {cameras}; "
            f"state {', '.join(k.describe() for k in self.state)}; "
            f"actions {', '.join(k.describe() for k in self.action)}"
        )


def _apply(keys: tuple[KeyTransform, ...], x: np.ndarray, how: str, width: Any) -> np.ndarray:
    parts, start = [], 0
    for key in keys:
        n = width(key)
        parts.append(getattr(key, how)(x[..., start : start + n]))
        start += n
    return np.concatenate(parts, axis=-1) if parts else np.zeros((*x.shape[:-1], 0))


# ----------------------------------------------------------------------------------------------
# building from metadata.json


def read_metadata(path: Path) -> dict[str, Any]:
    import json

    file = path / METADATA_PATH
    if not file.is_file():
        raise ModelLoadError(
            f"missing {file}: GR00T checkpoints carry their per-embodiment statistics "
            "and modalities in experiment_cfg/metadata.json"
        )
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{file}: expected an object keyed by embodiment tag")
    return raw


def build_embodiments(
    metadata: Mapping[str, Any],
    chosen: Mapping[str, str],
    *,
    lerobot: bool,
    max_state_dim: int,
    max_action_dim: int,
) -> tuple[dict[str, Embodiment], list[str]]:
    """Every metadata entry with a known id -> Embodiment; returns them and the skipped tags."""
    ids = embodiment_ids(lerobot)
    unknown = [tag for tag in chosen if tag not in metadata or tag not in ids]
    if unknown:
        raise ModelLoadError(
            f"{dc.SETTING} names {', '.join(unknown)}, not an embodiment this checkpoint serves "
            f"(metadata.json tags with a known id: {', '.join(t for t in metadata if t in ids) or 'none'})"
        )
    embodiments: dict[str, Embodiment] = {}
    skipped: list[str] = []
    for tag, entry in metadata.items():
        if tag not in ids or not isinstance(entry, dict):
            skipped.append(tag)
            continue
        emb = _embodiment(tag, ids[tag], entry, dc.choose(tag, dict(chosen)))
        if emb.model_state_dim > max_state_dim:
            raise ModelLoadError(
                f"{tag}: data config {emb.data_config} gives {emb.model_state_dim} state values, the "
                f"model takes at most {max_state_dim}; choose another with {dc.SETTING}={tag}:<name>"
            )
        if not emb.action or emb.model_action_dim > max_action_dim:
            raise ModelLoadError(
                f"{tag}: data config {emb.data_config} gives {emb.model_action_dim} action values, the "
                f"model produces 1..{max_action_dim}; choose another with {dc.SETTING}={tag}:<name> "
                f"(known: {', '.join(dc.known_names())})"
            )
        if not emb.cameras:
            raise ModelLoadError(f"{tag}: data config {emb.data_config} names no camera")
        embodiments[tag] = emb
    if not embodiments:
        raise ModelLoadError(
            f"metadata.json has no embodiment this backend knows (tags: {', '.join(metadata) or 'none'}; "
            f"known: {', '.join(ids)})"
        )
    return embodiments, skipped


def _embodiment(tag: str, tag_id: int, entry: Mapping[str, Any], config_name: str) -> Embodiment:
    modalities = entry.get("modalities") or {}
    statistics = entry.get("statistics") or {}
    if config_name == dc.METADATA:
        modes = entry.get("normalization_modes") or {}
        config = dc.metadata_config(
            tag,
            tuple(modalities.get("video") or {}),
            tuple(modalities.get("state") or {}),
            tuple(modalities.get("action") or {}),
            dict(modes),
        )
    else:
        config = dc.DATA_CONFIGS[config_name]
    where = f"metadata.json {tag} (data config {config.name})"
    wanted = {
        "video": config.video,
        "state": tuple(s.key for s in config.state),
        "action": tuple(s.key for s in config.action),
    }
    have = {kind: dict(modalities.get(kind) or {}) for kind in wanted}
    missing = [f"{kind}.{key}" for kind, keys in wanted.items() for key in keys if key not in have[kind]]
    if missing:
        available = ", ".join(f"{kind}.{key}" for kind, keys in have.items() for key in keys)
        raise ModelLoadError(
            f"{where}: lacks {', '.join(missing)} (it has {available or 'nothing'}); "
            f"choose the data config the checkpoint was trained with: {dc.SETTING}={tag}:<name>, "
            f"known: {', '.join(dc.known_names())}"
        )
    stats = {kind: dict(statistics.get(kind) or {}) for kind in ("state", "action")}
    state = tuple(
        _key(f"{where} state", s, have["state"][s.key], stats["state"].get(s.key)) for s in config.state
    )
    action = tuple(
        _key(f"{where} action", s, have["action"][s.key], stats["action"].get(s.key)) for s in config.action
    )
    cameras = tuple(Camera(k, _resolution(f"{where} video.{k}", have["video"][k])) for k in config.video)
    return Embodiment(tag, tag_id, config.name, state, action, cameras, config.crop_scale)


def _resolution(where: str, info: Any) -> tuple[int, int] | None:
    value = (info or {}).get("resolution") if isinstance(info, dict) else None
    if value is None:
        return None
    valid = isinstance(value, list | tuple) and len(value) == 2
    if not (valid and all(isinstance(v, int) and v > 0 for v in value)):
        raise ModelLoadError(f"{where}: resolution must be [width, height], got {value!r}")
    return int(value[0]), int(value[1])


def _key(where: str, spec: dc.KeySpec, info: Any, stats_raw: Any) -> KeyTransform:
    where = f"{where}.{spec.key}"
    info = info if isinstance(info, dict) else {}
    shape = info.get("shape") or []
    dim = int(np.prod(shape)) if shape else len((stats_raw or {}).get("min", []))
    if dim <= 0:
        raise ModelLoadError(f"{where}: the key has no dimensions (no shape, no statistics)")
    rotation = None
    model_dim = dim
    if spec.rotation:
        source = info.get("rotation_type")
        if not source:
            raise ModelLoadError(
                f"{where}: the data config converts it to {spec.rotation}; metadata gives no rotation_type"
            )
        if source not in dc.ROTATIONS:
            known = ", ".join(dc.ROTATIONS)
            raise ModelLoadError(f"{where}: unknown rotation_type {source!r}; known: {known}")
        if rot.rotation_dim(source) != dim:
            raise ModelLoadError(f"{where}: {source} has {rot.rotation_dim(source)} values, the key {dim}")
        if source != spec.rotation:
            rotation = (source, spec.rotation)
            model_dim = rot.rotation_dim(spec.rotation)
    if spec.sin_cos:
        return KeyTransform(spec.key, dim, 2 * model_dim, nz.Normalizer(nz.SIN_COS), rotation, "sin/cos")
    if spec.mode is None:
        return KeyTransform(spec.key, dim, model_dim, rotation=rotation)
    if spec.mode not in dc.MODES:
        known = ", ".join(dc.MODES)
        raise ModelLoadError(f"{where}: unknown normalisation mode {spec.mode!r}; known: {known}")
    if spec.mode != "binary" and info.get("continuous") is False:
        raise ModelLoadError(f"{where}: not continuous, so only the binary mode applies (got {spec.mode})")
    if rotation is not None:  # upstream: bounds of the target representation, absolute rotations only
        bounds = rot.rotation_bounds(spec.rotation or "")
        if spec.mode != "min_max" or bounds is None or info.get("absolute") is False:
            raise ModelLoadError(
                f"{where}: a converted rotation is normalised only min_max, absolute, "
                "to a bounded representation"
            )
        return KeyTransform(
            spec.key, dim, model_dim, _normalizer(where, spec.mode, bounds), rotation, spec.mode
        )
    stats = {}
    for name, values in (stats_raw or {}).items():
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.shape != (dim,):
            raise ModelLoadError(f"{where}: statistic {name!r} has {array.size} values, the key has {dim}")
        stats[name] = array
    mode = rot.MODES[spec.mode]
    lacking = [name for name in nz.NEEDED[mode] if name not in stats]
    if lacking:
        raise ModelLoadError(f"{where}: mode {spec.mode} needs statistics {', '.join(lacking)}")
    wanted = {name: stats[name] for name in nz.NEEDED[mode]}
    return KeyTransform(
        spec.key, dim, model_dim, _normalizer(where, spec.mode, nz.Stats.of(wanted)), None, spec.mode
    )


def _normalizer(where: str, mode: str, stats: nz.Stats) -> nz.Normalizer:
    try:
        return nz.Normalizer(rot.MODES[mode], stats, nz.GROOT)
    except nz.StatsError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
