"""Every pi0 / pi0.5 checkpoint format, in one place.

Formats read (safetensors and json only; nothing is unpickled or executed):

openpi PyTorch (examples/convert_jax_model_to_pytorch.py in Physical-Intelligence/openpi)::

    <dir>/model.safetensors        keys "paligemma_with_expert.paligemma.model.vision_tower...", ...
    <dir>/config.json              {action_dim, action_horizon, paligemma_variant, action_expert_variant,
                                    precision}; we also read the optional "pi05", "max_token_len",
                                    "vision_variant" (ours, default "so400m")
    <dir>/assets/<asset_id>/norm_stats.json   {"norm_stats": {"state": {mean, std, q01, q99},
                                                              "actions": {...}}}
    <dir>/tokenizer.model          optional (openpi downloads it; we never do)

  openpi saves with safetensors.torch.save_model, which keeps one name per tied tensor: the PaliGemma
  token embedding is stored as "paligemma.lm_head.weight" ("...language_model.embed_tokens.weight"
  is accepted too). A file holding both names (every LeRobot checkpoint) is read the way the
  reference forward pass reads it: the token embedding is "...language_model.embed_tokens.weight"
  and the LM head, which pi0 never uses, is ignored; the two are not guaranteed equal (fine-tuning
  trains the embedding). The action expert's "gemma_expert.lm_head.weight" (vocab x expert width)
  is in every openpi file but never used by pi0: it is accepted and ignored. The variant is read from
  config.json "pi05" when present, otherwise from the weights themselves (time_mlp_* = pi0.5,
  state_proj = pi0); a file that says neither is refused.

LeRobot (huggingface/lerobot, policies/pi0 and pi05)::

    <dir>/config.json              {"type": "pi0" | "pi05", chunk_size, max_action_dim, max_state_dim,
                                    tokenizer_max_length, paligemma_variant, action_expert_variant,
                                    input_features, output_features, normalization_mapping, ...}
    <dir>/model.safetensors        the openpi names prefixed with "model."
    <dir>/policy_preprocessor_step_<i>_normalizer_processor.safetensors    "observation.state.mean", ...
    <dir>/policy_postprocessor_step_0_unnormalizer_processor.safetensors   "action.mean", ...

  LeRobot checkpoints ship no tokenizer: VLA_TOKENIZER_PATH must name PaliGemma's tokenizer.model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.pi0.model import (
    GEMMA_VARIANTS,
    IMAGE_SLOTS,
    PALIGEMMA_VOCAB_SIZE,
    SIGLIP_VARIANTS,
    Pi0Config,
)

OPENPI = "openpi"
LEROBOT = "lerobot"

_PG = "paligemma_with_expert.paligemma."
_EX = "paligemma_with_expert.gemma_expert."
_VIS = _PG + "model.vision_tower.vision_model."
_LM = _PG + "model.language_model."

# Our token embedding: as openpi's save_model writes it (tied with the LM head), and the name the
# reference forward pass embeds tokens with, which wins when a file holds both.
EMBED_KEY = _PG + "lm_head.weight"
EMBED_ALIAS = _LM + "embed_tokens.weight"
# In every openpi file, never used by the policy.
IGNORED_KEYS = (_EX + "lm_head.weight",)

_VISION_LEAVES = {
    "norm1": "layer_norm1",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
_GEMMA_LEAVES = {
    "input_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "post_attn_norm": "post_attention_layernorm",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_HEADS = (
    "action_in_proj",
    "action_out_proj",
    "state_proj",
    "action_time_mlp_in",
    "action_time_mlp_out",
    "time_mlp_in",
    "time_mlp_out",
)


def openpi_name(name: str) -> str:
    """Our parameter name -> the openpi PyTorch checkpoint name."""
    parts = name.split(".")
    head, rest = parts[0], parts[1:]
    if head == "vision":
        sub = rest[0]
        if sub == "patch_embed":
            return _VIS + "embeddings.patch_embedding." + rest[-1]
        if sub == "pos_embed":
            return _VIS + "embeddings.position_embedding.weight"
        if sub == "post_norm":
            return _VIS + "post_layernorm." + rest[-1]
        if sub == "layers":
            return _VIS + f"encoder.layers.{rest[1]}.{_VISION_LEAVES[rest[2]]}." + ".".join(rest[3:])
    if head == "projector":
        return _PG + "model.multi_modal_projector.linear." + rest[-1]
    if name == "embed_tokens.weight":
        return EMBED_KEY
    if head in ("vlm", "expert"):
        base = _LM if head == "vlm" else _EX + "model."
        if rest[0] == "norm":
            return base + "norm." + ".".join(rest[1:])
        if rest[0] == "layers":
            return base + f"layers.{rest[1]}.{_GEMMA_LEAVES[rest[2]]}." + ".".join(rest[3:])
    if head in _HEADS:
        return name
    raise KeyError(f"no openpi name for {name!r}")


def to_openpi_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {openpi_name(k): v for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """One feature's statistics (float64 vectors)."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None

    @property
    def size(self) -> int:
        for value in (self.mean, self.q01, self.std, self.q99, self.min, self.max):
            if value is not None:
                return int(value.shape[-1])
        return 0


