"""GR00T N1.5's flow-matching action head: the VL adapter, the DiT, the embodiment-specific
encoders/decoder and the Euler sampler.

Written from the published architecture (NVIDIA/Isaac-GR00T flow_matching_action_head.py,
cross_attention_dit.py; diffusers' Attention / FeedForward / Timesteps / TimestepEmbedding):

    vl (B, L, Dv) --vlln LayerNorm--> --VL adapter (pre-LN self-attention blocks)--> vl
    state (B, 1, S) --state_encoder[emb]--> (B, 1, D)
    x (B, H, A) at step k: tokens = [state | future tokens (F) | action_encoder[emb](x, bucket) + pos]
    DiT: timestep embedding temb = MLP(sinusoid(bucket)); blocks alternate cross-attention to vl
         (even) and self-attention (odd), each norm1 = AdaLayerNorm(temb): LN(x) (1 + scale) + shift,
         then a GELU-tanh feed-forward; out = LN(x) (1 + scale) + shift from temb, proj_out_2
    v = action_decoder[emb](out)[:, -H:];  x += v / steps   (tau = k / steps, bucket = tau * 1000)

The cross-attention keys/values of vl do not depend on the step: a sample computes them once
(DiT.cross_kv) and every Euler step reuses them.

Names are ours; checkpoint.py maps them to upstream's (attn1.to_out.0, ff.net.0.proj, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DiTConfig:
    """The DiT (action_head_cfg.diffusion_model_cfg)."""

    heads: int = 32
    head_dim: int = 48
    layers: int = 16
    output_dim: int = 1024
    cross_attention_dim: int = 2048
    interleave_self_attention: bool = True
    norm_eps: float = 1e-5

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class VLAdapterConfig:
    """The VL self-attention adapter over the backbone features (action_head_cfg.vl_self_attention_cfg)."""

    heads: int = 32
    head_dim: int = 64
    layers: int = 4

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class ActionHeadConfig:
    """The flow-matching action head (action_head_cfg); N1.5's published sizes by default."""

    backbone_embedding_dim: int = 2048
    input_embedding_dim: int = 1536
    hidden_size: int = 1024
    max_state_dim: int = 64
    action_dim: int = 32
    action_horizon: int = 16
    num_target_vision_tokens: int = 32
    max_seq_len: int = 1024
    max_num_embodiments: int = 32
    num_timestep_buckets: int = 1000
    num_inference_timesteps: int = 4
    add_pos_embed: bool = True
    use_vlln: bool = True
    dit: DiTConfig = field(default_factory=DiTConfig)
    vl_adapter: VLAdapterConfig = field(default_factory=VLAdapterConfig)


def _key_mask(mask: Tensor | None) -> Tensor | None:
    """(B, S) bool keep-mask -> (B, 1, 1, S) bool for SDPA (True = attend)."""
    return None if mask is None else mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention with biases (diffusers layout), self or cross, optional key mask."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, kv_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(kv_dim or query_dim, inner)
        self.to_v = nn.Linear(kv_dim or query_dim, inner)
        self.to_out = nn.Linear(inner, query_dim)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """context (B, S, Dc) -> keys, values (B, h, S, d)."""
        B, S, _ = context.shape
        k = self.to_k(context).view(B, S, self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(B, S, self.heads, -1).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Self-attention over x, or cross-attention to `context`, or to its precomputed `kv`."""
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, h, T, d)
        k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(key_mask))
        return self.to_out(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """diffusers FeedForward("gelu-approximate"): proj_out(gelu_tanh(proj_in(x))), 4x wide."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class AdaLayerNorm(nn.Module):
    """LN(x) * (1 + scale) + shift, (scale, shift) = linear(silu(temb)) (GR00T's order)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # x (B, T, D), temb (B, D)
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class TransformerBlock(nn.Module):
    """One attention (self or cross) + feed-forward, pre-norm; norm1 adaptive in the DiT."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        ada_norm: bool,
        affine: bool,
        eps: float,
        kv_dim: int | None,
    ) -> None:
        super().__init__()
        self.ada_norm = ada_norm
        self.norm1: nn.Module = (
            AdaLayerNorm(dim, eps) if ada_norm else nn.LayerNorm(dim, eps, elementwise_affine=affine)
        )
        self.attn = Attention(dim, heads, head_dim, kv_dim)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=affine)
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: Tensor,
        temb: Tensor | None = None,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        h = self.norm1(x, temb) if self.ada_norm else self.norm1(x)
        x = x + self.attn(h, context, key_mask, kv)
        return x + self.ff(self.norm3(x))


def timestep_features(t: Tensor, dim: int = 256) -> Tensor:
    """diffusers Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1): (B,) -> (B, dim) [cos, sin]."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    args = t.float()[:, None] * exponent.exp()[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: Tensor) -> Tensor:  # (B,) buckets -> (B, D)
        x = timestep_features(t).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(x)))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.inner_dim
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                cfg.heads,
                cfg.head_dim,
                ada_norm=True,
                affine=False,
                eps=cfg.norm_eps,
                kv_dim=None if self.is_self_attention(i) else cfg.cross_attention_dim,
            )
            for i in range(cfg.layers)
        )
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, cfg.output_dim)

    def is_self_attention(self, index: int) -> bool:
        return self.cfg.interleave_self_attention and index % 2 == 1

    def cross_kv(self, vl: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The cross-attention blocks' keys/values of vl (B, L, Dv): (B, h, L, d) each, in block
        order. They do not depend on the step, so a sample computes them once."""
        blocks = [cast(TransformerBlock, block) for block in self.blocks]
        return [block.attn.project_kv(vl) for i, block in enumerate(blocks) if not self.is_self_attention(i)]

    def forward(
        self, x: Tensor, cross_kv: Sequence[tuple[Tensor, Tensor]], vl_mask: Tensor | None, t: Tensor
    ) -> Tensor:
        """x (B, T, D) tokens, cross_kv = cross_kv(vl), vl_mask (B, L), t (B,) buckets -> (B, T, D_out)."""
        temb = self.timestep_embedder(t)  # (B, D)
        kvs = iter(cross_kv)
        for i, block in enumerate(self.blocks):
            x = (
                block(x, temb)
                if self.is_self_attention(i)
                else block(x, temb, key_mask=vl_mask, kv=next(kvs))
            )
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out_2(x)


