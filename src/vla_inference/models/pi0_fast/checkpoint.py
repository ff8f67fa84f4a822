"""LeRobot's pi0_fast checkpoint format (huggingface/lerobot policies/pi0_fast, at 7427f31 / 0.6.1+).

    <dir>/config.json       {"type": "pi0_fast", paligemma_variant, chunk_size, n_action_steps,
                             max_state_dim, max_action_dim, max_action_tokens, max_decoding_steps,
                             tokenizer_max_length (200), text_tokenizer_name, action_tokenizer_name,
                             temperature, fast_skip_tokens (128), validate_action_token_prefix,
                             use_kv_cache, image_resolution, empty_cameras, input_features,
                             output_features, normalization_mapping (MEAN_STD), use_relative_actions}
    <dir>/model.safetensors  "model.paligemma_with_expert.paligemma." + transformers' PaliGemma names:
                             model.vision_tower.vision_model.*, model.multi_modal_projector.linear.*,
                             model.language_model.{embed_tokens,layers.*,norm}.*, lm_head.weight
                             (its own tensor, not tied: LeRobot's PiGemma swap unties it)
    <dir>/policy_preprocessor.json, policy_postprocessor.json, and the normalizer statistics in
        policy_preprocessor_step_<i>_normalizer_processor.safetensors  ("observation.state.mean", ...)
        policy_postprocessor_step_<i>_unnormalizer_processor.safetensors ("action.mean", ...)
    <dir>/tokenizer/tokenizer.json (+ tokenizer_config.json)       the PaliGemma text tokenizer
    <dir>/action_tokenizer/                                        the FAST tokenizer (fast_tokenizer.py)

The two tokenizer directories are saved by LeRobot's processor pipeline since #4182 (after 0.6.1);
older checkpoints name Hub ids in config.json only: then VLA_TOKENIZER_PATH (PaliGemma's
tokenizer.json) and VLA_FAST_TOKENIZER_PATH (the FAST directory) say where local copies are. Nothing
is downloaded, and the action tokenizer's .py file is never executed.

LeRobot always builds SigLIP So400m; the tower here is the SIGLIP_VARIANTS entry whose shapes the
weights have (so400m for every published checkpoint; the tiny test towers otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common import vit
from vla_inference.models.common.tokenizers import find_tokenizer
from vla_inference.models.common.weights import (
    NameMap,
    Source,
    TensorEntry,
    load_weights,
    read_json,
    read_layout,
    source_shape,
)
from vla_inference.models.pi0.model import GEMMA_VARIANTS, SIGLIP_VARIANTS
from vla_inference.models.pi0_fast import fast_tokenizer
from vla_inference.models.pi0_fast.model import Pi0FastConfig, Pi0FastModel, build

TYPE = "pi0_fast"
PREFIX = "model.paligemma_with_expert.paligemma."
VISION = PREFIX + "model.vision_tower.vision_model."
PROJECTOR = PREFIX + "model.multi_modal_projector.linear."
LANGUAGE = PREFIX + "model.language_model."
EMBED_KEY = LANGUAGE + "embed_tokens.weight"
LM_HEAD_KEY = PREFIX + "lm_head.weight"
TEXT_TOKENIZER_DIR = "tokenizer"
ACTION_TOKENIZER_DIR = "action_tokenizer"
TEXT_TOKENIZER_HELP = (
    "pi0-FAST reads the PaliGemma text tokenizer as tokenizer.json: LeRobot saves it as "
    "tokenizer/tokenizer.json in the checkpoint; for older checkpoints set VLA_TOKENIZER_PATH to the "
    "tokenizer.json of the tokenizer config.json names (text_tokenizer_name, default "
    "google/paligemma-3b-pt-224)."
)
DEFAULT_EPS = 1e-8


def lerobot_names(embed_key: str = EMBED_KEY, lm_head_key: str | None = LM_HEAD_KEY) -> NameMap:
    """Our parameter names -> LeRobot's pi0_fast names. `embed_key`: the tensor that fills the token
    embedding; `lm_head_key`: the LM head's (None: tied to the embedding, nothing else read)."""

    def sources(name: str, shape: tuple[int, ...]) -> list[Source]:
        head, _, rest = name.partition(".")
        if head == "vision":
            return [s.under(VISION) for s in vit.hf_siglip_names(rest, shape)]
        if head == "projector":
            return [Source(PROJECTOR + rest)]
        if name == "text.embed_tokens.weight":
            return [Source(embed_key)]
        if head == "text":
            return [Source(LANGUAGE + rest)]
        if name == "lm_head.weight" and lm_head_key is not None:
            return [Source(lm_head_key)]
        raise KeyError(f"no LeRobot pi0_fast name for {name}")

    def unused(key: str) -> bool:  # SigLIP's attention-pooling head: never used for patch features
        return key.startswith(VISION) and vit.hf_siglip_unused(key.removeprefix(VISION))

    return NameMap(sources, unused)