@dataclass(frozen=True)
class Normalizer:
    """Normalise / un-normalise the first `stats.size` dimensions; the rest pass through.

    openpi (shared/normalize.py, transforms.py):
        zscore   (x - mean) / (std + 1e-6)              inverse x * (std + 1e-6) + mean
        quantile (x - q01) / (q99 - q01 + 1e-6) * 2 - 1  inverse (x + 1) / 2 * (q99 - q01 + 1e-6) + q01
    LeRobot (processor/normalize_processor.py, eps 1e-8):
        MEAN_STD (x - mean) / (std + eps)               inverse x * std + mean
        QUANTILES 2 (x - q01) / d - 1, d = q99 - q01 (eps where 0)   inverse (x + 1) d / 2 + q01
        MIN_MAX  same with min / max
    """

    mode: str  # "zscore" | "quantile" | "minmax" | "identity"
    stats: Stats = field(default_factory=Stats)
    flavour: str = OPENPI
    eps: float = 1e-6

    def _parts(self) -> tuple[np.ndarray, np.ndarray]:
        """(offset, scale) so that normalised = (x - offset) / scale * k + c for each mode."""
        s = self.stats
        if self.mode == "zscore":
            assert s.mean is not None and s.std is not None
            return s.mean, s.std + self.eps
        lo, hi = (s.q01, s.q99) if self.mode == "quantile" else (s.min, s.max)
        assert lo is not None and hi is not None
        if self.flavour == OPENPI:
            return lo, hi - lo + self.eps
        d = hi - lo
        return lo, np.where(d == 0, self.eps, d)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "identity" or self.stats.size == 0:
            return x.astype(np.float32)
        n = min(self.stats.size, x.shape[-1])
        out = x.astype(np.float64).copy()
        offset, scale = self._parts()
        y = (out[..., :n] - offset[:n]) / scale[:n]
        out[..., :n] = y if self.mode == "zscore" else 2.0 * y - 1.0
        return out.astype(np.float32)

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "identity" or self.stats.size == 0:
            return x.astype(np.float32)
        n = min(self.stats.size, x.shape[-1])
        out = x.astype(np.float64).copy()
        offset, scale = self._parts()
        s = self.stats
        if self.mode == "zscore":
            assert s.std is not None
            std = scale[:n] if self.flavour == OPENPI else s.std[:n]
            out[..., :n] = out[..., :n] * std + offset[:n]
        else:
            out[..., :n] = (out[..., :n] + 1.0) / 2.0 * scale[:n] + offset[:n]
        return out.astype(np.float32)


@dataclass(frozen=True)
class EmbodimentNorm:
    state: Normalizer
    actions: Normalizer


# --------------------------------------------------------------------------------------------
# A loaded checkpoint
# --------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    format: str
    path: Path
    config: Pi0Config
    state_dict: dict[str, torch.Tensor]  # our names
    norms: dict[str, EmbodimentNorm]  # embodiment (asset id) -> normalisers; empty = no stats
    tokenizer_path: Path
    image_slots: tuple[str, ...] = IMAGE_SLOTS
    num_steps: int = 10
    notes: list[str] = field(default_factory=list)
    about: About = field(default_factory=lambda: About())


