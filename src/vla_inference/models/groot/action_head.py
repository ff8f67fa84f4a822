"""GR00T's flow-matching action head (N1.5 and N1.7): the VL adapter, the DiT, the embodiment-
specific encoders/decoder, and the sampling both networks share (GrootNetwork).

Written from the published architecture (NVIDIA/Isaac-GR00T flow_matching_action_head.py,
cross_attention_dit.py; N1.7: gr00t_n1d7.py, modules/dit.py; diffusers' Attention / FeedForward /
Timesteps / TimestepEmbedding):

    vl (B, L, Dv) --vlln LayerNorm--> --VL adapter (pre-LN self-attention blocks)--> vl
    state (B, T_s, S) --as one (B, 1, T_s S) token--> --state_encoder[emb]--> (B, 1, D)
    x (B, H, A) at step k: tokens = [state | future tokens (F) | action_encoder[emb](x, bucket) + pos]
    DiT: timestep embedding temb = MLP(sinusoid(bucket)); blocks alternate cross-attention to vl
         (even) and self-attention (odd), each norm1 = AdaLayerNorm(temb): LN(x) (1 + scale) + shift,
         then a GELU-tanh feed-forward; out = LN(x) (1 + scale) + shift from temb, proj_out_2
    v = action_decoder[emb](out)[:, -H:];  x += v / steps   (tau = k / steps, bucket = tau * 1000)

Where N1.5 and N1.7 differ, the config says so (the readers in checkpoint.py / n17_checkpoint.py
fill it from each format's config.json):

    num_target_vision_tokens    N1.5: 32 future tokens; N1.7: 0 (tokens = [state | actions])
    state_history               N1.5: 1; N1.7: state_history_length states in the one state token
    dit.attend_text_every_n_blocks  N1.5: 0, every cross block attends to all of vl; N1.7: n (2),
                                cross block i attends to the text tokens when i % 2n == 0, to the
                                image tokens otherwise (AlternateVLDiT)
    vl_adapter.layers           0: no adapter (N1.5 without use_vlln; N1.7 without
                                vl_self_attention_cfg)

The cross-attention keys/values of vl do not depend on the step: a sample computes them once
(DiT.cross_kv) and every Euler step reuses them.

Names are ours; checkpoint.py maps them to upstream's (attn1.to_out.0, ff.net.0.proj, ...).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models import rtc
from vla_inference.models.common import flow


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
    # N1.7's AlternateVLDiT: cross block i attends to the text tokens when i % (2 n) == 0, to the
    # image tokens otherwise; 0 = every cross block attends to all backbone tokens (N1.5).
    attend_text_every_n_blocks: int = 0

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class VLAdapterConfig:
    """The VL self-attention adapter over the backbone features (vl_self_attention_cfg); 0 layers:
    none."""

    heads: int = 32
    head_dim: int = 64
    layers: int = 4

    @property
    def inner_dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class ActionHeadConfig:
    """The flow-matching action head (N1.5: action_head_cfg; N1.7: config.json's top level);
    N1.5's published sizes by default."""

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
    state_history: int = 1  # states in the state token (N1.7's state_history_length)
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

    def key_mask(self, index: int, vl_mask: Tensor | None, image_mask: Tensor | None) -> Tensor | None:
        """Cross block `index`'s keys: all of vl_mask (N1.5), or its text / image part (N1.7)."""
        n = self.cfg.attend_text_every_n_blocks
        if n == 0 or vl_mask is None or image_mask is None:
            return vl_mask
        return vl_mask & ~image_mask if index % (2 * n) == 0 else vl_mask & image_mask

    def cross_kv(self, vl: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The cross-attention blocks' keys/values of vl (B, L, Dv): (B, h, L, d) each, in block
        order. They do not depend on the step, so a sample computes them once."""
        blocks = [cast(TransformerBlock, block) for block in self.blocks]
        return [block.attn.project_kv(vl) for i, block in enumerate(blocks) if not self.is_self_attention(i)]

    def forward(
        self,
        x: Tensor,
        cross_kv: Sequence[tuple[Tensor, Tensor]],
        vl_mask: Tensor | None,
        t: Tensor,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, D) tokens, cross_kv = cross_kv(vl), vl_mask (B, L), t (B,) buckets, image_mask
        (B, L) the image tokens (N1.7's alternation) -> (B, T, D_out)."""
        temb = self.timestep_embedder(t)  # (B, D)
        kvs = iter(cross_kv)
        for i, block in enumerate(self.blocks):
            x = (
                block(x, temb)
                if self.is_self_attention(i)
                else block(x, temb, key_mask=self.key_mask(i, vl_mask, image_mask), kv=next(kvs))
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
            n, cfg.max_state_dim * cfg.state_history, cfg.hidden_size, cfg.input_embedding_dim
        )
        self.action_encoder = MultiEmbodimentActionEncoder(cfg.action_dim, cfg.input_embedding_dim, n)
        self.action_decoder = CategorySpecificMLP(n, cfg.hidden_size, cfg.hidden_size, cfg.action_dim)
        self.future_tokens = (
            nn.Parameter(torch.zeros(cfg.num_target_vision_tokens, cfg.input_embedding_dim))
            if cfg.num_target_vision_tokens
            else None
        )
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
            if cfg.vl_adapter.layers
            else None
        )
        self.position_embedding = (
            nn.Parameter(torch.zeros(cfg.max_seq_len, cfg.input_embedding_dim)) if cfg.add_pos_embed else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.action_encoder.W1.W.dtype

    def process_backbone(self, features: Tensor, mask: Tensor) -> Tensor:
        x = self.vlln(features)
        for block in self.vl_adapter or ():
            x = block(x, key_mask=mask)
        return x

    def encode_state(self, state: Tensor, ids: Tensor) -> Tensor:
        """state (B, T_s, S) -> (B, 1, D): the state history as one token."""
        return self.state_encoder(state.reshape(state.shape[0], 1, -1), ids)

    def velocity(
        self,
        cross_kv: Sequence[tuple[Tensor, Tensor]],
        vl_mask: Tensor,
        state_feat: Tensor,
        x: Tensor,
        bucket: Tensor,
        ids: Tensor,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """One DiT evaluation: noisy actions x (B, H, A) at bucket (B,) -> velocity (B, H, A);
        cross_kv = dit.cross_kv(vl); image_mask (B, L): the image tokens (N1.7's alternation)."""
        a = self.action_encoder(x, bucket, ids)  # (B, H, D)
        if self.position_embedding is not None:
            a = a + self.position_embedding[: a.shape[1]][None]
        parts = [state_feat, a]
        if self.future_tokens is not None:
            parts.insert(1, self.future_tokens[None].expand(x.shape[0], -1, -1))
        tokens = torch.cat(parts, dim=1)  # (B, 1 + F + H, D)
        out = self.dit(tokens, cross_kv, vl_mask, bucket, image_mask)
        return self.action_decoder(out, ids)[:, -self.cfg.action_horizon :]

    def time_bucket(self, steps: int, step: int) -> int:
        """The DiT's discretised time at `step`: int(step / steps * num_timestep_buckets)."""
        return int(step / steps * self.cfg.num_timestep_buckets)


class HeadBatch(Protocol):
    """What the head reads of a network's batch (model.GrootBatch, n17.Groot17Batch)."""

    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L) bool
    state: Tensor  # (B, T_s, S)
    embodiment_ids: Tensor  # (B,) long


class GrootNetwork(nn.Module, abc.ABC):
    """A backbone + the action head, sampled as one prefix and one Euler step (N1.5: model.GR00TN15,
    N1.7: n17.Groot17). `sample` runs them eagerly; static.py compiles the same two functions."""

    action_head: ActionHead

    @property
    def dtype(self) -> torch.dtype:
        return self.action_head.dtype

    @abc.abstractmethod
    def features(self, batch: Any, check: bool) -> Tensor:
        """The backbone features (B, L, Dv) of the batch (`check`: host-synchronising checks)."""

    def image_mask(self, batch: Any) -> Tensor | None:
        """(B, L) the image tokens, for a DiT that alternates text and image blocks (N1.7)."""
        return None

    def cross_blocks(self) -> int:
        """C: the DiT blocks that cross-attend to the backbone features."""
        dit = self.action_head.dit
        return sum(not dit.is_self_attention(i) for i in range(self.action_head.cfg.dit.layers))

    def new_context(self, batch: int, length: int) -> Tensor:
        """A cache of the cross-attention keys/values (C, 2, B, h, L, d) in the model's dtype."""
        dit = self.action_head.cfg.dit
        like = self.action_head.action_encoder.W1.W
        shape = (self.cross_blocks(), 2, batch, dit.heads, length, dit.head_dim)
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    # ---- sampling: one context and one Euler step, run eagerly here and compiled in static.py ----

    def prefix(self, batch: Any, cross_kv: Tensor, check: bool = False) -> Tensor:
        """Backbone, VL adapter and the DiT's cross-attention keys/values of the batch, written into
        cross_kv (C, 2, B, h, L, d) in place; returns the state features (B, 1, D) every step
        shares. No host sync unless `check` (static.py compiles it once per batch bucket)."""
        head = self.action_head
        vl = head.process_backbone(self.features(batch, check), batch.attention_mask)
        for i, (k, v) in enumerate(head.dit.cross_kv(vl)):
            cross_kv[i, 0].copy_(k)
            cross_kv[i, 1].copy_(v)
        return head.encode_state(batch.state.to(self.dtype), batch.embodiment_ids)

    def euler_step(
        self,
        cross_kv: Tensor,
        state_features: Tensor,
        batch: Any,
        x: Tensor,
        time: flow.StepTime,
        noise: Tensor,
        chunking: rtc.Chunking | None,
        dt: float,
        differentiate: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """One Euler step of the flow (models/common/flow.py) through the DiT against the cached
        cross-attention keys/values, with the batch's real-time chunking. time.tau (B,) = step /
        steps, time.t (B,) the DiT's time bucket. Returns (x after the step, velocity)."""
        head = self.action_head
        kv = [(cross_kv[i, 0], cross_kv[i, 1]) for i in range(cross_kv.shape[0])]
        image = self.image_mask(batch)

        def velocity(x_in: Tensor) -> Tensor:
            return head.velocity(
                kv, batch.attention_mask, state_features, x_in, time.t, batch.embodiment_ids, image
            )

        return flow.euler_step(velocity, x, time.tau, dt, noise, chunking, differentiate)

    def times(self, batch: int, steps: int, dtype: torch.dtype, device: torch.device) -> list[flow.StepTime]:
        """(tau, bucket) (batch,) per step: tau = step / steps in `dtype`, the bucket a long."""
        head = self.action_head
        return [
            flow.StepTime(
                torch.full((batch,), i / steps, dtype=dtype, device=device),
                torch.full((batch,), head.time_bucket(steps, i), device=device),
            )
            for i in range(steps)
        ]

    def sample(
        self, batch: Any, noise: Tensor, steps: int, chunking: rtc.Chunking | None = None
    ) -> tuple[Tensor, Tensor]:
        """Euler integration from noise (tau = 0) to actions (tau = 1), eagerly; returns (actions,
        the last step's velocity), (B, H, action_dim) each. `chunking`: real-time chunking rows (a
        batch guided with the Jacobian must run with gradients allowed)."""
        B, L = batch.input_ids.shape
        cross_kv = self.new_context(B, L)
        state_features = self.prefix(batch, cross_kv, check=True)
        return flow.integrate_network(
            self, cross_kv, state_features, batch, noise.to(self.dtype), steps, chunking
        )
