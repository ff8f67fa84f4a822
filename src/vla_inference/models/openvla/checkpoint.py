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

Tower sizes and conventions come from the timm model ids (model.TIMM_TOWERS: DINOv2 S/B/L/g with
or without registers, SigLIP B/16 and So400m/14 at 224 or 384 px). A checkpoint may instead
describe its towers with the key `vla_inference_towers` (a list of two ViTConfig field dicts): the
tiny test checkpoints use it, the published ones do not.

Checkpoint names: `vision_backbone.featurizer.*` / `fused_featurizer.*` are timm's (LayerScale's
`gamma` renamed `scale_factor` by the OpenVLA port), `projector.*` ours, `language_model.model.*`
and `language_model.lm_head.weight` HF Llama's. The towers' last block, final norm and SigLIP's
attention-pool head are in the files but never run: they are skipped, not allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common import vit
from vla_inference.models.common.transformer import DecoderConfig
from vla_inference.models.common.weights import NameMap, Source, find_weight_files, load_weights, read_json
from vla_inference.models.openvla.model import TIMM_TOWERS, OpenVLA, OpenVLAConfig
from vla_inference.preprocessing import normalize as nz

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
PREPROCESSOR_FILE = "preprocessor_config.json"
STATISTICS_FILE = "dataset_statistics.json"
TOWERS_KEY = "vla_inference_towers"
_TOWERS = {"dino": "vision_backbone.featurizer.", "siglip": "vision_backbone.fused_featurizer."}

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

    def normalizer(self) -> nz.Normalizer:
        """[-1, 1] <-> robot units with q01 / q99 where the mask is True (OpenVLA's bounds)."""
        return nz.Normalizer(
            nz.QUANTILE, nz.Stats(q01=self.q01, q99=self.q99, mask=self.mask), nz.BOUNDS, eps=0.0
        )


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
    weight_files: list[Path]
    raw_config: dict[str, Any]


def openvla_names(cfg: OpenVLAConfig) -> NameMap:
    """Our names -> the HF OpenVLA checkpoint's; the towers' never-run tensors are skipped."""

    def sources(name: str, shape: tuple[int, ...]) -> list[Source]:
        head, _, rest = name.partition(".")
        if head in _TOWERS:
            layer_scale = "scale_factor" if head == "dino" else "gamma"
            return [s.under(_TOWERS[head]) for s in vit.timm_name(rest, shape, layer_scale)]
        if head == "llm":
            return [Source("language_model.model." + rest)]
        if head == "lm_head":
            return [Source("language_model." + name)]
        return [Source(name)]  # projector.*

    def unused(key: str) -> bool:
        return any(
            key.startswith(prefix) and vit.timm_unused(getattr(cfg, tower), key.removeprefix(prefix))
            for tower, prefix in _TOWERS.items()
        )

    return NameMap(sources, unused)


def _tower_config(timm_id: str, image_size: int) -> vit.ViTConfig:
    base = timm_id.split(".")[0]
    if base not in TIMM_TOWERS:
        raise ModelLoadError(
            f"unsupported vision tower {timm_id!r} in config.json timm_model_ids; "
            f"supported: {', '.join(TIMM_TOWERS)}"
        )
    tower = TIMM_TOWERS[base]
    if "siglip" in base and tower.image_size != image_size:
        raise ModelLoadError(
            f"config.json image_sizes gives {image_size} px for {timm_id}, a {tower.image_size} px tower"
        )
    return replace(tower, image_size=image_size)


def _llama_config(text: Mapping[str, Any]) -> tuple[DecoderConfig, int, int]:
    """text_config -> (decoder config, vocab size, max positions); absent keys take transformers'
    LlamaConfig defaults (as the reference)."""
    if text.get("model_type", "llama") != "llama":
        raise ModelLoadError(f"unsupported language model {text.get('model_type')!r}; OpenVLA uses llama")
    if text.get("rope_scaling"):
        raise ModelLoadError("text_config.rope_scaling is not supported")
    heads = int(text.get("num_attention_heads", 32))
    width = int(text.get("hidden_size", 4096))
    decoder = DecoderConfig(
        width=width,
        depth=int(text.get("num_hidden_layers", 32)),
        mlp_dim=int(text.get("intermediate_size", 11008)),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=width // heads,
        norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(text.get("rope_theta", 10000.0)),
    )
    return decoder, int(text.get("vocab_size", 32000)), int(text.get("max_position_embeddings", 2048))


def parse_config(raw: Mapping[str, Any]) -> OpenVLAConfig:
    if raw.get("use_fused_vision_backbone") is False:
        raise ModelLoadError("only fused (DINOv2 + SigLIP) OpenVLA checkpoints are supported")
    sizes = [int(s) for s in raw.get("image_sizes", [224, 224])]
    if len(sizes) == 1:
        sizes = sizes * 2
    try:
        if TOWERS_KEY in raw:
            towers = raw[TOWERS_KEY]
            names = {f.name for f in fields(vit.ViTConfig)}
            dino, siglip = (vit.ViTConfig(**{k: v for k, v in t.items() if k in names}) for t in towers)
        else:
            ids = raw.get("timm_model_ids") or []
            if len(ids) != 2:
                raise ModelLoadError(f"config.json timm_model_ids must name two towers, got {ids!r}")
            dino, siglip = _tower_config(ids[0], sizes[0]), _tower_config(ids[1], sizes[1])
        llm, vocab_size, max_seq_len = _llama_config(raw.get("text_config") or {})
        if dino.num_patches != siglip.num_patches:
            raise ModelLoadError(
                f"the towers give {dino.num_patches} and {siglip.num_patches} patches; a fused backbone "
                "needs the same patch grid (image size / patch size) in both"
            )
        return OpenVLAConfig(
            dino=dino,
            siglip=siglip,
            llm=llm,
            vocab_size=vocab_size,
            max_seq_len=max_seq_len,
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
        pre = read_json(path / PREPROCESSOR_FILE)
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


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read everything but the tensors; fail early with what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"OpenVLA checkpoint directory {path} does not exist")
    raw = read_json(path / CONFIG_FILE)
    cfg = parse_config(raw)
    stats_raw: dict[str, Any] = dict(raw.get("norm_stats") or {})
    if (path / STATISTICS_FILE).is_file():
        stats_raw.update(read_json(path / STATISTICS_FILE))
    if not stats_raw:
        raise ModelLoadError(f"no norm_stats in {path / CONFIG_FILE} and no {STATISTICS_FILE}")
    return CheckpointInfo(
        path=path,
        config=cfg,
        norm_stats=parse_norm_stats(stats_raw),
        image=_image_spec(path, raw, cfg),
        weight_files=find_weight_files(path),
        raw_config=dict(raw),
    )


M = TypeVar("M", bound=nn.Module)


def build_and_load(
    build: Callable[[], M], files: list[Path], names: NameMap, where: Path, what: str, device: Any, dtype: Any
) -> M:
    """build() on `meta`, then the checkpoint's tensors streamed into it (common/weights.py)."""
    with torch.device("meta"):
        model = build()
    return cast(M, load_weights(model, files, names, device=device, dtype=dtype, where=str(where), what=what))


def load_model(info: CheckpointInfo, device: str | torch.device, dtype: torch.dtype) -> OpenVLA:
    """The OpenVLA network with the checkpoint's weights."""
    cfg = info.config
    return build_and_load(
        lambda: OpenVLA(cfg), info.weight_files, openvla_names(cfg), info.path, "OpenVLA", device, dtype
    )