@dataclass(frozen=True)
class About:
    """What a checkpoint says about itself in config.json's optional "vla_inference" section:
    {"description": str, "embodiments": {tag: {"state": [names], "actions": [names]}},
     "cameras": [names of the cameras it was trained with; others are refused]}."""

    description: str = ""
    state_layouts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    action_layouts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cameras: tuple[str, ...] = ()

    @staticmethod
    def from_config(config: Mapping[str, Any], where: Path) -> About:
        section = config.get("vla_inference", {})
        if not isinstance(section, dict):
            raise ModelLoadError(f"{where}: 'vla_inference' must be an object")
        description = section.get("description", "")
        embodiments = section.get("embodiments", {})
        cameras = section.get("cameras", [])
        if (
            not isinstance(description, str)
            or not isinstance(embodiments, dict)
            or not isinstance(cameras, list)
            or not all(isinstance(c, str) for c in cameras)
        ):
            raise ModelLoadError(
                f"{where}: 'vla_inference' needs a string description, an embodiments object and a "
                "list of camera names"
            )
        layouts: dict[str, dict[str, tuple[str, ...]]] = {"state": {}, "actions": {}}
        for tag, spec in embodiments.items():
            for key in layouts:
                names = spec.get(key, []) if isinstance(spec, dict) else None
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ModelLoadError(
                        f"{where}: vla_inference.embodiments.{tag}.{key} must be a list of names"
                    )
                if names:
                    layouts[key][tag] = tuple(names)
        return About(description, layouts["state"], layouts["actions"], tuple(cameras))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def _vector(value: Any, where: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{where}: not a list of numbers") from None
    if not np.all(np.isfinite(arr)):
        raise ModelLoadError(f"{where}: contains NaN or inf")
    return arr


def _stats_from_json(obj: Any, where: str) -> Stats:
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{where}: expected an object with mean/std/q01/q99")
    return Stats(**{k: _vector(obj.get(k), f"{where}.{k}") for k in ("mean", "std", "q01", "q99")})


def read_openpi_norm_stats(path: Path) -> dict[str, Stats]:
    data = _read_json(path)
    stats = data.get("norm_stats", data)
    if not isinstance(stats, dict):
        raise ModelLoadError(f"{path}: missing 'norm_stats'")
    return {
        key: _stats_from_json(stats[key], f"{path}:{key}") for key in ("state", "actions") if key in stats
    }


def _select_assets(found: dict[str, Path], norm_stats_key: str, where: Path) -> dict[str, Path]:
    if not norm_stats_key:
        return found
    if norm_stats_key not in found:
        raise ModelLoadError(
            f"VLA_NORM_STATS_KEY={norm_stats_key!r} not found under {where}; available: "
            f"{', '.join(sorted(found)) or 'none'}"
        )
    return {norm_stats_key: found[norm_stats_key]}


def _check_stats(stats: Stats, mode: str, where: str) -> None:
    needed = {"zscore": ("mean", "std"), "quantile": ("q01", "q99"), "minmax": ("min", "max")}.get(mode, ())
    missing = [name for name in needed if getattr(stats, name) is None]
    if missing:
        raise ModelLoadError(f"{where}: {mode} normalisation needs {', '.join(missing)}")
    sizes = {getattr(stats, name).size for name in needed}
    if len(sizes) > 1:
        raise ModelLoadError(f"{where}: statistics of different lengths {sorted(sizes)}")


def find_tokenizer(checkpoint_dir: Path, tokenizer_path: str, fmt: str) -> Path:
    """VLA_TOKENIZER_PATH (a file, or a directory with tokenizer.model) wins; then <dir>/tokenizer.model."""
    if tokenizer_path:
        p = Path(tokenizer_path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.model"
        if not p.is_file():
            raise ModelLoadError(
                f"VLA_TOKENIZER_PATH={tokenizer_path!r}: no such file (expected tokenizer.model)"
            )
        return p
    candidate = checkpoint_dir / "tokenizer.model"
    if candidate.is_file():
        return candidate
    extra = " (LeRobot checkpoints ship no tokenizer)" if fmt == LEROBOT else ""
    raise ModelLoadError(
        f"pi0 needs the PaliGemma SentencePiece tokenizer file 'tokenizer.model'{extra}: put it at "
        f"{candidate} or set VLA_TOKENIZER_PATH to it. It is the file "
        "gs://big_vision/paligemma_tokenizer.model, "
        "also published as tokenizer.model in the google/paligemma-3b-pt-224 repository."
    )


def detect_format(path: Path) -> str:
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint directory {path} does not exist")
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"{path} has no model.safetensors (pi0 checkpoints are a directory with one)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json")
    config = _read_json(path / "config.json")
    return LEROBOT if "type" in config else OPENPI


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def _load_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}