class CategorySpecificLinear(nn.Module):
    """One (in, out) weight per embodiment id, selected per sample: y = x @ W[id] + b[id]."""

    def __init__(self, categories: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(0.02 * torch.randn(categories, in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(categories, out_dim))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:  # (B, T, in), (B,) -> (B, T, out)
        return torch.bmm(x, self.W[ids]) + self.b[ids][:, None]


class CategorySpecificMLP(nn.Module):
    def __init__(self, categories: int, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.layer1 = CategorySpecificLinear(categories, in_dim, hidden)
        self.layer2 = CategorySpecificLinear(categories, hidden, out_dim)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        return self.layer2(F.relu(self.layer1(x, ids)), ids)


def sinusoidal_features(t: Tensor, dim: int) -> Tensor:
    """(B, T) -> (B, T, dim) = [sin, cos] of t * 10000^(-k / half)."""
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32, device=t.device) * (math.log(10000.0) / half))
    args = t.float()[..., None] * freqs
    return torch.cat([args.sin(), args.cos()], dim=-1)


class MultiEmbodimentActionEncoder(nn.Module):
    """W3(swish(W2([W1(a), sinusoid(t)]))) with per-embodiment weights."""

    def __init__(self, action_dim: int, dim: int, categories: int) -> None:
        super().__init__()
        self.dim = dim
        self.W1 = CategorySpecificLinear(categories, action_dim, dim)
        self.W2 = CategorySpecificLinear(categories, 2 * dim, dim)
        self.W3 = CategorySpecificLinear(categories, dim, dim)

    def forward(self, actions: Tensor, t: Tensor, ids: Tensor) -> Tensor:  # (B, T, A), (B,), (B,)
        B, T, _ = actions.shape
        a = self.W1(actions, ids)  # (B, T, D)
        tau = sinusoidal_features(t[:, None].expand(B, T), self.dim).to(a.dtype)
        x = self.W2(torch.cat([a, tau], dim=-1), ids)
        return self.W3(x * torch.sigmoid(x), ids)


class ActionHead(nn.Module):
    def __init__(self, cfg: ActionHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.max_num_embodiments
        self.dit = DiT(cfg.dit)
        self.state_encoder = CategorySpecificMLP(
            n, cfg.max_state_dim, cfg.hidden_size, cfg.input_embedding_dim
        )
        self.action_encoder = MultiEmbodimentActionEncoder(cfg.action_dim, cfg.input_embedding_dim, n)
        self.action_decoder = CategorySpecificMLP(n, cfg.hidden_size, cfg.hidden_size, cfg.action_dim)
        self.future_tokens = nn.Parameter(torch.zeros(cfg.num_target_vision_tokens, cfg.input_embedding_dim))
        self.vlln: nn.Module = nn.LayerNorm(cfg.backbone_embedding_dim) if cfg.use_vlln else nn.Identity()
        self.vl_adapter = (
            nn.ModuleList(
                TransformerBlock(
                    cfg.vl_adapter.inner_dim,
                    cfg.vl_adapter.heads,
                    cfg.vl_adapter.head_dim,
                    ada_norm=False,
                    affine=True,
                    eps=1e-5,
                    kv_dim=None,
                )
                for _ in range(cfg.vl_adapter.layers)
            )
            if cfg.use_vlln
            else None
        )
        self.position_embedding = (
            nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.input_embedding_dim)) if cfg.add_pos_embed else None
        )

    def process_backbone(self, features: Tensor, mask: Tensor) -> Tensor:
        x = self.vlln(features)
        for block in self.vl_adapter or ():
            x = block(x, key_mask=mask)
        return x

    def velocity(
        self,
        cross_kv: Sequence[tuple[Tensor, Tensor]],
        vl_mask: Tensor,
        state_feat: Tensor,
        x: Tensor,
        bucket: Tensor,
        ids: Tensor,
    ) -> Tensor:
        """One DiT evaluation: noisy actions x (B, H, A) at bucket (B,) -> velocity (B, H, A);
        cross_kv = dit.cross_kv(vl)."""
        a = self.action_encoder(x, bucket, ids)  # (B, H, D)
        if self.position_embedding is not None:
            a = a + self.position_embedding[: a.shape[1]][None]
        future = self.future_tokens[None].expand(x.shape[0], -1, -1)
        tokens = torch.cat([state_feat, future, a], dim=1)  # (B, 1 + F + H, D)
        out = self.dit(tokens, cross_kv, vl_mask, bucket)
        return self.action_decoder(out, ids)[:, -self.cfg.action_horizon :]

    def time_bucket(self, steps: int, step: int) -> int:
        """The DiT's discretised time at `step`: int(step / steps * num_timestep_buckets)."""
        return int(step / steps * self.cfg.num_timestep_buckets)