# --------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    config: Pi0FastConfig
    weight_files: list[Path]
    names: NameMap
    text_tokenizer: Path  # tokenizer.json
    action_tokenizer: Path  # the FAST tokenizer directory
    image_slots: tuple[str, ...]  # camera feature names without "observation.images."
    image_size: int
    state_dim: int  # the state feature's size (what the prompt discretises: unpadded)
    action_dim: int  # the action feature's size (FAST decodes this many dims)
    chunk_size: int
    n_action_steps: int  # LeRobot detokenises with this horizon
    max_decoding_steps: int  # the decode budget
    tokenizer_max_length: int  # the prompt's padded length (BOS included; the decode BOS is extra)
    temperature: float
    fast_skip_tokens: int
    normalization: dict[str, str] = field(default_factory=dict)  # "STATE" / "ACTION" -> LeRobot mode
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # feature -> {"mean": ...}
    eps: float = DEFAULT_EPS

    def describe(self) -> str:
        cfg = self.config
        return (
            f"pi0-FAST (SigLIP {cfg.vision.width}/{cfg.vision.depth} + Gemma {cfg.text.width}/"
            f"{cfg.text.depth}, vocab {cfg.vocab_size}, {self.n_action_steps} x {self.action_dim} actions, "
            f"budget {self.max_decoding_steps} tokens)"
        )


def _int(config: Mapping[str, Any], key: str, default: int, where: Path, minimum: int = 1) -> int:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModelLoadError(f"{where}: {key}={value!r} must be an integer >= {minimum}")
    return value


def _feature_size(features: Any, key: str, default: int) -> int:
    spec = features.get(key) if isinstance(features, dict) else None
    shape = spec.get("shape") if isinstance(spec, dict) else None
    return int(shape[0]) if isinstance(shape, list) and shape and isinstance(shape[0], int) else default


def vision_from_layout(layout: Mapping[str, TensorEntry], where: Path) -> str:
    """The SIGLIP_VARIANTS name whose tensors have the checkpoint's shapes."""
    have = {k.removeprefix(VISION): tuple(e.shape) for k, e in layout.items() if k.startswith(VISION)}
    for name, cfg in SIGLIP_VARIANTS.items():
        with torch.device("meta"):
            tower = vit.VisionTower(cfg)
        want = {
            s.key: source_shape(s, tuple(t.shape))
            for n, t in tower.state_dict().items()
            for s in vit.hf_siglip_names(n, tuple(t.shape))
        }
        if all(have.get(k) == shape for k, shape in want.items()) and not (
            {k for k in have if not vit.hf_siglip_unused(k)} - set(want)
        ):
            return name
    raise ModelLoadError(f"{where}: the vision tower's weights match no known SigLIP size")


def _stats(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], float]:
    """The normalizer statistics as plain float64 arrays, and the normalizer's eps."""
    from safetensors import safe_open

    found: dict[str, dict[str, np.ndarray]] = {}
    files = sorted(path.glob("policy_postprocessor_step_*_unnormalizer_processor.safetensors"))
    files += sorted(path.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))
    for file in files:
        with safe_open(str(file), framework="np") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                feature, _, stat = key.rpartition(".")
                if feature and stat in ("mean", "std", "min", "max", "q01", "q99"):
                    found.setdefault(feature, {}).setdefault(
                        stat, np.asarray(handle.get_tensor(key), dtype=np.float64).reshape(-1)
                    )
    eps = DEFAULT_EPS
    for name in ("policy_postprocessor.json", "policy_preprocessor.json"):
        if (path / name).is_file():
            for step in read_json(path / name).get("steps", []):
                value = step.get("config", {}).get("eps") if isinstance(step, dict) else None
                if "normalizer" in str(step.get("registry_name", "")) and isinstance(value, int | float):
                    eps = float(value)
    return found, eps


def _action_tokenizer_dir(path: Path, setting: str) -> Path:
    where = Path(setting).expanduser() if setting else path / ACTION_TOKENIZER_DIR
    if not (where / fast_tokenizer.CONFIG_FILE).is_file():
        origin = "VLA_FAST_TOKENIZER_PATH" if setting else "the checkpoint"
        raise ModelLoadError(
            f"missing FAST action tokenizer {where / fast_tokenizer.CONFIG_FILE} (from {origin}). "
            f"{fast_tokenizer.HELP}"
        )
    return where


