"""pi0 / pi0.5 checkpoints: what a loaded one holds, the openpi PyTorch format, and the dispatch
between formats (LeRobot's is in lerobot.py).

openpi PyTorch (examples/convert_jax_model_to_pytorch.py in Physical-Intelligence/openpi)::

    <dir>/model.safetensors        keys "paligemma_with_expert.paligemma.model.vision_tower...", ...
    <dir>/config.json              {action_dim, action_horizon, paligemma_variant, action_expert_variant,
                                    precision}; we also read the optional "pi05", "max_token_len",
                                    "vision_variant" (ours, default "so400m"), "flow_dims" (ours,
                                    default 0 = every dim) and "vla_inference"
    <dir>/assets/<asset_id>/norm_stats.json   {"norm_stats": {"state": {...}, "actions": {...}}}
    <dir>/tokenizer.model          optional (openpi downloads it; we never do)

  openpi saves with safetensors.torch.save_model, which keeps one name per tied tensor: the PaliGemma
  token embedding is stored as "paligemma.lm_head.weight" ("...language_model.embed_tokens.weight"
  is accepted too). The action expert's "gemma_expert.lm_head.weight" (vocab x expert width) is in
  every file but never used: it is skipped. The variant is read from config.json "pi05" when
  present, otherwise from the weights themselves (time_mlp_* = pi0.5, state_proj = pi0).

Only headers are read here; the policy streams the weights into the model (common/weights.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common import vit
from vla_inference.models.common.tokenizers import find_tokenizer
from vla_inference.models.common.weights import NameMap, Source, TensorEntry, read_json, read_layout
from vla_inference.models.pi0.model import (
    GEMMA_VARIANTS,
    IMAGE_SLOTS,
    PALIGEMMA_VOCAB_SIZE,
    SIGLIP_VARIANTS,
    Pi0Config,
)
from vla_inference.preprocessing import normalize as nz

__all__ = ["LEROBOT", "OPENPI", "Checkpoint", "EmbodimentNorm", "load", "write_openpi"]

OPENPI = "openpi"  # the checkpoint formats
LEROBOT = "lerobot"

_PG = PALIGEMMA = "paligemma_with_expert.paligemma."  # the PaliGemma's names (pi0-FAST's file too)
_EX = "paligemma_with_expert.gemma_expert."
_VIS = _PG + "model.vision_tower.vision_model."
_LM = _PG + "model.language_model."

# The PaliGemma token embedding, as openpi's save_model writes it (tied with the LM head), and its alias.
EMBED_KEY = _PG + "lm_head.weight"
EMBED_ALIAS = _LM + "embed_tokens.weight"
EXPERT_LM_HEAD = _EX + "lm_head.weight"  # in every openpi file, never used by the policy
TOKENIZER_HELP = (
    "pi0 needs the PaliGemma SentencePiece tokenizer: the file gs://big_vision/paligemma_tokenizer.model, "
    "also published as tokenizer.model in the google/paligemma-3b-pt-224 repository."
)


def openpi_names(embed_key: str = EMBED_KEY, prefix: str = "", lm_head_key: str | None = None) -> NameMap:
    """Our parameter names -> the openpi PyTorch names (LeRobot: the same under "model."; pi0-FAST's
    LeRobot file: under "model." with its own LM head).

    `embed_key`: which of the two embedding names fills the token embedding; `lm_head_key`: the
    tensor of a model's own `lm_head` (pi0-FAST as LeRobot saves it), None when it has none. The
    other PaliGemma names, the expert's LM head and SigLIP's attention-pooling head (in files saved
    with recent transformers) are skipped when present."""

    def sources(name: str, shape: tuple[int, ...]) -> list[Source]:
        head, _, rest = name.partition(".")
        if head == "vision":
            found = [s.under(_VIS) for s in vit.hf_siglip_names(rest, shape)]
        elif head == "projector":
            found = [Source(_PG + "model.multi_modal_projector.linear." + rest)]
        elif name == "vlm.embed_tokens.weight":
            found = [Source(embed_key)]
        elif head == "vlm":
            found = [Source(_LM + rest)]
        elif head == "expert":
            found = [Source(_EX + "model." + rest)]
        elif name == "lm_head.weight" and lm_head_key is not None:
            found = [Source(lm_head_key)]
        else:  # the action heads keep their names
            found = [Source(name)]
        return [s.under(prefix) for s in found]

    used = {embed_key, lm_head_key}
    skipped = {prefix + key for key in (EMBED_KEY, EMBED_ALIAS, EXPERT_LM_HEAD) if key not in used}

    def unused(key: str) -> bool:
        vision = prefix + _VIS
        return key in skipped or (key.startswith(vision) and vit.hf_siglip_unused(key.removeprefix(vision)))

    return NameMap(sources, unused)


# --------------------------------------------------------------------------------------------
# A loaded checkpoint
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class EmbodimentNorm:
    """One embodiment's state and action normalisers."""

    state: nz.Normalizer
    actions: nz.Normalizer


