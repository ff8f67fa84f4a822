"""Reading an OpenVLA checkpoint directory (the HF layout of openvla/openvla-7b).

Only JSON, safetensors and the SentencePiece `tokenizer.model` are read: the checkpoint's
Python files (auto_map) are never imported, nothing is unpickled.

  config.json                   PrismaticConfig/OpenVLAConfig: timm_model_ids, image_sizes,
                                image_resize_strategy, text_config (Llama), pad_to_multiple_of,
                                n_action_bins, norm_stats
  model.safetensors.index.json  + model-0000N-of-0000M.safetensors, or one model.safetensors
  tokenizer.model               Llama-2 SentencePiece model
  preprocessor_config.json      optional: image means/stds, interpolation, resize strategy
  dataset_statistics.json       optional (fine-tunes): norm stats, merged over config.json's

Tower sizes come from the timm model ids. A checkpoint may instead describe its towers with
the key `vla_inference_towers` (a list of two ViTConfig field dicts): the tiny test
checkpoints use it, the published ones do not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.openvla.model import (
    DINOV2_L14_REG4,
    SIGLIP_SO400M_14,
    LlamaConfig,
    OpenVLA,
    OpenVLAConfig,
    ViTConfig,
)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
PREPROCESSOR_FILE = "preprocessor_config.json"
STATISTICS_FILE = "dataset_statistics.json"
TOWERS_KEY = "vla_inference_towers"

# timm model id (without the ".pretrained_tag") -> tower architecture
TIMM_TOWERS: dict[str, ViTConfig] = {
    "vit_large_patch14_reg4_dinov2": DINOV2_L14_REG4,
    "vit_so400m_patch14_siglip_224": SIGLIP_SO400M_14,
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ActionStats:
    """One dataset's action statistics (the `action` entry of norm_stats)."""

    q01: np.ndarray  # (D,) float64
    q99: np.ndarray  # (D,)
    mask: np.ndarray  # (D,) bool: True = un-normalise this dimension

    @property
    def dim(self) -> int:
        return int(self.q01.shape[0])


