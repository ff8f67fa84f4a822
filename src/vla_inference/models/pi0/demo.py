"""The embedded models, served through the normal loading code when VLA_MODEL_PATH is empty.

VLA_EMBEDDED_MODEL=metaworld (the default) serves METAWORLD_CHECKPOINT, a small pi0 trained on
MetaWorld MT10 demonstrations (`make train-default` reproduces it; training/train.py), shipped
in the package as an openpi-format checkpoint.

VLA_EMBEDDED_MODEL=random serves a random pi0 for tests: Pi0Policy.load() calls
ensure_demo_checkpoint(), which the first time writes a tiny openpi-format checkpoint (weights
from a fixed seed, the bundled SentencePiece tokenizer, norm stats for 7 joints / 7 action dims)
into $VLA_CACHE_DIR (default ~/.cache/vla-inference)/pi0-demo-<hash>, then loads it like any
other checkpoint. The hash covers everything that defines the files, so a changed recipe gets a
fresh directory. Those weights are random: that demo exercises the server, it controls nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common.init import init_random_weights
from vla_inference.models.pi0 import checkpoint as ckpt
from vla_inference.models.pi0.model import Pi0Config, build

DEMO_CONFIG = Pi0Config.named("pi0_demo")
DEMO_SEED = 0
DEMO_ASSET_ID = "demo"
TOKENIZER_ASSET = Path(__file__).resolve().parent / "assets" / "demo_tokenizer.model"
METAWORLD_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "metaworld"
# sha256 of METAWORLD_CHECKPOINT/model.safetensors: the weights docs/evaluation.md measured
# (ModelInfo.model_version is its first 12 digits). `make train-default` prints the new one.
METAWORLD_SHA256 = "4bc6881a797c083b2f4321884a6d8a89c56adc89b7df2cf6e6a8617ba1e29fed"
_RECIPE_VERSION = 2  # 2: shared model modules (fused ViT qkv, new random draw order)


def demo_norm_stats(state_dim: int = 7, action_dim: int = 7) -> dict[str, dict[str, list[float]]]:
    """Plausible 7-joint arm statistics (radians; last dim a gripper in [0, 1])."""

    def stats(n: int, scale: float) -> dict[str, list[float]]:
        mean = [round(0.1 * ((i % 3) - 1) * scale, 4) for i in range(n)]
        std = [round((0.3 + 0.05 * i) * scale, 4) for i in range(n)]
        return {
            "mean": mean,
            "std": std,
            "q01": [round(m - 2.3 * s, 4) for m, s in zip(mean, std, strict=True)],
            "q99": [round(m + 2.3 * s, 4) for m, s in zip(mean, std, strict=True)],
        }

    return {"state": stats(state_dim, 1.0), "actions": stats(action_dim, 0.5)}


def tokenizer_bytes() -> bytes:
    return TOKENIZER_ASSET.read_bytes()


def cache_root() -> Path:
    return Path(os.environ.get("VLA_CACHE_DIR") or Path.home() / ".cache" / "vla-inference").expanduser()


def demo_fingerprint() -> str:
    recipe = json.dumps(
        {"config": repr(DEMO_CONFIG), "seed": DEMO_SEED, "stats": demo_norm_stats(), "v": _RECIPE_VERSION},
        sort_keys=True,
    )
    digest = hashlib.sha256(recipe.encode())
    digest.update(tokenizer_bytes())
    return digest.hexdigest()[:12]


def write_demo_checkpoint(path: Path) -> Path:
    model = build(DEMO_CONFIG)
    init_random_weights(model, DEMO_SEED)
    return ckpt.write_openpi(
        path,
        DEMO_CONFIG,
        model.state_dict(),
        {DEMO_ASSET_ID: demo_norm_stats()},
        tokenizer=tokenizer_bytes(),
        extra_config={"note": "vla-inference pi0 demo: random weights, not a trained policy"},
    )


def ensure_demo_checkpoint() -> Path:
    """The demo checkpoint directory, written on first use (atomic rename; safe with concurrent servers)."""
    target = cache_root() / f"pi0-demo-{demo_fingerprint()}"
    if (target / "model.safetensors").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pi0-demo-", dir=target.parent))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the pi0 demo model under {target.parent} ({exc}); "
            "set VLA_CACHE_DIR to a writable directory"
        ) from None
    try:
        with torch.random.fork_rng(devices=[]):
            write_demo_checkpoint(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
