"""Tiny random pi0 / pi0.5 checkpoints in the real on-disk formats, for tests.

    write_tiny_openpi_checkpoint(path, variant="pi0" | "pi05", seed=0, asset_ids=("demo",),
                                 state_dim=7, action_dim=7)
    write_tiny_lerobot_checkpoint(path, variant="pi0" | "pi05", seed=0, state_dim=7, action_dim=7,
                                  lm_head_seed=None)

Both write the openpi "dummy" Gemma sizes with a tiny SigLIP (patch 28), random weights from
`seed`, norm stats with distinct non-trivial values per asset id (see tiny_norm_stats), and — for
openpi — the demo tokenizer as tokenizer.model. LeRobot files hold both the token embedding and
the PaliGemma LM head, as LeRobot's do: equal by default, random from `lm_head_seed` when given.
LeRobot checkpoints ship no tokenizer (as the real ones): pass
`tokenizer_path=demo_tokenizer_path()` in Settings, or call with with_tokenizer=True.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from vla_inference.models.pi0 import checkpoint as ckpt
from vla_inference.models.pi0.demo import TOKENIZER_ASSET
from vla_inference.models.pi0.model import NAMED_CONFIGS, Pi0Config, build, init_random_weights


def tiny_config(variant: str = "pi0") -> Pi0Config:
    if variant not in ("pi0", "pi05"):
        raise ValueError(f"variant must be 'pi0' or 'pi05', got {variant!r}")
    return NAMED_CONFIGS[f"{variant}_dummy"]


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
    lm_head_seed: int | None = None,
) -> Path:
    path = Path(path)
    cfg, state_dict = _weights(variant, seed)
    stats = tiny_norm_stats(state_dim, action_dim)
    lm_head = None
    if lm_head_seed is not None:
        embedding = state_dict["embed_tokens.weight"]
        generator = torch.Generator().manual_seed(lm_head_seed)
        lm_head = torch.randn(embedding.shape, generator=generator).mul_(0.5).to(embedding.dtype)
    ckpt.write_lerobot(
        path,
        cfg,
        state_dict,
        state_stats=stats["state"],
        action_stats=stats["actions"],
        state_dim=state_dim,
        action_dim=action_dim,
        lm_head=lm_head,
    )
    if with_tokenizer:
        shutil.copyfile(TOKENIZER_ASSET, path / "tokenizer.model")
    return path