def _variant_from_keys(keys: set[str], prefix: str) -> bool | None:
    has_time = prefix + "time_mlp_in.weight" in keys
    has_state = prefix + "state_proj.weight" in keys
    if has_time != has_state:
        return has_time
    return None


def expected_shapes(cfg: Pi0Config) -> dict[str, tuple[int, ...]]:
    """Our parameter names -> shapes for this configuration (built on the meta device)."""
    from vla_inference.models.pi0.model import build

    model = build(cfg, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def map_weights(file: Path, cfg: Pi0Config, prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read `file` into our names, checking every key and shape. Returns (state_dict, notes)."""
    shapes = _shapes(file)
    ours = expected_shapes(cfg)
    wanted = {prefix + openpi_name(k): k for k in ours}
    notes: list[str] = []
    lm_head = prefix + EMBED_KEY
    embed_tokens = prefix + EMBED_ALIAS
    ignored = {prefix + k for k in IGNORED_KEYS}
    if embed_tokens in shapes:
        # The forward pass embeds with embed_tokens; an LM head beside it is unused by pi0.
        wanted[embed_tokens] = wanted.pop(lm_head)
        if lm_head in shapes:
            ignored.add(lm_head)
            if tuple(shapes[lm_head]) != tuple(shapes[embed_tokens]):
                notes.append(f"{lm_head} has shape {list(shapes[lm_head])}, unlike the embedding")
    missing = sorted(k for k in wanted if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in wanted and k not in ignored)
    mismatched = sorted(
        f"{k}: file {list(shapes[k])}, model {list(ours[wanted[k]])}"
        for k in wanted
        if k in shapes and tuple(shapes[k]) != ours[wanted[k]]
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} weight(s): " + ", ".join(missing[:40]) + _more(missing, 40))
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} weight(s): " + ", ".join(unexpected[:40]) + _more(unexpected, 40)
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:20]) + _more(mismatched, 20)
        )
    if problems:
        raise ModelLoadError(f"{file} does not match the {_describe(cfg)} layout: " + " | ".join(problems))
    for k in sorted(ignored & set(shapes)):
        notes.append(f"ignored unused weight {k}")
    tensors = _load_tensors(file, list(wanted))
    return {wanted[k]: v for k, v in tensors.items()}, notes


def _more(items: list[str], shown: int) -> str:
    return f", ... ({len(items) - shown} more)" if len(items) > shown else ""


def _describe(cfg: Pi0Config) -> str:
    return (
        f"{'pi0.5' if cfg.pi05 else 'pi0'} ({cfg.vision_variant} + {cfg.vlm_variant} + {cfg.expert_variant}, "
        f"action_dim {cfg.action_dim}, horizon {cfg.action_horizon})"
    )


def _variant(name: Any, table: Mapping[str, Any], key: str, where: Path) -> str:
    if not isinstance(name, str) or name not in table:
        raise ModelLoadError(f"{where}: {key}={name!r} is not one of {', '.join(table)}")
    return name


def _int(config: Mapping[str, Any], key: str, default: int, where: Path) -> int:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{where}: {key}={value!r} must be a positive integer")
    return value


def _vocab_size(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    for key in (prefix + EMBED_ALIAS, prefix + EMBED_KEY):
        if key in shapes and len(shapes[key]) == 2:
            return int(shapes[key][0])
    return PALIGEMMA_VOCAB_SIZE


# --------------------------------------------------------------------------------------------
# openpi
# --------------------------------------------------------------------------------------------


def load_openpi(path: Path, *, tokenizer_path: str = "", norm_stats_key: str = "") -> Checkpoint:
    where = path / "config.json"
    config = _read_json(where)
    weights = path / "model.safetensors"
    shapes = _shapes(weights)
    from_keys = _variant_from_keys(set(shapes), "")
    pi05 = config.get("pi05")
    if pi05 is None:
        if from_keys is None:
            raise ModelLoadError(
                f"{path}: cannot tell pi0 from pi0.5: config.json has no 'pi05' and the weights have "
                "neither state_proj (pi0) nor time_mlp_in (pi0.5)"
            )
        pi05 = from_keys
    if not isinstance(pi05, bool):
        raise ModelLoadError(f"{where}: pi05={pi05!r} must be true or false")
    if from_keys is not None and from_keys != pi05:
        raise ModelLoadError(
            f"{where}: says pi05={str(pi05).lower()} but the weights are a "
            f"{'pi0.5' if from_keys else 'pi0'} model"
        )
    cfg = Pi0Config(
        pi05=pi05,
        vlm_variant=_variant(
            config.get("paligemma_variant", "gemma_2b"), GEMMA_VARIANTS, "paligemma_variant", where
        ),
        expert_variant=_variant(
            config.get("action_expert_variant", "gemma_300m"), GEMMA_VARIANTS, "action_expert_variant", where
        ),
        vision_variant=_variant(
            config.get("vision_variant", "so400m"), SIGLIP_VARIANTS, "vision_variant", where
        ),
        vocab_size=_vocab_size(shapes, ""),
        action_dim=_int(config, "action_dim", 32, where),
        action_horizon=_int(config, "action_horizon", 50, where),
        max_token_len=_int(config, "max_token_len", 200 if pi05 else 48, where),
    )
    state_dict, notes = map_weights(weights, cfg)

    mode = "quantile" if pi05 else "zscore"
    found = (
        {p.parent.name: p for p in sorted((path / "assets").glob("*/norm_stats.json")) if p.parent.is_dir()}
        if (path / "assets").is_dir()
        else {}
    )
    # norm_stats.json may also sit deeper (assets/<org>/<dataset>/norm_stats.json)
    if (path / "assets").is_dir():
        for p in sorted((path / "assets").rglob("norm_stats.json")):
            asset_id = str(p.parent.relative_to(path / "assets"))
            found.setdefault(asset_id, p)
    norms: dict[str, EmbodimentNorm] = {}
    for asset_id, stats_path in _select_assets(found, norm_stats_key, path / "assets").items():
        stats = read_openpi_norm_stats(stats_path)
        for key in ("state", "actions"):
            if key not in stats:
                raise ModelLoadError(f"{stats_path}: no '{key}' statistics")
            _check_stats(stats[key], mode, f"{stats_path}:{key}")
        norms[asset_id] = EmbodimentNorm(Normalizer(mode, stats["state"]), Normalizer(mode, stats["actions"]))
    tokenizer = find_tokenizer(path, tokenizer_path, OPENPI)
    about = About.from_config(config, where)
    return Checkpoint(OPENPI, path, cfg, state_dict, norms, tokenizer, notes=notes, about=about)


def write_openpi(
    path: Path,
    cfg: Pi0Config,
    state_dict: Mapping[str, torch.Tensor],
    norm_stats: Mapping[str, Mapping[str, Mapping[str, list[float]]]],
    *,
    tokenizer: bytes | None = None,
    precision: str = "float32",
    extra_config: Mapping[str, Any] | None = None,
    expert_lm_head: bool = True,
) -> Path:
    """Write a checkpoint in the openpi PyTorch layout (what convert_jax_model_to_pytorch.py produces).

    norm_stats: asset id -> {"state": {"mean": [...], ...}, "actions": {...}}.
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_openpi_state_dict(state_dict).items()}
    if expert_lm_head:
        # openpi files carry the (unused) expert LM head; keep the layout identical.
        g = torch.Generator().manual_seed(0)
        shape = (cfg.vocab_size, cfg.expert.width)
        tensors[IGNORED_KEYS[0]] = (
            torch.randn(shape, generator=g).mul_(0.02).to(next(iter(tensors.values())).dtype)
        )
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "action_dim": cfg.action_dim,
        "action_horizon": cfg.action_horizon,
        "paligemma_variant": cfg.vlm_variant,
        "action_expert_variant": cfg.expert_variant,
        "precision": precision,
        "pi05": cfg.pi05,
        "max_token_len": cfg.max_token_len,
        "vision_variant": cfg.vision_variant,
        **(extra_config or {}),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for asset_id, stats in norm_stats.items():
        target = path / "assets" / asset_id
        target.mkdir(parents=True, exist_ok=True)
        (target / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}, indent=2))
    if tokenizer is not None:
        (path / "tokenizer.model").write_bytes(tokenizer)
    return path


