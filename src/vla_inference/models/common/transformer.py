"""Decoder-only transformer primitives, one set for Gemma (pi0), Llama (OpenVLA) and Qwen3 (GR00T).

    RMSNorm        float32 statistics; Llama/Qwen scale by `weight` after casting back, Gemma by
                   `1 + weight` in float32 (its weights are stored zero-centred)
    rope_cos_sin   rotary tables (B, 1, T, D) in float32, rotate-half layout; apply_rope rotates in
                   float32 and casts back
    GatedMLP       down(act(gate(x)) * up(x)); act = tanh-GELU (Gemma) or SiLU (Llama, Qwen3)
    Attention      q/k/v/o projections without bias, optional per-head q/k RMSNorm (Qwen3), GQA
                   through scaled_dot_product_attention(enable_gqa=...)
    DecoderLayer   pre-norm: x + attn(norm(x)); x + mlp(norm(x))
    Decoder        optional token embedding, the layers, the final norm
    KVCache        keys/values of every layer (L, B, Hkv, S, D): written at a column, read up to one;
                   or, with the column a tensor (static shapes), written there and read whole

Parameter names follow the HF layout (`layers.{i}.self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, ...), so the checkpoint maps of the families are prefix renames.
Shapes: B batch, T query tokens, S key tokens, W width, Hq/Hkv heads, D head dim, L layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DecoderConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    activation: str = "silu"  # "silu" (Llama, Qwen3) | "gelu_tanh" (Gemma)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys
    gemma_norm: bool = False  # RMSNorm scales by (1 + weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, gemma: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, D) float32; frequencies theta^(-2i/D), halves repeated."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    freqs = positions.float()[..., None] * (1.0 / theta**exponent)  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) -> x * cos + rotate_half(x) * sin, computed in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, S, D), mask broadcastable to (B, 1, T, S) bool -> (B, T, Hq*D)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).flatten(2)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class KVCache(NamedTuple):
    """Preallocated keys and values of every layer, (L, B, Hkv, S, D) each.

    `update` writes a layer's new keys/values at a column and returns that layer's filled part;
    `view` reads it. `reserve` reuses a cache when it is large enough (grows it otherwise). A named
    tuple of two tensors, so a compiled function takes it as an argument (a static cache).
    """

    k: Tensor
    v: Tensor

    @classmethod
    def allocate(
        cls, layers: int, batch: int, kv_heads: int, length: int, head_dim: int, like: Tensor
    ) -> KVCache:
        shape = (layers, batch, kv_heads, length, head_dim)
        return cls(
            torch.zeros(shape, dtype=like.dtype, device=like.device),
            torch.zeros(shape, dtype=like.dtype, device=like.device),
        )

    @classmethod
    def reserve(
        cls,
        cache: KVCache | None,
        layers: int,
        batch: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        like: Tensor,
    ) -> KVCache:
        if cache is not None and cache.k.dtype == like.dtype and cache.k.device == like.device:
            _, b, _, s, _ = cache.k.shape
            if b >= batch and s >= length:
                return cache
            batch, length = max(batch, b), max(length, s)  # grow, never shrink
        del cache  # free the old one before allocating
        return cls.allocate(layers, batch, kv_heads, length, head_dim, like)

    def update(self, layer: int, start: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, D) at columns start..start+T; return the layer's (B, Hkv, start+T, D).

        With `start` a tensor (shape (1,), static shapes: one graph for every column), the batch is
        the cache's and the whole layer (B, Hkv, S, D) comes back; the mask hides unwritten columns.
        """
        if isinstance(start, Tensor):
            columns = start + torch.arange(k.shape[2], device=start.device)
            self.k[layer].index_copy_(2, columns, k)
            self.v[layer].index_copy_(2, columns, v)
            return self.k[layer], self.v[layer]
        batch, end = k.shape[0], start + k.shape[2]
        self.k[layer, :batch, :, start:end] = k
        self.v[layer, :batch, :, start:end] = v
        return self.view(layer, batch, end)

    def view(self, layer: int, batch: int, end: int) -> tuple[Tensor, Tensor]:
        return self.k[layer, :batch, :, :end], self.v[layer, :batch, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def qkv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, T, W) normed -> q (B, Hq, T, D), k, v (B, Hkv, T, D), q and k rotated."""
        B, T, _ = h.shape
        q = self.q_proj(h).view(B, T, -1, self.head_dim)
        k = self.k_proj(h).view(B, T, -1, self.head_dim)
        v = self.v_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int | Tensor = 0,
    ) -> Tensor:
        """h (B, T, W), mask (B, 1, T, S) bool; with a cache, keys/values are written at `start`
        and the attention covers columns 0..start+T (every column when `start` is a tensor)."""
        q, k, v = self.qkv(h, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        return self.o_proj(attend(q, k, v, mask))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer. `norm` builds the two norms (default RMSNorm of the config)."""

    def __init__(self, cfg: DecoderConfig, norm: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        make = norm or (lambda dim: RMSNorm(dim, cfg.norm_eps, cfg.gemma_norm))
        self.input_layernorm = make(cfg.width)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make(cfg.width)
        self.mlp = GatedMLP(cfg.width, cfg.mlp_dim, cfg.activation)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int | Tensor = 0,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding (vocab_size > 0), `depth` layers (or `layers` of them), final norm."""

    def __init__(
        self,
        cfg: DecoderConfig,
        vocab_size: int = 0,
        layers: int | None = None,
        norm: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        if vocab_size:
            self.embed_tokens = nn.Embedding(vocab_size, cfg.width)
        count = cfg.depth if layers is None else layers
        self.layers = nn.ModuleList(DecoderLayer(cfg, norm) for _ in range(count))
        self.norm = (norm or (lambda dim: RMSNorm(dim, cfg.norm_eps, cfg.gemma_norm)))(cfg.width)

    def layer(self, index: int) -> DecoderLayer:
        return cast(DecoderLayer, self.layers[index])

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        start: int | Tensor = 0,
    ) -> Tensor:
        """x (B, T, W) embeddings, positions (B, T), mask (B, 1, T, S) -> final-normed (B, T, W)."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, index, start)
        return cast(Tensor, self.norm(x))

    def new_cache(self, batch: int, length: int, like: Tensor, cache: KVCache | None = None) -> KVCache:
        cfg = self.cfg
        return KVCache.reserve(cache, len(self.layers), batch, cfg.num_kv_heads, length, cfg.head_dim, like)
