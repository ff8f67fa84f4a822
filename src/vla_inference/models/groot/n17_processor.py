"""GR00T N1.7's processor, built from the checkpoint's own files (Isaac-GR00T 626af89:
gr00t/model/gr00t_n1d7/processing_gr00t_n1d7.py, gr00t/data/state_action/state_action_processor.py,
gr00t/data/state_action/pose.py, gr00t/data/utils.py). The images are n17_images.py's.

Per embodiment tag of processor_config.json's modality_configs (an Embodiment17):

    video       modality_keys (the cameras, in order) x delta_indices (frames, e.g. [-15, 0]):
                images in the prompt time-major (t0 cam0, t0 cam1, t1 cam0, ...)
    state       modality_keys in order (joint_positions = their values concatenated) x
                delta_indices (state_history_length steps). Per key: sin/cos when
                apply_sincos_state_encoding and the key is in sin_cos_embedding_keys (2 x dims);
                mean / std for mean_std_embedding_keys (std 0: passed); else min / max to [-1, 1]
                over q01 / q99 (use_percentiles) or min / max, 0 where np.isclose(high, low),
                clipped (clip_outliers). exclude_state: zeros. Concatenated, zero-padded to
                max_state_dim: (T_s, max_state_dim).
    action      modality_keys in order, the first len(delta_indices) rows of the model's horizon,
                each key's dims (its statistics) in turn: min / max inverse, the model side
                clipped to [-1, 1] first (mean / std for mean_std_embedding_keys). A RELATIVE key
                (with use_relative_action) is normalised with relative_action's own min / max
                (whatever use_percentiles says, as upstream) and made absolute against the state's
                last step of its state_key: NON_EEF adds it; EEF composes the poses,
                T_abs = T_ref T_rel (xyz + rot6d: the first two rows of the rotation matrix,
                Gram-Schmidt; or xyz + rotation vector). ABSOLUTE and DELTA keys are only
                un-normalised (upstream converts no DELTA key at inference).
    language    the instruction lower-cased with punctuation removed (formalize_language)
    projector   embodiment_id.json's index for the tag (tags it lacks are not served)

Statistics are statistics.json's {tag: {state | action | relative_action: {key: {min, max, mean,
std, q01, q99}}}}; normalisation is the shared preprocessing/normalize.py (GR00T N1.7 convention).

Prompt (Prompt): one user turn, the images then the text, rendered with the backbone's own chat
template (Jinja, sandboxed, trim_blocks and lstrip_blocks as transformers renders it; no
generation prompt), each image's <|image_pad|> expanded to its merged-token count, tokenised with
tokenizer.json (transformers' default special-token handling). Batches are left-padded
(n17_policy.collate), as upstream's tokenizer padding_side "left".

Real-time chunking (n17_policy): a RELATIVE key's rows are remembered in robot units (absolute),
the other keys in model units, and a prefix is made relative to the new observation's state before
sampling (Embodiment17.in_frame), so a chunk continues the previous one across a moving reference.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla_inference.models.base import ModelLoadError
from vla_inference.models.groot import rotations as rot
from vla_inference.preprocessing import normalize as nz

RELATIVE, ABSOLUTE, DELTA = "RELATIVE", "ABSOLUTE", "DELTA"
EEF, NON_EEF = "EEF", "NON_EEF"
DEFAULT, XYZ_ROT6D, XYZ_ROTVEC = "DEFAULT", "XYZ_ROT6D", "XYZ_ROTVEC"
_ROTATION = {XYZ_ROT6D: ("rotation_6d", 9), XYZ_ROTVEC: ("axis_angle", 6)}  # EEF formats: rep, dims


# ---- state and action keys ---------------------------------------------------------------------


@dataclass(frozen=True)
class StateKey:
    key: str
    dim: int  # values the robot sends
    normalizer: nz.Normalizer  # sin/cos doubles them

    @property
    def width(self) -> int:
        return 2 * self.dim if self.normalizer.mode == nz.SIN_COS else self.dim


@dataclass(frozen=True)
class ActionKey:
    key: str
    dim: int
    normalizer: nz.Normalizer
    relative: bool  # RELATIVE (with use_relative_action): made absolute against the state
    eef: bool  # EEF: poses composed; else (NON_EEF) added
    format: str  # DEFAULT | XYZ_ROT6D | XYZ_ROTVEC
    reference: tuple[int, int] = (0, 0)  # its state key's [start, stop) in joint_positions

    def absolute(self, values: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Relative values (N, dim) -> absolute, against the state (state_dim,) (float64)."""
        ref = np.asarray(state[self.reference[0] : self.reference[1]], np.float64)
        if not self.eef:
            return values + ref
        return _from_pose(_pose(ref[None], self.format) @ _pose(values, self.format), self.format)

    def relative_to(self, values: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Absolute values (N, dim) -> relative to the state (the inverse of `absolute`)."""
        ref = np.asarray(state[self.reference[0] : self.reference[1]], np.float64)
        if not self.eef:
            return values - ref
        inverse = np.linalg.inv(_pose(ref[None], self.format))
        return _from_pose(inverse @ _pose(values, self.format), self.format)


def _pose(values: np.ndarray, fmt: str) -> np.ndarray:
    """(N, 3 + r) xyz + rotation -> (N, 4, 4) homogeneous transforms."""
    values = np.asarray(values, np.float64)
    out = np.zeros((*values.shape[:-1], 4, 4))
    out[..., :3, :3] = rot.to_matrix(values[..., 3:], _ROTATION[fmt][0])
    out[..., :3, 3] = values[..., :3]
    out[..., 3, 3] = 1.0
    return out


def _from_pose(pose: np.ndarray, fmt: str) -> np.ndarray:
    return np.concatenate([pose[..., :3, 3], rot.from_matrix(pose[..., :3, :3], _ROTATION[fmt][0])], axis=-1)


# ---- an embodiment -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Embodiment17:
    tag: str
    projector: int  # embodiment_id.json
    cameras: tuple[str, ...]  # video modality_keys
    video_offsets: tuple[int, ...]  # video delta_indices (ascending, the last 0)
    state: tuple[StateKey, ...]
    state_offsets: tuple[int, ...]  # state delta_indices
    action: tuple[ActionKey, ...]
    horizon: int  # rows of the model's chunk this embodiment uses: len(action delta_indices)
    exclude_state: bool

    @property
    def state_dim(self) -> int:
        return sum(k.dim for k in self.state)

    @property
    def model_action_dim(self) -> int:
        """The model's action values this embodiment reads (N1.7 encodes keys one to one)."""
        return self.action_dim

    @property
    def action_dim(self) -> int:
        return sum(k.dim for k in self.action)

    @property
    def image_history(self) -> tuple[int, ...]:
        return tuple(d for d in self.video_offsets if d < 0)

    @property
    def state_history(self) -> tuple[int, ...]:
        return tuple(d for d in self.state_offsets if d < 0)

    @property
    def relative(self) -> bool:
        return any(k.relative for k in self.action)

    def encode_state(self, steps: np.ndarray) -> np.ndarray:
        """(T_s, state_dim) robot units -> (T_s, model width) float32, unpadded."""
        if self.exclude_state:
            return np.zeros((steps.shape[0], self.state_dim), np.float32)
        parts, start = [], 0
        for key in self.state:
            parts.append(key.normalizer.normalize(steps[:, start : start + key.dim]))
            start += key.dim
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def decode(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Model actions (rows, >= action_dim) -> (rows, action_dim) float32 robot units; relative
        keys made absolute against `state` (state_dim,), the observation's last step."""
        parts, start = [], 0
        for key in self.action:
            values = key.normalizer.unnormalize(actions[:, start : start + key.dim])
            parts.append(key.absolute(values, state) if key.relative else values)
            start += key.dim
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def encode(self, actions: np.ndarray, state: np.ndarray | None) -> np.ndarray:
        """Robot actions (N, action_dim) -> model units (N, action_dim) float32: relative keys made
        relative to `state` first; with `state` None they stay absolute robot units (the form a
        chunk is remembered in for real-time chunking, see the module docstring)."""
        parts, start = [], 0
        for key in self.action:
            values = np.asarray(actions[:, start : start + key.dim], np.float64)
            if key.relative and state is None:
                parts.append(values)
            elif key.relative:
                assert state is not None
                parts.append(key.normalizer.normalize(key.relative_to(values, state)))
            else:
                parts.append(key.normalizer.normalize(values))
            start += key.dim
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def remembered(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """A chunk in model units (H, A) -> the form real-time chunking remembers: relative keys
        absolute (robot units), the others as they are."""
        if not self.relative:
            return actions
        out, start = actions.copy(), 0
        for key in self.action:
            if key.relative:
                values = key.normalizer.unnormalize(actions[:, start : start + key.dim])
                out[:, start : start + key.dim] = key.absolute(values, state)
            start += key.dim
        return out

    def in_frame(self, remembered: np.ndarray, rows: int, state: np.ndarray) -> np.ndarray:
        """The inverse of `remembered` against a new state, for the first `rows` rows (the others
        stay as they are: zeros past a prefix's overlap)."""
        if not self.relative or rows == 0:
            return remembered
        out, start = remembered.copy(), 0
        for key in self.action:
            if key.relative:
                absolute = np.asarray(remembered[:rows, start : start + key.dim], np.float64)
                out[:rows, start : start + key.dim] = key.normalizer.normalize(
                    key.relative_to(absolute, state)
                )
            start += key.dim
        return out

    def state_names(self) -> tuple[str, ...]:
        return _names((k.key, k.dim) for k in self.state)

    def action_names(self) -> tuple[str, ...]:
        return _names((k.key, k.dim) for k in self.action)

    def describe(self) -> str:
        history = ""
        if self.image_history or self.state_history:
            history = f", history: frames {list(self.image_history)} states {list(self.state_history)}"
        relative = [k.key for k in self.action if k.relative]
        return (
            f"{self.tag} (projector {self.projector}): cameras {', '.join(self.cameras)}; "
            f"state {self.state_dim} ({', '.join(f'{k.key}:{k.dim}' for k in self.state)}); "
            f"actions {self.horizon} x {self.action_dim}"
            + (f" (relative to the state: {', '.join(relative)})" if relative else "")
            + history
        )


def _names(keys: Any) -> tuple[str, ...]:
    """ModelInfo's layout names, "<key>.<index>" as for N1.5 (the ZeroMQ endpoint reads the keys
    back from them)."""
    return tuple(f"{key}.{i}" for key, dim in keys for i in range(dim))


# ---- building the embodiments from the files ------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What the network takes (config.json)."""

    max_state_dim: int
    max_action_dim: int
    horizon: int
    state_history: int
    projectors: int


def build_embodiments(
    kwargs: Mapping[str, Any],
    modalities: Mapping[str, Mapping[str, Any]],
    statistics: Mapping[str, Any],
    projectors: Mapping[str, int],
    limits: Limits,
) -> tuple[dict[str, Embodiment17], dict[str, str]]:
    """The servable embodiments, and the skipped tags with the reason (a tag without statistics or
    projector index); ModelLoadError for a configuration the network cannot take."""
    served: dict[str, Embodiment17] = {}
    skipped: dict[str, str] = {}
    for tag, modality in modalities.items():
        if tag not in statistics:
            skipped[tag] = "no statistics.json entry"
            continue
        if tag not in projectors:
            skipped[tag] = "no embodiment_id.json entry"
            continue
        served[tag] = _embodiment(tag, kwargs, modality, statistics[tag], projectors[tag], limits)
    return served, skipped


def _where(tag: str, part: str) -> str:
    return f"processor_config.json modality_configs.{tag}.{part}"


def _offsets(tag: str, part: str, raw: Any) -> tuple[int, ...]:
    offsets = tuple(int(d) for d in raw.delta_indices)
    if not offsets or offsets[-1] != 0 or list(offsets) != sorted(set(offsets)):
        raise ModelLoadError(
            f"{_where(tag, part)}.delta_indices {list(offsets)}: expected ascending, ending at 0"
        )
    return offsets


def _stats(statistics: Mapping[str, Any], tag: str, kind: str, key: str) -> Mapping[str, Any]:
    entry = (statistics.get(kind) or {}).get(key)
    if not isinstance(entry, Mapping):
        raise ModelLoadError(f"statistics.json has no {tag}.{kind}.{key}")
    return entry


def _dim(stats: Mapping[str, Any], tag: str, kind: str, key: str) -> int:
    for name in ("min", "q01", "mean"):
        if isinstance(stats.get(name), list):
            return len(stats[name])
    raise ModelLoadError(f"statistics.json {tag}.{kind}.{key} has no min / q01 / mean list")


def _normalizer(
    stats: Mapping[str, Any], mode: str, clip: bool, where: str, percentiles: bool
) -> nz.Normalizer:
    try:
        if mode == nz.MEAN_STD:
            values = nz.Stats.of(stats, where)
        elif percentiles:
            values = nz.Stats.of({"q01": stats.get("q01"), "q99": stats.get("q99")}, where)
        else:
            values = nz.Stats.of({"min": stats.get("min"), "max": stats.get("max")}, where)
        return nz.Normalizer(mode, values, nz.GROOT17, clip=clip)
    except nz.StatsError as exc:
        raise ModelLoadError(f"statistics.json {exc}") from None


def _keys(raw: Any, name: str) -> set[str]:
    return {str(k) for k in (raw.extra.get(name) or [])}


def _embodiment(
    tag: str,
    kwargs: Mapping[str, Any],
    modality: Mapping[str, Any],
    statistics: Mapping[str, Any],
    projector: int,
    limits: Limits,
) -> Embodiment17:
    for part in ("video", "state", "action", "language"):
        if part not in modality:
            raise ModelLoadError(f"{_where(tag, part)} is missing")
    video, state, action = modality["video"], modality["state"], modality["action"]
    if not 0 <= projector < limits.projectors:
        raise ModelLoadError(
            f"embodiment_id.json maps {tag!r} to {projector}, outside the model's "
            f"{limits.projectors} projectors"
        )
    clip = bool(kwargs.get("clip_outliers", True))
    percentiles = bool(kwargs.get("use_percentiles", False))
    sincos = _keys(state, "sin_cos_embedding_keys") if kwargs.get("apply_sincos_state_encoding") else set()
    state_mean_std = _keys(state, "mean_std_embedding_keys")
    state_keys = []
    for key in state.modality_keys:
        stats = _stats(statistics, tag, "state", key)
        dim = _dim(stats, tag, "state", key)
        where = f"{tag}.state.{key}"
        if key in sincos:
            normalizer = nz.Normalizer(nz.SIN_COS)
        elif key in state_mean_std:
            normalizer = _normalizer(stats, nz.MEAN_STD, False, where, percentiles)
        else:
            mode = nz.QUANTILE if percentiles else nz.MIN_MAX
            normalizer = _normalizer(stats, mode, clip, where, percentiles)
        state_keys.append(StateKey(key, dim, normalizer))
    starts = np.cumsum([0] + [k.dim for k in state_keys])
    where_in_state = {k.key: (int(starts[i]), int(starts[i + 1])) for i, k in enumerate(state_keys)}

    configs = action.extra.get("action_configs") or [{} for _ in action.modality_keys]
    if len(configs) != len(action.modality_keys):
        raise ModelLoadError(
            f"{_where(tag, 'action')}: {len(configs)} action_configs for {len(action.modality_keys)} keys"
        )
    use_relative = bool(kwargs.get("use_relative_action", False))
    action_mean_std = _keys(action, "mean_std_embedding_keys")
    action_keys = []
    for key, config in zip(action.modality_keys, configs, strict=True):
        rep, kind = str(config.get("rep", ABSOLUTE)), str(config.get("type", NON_EEF))
        fmt = str(config.get("format", DEFAULT))
        if (
            rep not in (RELATIVE, ABSOLUTE, DELTA)
            or kind not in (EEF, NON_EEF)
            or fmt not in (DEFAULT, *_ROTATION)
        ):
            raise ModelLoadError(f"{_where(tag, 'action')}.action_configs for {key!r}: unknown {config}")
        dim = _dim(_stats(statistics, tag, "action", key), tag, "action", key)
        relative = rep == RELATIVE and use_relative
        stats = _stats(statistics, tag, "relative_action" if relative else "action", key)
        mode = (
            nz.MEAN_STD
            if key in action_mean_std
            else (nz.QUANTILE if percentiles and not relative else nz.MIN_MAX)
        )
        normalizer = _normalizer(stats, mode, clip, f"{tag}.action.{key}", percentiles and not relative)
        reference = (0, 0)
        if relative:
            state_key = str(config.get("state_key") or key)
            if state_key not in where_in_state:
                raise ModelLoadError(
                    f"{_where(tag, 'action')}: {key!r} is relative to {state_key!r}, not a state key"
                )
            reference = where_in_state[state_key]
            if reference[1] - reference[0] != dim:
                raise ModelLoadError(
                    f"{_where(tag, 'action')}: {key!r} has {dim} dims, its state {state_key!r} "
                    f"{reference[1] - reference[0]}"
                )
            if kind == EEF and (fmt not in _ROTATION or _ROTATION[fmt][1] != dim):
                raise ModelLoadError(
                    f"{_where(tag, 'action')}: EEF key {key!r} in format {fmt} ({dim} dims) "
                    "is not served (XYZ_ROT6D: 9, XYZ_ROTVEC: 6)"
                )
        action_keys.append(ActionKey(key, dim, normalizer, relative, kind == EEF, fmt, reference))

    emb = Embodiment17(
        tag=tag,
        projector=projector,
        cameras=tuple(video.modality_keys),
        video_offsets=_offsets(tag, "video", video),
        state=tuple(state_keys),
        state_offsets=_offsets(tag, "state", state),
        action=tuple(action_keys),
        horizon=len(action.delta_indices),
        exclude_state=bool(kwargs.get("exclude_state", False) or state.extra.get("exclude_state", False)),
    )
    width = sum(k.width for k in emb.state)
    problems = []
    if not emb.cameras:
        problems.append("no video modality_keys")
    if width > limits.max_state_dim:
        problems.append(f"state width {width} > max_state_dim {limits.max_state_dim}")
    if emb.action_dim > limits.max_action_dim:
        problems.append(f"action dims {emb.action_dim} > max_action_dim {limits.max_action_dim}")
    if not 0 < emb.horizon <= limits.horizon:
        problems.append(f"action horizon {emb.horizon} outside 1..{limits.horizon}")
    if len(emb.state_offsets) != limits.state_history:
        problems.append(
            f"{len(emb.state_offsets)} state steps, config.json state_history_length {limits.state_history}"
        )
    if problems:
        raise ModelLoadError(f"GR00T N1.7 embodiment {tag!r} cannot be served: " + "; ".join(problems))
    return emb


def formalize(instruction: str) -> str:
    """formalize_language: lower case, punctuation removed (re's \\w: letters, digits, underscore)."""
    return re.sub(r"[^\w\s]", "", instruction.lower())


# ---- the prompt ----------------------------------------------------------------------------------


def _special_tokens(tokenizer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The special-token strings transformers hands a chat template (bos_token, eos_token, ...)."""
    out: dict[str, Any] = {}
    for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = tokenizer_config.get(name)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    extra = tokenizer_config.get("additional_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = [t.get("content") if isinstance(t, Mapping) else t for t in extra]
    return out


class Prompt:
    """The N1.7 prompt: the backbone's chat template (Jinja) + tokenizer.json."""

    def __init__(
        self,
        template: str,
        tokenizer_file: Path,
        tokenizer_config: Mapping[str, Any],
        image_token_id: int,
        tokens_per_image: int,
    ) -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        # As transformers renders chat templates: sandboxed, trim_blocks / lstrip_blocks, loop
        # controls, tojson, raise_exception and strftime_now.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(
            value, indent=indent, ensure_ascii=False
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(template)
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # jinja2 / tokenizers raise their own Exception subclasses
            raise ModelLoadError(
                f"cannot read the backbone's chat template / {tokenizer_file}: {exc}"
            ) from None
        self.special = _special_tokens(tokenizer_config)
        extra = tokenizer_config.get("extra_special_tokens") or {}
        self.image_token = (
            str(extra.get("image_token", "<|image_pad|>")) if isinstance(extra, Mapping) else "<|image_pad|>"
        )
        found = self.tokenizer.token_to_id(self.image_token)
        if found != image_token_id:
            raise ModelLoadError(
                f"tokenizer {tokenizer_file} maps {self.image_token} to {found}, "
                f"the backbone expects {image_token_id}"
            )
        pad = self.special.get("pad_token")
        self.pad_id = int(self.tokenizer.token_to_id(pad) or 0) if isinstance(pad, str) else 0
        self.tokens_per_image = tokens_per_image

    def text(self, instruction: str, images: int) -> str:
        """The rendered prompt, before the image tokens are expanded."""
        content: list[dict[str, Any]] = [{"type": "image", "image": f"image {i}"} for i in range(images)]
        content.append({"type": "text", "text": instruction})
        messages = [{"role": "user", "content": content}]
        return self.template.render(messages=messages, add_generation_prompt=False, **self.special)

    def ids(self, instruction: str, images: int) -> list[int]:
        text = self.text(instruction, images)
        if text.count(self.image_token) != images:
            raise ValueError(
                f"the chat template rendered {text.count(self.image_token)} image tokens for {images} images"
            )
        expanded = text.replace(self.image_token, self.image_token * self.tokens_per_image)
        return list(self.tokenizer.encode(expanded, add_special_tokens=True).ids)


__all__: Sequence[str] = (
    "ActionKey",
    "Embodiment17",
    "Limits",
    "Prompt",
    "StateKey",
    "build_embodiments",
    "formalize",
)
