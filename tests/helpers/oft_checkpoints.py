"""Tiny OpenVLA-OFT checkpoints in upstream's layout, for tests.

`write_tiny_oft_checkpoint` writes what an OpenVLA-OFT fine-tune directory holds, at test size:

  the merged OpenVLA (tests/helpers/openvla_checkpoints.py: config.json, two safetensors shards + index,
      tokenizer.model, preprocessor_config.json; config.json's norm_stats hold the base model's dataset)
  dataset_statistics.json                   {DATASET: action (7: q01/q99/min/max/mean/std, mask with the
                                            gripper False) and proprio (8, no mask)}; replaces norm_stats
  action_head--{step}_checkpoint.pt         torch.save of the L1 head's state dict, DDP-wrapped: every key
  proprio_projector--{step}_checkpoint.pt   starts with "module." (upstream's finetune.py saves it that way)

The `.pt` files are pickles written with torch.save here because they are the upstream format the
converter reads; the server itself never opens them. `convert=True` also runs the conversion.
`pattern_image` makes deterministic integer-formula test images (also used to record the fixtures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.helpers.openvla_checkpoints import init_weights, quantity_stats, write_tiny_openvla_checkpoint
from vla_inference.models.openvla.oft import OFTConfig, OpenVLAOFT
from vla_inference.models.openvla.oft_checkpoint import convert_oft_checkpoint

TINY = OFTConfig.named("tiny")
DATASET = "libero_spatial_no_noops"
STEP = 150000


def pattern_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 from integer arithmetic only (identical on every platform): a ramp, blocks and
    rings with sharp wrap-around edges."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = (x * (3 + seed) + y * 2 + seed * 29) % 256
    g = ((x // (4 + seed)) * 37 + (y // 5) * 23 + seed * 11) % 256
    b = (((x - w // 2) ** 2 + (y - h // 2) ** 2) // (7 + seed)) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def oft_statistics(seed: int = 0, action_dim: int = 7, proprio_dim: int = 8) -> dict[str, Any]:
    """dataset_statistics.json as an OFT fine-tune writes it (one dataset; q01 < q99, min < q01)."""
    rng = np.random.default_rng(seed + 2000)
    return {
        DATASET: {
            "action": quantity_stats(rng, action_dim, 1.2, mask=True),
            "proprio": quantity_stats(rng, proprio_dim, 1.2, mask=False),
            "num_transitions": 1000,
            "num_trajectories": 10,
        }
    }


def tiny_components(seed: int = 0, cfg: OFTConfig = TINY) -> dict[str, dict[str, torch.Tensor]]:
    """Random head and projector state dicts in upstream's names (no DDP prefix)."""
    with torch.device("meta"):
        model = OpenVLAOFT(cfg)
    head = model.action_head.to_empty(device="cpu")
    init_weights(head, seed + 10)
    out = {"action_head": {k: v.clone() for k, v in head.state_dict().items()}}
    if model.proprio_projector is not None:
        projector = model.proprio_projector.to_empty(device="cpu")
        init_weights(projector, seed + 11)
        out["proprio_projector"] = {k: v.clone() for k, v in projector.state_dict().items()}
    return out


def write_pt(file: Path, state: dict[str, torch.Tensor], ddp: bool = True) -> Path:
    """torch.save a state dict as DDP(module).state_dict() names it."""
    torch.save({("module." if ddp else "") + k: v for k, v in state.items()}, file)
    return file


def write_tiny_oft_checkpoint(
    path: Path, seed: int = 0, *, convert: bool = False, ddp: bool = True, proprio: bool = True
) -> Path:
    """Write a tiny random OpenVLA-OFT checkpoint directory (upstream's files) at `path`; return it."""
    path = Path(path)
    write_tiny_openvla_checkpoint(path, seed=seed)
    (path / "dataset_statistics.json").write_text(json.dumps(oft_statistics(seed), indent=2))
    for name, state in tiny_components(seed).items():
        if name == "proprio_projector" and not proprio:
            continue
        write_pt(path / f"{name}--{STEP}_checkpoint.pt", state, ddp=ddp)
    if convert:
        convert_oft_checkpoint(path)
    return path