# --------------------------------------------------------------------------------------------
# LeRobot
# --------------------------------------------------------------------------------------------

_LEROBOT_MODES = {"MEAN_STD": "zscore", "QUANTILES": "quantile", "MIN_MAX": "minmax", "IDENTITY": "identity"}
LEROBOT_PREFIX = "model."


def _lerobot_stats(files: list[Path], feature: str) -> Stats | None:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            found = {
                name: f.get_tensor(f"{feature}.{name}").double().numpy().reshape(-1)
                for name in ("mean", "std", "q01", "q99", "min", "max")
                if f"{feature}.{name}" in keys
            }
        if found:
            return Stats(**found)
    return None


def _lerobot_eps(path: Path) -> float:
    for name in ("policy_postprocessor.json", "policy_preprocessor.json"):
        file = path / name
        if not file.is_file():
            continue
        for step in _read_json(file).get("steps", []):
            if isinstance(step, dict) and "normalizer" in str(step.get("registry_name", "")):
                eps = step.get("config", {}).get("eps")
                if isinstance(eps, int | float) and eps > 0:
                    return float(eps)
    return 1e-8


def load_lerobot(path: Path, *, tokenizer_path: str = "", norm_stats_key: str = "") -> Checkpoint:
    where = path / "config.json"
    config = _read_json(where)
    kind = config.get("type")
    if kind not in ("pi0", "pi05"):
        raise ModelLoadError(f"{where}: type={kind!r} is not a pi0 / pi05 policy")
    pi05 = kind == "pi05"
    for flag in ("use_relative_actions", "use_proprioceptive_memory", "use_visual_memory"):
        if config.get(flag):
            raise ModelLoadError(f"{where}: {flag}=true is not supported by this server")
    weights = path / "model.safetensors"
    shapes = _shapes(weights)
    from_keys = _variant_from_keys(set(shapes), LEROBOT_PREFIX)
    if from_keys is not None and from_keys != pi05:
        raise ModelLoadError(
            f"{where}: type={kind} but the weights are a {'pi0.5' if from_keys else 'pi0'} model"
        )
    max_action = _int(config, "max_action_dim", 32, where)
    if _int(config, "max_state_dim", 32, where) != max_action:
        raise ModelLoadError(f"{where}: max_state_dim must equal max_action_dim (both pad to one size)")
    resolution = config.get("image_resolution", [224, 224])
    vision_variant = _variant(
        config.get("vision_variant", "so400m"), SIGLIP_VARIANTS, "vision_variant", where
    )
    if list(resolution) != [SIGLIP_VARIANTS[vision_variant].image_size] * 2:
        raise ModelLoadError(
            f"{where}: image_resolution={resolution} is not supported (expected the tower's size)"
        )
    cfg = Pi0Config(
        pi05=pi05,
        vlm_variant=_variant(
            config.get("paligemma_variant", "gemma_2b"), GEMMA_VARIANTS, "paligemma_variant", where
        ),
        expert_variant=_variant(
            config.get("action_expert_variant", "gemma_300m"), GEMMA_VARIANTS, "action_expert_variant", where
        ),
        vision_variant=vision_variant,
        vocab_size=_vocab_size(shapes, LEROBOT_PREFIX),
        action_dim=max_action,
        action_horizon=_int(config, "chunk_size", 50, where),
        max_token_len=_int(config, "tokenizer_max_length", 200 if pi05 else 48, where),
    )
    state_dict, notes = map_weights(weights, cfg, prefix=LEROBOT_PREFIX)

    inputs = config.get("input_features") or {}
    image_keys = [k for k, v in inputs.items() if isinstance(v, dict) and v.get("type") == "VISUAL"]
    slots = tuple(k.removeprefix("observation.images.") for k in image_keys) or IMAGE_SLOTS
    empty = _int(config, "empty_cameras", 0, where) if config.get("empty_cameras") else 0
    slots = slots + tuple(f"empty_camera_{i}" for i in range(empty))

    mapping = config.get("normalization_mapping") or {}
    modes = {}
    for group, default in (
        ("STATE", "QUANTILES" if pi05 else "MEAN_STD"),
        ("ACTION", "QUANTILES" if pi05 else "MEAN_STD"),
    ):
        name = mapping.get(group, default)
        if name not in _LEROBOT_MODES:
            raise ModelLoadError(f"{where}: normalization_mapping.{group}={name!r} is not supported")
        modes[group] = _LEROBOT_MODES[name]
    eps = _lerobot_eps(path)
    pre = sorted(path.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    post = sorted(path.glob("policy_postprocessor_step_*_unnormalizer_processor.safetensors"))
    state_stats = _lerobot_stats(pre, "observation.state")
    action_stats = _lerobot_stats(post, "action") or _lerobot_stats(pre, "action")
    norms: dict[str, EmbodimentNorm] = {}
    if state_stats is not None or action_stats is not None:
        key = norm_stats_key or "default"
        state_norm = Normalizer(modes["STATE"], state_stats or Stats(), LEROBOT, eps)
        action_norm = Normalizer(modes["ACTION"], action_stats or Stats(), LEROBOT, eps)
        for label, norm in (("observation.state", state_norm), ("action", action_norm)):
            if norm.stats.size:
                _check_stats(norm.stats, norm.mode, f"{path} {label}")
            elif norm.mode != "identity":
                raise ModelLoadError(f"{path}: no '{label}' statistics in the normalizer files")
        norms[key] = EmbodimentNorm(state_norm, action_norm)
    tokenizer = find_tokenizer(path, tokenizer_path, LEROBOT)
    steps = _int(config, "num_inference_steps", 10, where)
    return Checkpoint(
        LEROBOT, path, cfg, state_dict, norms, tokenizer, image_slots=slots, num_steps=steps, notes=notes
    )


def write_lerobot(
    path: Path,
    cfg: Pi0Config,
    state_dict: Mapping[str, torch.Tensor],
    *,
    state_stats: Mapping[str, list[float]],
    action_stats: Mapping[str, list[float]],
    state_dim: int,
    action_dim: int,
    lm_head: torch.Tensor | None = None,
) -> Path:
    """Write a checkpoint in LeRobot's pi0 / pi05 layout (config.json + model.safetensors + normalizers).

    Like LeRobot's own files, model.safetensors holds both the token embedding
    ("...language_model.embed_tokens.weight") and the PaliGemma LM head ("...paligemma.lm_head.weight"):
    `lm_head` gives the latter (default: a copy of the embedding, as right after conversion).
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    named = to_openpi_state_dict(state_dict)
    embedding = named.pop(EMBED_KEY)
    named[EMBED_ALIAS] = embedding
    named[EMBED_KEY] = embedding.clone() if lm_head is None else lm_head
    tensors = {LEROBOT_PREFIX + k: v.detach().contiguous().cpu() for k, v in named.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    mode = "QUANTILES" if cfg.pi05 else "MEAN_STD"
    config = {
        "type": "pi05" if cfg.pi05 else "pi0",
        "paligemma_variant": cfg.vlm_variant,
        "action_expert_variant": cfg.expert_variant,
        "vision_variant": cfg.vision_variant,
        "dtype": "float32",
        "n_obs_steps": 1,
        "chunk_size": cfg.action_horizon,
        "n_action_steps": cfg.action_horizon,
        "max_state_dim": cfg.action_dim,
        "max_action_dim": cfg.action_dim,
        "num_inference_steps": 10,
        "image_resolution": [cfg.vision.image_size, cfg.vision.image_size],
        "tokenizer_max_length": cfg.max_token_len,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode},
        "input_features": {
            **{
                f"observation.images.{slot}": {
                    "type": "VISUAL",
                    "shape": [3, cfg.vision.image_size, cfg.vision.image_size],
                }
                for slot in IMAGE_SLOTS
            },
            "observation.state": {"type": "STATE", "shape": [state_dim]},
        },
        "output_features": {"action": {"type": "ACTION", "shape": [action_dim]}},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))

    def flat(prefix: str, stats: Mapping[str, list[float]]) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": torch.tensor(v, dtype=torch.float32) for k, v in stats.items()}

    save_file(
        {**flat("observation.state", state_stats), **flat("action", action_stats)},
        str(path / "policy_preprocessor_step_4_normalizer_processor.safetensors"),
    )
    save_file(
        flat("action", action_stats),
        str(path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"),
    )
    step = {"registry_name": "normalizer_processor", "config": {"eps": 1e-8}}
    (path / "policy_preprocessor.json").write_text(
        json.dumps({"name": "policy_preprocessor", "steps": [step]})
    )
    return path


# --------------------------------------------------------------------------------------------


def load(path: Path, *, tokenizer_path: str = "", norm_stats_key: str = "") -> Checkpoint:
    fmt = detect_format(path)
    loader = load_lerobot if fmt == LEROBOT else load_openpi
    return loader(path, tokenizer_path=tokenizer_path, norm_stats_key=norm_stats_key)
