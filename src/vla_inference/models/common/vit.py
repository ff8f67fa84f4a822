"""One ViT tower for every family, and the checkpoint names of the two formats it is stored in.

    SigLIP, HF names (pi0 / PaliGemma, GR00T / Eagle): no prefix tokens, learned positions,
        tanh-GELU MLP, all blocks, then the final LayerNorm ("post_layernorm").
    timm VisionTransformer (OpenVLA / Prismatic): DINOv2 with a class token (its position
        embedded, or not when it has registers), optional 4 registers, LayerScale, exact-GELU or
        packed-SwiGLU MLP; SigLIP without prefix tokens. OpenVLA reads the patch tokens after the
        second-to-last block: that tower builds neither the last block nor the final norm.

    images (B, 3, S, S) -> patch_embed -> (B, N, W) (+ positions) -> [prefix | patches] -> blocks
    -> (final norm) -> patch tokens (B, N, W)

Our names (`patch_embed`, `pos_embed`, `cls_token`, `reg_tokens`, `blocks.{i}.norm1 / attn.qkv /
attn.proj / ls1 / norm2 / mlp.fc1 / mlp.fc2 / ls2`, `norm`) map to each format in `hf_siglip_names`
and `timm_names`; HF's separate q/k/v fill the rows of our fused qkv.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models.common.weights import Source

PENULTIMATE = "penultimate"  # the output of the second-to-last block, no final norm (Prismatic)
FINAL = "final"  # all blocks, then the final norm (HF last_hidden_state)


@dataclass(frozen=True)
class ViTConfig:
    width: int
    depth: int
    num_heads: int
    mlp_dim: int  # fc1's output size (for "swiglu", twice the gated hidden size, as timm packs it)
    patch_size: int = 14
    image_size: int = 224
    norm_eps: float = 1e-6
    act: str = "gelu_tanh"  # "gelu_tanh" | "gelu" (exact) | "swiglu" (silu(fc1 first half) * second half)
    class_token: bool = False
    reg_tokens: int = 0
    pos_embed_prefix: bool = False  # the position embedding covers the prefix tokens too (timm default)
    layer_scale: bool = False
    output: str = FINAL

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def blocks_built(self) -> int:
        return self.depth if self.output == FINAL else self.depth - 1


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, W)
        B, T, W = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, T, W/h)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, W))


class ViTMlp(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.act = cfg.act
        hidden = cfg.mlp_dim // 2 if cfg.act == "swiglu" else cfg.mlp_dim
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.act == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.fc2(h)


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = ViTAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = ViTMlp(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.width)) if cfg.layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(cfg.width)) if cfg.layer_scale else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.attn(self.norm1(x))
        x = x + (h if self.ls1 is None else h * self.ls1)
        h = self.mlp(self.norm2(x))
        return x + (h if self.ls2 is None else h * self.ls2)


class VisionTower(nn.Module):
    """images (B, 3, S, S) -> patch features (B, num_patches, width)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        positions = cfg.num_patches + (cfg.num_prefix_tokens if cfg.pos_embed_prefix else 0)
        self.pos_embed = nn.Parameter(torch.zeros(positions, cfg.width))
        self.cls_token = nn.Parameter(torch.zeros(1, cfg.width)) if cfg.class_token else None
        self.reg_tokens = nn.Parameter(torch.zeros(cfg.reg_tokens, cfg.width)) if cfg.reg_tokens else None
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.blocks_built))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.output == FINAL else None

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, W)
        prefix = [
            t[None].expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_tokens) if t is not None
        ]
        if self.cfg.pos_embed_prefix:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed[None]
        else:
            x = torch.cat([*prefix, x + self.pos_embed[None]], dim=1)  # (B, prefix + N, W)
        for block in self.blocks:
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        return x[:, self.cfg.num_prefix_tokens :]


# ---- checkpoint names ---------------------------------------------------------------------------

_HF_BLOCK = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def hf_siglip_names(name: str, shape: tuple[int, ...]) -> list[Source]:
    """Our tower name -> HF SiglipVisionTransformer names (below "vision_model.")."""
    if name.startswith("patch_embed."):
        return [Source("embeddings.patch_embedding." + name.split(".")[-1])]
    if name == "pos_embed":
        return [Source("embeddings.position_embedding.weight")]
    if name.startswith("norm."):
        return [Source("post_layernorm." + name.split(".")[-1])]
    _, index, rest = name.split(".", 2)  # blocks.{i}.<module>.<leaf>
    module, leaf = rest.rsplit(".", 1)
    base = f"encoder.layers.{index}."
    if module == "attn.qkv":
        width = shape[0] // 3
        return [
            Source(f"{base}self_attn.{p}_proj.{leaf}", (i * width, (i + 1) * width))
            for i, p in enumerate(("q", "k", "v"))
        ]
    return [Source(f"{base}{_HF_BLOCK[module]}.{leaf}")]


def hf_siglip_unused(key: str) -> bool:
    """The attention-pooling head: built by SiglipVisionModel, never used for patch features."""
    return key.startswith("head.")


def timm_name(name: str, shape: tuple[int, ...], layer_scale: str = "gamma") -> list[Source]:
    """Our tower name -> timm VisionTransformer name. `layer_scale`: the LayerScale parameter's
    leaf ("gamma" in timm; OpenVLA's port renamed it "scale_factor")."""
    if name.startswith("patch_embed."):
        return [Source("patch_embed.proj." + name.split(".")[-1])]
    if name == "pos_embed":
        return [Source("pos_embed", shape=(1, *shape))]
    if name == "cls_token":
        return [Source("cls_token", shape=(1, *shape))]
    if name == "reg_tokens":
        return [Source("reg_token", shape=(1, *shape))]
    parts = name.split(".")
    if parts[0] == "blocks" and parts[2] in ("ls1", "ls2"):
        return [Source(f"blocks.{parts[1]}.{parts[2]}.{layer_scale}")]
    return [Source(name)]


def timm_unused(cfg: ViTConfig, key: str) -> bool:
    """What a penultimate-block tower never runs: the last block, the final norm, the heads."""
    if cfg.output == FINAL:
        return key.startswith(("attn_pool.", "head.", "fc_norm."))
    return key.startswith((f"blocks.{cfg.depth - 1}.", "norm.", "attn_pool.", "head.", "fc_norm."))