def read_openpi_norm_stats(path: Path) -> dict[str, nz.Stats]:
    """assets/<id>/norm_stats.json: {"norm_stats": {"state": {mean, std, q01, q99}, "actions": {...}}}."""
    data = read_json(path)
    stats = data.get("norm_stats", data)
    if not isinstance(stats, dict):
        raise ModelLoadError(f"{path}: missing 'norm_stats'")
    out = {}
    for key in ("state", "actions"):
        if key not in stats:
            continue
        if not isinstance(stats[key], dict):
            raise ModelLoadError(f"{path}:{key}: expected an object with mean/std/q01/q99")
        try:
            out[key] = nz.Stats.of(
                {k: v for k, v in stats[key].items() if k in ("mean", "std", "q01", "q99")}, f"{path}:{key}"
            )
        except nz.StatsError as exc:
            raise ModelLoadError(str(exc)) from None
    return out


@dataclass
class Checkpoint:
    format: str
    path: Path
    config: Pi0Config
    weight_files: list[Path]
    names: NameMap  # our names -> this file's names
    norms: dict[str, EmbodimentNorm]  # embodiment (asset id) -> normalisers; empty = no stats
    tokenizer_path: Path
    image_slots: tuple[str, ...] = IMAGE_SLOTS
    num_steps: int = 10
    about: About = field(default_factory=About)

    def describe(self) -> str:
        cfg = self.config
        return (
            f"{'pi0.5' if cfg.pi05 else 'pi0'} ({cfg.vision_variant} + {cfg.vlm_variant} + "
            f"{cfg.expert_variant}, action_dim {cfg.action_dim}, horizon {cfg.action_horizon})"
        )


# ---- config fields shared by both formats ------------------------------------------------------


def variant(name: Any, table: Mapping[str, Any], key: str, where: Path) -> str:
    if not isinstance(name, str) or name not in table:
        raise ModelLoadError(f"{where}: {key}={name!r} is not one of {', '.join(table)}")
    return name


def positive_int(config: Mapping[str, Any], key: str, default: int, where: Path) -> int:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{where}: {key}={value!r} must be a positive integer")
    return value


def flow_dims(config: Mapping[str, Any], where: Path) -> int:
    """Ours: "flow_dims" (Pi0Config.flow_dims), absent or 0 = every dim, as openpi."""
    value = config.get("flow_dims", 0)
    action_dim = config.get("action_dim", 32)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= action_dim:
        raise ModelLoadError(f"{where}: flow_dims={value!r} must be an integer from 0 to action_dim")
    return value


def variant_from_keys(layout: Mapping[str, TensorEntry], prefix: str) -> bool | None:
    """pi0.5 (True) when the weights have time_mlp_in, pi0 (False) when state_proj, else None."""
    has_time = prefix + "time_mlp_in.weight" in layout
    if has_time != (prefix + "state_proj.weight" in layout):
        return has_time
    return None


def vocab_size(layout: Mapping[str, TensorEntry], embed_key: str) -> int:
    entry = layout.get(embed_key)
    return int(entry.shape[0]) if entry is not None and len(entry.shape) == 2 else PALIGEMMA_VOCAB_SIZE


