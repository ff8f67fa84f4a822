"""LeRobot's pi0_fast checkpoint format (huggingface/lerobot policies/pi0_fast, at 7427f31 / 0.6.1+).

    <dir>/config.json       {"type": "pi0_fast", paligemma_variant, chunk_size, n_action_steps,
                             max_state_dim, max_action_dim, max_action_tokens, max_decoding_steps,
                             tokenizer_max_length (200), text_tokenizer_name, action_tokenizer_name,
                             temperature, fast_skip_tokens (128), validate_action_token_prefix,
                             use_kv_cache, image_resolution, empty_cameras, input_features,
                             output_features, normalization_mapping (MEAN_STD), use_relative_actions}
    <dir>/model.safetensors  "model.paligemma_with_expert.paligemma." + transformers' PaliGemma names
                             (the pi0 family's map, models/pi0/checkpoint.py `openpi_names`):
                             model.vision_tower.vision_model.*, model.multi_modal_projector.linear.*,
                             model.language_model.{embed_tokens,layers.*,norm}.*, lm_head.weight
                             (its own tensor, not tied: LeRobot's PiGemma swap unties it)
    <dir>/policy_preprocessor.json, policy_postprocessor.json and their normalizer statistics
                             (models/common/lerobot.py)
    <dir>/tokenizer/tokenizer.json (+ tokenizer_config.json)       the PaliGemma text tokenizer
    <dir>/action_tokenizer/                                        the FAST tokenizer (fast_tokenizer.py)

The two tokenizer directories are saved by LeRobot's processor pipeline since #4182 (after 0.6.1);
older checkpoints name Hub ids in config.json only: then VLA_TOKENIZER_PATH (PaliGemma's
tokenizer.json) and VLA_FAST_TOKENIZER_PATH (the FAST directory) say where local copies are. Nothing
is downloaded, and the action tokenizer's .py file is never executed.

A file with only one of the two embedding tensors (what LeRobot's own loader accepts from
openpi-converted weights) is read with the LM head tied to the embedding.

LeRobot always builds SigLIP So400m; the tower here is the SIGLIP_VARIANTS entry whose shapes the
weights have (so400m for every published checkpoint; the tiny test towers otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common import lerobot as lr
from vla_inference.models.common import vit
from vla_inference.models.common.tokenizers import find_tokenizer
from vla_inference.models.common.weights import (
    NameMap,
    TensorEntry,
    load_weights,
    read_json,
    read_layout,
    source_shape,
)
from vla_inference.models.pi0 import checkpoint as pi0_checkpoint
from vla_inference.models.pi0.checkpoint import PALIGEMMA, openpi_names, positive_int, variant
from vla_inference.models.pi0.model import GEMMA_VARIANTS, SIGLIP_VARIANTS
from vla_inference.models.pi0_fast import fast_tokenizer
from vla_inference.models.pi0_fast.model import Pi0FastConfig, Pi0FastModel, build
from vla_inference.preprocessing.normalize import Normalizer

TYPE = "pi0_fast"
LEROBOT_PREFIX = "model."  # LeRobot's policy.model
PREFIX = LEROBOT_PREFIX + PALIGEMMA
VISION = PREFIX + "model.vision_tower.vision_model."
LANGUAGE = PREFIX + "model.language_model."
EMBED_KEY = LEROBOT_PREFIX + pi0_checkpoint.EMBED_ALIAS  # ...language_model.embed_tokens.weight
LM_HEAD_KEY = LEROBOT_PREFIX + pi0_checkpoint.EMBED_KEY  # ...paligemma.lm_head.weight
TEXT_TOKENIZER_DIR = "tokenizer"
ACTION_TOKENIZER_DIR = "action_tokenizer"
TEXT_TOKENIZER_HELP = (
    "pi0-FAST reads the PaliGemma text tokenizer as tokenizer.json: LeRobot saves it as "
    "tokenizer/tokenizer.json in the checkpoint; for older checkpoints set VLA_TOKENIZER_PATH to the "
    "tokenizer.json of the tokenizer config.json names (text_tokenizer_name, default "
    "google/paligemma-3b-pt-224)."
)


def lerobot_names(embed_key: str = EMBED_KEY, lm_head_key: str | None = LM_HEAD_KEY) -> NameMap:
    """Our parameter names -> LeRobot's pi0_fast names. `embed_key`: the tensor that fills the token
    embedding; `lm_head_key`: the LM head's (None: tied to the embedding, nothing else read)."""
    head = lm_head_key.removeprefix(LEROBOT_PREFIX) if lm_head_key else None
    return openpi_names(embed_key.removeprefix(LEROBOT_PREFIX), LEROBOT_PREFIX, head)


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
    state_dim: int  # the state feature's size (what the prompt discretises: unpadded)
    action_dim: int  # the action feature's size (FAST decodes this many dims)
    chunk_size: int  # the horizon the model was trained to write (and is decoded with)
    n_action_steps: int  # LeRobot's actions per call (and its detokenising horizon: see policy.py)
    max_decoding_steps: int  # the decode budget
    tokenizer_max_length: int  # the prompt's padded length (BOS included; the decode BOS is extra)
    temperature: float
    fast_skip_tokens: int
    norms: tuple[Normalizer, Normalizer] | None  # (state, action); None: no statistics

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def describe(self) -> str:
        cfg = self.config
        return (
            f"pi0-FAST (SigLIP {cfg.vision.width}/{cfg.vision.depth} + Gemma {cfg.vlm.width}/"
            f"{cfg.vlm.depth}, vocab {cfg.vocab_size}, {self.chunk_size} x {self.action_dim} actions)"
        )


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
    gemma = variant(config.get("paligemma_variant", "gemma_2b"), GEMMA_VARIANTS, "paligemma_variant", where)
    has_embed, has_head = EMBED_KEY in layout, LM_HEAD_KEY in layout
    if not (has_embed or has_head):
        raise ModelLoadError(f"{weight_file} has neither {EMBED_KEY} nor {LM_HEAD_KEY}")
    embed_key = EMBED_KEY if has_embed else LM_HEAD_KEY
    tied = not (has_embed and has_head)
    vision = SIGLIP_VARIANTS[vision_from_layout(layout, weight_file)]
    cfg = Pi0FastConfig(vision, GEMMA_VARIANTS[gemma], int(layout[embed_key].shape[0]), tied_lm_head=tied)
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
    empty = positive_int(config, "empty_cameras", 0, where) if config.get("empty_cameras") else 0
    cameras += tuple(f"empty_camera_{i}" for i in range(empty) if f"empty_camera_{i}" not in cameras)
    if not cameras:
        raise ModelLoadError(f"{where}: input_features names no camera (VISUAL feature)")
    chunk = positive_int(config, "chunk_size", 50, where)
    temperature = config.get("temperature", 0.0)
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or temperature < 0:
        raise ModelLoadError(f"{where}: temperature={temperature!r} must be a number >= 0")
    skip = config.get("fast_skip_tokens", fast_tokenizer.FAST_SKIP_TOKENS)
    skip = positive_int(config, "fast_skip_tokens", fast_tokenizer.FAST_SKIP_TOKENS, where) if skip else 0
    text = find_tokenizer(path / TEXT_TOKENIZER_DIR, tokenizer_path, "tokenizer.json", TEXT_TOKENIZER_HELP)
    return Checkpoint(
        path=path,
        config=cfg,
        weight_files=[weight_file],
        names=lerobot_names(embed_key, None if tied else LM_HEAD_KEY),
        text_tokenizer=text,
        action_tokenizer=_action_tokenizer_dir(path, fast_tokenizer_path),
        image_slots=cameras,
        state_dim=_feature_size(inputs, lr.STATE, positive_int(config, "max_state_dim", 32, where)),
        action_dim=_feature_size(outputs, lr.ACTION, positive_int(config, "max_action_dim", 32, where)),
        chunk_size=chunk,
        n_action_steps=positive_int(config, "n_action_steps", chunk, where),
        max_decoding_steps=positive_int(config, "max_decoding_steps", 256, where),
        tokenizer_max_length=positive_int(config, "tokenizer_max_length", 200, where),
        temperature=float(temperature),
        fast_skip_tokens=skip,
        norms=lr.state_and_action(path, config, "MEAN_STD"),
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