@dataclass(frozen=True)
class ImageSpec:
    size: int  # square input side (224)
    resize_strategy: str  # resize-naive | letterbox | resize-crop
    means: tuple[tuple[float, float, float], tuple[float, float, float]]  # DINOv2, SigLIP
    stds: tuple[tuple[float, float, float], tuple[float, float, float]]
    interpolation: str  # bicubic | bilinear


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: OpenVLAConfig
    norm_stats: dict[str, ActionStats]
    image: ImageSpec
    weight_files: dict[str, list[str]]  # shard file name -> tensor names
    raw_config: dict[str, Any]


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ModelLoadError(f"missing {path.name} in {path.parent}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def _tower_config(timm_id: str, image_size: int) -> ViTConfig:
    base = timm_id.split(".")[0]
    if base not in TIMM_TOWERS:
        raise ModelLoadError(
            f"unsupported vision tower {timm_id!r} in config.json timm_model_ids; "
            f"supported: {', '.join(TIMM_TOWERS)}"
        )
    return replace(TIMM_TOWERS[base], image_size=image_size)


def _llama_config(text: Mapping[str, Any]) -> LlamaConfig:
    """text_config -> LlamaConfig; absent keys take transformers' LlamaConfig defaults (as the reference)."""
    if text.get("model_type", "llama") != "llama":
        raise ModelLoadError(f"unsupported language model {text.get('model_type')!r}; OpenVLA uses llama")
    if text.get("rope_scaling"):
        raise ModelLoadError("text_config.rope_scaling is not supported")
    heads = int(text.get("num_attention_heads", 32))
    return LlamaConfig(
        vocab_size=int(text.get("vocab_size", 32000)),
        dim=int(text.get("hidden_size", 4096)),
        n_layers=int(text.get("num_hidden_layers", 32)),
        n_heads=heads,
        n_kv_heads=int(text.get("num_key_value_heads") or heads),
        intermediate=int(text.get("intermediate_size", 11008)),
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(text.get("rope_theta", 10000.0)),
        max_seq_len=int(text.get("max_position_embeddings", 2048)),
    )


def parse_config(raw: Mapping[str, Any]) -> OpenVLAConfig:
    if raw.get("use_fused_vision_backbone") is False:
        raise ModelLoadError("only fused (DINOv2 + SigLIP) OpenVLA checkpoints are supported")
    sizes = [int(s) for s in raw.get("image_sizes", [224, 224])]
    if len(sizes) == 1:
        sizes = sizes * 2
    try:
        if TOWERS_KEY in raw:
            towers = raw[TOWERS_KEY]
            names = {f.name for f in fields(ViTConfig)}
            dino, siglip = (ViTConfig(**{k: v for k, v in t.items() if k in names}) for t in towers)
        else:
            ids = raw.get("timm_model_ids") or []
            if len(ids) != 2:
                raise ModelLoadError(f"config.json timm_model_ids must name two towers, got {ids!r}")
            dino, siglip = _tower_config(ids[0], sizes[0]), _tower_config(ids[1], sizes[1])
        llm = _llama_config(raw.get("text_config") or {})
        return OpenVLAConfig(
            dino=dino,
            siglip=siglip,
            llm=llm,
            pad_token_id=int(raw.get("pad_token_id", 32000)),
            pad_to_multiple_of=int(raw.get("pad_to_multiple_of", 64)),
            n_action_bins=int(raw.get("n_action_bins", 256)),
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid OpenVLA config.json: {exc}") from None


def parse_norm_stats(raw: Mapping[str, Any]) -> dict[str, ActionStats]:
    stats: dict[str, ActionStats] = {}
    for name, entry in raw.items():
        try:
            action = entry["action"]
            q01 = np.asarray(action["q01"], np.float64)
            q99 = np.asarray(action["q99"], np.float64)
            mask = np.asarray(action.get("mask", np.ones_like(q01, dtype=bool)), bool)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"norm_stats[{name!r}] has no usable action q01/q99/mask ({exc})") from None
        if q01.ndim != 1 or q01.shape != q99.shape or q01.shape != mask.shape or q01.size == 0:
            raise ModelLoadError(f"norm_stats[{name!r}].action: q01, q99 and mask must be equal-length lists")
        if not (np.all(np.isfinite(q01)) and np.all(np.isfinite(q99))):
            raise ModelLoadError(f"norm_stats[{name!r}].action: q01/q99 must be finite")
        stats[str(name)] = ActionStats(q01=q01, q99=q99, mask=mask)
    return stats


def _image_spec(path: Path, raw: Mapping[str, Any], cfg: OpenVLAConfig) -> ImageSpec:
    pre: Mapping[str, Any] = {}
    if (path / PREPROCESSOR_FILE).is_file():
        pre = _read_json(path / PREPROCESSOR_FILE)
    strategy = str(pre.get("image_resize_strategy", raw.get("image_resize_strategy", "resize-naive")))
    if strategy not in ("resize-naive", "letterbox", "resize-crop"):
        raise ModelLoadError(f"unsupported image_resize_strategy {strategy!r}")
    means = pre.get("means") or [IMAGENET_MEAN, SIGLIP_MEAN]
    stds = pre.get("stds") or [IMAGENET_STD, SIGLIP_STD]
    interpolations = pre.get("interpolations") or ["bicubic", "bicubic"]
    interpolation = str(interpolations[0])
    if interpolation not in ("bicubic", "bilinear") or len(set(interpolations)) != 1:
        raise ModelLoadError(f"unsupported interpolations {interpolations!r} (bicubic or bilinear, equal)")
    if cfg.dino.image_size != cfg.siglip.image_size:
        raise ModelLoadError("both towers must take the same image size")
    return ImageSpec(
        size=cfg.dino.image_size,
        resize_strategy=strategy,
        means=(tuple(means[0]), tuple(means[1])),  # type: ignore[arg-type]
        stds=(tuple(stds[0]), tuple(stds[1])),  # type: ignore[arg-type]
        interpolation=interpolation,
    )


def _weight_files(path: Path) -> dict[str, list[str]]:
    from safetensors import safe_open

    if (path / INDEX_FILE).is_file():
        weight_map = _read_json(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{path / INDEX_FILE} has no weight_map")
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(str(file), []).append(str(name))
        for file in files:
            if not (path / file).is_file():
                raise ModelLoadError(f"shard {file} named in {INDEX_FILE} is missing from {path}")
        return files
    if (path / SINGLE_FILE).is_file():
        with safe_open(str(path / SINGLE_FILE), framework="pt") as handle:
            return {SINGLE_FILE: list(handle.keys())}
    raise ModelLoadError(f"no weights in {path}: expected {INDEX_FILE} with shards, or {SINGLE_FILE}")


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read everything but the tensors; fail early with what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"OpenVLA checkpoint directory {path} does not exist")
    raw = _read_json(path / CONFIG_FILE)
    cfg = parse_config(raw)
    stats_raw: dict[str, Any] = dict(raw.get("norm_stats") or {})
    if (path / STATISTICS_FILE).is_file():
        stats_raw.update(_read_json(path / STATISTICS_FILE))
    if not stats_raw:
        raise ModelLoadError(f"no norm_stats in {path / CONFIG_FILE} and no {STATISTICS_FILE}")
    return CheckpointInfo(
        path=path,
        config=cfg,
        norm_stats=parse_norm_stats(stats_raw),
        image=_image_spec(path, raw, cfg),
        weight_files=_weight_files(path),
        raw_config=dict(raw),
    )


def _listing(names: set[str], limit: int = 12) -> str:
    ordered = sorted(names)
    text = ", ".join(ordered[:limit])
    return text + (f", ... ({len(ordered) - limit} more)" if len(ordered) > limit else "")


def load_model(info: CheckpointInfo, device: str | torch.device, dtype: torch.dtype) -> OpenVLA:
    """Build the model on `meta`, allocate it once on `device`, stream tensors in shard by shard.

    Peak host memory is one tensor; the weights are never held twice.
    """
    from safetensors import safe_open

    with torch.device("meta"):
        model = OpenVLA(info.config)
    model = model.to(dtype=dtype)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    present = {name for names in info.weight_files.values() for name in names}
    missing, unexpected = set(expected) - present, present - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {_listing(unexpected)}")
        raise ModelLoadError(f"{info.path} does not match the OpenVLA layout: " + "; ".join(parts))

    model = model.to_empty(device=device)
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    params.update(model.named_buffers())
    with torch.no_grad():
        for file, names in info.weight_files.items():
            with safe_open(str(info.path / file), framework="pt", device="cpu") as handle:
                for name in names:
                    tensor = handle.get_tensor(name)
                    if tuple(tensor.shape) != expected[name]:
                        raise ModelLoadError(
                            f"{file}: {name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
                        )
                    params[name].copy_(tensor)
                    del tensor
    return model.eval()
