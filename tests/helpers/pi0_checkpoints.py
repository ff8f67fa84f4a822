"""Tiny random pi0 / pi0.5 checkpoints in the real on-disk formats, for tests.

    write_tiny_openpi_checkpoint(path, variant="pi0" | "pi05", seed=0, asset_ids=("demo",),
                                 state_dim=7, action_dim=7)
    write_tiny_lerobot_checkpoint(path, variant="pi0" | "pi05", seed=0, state_dim=7, action_dim=7)

Both write the openpi "dummy" Gemma sizes with a tiny SigLIP (patch 28), random weights from
`seed`, norm stats with distinct non-trivial values per asset id (see tiny_norm_stats), and — for
openpi — the demo tokenizer as tokenizer.model. LeRobot checkpoints ship no tokenizer (as the real
ones): pass `tokenizer_path=demo_tokenizer_path()` in Settings, or call with with_tokenizer=True.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vla_inference.models.common.init import init_random_weights
from vla_inference.models.pi0 import checkpoint as ckpt
from vla_inference.models.pi0.demo import TOKENIZER_ASSET
from vla_inference.models.pi0.model import IMAGE_SLOTS, SIZES, Pi0Config, build


def tiny_config(variant: str = "pi0") -> Pi0Config:
    if variant not in ("pi0", "pi05"):
        raise ValueError(f"variant must be 'pi0' or 'pi05', got {variant!r}")
    return SIZES[f"{variant}_dummy"]


def demo_tokenizer_path() -> Path:
    return TOKENIZER_ASSET


def tiny_norm_stats(
    state_dim: int = 7, action_dim: int = 7, index: int = 0
) -> dict[str, dict[str, list[float]]]:
    """Distinct, non-trivial statistics; `index` shifts them so several asset ids differ."""

    def stats(n: int, base: float) -> dict[str, list[float]]:
        mean = [base + 0.25 * i + index for i in range(n)]
        std = [0.5 + 0.1 * i + 0.2 * index for i in range(n)]
        return {
            "mean": mean,
            "std": std,
            "q01": [m - 1.5 - 0.05 * i for i, m in enumerate(mean)],
            "q99": [m + 2.0 + 0.1 * i for i, m in enumerate(mean)],
        }

    return {"state": stats(state_dim, 0.3), "actions": stats(action_dim, -0.7)}


def _weights(variant: str, seed: int) -> tuple[Pi0Config, dict]:
    cfg = tiny_config(variant)
    model = build(cfg)
    init_random_weights(model, seed)
    return cfg, model.state_dict()


def write_tiny_openpi_checkpoint(
    path: Path,
    variant: str = "pi0",
    seed: int = 0,
    asset_ids: Sequence[str] = ("demo",),
    state_dim: int = 7,
    action_dim: int = 7,
    *,
    with_tokenizer: bool = True,
) -> Path:
    path = Path(path)
    cfg, state_dict = _weights(variant, seed)
    stats = {asset: tiny_norm_stats(state_dim, action_dim, i) for i, asset in enumerate(asset_ids)}
    tokenizer = TOKENIZER_ASSET.read_bytes() if with_tokenizer else None
    return ckpt.write_openpi(path, cfg, state_dict, stats, tokenizer=tokenizer)


def write_tiny_lerobot_checkpoint(
    path: Path,
    variant: str = "pi0",
    seed: int = 0,
    state_dim: int = 7,
    action_dim: int = 7,
    *,
    with_tokenizer: bool = False,
) -> Path:
    path = Path(path)
    cfg, state_dict = _weights(variant, seed)
    stats = tiny_norm_stats(state_dim, action_dim)
    write_lerobot(
        path,
        cfg,
        state_dict,
        state_stats=stats["state"],
        action_stats=stats["actions"],
        state_dim=state_dim,
        action_dim=action_dim,
    )
    if with_tokenizer:
        shutil.copyfile(TOKENIZER_ASSET, path / "tokenizer.model")
    return path


# What every LeRobot policy config.json of the pi0 family (pi0, pi05, pi0_fast) saves: the
# PreTrainedConfig fields, and the optimizer / scheduler presets (openpi's).
LEROBOT_PRETRAINED_FIELDS: dict[str, Any] = {
    "device": "cpu",
    "use_amp": False,
    "push_to_hub": False,
    "repo_id": None,
    "private": None,
    "tags": None,
    "license": None,
    "pretrained_path": None,
}
LEROBOT_OPTIMIZER_FIELDS: dict[str, Any] = {
    "optimizer_lr": 2.5e-05,
    "optimizer_betas": [0.9, 0.95],
    "optimizer_eps": 1e-08,
    "optimizer_weight_decay": 0.01,
    "optimizer_grad_clip_norm": 1.0,
    "scheduler_warmup_steps": 1000,
    "scheduler_decay_steps": 30000,
    "scheduler_decay_lr": 2.5e-06,
}


def lerobot_config(cfg: Pi0Config, state_dim: int, action_dim: int) -> dict[str, Any]:
    """config.json as LeRobot (0.4, policies/pi0 and pi05 PI0Config / PI05Config) saves it: the
    PreTrainedConfig fields ("type", features, device ...) and the policy's own, with our test sizes."""
    mode = "QUANTILES" if cfg.pi05 else "MEAN_STD"
    size = cfg.vision.image_size
    return {
        "type": "pi05" if cfg.pi05 else "pi0",
        "n_obs_steps": 1,
        "input_features": {
            **{
                f"observation.images.{slot}": {"type": "VISUAL", "shape": [3, size, size]}
                for slot in IMAGE_SLOTS
            },
            "observation.state": {"type": "STATE", "shape": [state_dim]},
        },
        "output_features": {"action": {"type": "ACTION", "shape": [action_dim]}},
        **LEROBOT_PRETRAINED_FIELDS,
        "paligemma_variant": cfg.vlm_variant,
        "action_expert_variant": cfg.expert_variant,
        "dtype": "float32",
        "chunk_size": cfg.action_horizon,
        "n_action_steps": cfg.action_horizon,
        "max_state_dim": cfg.action_dim,
        "max_action_dim": cfg.action_dim,
        "num_inference_steps": 10,
        "time_sampling_beta_alpha": 1.5,
        "time_sampling_beta_beta": 1.0,
        "time_sampling_scale": 0.999,
        "time_sampling_offset": 0.001,
        "min_period": 0.004,
        "max_period": 4.0,
        "rtc_config": None,
        "image_resolution": [size, size],
        "empty_cameras": 0,
        "tokenizer_max_length": cfg.max_token_len,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode},
        "gradient_checkpointing": False,
        "compile_model": False,
        "compile_mode": "max-autotune",
        "freeze_vision_encoder": False,
        "train_expert_only": False,
        **LEROBOT_OPTIMIZER_FIELDS,
        # ours: LeRobot always uses So400m; tiny tests need a tiny tower
        "vision_variant": cfg.vision_variant,
    }


def write_lerobot(
    path: Path,
    cfg: Pi0Config,
    state_dict: Mapping[str, torch.Tensor],
    *,
    state_stats: Mapping[str, list[float]],
    action_stats: Mapping[str, list[float]],
    state_dim: int,
    action_dim: int,
) -> Path:
    """A checkpoint in LeRobot's pi0 / pi05 layout: config.json, model.safetensors with the openpi
    names under "model." and the PaliGemma embedding under both of its names (LeRobot's files keep
    "embed_tokens" and the tied "lm_head"), and the normalizer processor files."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {"model." + k: v for k, v in ckpt.openpi_names().to_checkpoint(state_dict).items()}
    tensors["model." + ckpt.EMBED_ALIAS] = tensors["model." + ckpt.EMBED_KEY].clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(lerobot_config(cfg, state_dim, action_dim), indent=2))

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