def gemma_variants(config: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """The Pi0Config variant fields named by config.json (both formats use openpi's keys)."""
    return {
        "vlm_variant": variant(
            config.get("paligemma_variant", "gemma_2b"), GEMMA_VARIANTS, "paligemma_variant", where
        ),
        "expert_variant": variant(
            config.get("action_expert_variant", "gemma_300m"), GEMMA_VARIANTS, "action_expert_variant", where
        ),
        "vision_variant": variant(
            config.get("vision_variant", "so400m"), SIGLIP_VARIANTS, "vision_variant", where
        ),
    }


def weights_of(path: Path) -> tuple[list[Path], dict[str, TensorEntry]]:
    """pi0 checkpoints are one model.safetensors; its header."""
    files = [path / "model.safetensors"]
    return files, read_layout(files)


# --------------------------------------------------------------------------------------------
# openpi
# --------------------------------------------------------------------------------------------


def _find_assets(path: Path) -> dict[str, Path]:
    """asset id -> norm_stats.json, at assets/<id>/ or deeper (assets/<org>/<dataset>/)."""
    root = path / "assets"
    if not root.is_dir():
        return {}
    return {str(p.parent.relative_to(root)): p for p in sorted(root.rglob("norm_stats.json"))}


def load_openpi(path: Path, *, tokenizer_path: str = "", norm_stats_key: str = "") -> Checkpoint:
    where = path / "config.json"
    config = read_json(where)
    files, layout = weights_of(path)
    from_keys = variant_from_keys(layout, "")
    pi05 = config.get("pi05", from_keys)
    if pi05 is None:
        raise ModelLoadError(
            f"{path}: cannot tell pi0 from pi0.5: config.json has no 'pi05' and the weights have "
            "neither state_proj (pi0) nor time_mlp_in (pi0.5)"
        )
    if not isinstance(pi05, bool):
        raise ModelLoadError(f"{where}: pi05={pi05!r} must be true or false")
    if from_keys is not None and from_keys != pi05:
        raise ModelLoadError(
            f"{where}: says pi05={str(pi05).lower()} but the weights are a "
            f"{'pi0.5' if from_keys else 'pi0'} model"
        )
    embed_key = EMBED_KEY if EMBED_KEY in layout or EMBED_ALIAS not in layout else EMBED_ALIAS
    cfg = Pi0Config(
        pi05=pi05,
        **gemma_variants(config, where),
        vocab_size=vocab_size(layout, embed_key),
        action_dim=positive_int(config, "action_dim", 32, where),
        action_horizon=positive_int(config, "action_horizon", 50, where),
        max_token_len=positive_int(config, "max_token_len", 200 if pi05 else 48, where),
        flow_dims=flow_dims(config, where),
    )
    found = _find_assets(path)
    if norm_stats_key:
        if norm_stats_key not in found:
            raise ModelLoadError(
                f"VLA_NORM_STATS_KEY={norm_stats_key!r} not found under {path / 'assets'}; available: "
                f"{', '.join(sorted(found)) or 'none'}"
            )
        found = {norm_stats_key: found[norm_stats_key]}
    mode = nz.QUANTILE if pi05 else nz.MEAN_STD
    norms: dict[str, EmbodimentNorm] = {}
    for asset_id, stats_path in found.items():
        stats = read_openpi_norm_stats(stats_path)
        made = {}
        for key in ("state", "actions"):
            if key not in stats:
                raise ModelLoadError(f"{stats_path}: no '{key}' statistics")
            try:
                made[key] = nz.Normalizer(mode, stats[key], nz.OPENPI)
            except nz.StatsError as exc:
                raise ModelLoadError(f"{stats_path}:{key}: {exc}") from None
        norms[asset_id] = EmbodimentNorm(made["state"], made["actions"])
    tokenizer = find_tokenizer(path, tokenizer_path, "tokenizer.model", TOKENIZER_HELP)
    about = About.from_config(config, where)
    return Checkpoint(OPENPI, path, cfg, files, openpi_names(embed_key), norms, tokenizer, about=about)


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
    """Write a checkpoint in the openpi PyTorch layout (what convert_jax_model_to_pytorch.py produces):
    the random demo model and the training export use it.

    norm_stats: asset id -> {"state": {"mean": [...], ...}, "actions": {...}}.
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = openpi_names().to_checkpoint(state_dict)
    if expert_lm_head:
        # openpi files carry the (unused) expert LM head; keep the layout identical.
        g = torch.Generator().manual_seed(0)
        shape = (cfg.vocab_size, cfg.expert.width)
        tensors[EXPERT_LM_HEAD] = (
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
        **({"flow_dims": cfg.flow_dims} if cfg.flow_dims else {}),
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


def detect_format(path: Path) -> str:
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint directory {path} does not exist")
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"{path} has no model.safetensors (pi0 checkpoints are a directory with one)")
    return LEROBOT if "type" in read_json(path / "config.json") else OPENPI


def load(path: Path, *, tokenizer_path: str = "", norm_stats_key: str = "") -> Checkpoint:
    """Read a checkpoint's config, statistics, tokenizer location and weight layout (not the weights)."""
    from vla_inference.models.pi0 import lerobot

    loader = lerobot.load_lerobot if detect_format(path) == LEROBOT else load_openpi
    return loader(path, tokenizer_path=tokenizer_path, norm_stats_key=norm_stats_key)