def load(path: Path, *, tokenizer_path: str = "", fast_tokenizer_path: str = "") -> Checkpoint:
    """Read a LeRobot pi0_fast checkpoint's config, statistics, tokenizer locations and weight
    layout (not the weights). ModelLoadError names the first missing or malformed file."""
    path = Path(path)
    where = path / "config.json"
    config = read_json(where)
    if config.get("type") != TYPE:
        raise ModelLoadError(f"{where}: type={config.get('type')!r} is not a {TYPE} policy")
    if config.get("use_relative_actions"):
        raise ModelLoadError(f"{where}: use_relative_actions=true is not supported by this server")
    weight_file = path / "model.safetensors"
    if not weight_file.is_file():
        raise ModelLoadError(f"missing model.safetensors in {path} (LeRobot saves the weights there)")
    layout = read_layout([weight_file])
    variant = config.get("paligemma_variant", "gemma_2b")
    if variant not in GEMMA_VARIANTS:
        known = ", ".join(GEMMA_VARIANTS)
        raise ModelLoadError(f"{where}: paligemma_variant={variant!r} is not one of {known}")
    has_embed, has_head = EMBED_KEY in layout, LM_HEAD_KEY in layout
    if not (has_embed or has_head):
        raise ModelLoadError(f"{weight_file} has neither {EMBED_KEY} nor {LM_HEAD_KEY}")
    embed_key = EMBED_KEY if has_embed else LM_HEAD_KEY
    tied = not (has_embed and has_head)
    vision = SIGLIP_VARIANTS[vision_from_layout(layout, weight_file)]
    cfg = Pi0FastConfig(
        vision=vision,
        text=GEMMA_VARIANTS[variant],
        vocab_size=int(layout[embed_key].shape[0]),
        tied_lm_head=tied,
    )
    resolution = config.get("image_resolution", [vision.image_size] * 2)
    if list(resolution) != [vision.image_size] * 2:
        raise ModelLoadError(f"{where}: image_resolution={resolution} is not the tower's {vision.image_size}")
    inputs = config.get("input_features") or {}
    outputs = config.get("output_features") or {}
    cameras = tuple(
        k.removeprefix("observation.images.")
        for k, v in inputs.items()
        if isinstance(v, dict) and v.get("type") == "VISUAL"
    )
    empty = _int(config, "empty_cameras", 0, where, minimum=0)
    cameras += tuple(f"empty_camera_{i}" for i in range(empty) if f"empty_camera_{i}" not in cameras)
    chunk = _int(config, "chunk_size", 50, where)
    steps = _int(config, "n_action_steps", chunk, where)
    temperature = config.get("temperature", 0.0)
    if not isinstance(temperature, int | float) or temperature < 0:
        raise ModelLoadError(f"{where}: temperature={temperature!r} must be a number >= 0")
    modes = config.get("normalization_mapping") or {}
    stats, eps = _stats(path)
    text = find_tokenizer(path / TEXT_TOKENIZER_DIR, tokenizer_path, "tokenizer.json", TEXT_TOKENIZER_HELP)
    return Checkpoint(
        path=path,
        config=cfg,
        weight_files=[weight_file],
        names=lerobot_names(embed_key, None if tied else LM_HEAD_KEY),
        text_tokenizer=text,
        action_tokenizer=_action_tokenizer_dir(path, fast_tokenizer_path),
        image_slots=cameras,
        image_size=vision.image_size,
        state_dim=_feature_size(inputs, "observation.state", _int(config, "max_state_dim", 32, where)),
        action_dim=_feature_size(outputs, "action", _int(config, "max_action_dim", 32, where)),
        chunk_size=chunk,
        n_action_steps=steps,
        max_decoding_steps=_int(config, "max_decoding_steps", 256, where),
        tokenizer_max_length=_int(config, "tokenizer_max_length", 200, where),
        temperature=float(temperature),
        fast_skip_tokens=_int(config, "fast_skip_tokens", fast_tokenizer.FAST_SKIP_TOKENS, where, minimum=0),
        normalization={k: str(v) for k, v in modes.items() if k in ("STATE", "ACTION")}
        or {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        stats=stats,
        eps=eps,
    )


def load_model(checkpoint: Checkpoint, device: str | torch.device, dtype: torch.dtype) -> Pi0FastModel:
    """The network, built on meta and streamed from the checkpoint's safetensors."""
    model = build(checkpoint.config, device="meta")
    return load_weights(  # type: ignore[return-value]
        model,
        checkpoint.weight_files,
        checkpoint.names,
        device=device,
        dtype=dtype,
        where=str(checkpoint.path),
        what="LeRobot pi0_fast",
    )
