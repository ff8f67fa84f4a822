"""pi0 / pi0.5 in one file: SigLIP vision tower, PaliGemma projector, Gemma VLM + Gemma action expert.

Written from the public description of the architecture (Physical-Intelligence/openpi: models/pi0.py,
gemma.py, siglip.py, models_pytorch/pi0_pytorch.py). Names here are our own; `checkpoint.py` maps
them to the on-disk names of each checkpoint format.

Shapes: B batch, N image slots, P prefix tokens, S suffix tokens, H action horizon, A padded action
dim (32), W width, Hq / Hkv query / key-value heads, D head dim, L layers.

The model is a prefix-LM over one sequence:

    prefix = [image slot 0 tokens | image slot 1 | image slot 2 | language tokens]    (bidirectional)
    suffix = pi0:   [state token | H action tokens]   (state: own block; actions: one block)
             pi0.5: [H action tokens]                  (one block; time enters through adaRMSNorm)

Block-causal: a token sees every valid token of its own and earlier blocks. The prefix never
sees the suffix, so the prefix runs once through the VLM filling a preallocated KV cache, and each
Euler step runs only the suffix through the action expert against that cache. The two experts
share attention layer by layer (same depth and head layout) but have separate weights.

Conventions taken from the reference:
- language embeddings are multiplied by sqrt(W); image tokens are not scaled (the projector output
  enters the LM as is);
- RMSNorm computes in float32 and scales by (1 + weight); adaRMSNorm (pi0.5 expert only) maps the
  time condition to (scale, shift, gate): x_norm * (1 + scale) + shift, and the residual adds
  gate * branch;
- flow matching: t = 1 is noise, t = 0 the action; x_{t+dt} = x_t + dt * v_t, dt = -1 / steps;
- time embedding: sin/cos of t * 2π / period, periods geometric in [4e-3, 4], [sin, cos] order.

Exact shortcuts (they change no valid token's value): an image slot masked out in every sample
of the batch is left out of the prefix; the last VLM layer computes only its keys/values;
the policy trims trailing padding tokens to the longest prompt of the batch. Every padding token
attends to itself only, so no softmax row is empty (no NaN) and padding never reaches valid tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models import rtc

PALIGEMMA_VOCAB_SIZE = 257_152
IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


# --------------------------------------------------------------------------------------------
# Configuration: a table of named sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6


@dataclass(frozen=True)
class SiglipConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 224
    norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


GEMMA_VARIANTS: dict[str, GemmaConfig] = {
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    # openpi's LoRA fine-tuning variants have the base sizes (PyTorch checkpoints hold merged weights)
    "gemma_2b_lora": GemmaConfig(
        width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256
    ),
    "gemma_300m_lora": GemmaConfig(
        width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256
    ),
    # openpi's own test variant
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    # ours: the embedded demo (fast on a small CPU)
    "demo": GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
    # ours: the embedded default policy trained in MetaWorld (sized to train in ~1 h on 2 cores)
    "metaworld_vlm": GemmaConfig(width=128, depth=3, mlp_dim=384, num_heads=4, num_kv_heads=1, head_dim=32),
    "metaworld_expert": GemmaConfig(width=96, depth=3, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=32),
}

SIGLIP_VARIANTS: dict[str, SiglipConfig] = {
    "so400m": SiglipConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224),
    # ours: a tiny ViT on 224 px for tests and the demo (patch 28 -> 64 tokens per image)
    "tiny": SiglipConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=28, image_size=224),
    "tiny14": SiglipConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=224),
    # ours: the MetaWorld policy's camera (96 px, patch 16 -> 36 tokens)
    "metaworld": SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=16, image_size=96),
}


@dataclass(frozen=True)
class Pi0Config:
    pi05: bool = False
    vlm_variant: str = "gemma_2b"
    expert_variant: str = "gemma_300m"
    vision_variant: str = "so400m"
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    action_dim: int = 32  # padded state / action size
    action_horizon: int = 50
    max_token_len: int = 0  # 0 = reference default: 48 (pi0) / 200 (pi0.5)
    num_steps: int = 10
    image_slots: tuple[str, ...] = IMAGE_SLOTS
    min_period: float = 4e-3
    max_period: float = 4.0

    def __post_init__(self) -> None:
        if self.max_token_len <= 0:
            object.__setattr__(self, "max_token_len", 200 if self.pi05 else 48)
        for name, table in (
            (self.vlm_variant, GEMMA_VARIANTS),
            (self.expert_variant, GEMMA_VARIANTS),
            (self.vision_variant, SIGLIP_VARIANTS),
        ):
            if name not in table:
                raise ValueError(f"unknown variant {name!r}; known: {', '.join(table)}")
        vlm, expert = self.vlm, self.expert
        if (vlm.depth, vlm.num_heads, vlm.num_kv_heads, vlm.head_dim) != (
            expert.depth,
            expert.num_heads,
            expert.num_kv_heads,
            expert.head_dim,
        ):
            raise ValueError("the VLM and the action expert must share depth and attention layout")

    @property
    def vlm(self) -> GemmaConfig:
        return GEMMA_VARIANTS[self.vlm_variant]

    @property
    def expert(self) -> GemmaConfig:
        return GEMMA_VARIANTS[self.expert_variant]

    @property
    def vision(self) -> SiglipConfig:
        return SIGLIP_VARIANTS[self.vision_variant]

    @property
    def suffix_len(self) -> int:
        return self.action_horizon + (0 if self.pi05 else 1)


NAMED_CONFIGS: dict[str, Pi0Config] = {
    "pi0": Pi0Config(),
    "pi05": Pi0Config(pi05=True),
    "pi0_dummy": Pi0Config(
        vlm_variant="dummy", expert_variant="dummy", vision_variant="tiny", vocab_size=512
    ),
    "pi05_dummy": Pi0Config(
        pi05=True, vlm_variant="dummy", expert_variant="dummy", vision_variant="tiny", vocab_size=512
    ),
    "pi0_demo": Pi0Config(vlm_variant="demo", expert_variant="demo", vision_variant="tiny", vocab_size=512),
    "pi0_metaworld": Pi0Config(
        vlm_variant="metaworld_vlm",
        expert_variant="metaworld_expert",
        vision_variant="metaworld",
        vocab_size=512,
        action_horizon=16,
    ),
}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Gemma RMSNorm: float32 statistics, scale by (1 + weight)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype), None


class AdaRMSNorm(nn.Module):
    """Adaptive RMSNorm (pi0.5 expert): cond (B, C) -> scale, shift, gate, each (B, 1, W)."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        assert cond is not None, "adaRMSNorm needs the time condition"
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)  # (B, 1, W) each
        out = normed * (1.0 + scale.float()) + shift.float()
        return out.to(x.dtype), gate.to(x.dtype)


def _norm(dim: int, cond_dim: int | None, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if cond_dim is None else AdaRMSNorm(dim, cond_dim, eps)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, D) in float32 (half-split rotary layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, h, T, D) rotated by position: x*cos + rotate_half(x)*sin, in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class GemmaLayer(nn.Module):
    """One expert's weights for one layer. The attention itself is computed jointly (see Pi0Model)."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_norm = _norm(cfg.width, cond_dim, cfg.norm_eps)
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.post_attn_norm = _norm(cfg.width, cond_dim, cfg.norm_eps)
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, T, W) already normed -> q (B, Hq, T, D), k, v (B, Hkv, T, D)."""
        B, T, _ = h.shape
        D = self.cfg.head_dim
        q = self.q_proj(h).view(B, T, -1, D).transpose(1, 2)
        k = self.k_proj(h).view(B, T, -1, D).transpose(1, 2)
        v = self.v_proj(h).view(B, T, -1, D).transpose(1, 2)
        return q, k, v

    def finish(self, x: Tensor, attn: Tensor, gate: Tensor | None, cond: Tensor | None) -> Tensor:
        """Residual + MLP half of the layer. x (B, T, W) input, attn (B, T, Hq*D)."""
        out = self.o_proj(attn)
        x = x + (out if gate is None else out * gate)
        h, gate2 = self.post_attn_norm(x, cond)
        mlp = self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        return x + (mlp if gate2 is None else mlp * gate2)


class GemmaStack(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([GemmaLayer(cfg, cond_dim) for _ in range(cfg.depth)])
        self.norm = _norm(cfg.width, cond_dim, cfg.norm_eps)

    def layer(self, index: int) -> GemmaLayer:
        return cast(GemmaLayer, self.layers[index])


class SiglipLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, W = x.shape
        h = self.norm1(x)
        q, k, v = (
            p(h).view(B, T, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, W/heads)
        x = x + self.out_proj(a.transpose(1, 2).reshape(B, T, W))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class SiglipTower(nn.Module):
    """SigLIP ViT without the pooling head: images (B, 3, S, S) in [-1, 1] -> (B, patches, Wv)."""

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Embedding(cfg.num_patches, cfg.width)
        self.layers = nn.ModuleList([SiglipLayer(cfg) for _ in range(cfg.depth)])
        self.post_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.weight[None]
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x)


def sinusoidal_time_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """t (B,) -> (B, dim) = [sin(2π t / period), cos(2π t / period)], periods geometric, float32."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.double()[:, None] * (2.0 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


def block_causal_mask(ar: Tensor, pad: Tensor) -> Tensor:
    """Reference mask rule. ar (B, T) int (1 starts a new block), pad (B, T) bool -> (B, T, T) bool.

    Query i sees key j when cumsum(ar)[j] <= cumsum(ar)[i] and both are valid tokens. Every token
    also sees itself, so padding rows are never empty (their outputs are never read).
    """
    c = torch.cumsum(ar, dim=1)
    mask = (c[:, None, :] <= c[:, :, None]) & pad[:, None, :] & pad[:, :, None]
    eye = torch.eye(ar.shape[1], dtype=torch.bool, device=ar.device)
    return mask | eye


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys/values of the prefix in every VLM layer: (L, B, Hkv, P, D).

    prefill writes it once; the Euler steps only read it (each step's suffix keys/values are
    joined to it per layer), so a step is a pure function of x_t and can be differentiated.
    """

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        prefix_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (layers, batch, kv_heads, prefix_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.prefix_len = prefix_len


class Pi0Model(nn.Module):
    def __init__(self, cfg: Pi0Config) -> None:
        super().__init__()
        self.cfg = cfg
        vlm, expert = cfg.vlm, cfg.expert
        self.vision = SiglipTower(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, vlm.width)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, vlm.width)
        self.vlm = GemmaStack(vlm, cond_dim=None)
        self.expert = GemmaStack(expert, cond_dim=expert.width if cfg.pi05 else None)
        self.action_in_proj = nn.Linear(cfg.action_dim, expert.width)
        self.action_out_proj = nn.Linear(expert.width, cfg.action_dim)
        if cfg.pi05:
            self.time_mlp_in = nn.Linear(expert.width, expert.width)
            self.time_mlp_out = nn.Linear(expert.width, expert.width)
        else:
            self.state_proj = nn.Linear(cfg.action_dim, expert.width)
            self.action_time_mlp_in = nn.Linear(2 * expert.width, expert.width)
            self.action_time_mlp_out = nn.Linear(expert.width, expert.width)

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    # ---- embeddings ------------------------------------------------------------------------

    def embed_prefix(
        self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor
    ) -> tuple[Tensor, Tensor]:
        """images (B, N, 3, S, S) in [-1, 1], image_masks (B, N), tokens/token_masks (B, T)
        -> embeddings (B, P, W), pad mask (B, P) with P = N' * patches + T, N' the slots present in
        at least one sample.

        A slot masked out in every sample of the batch contributes no tokens at all (its tokens
        would be padding, and padding never changes a valid token's value or position).
        """
        present = image_masks.any(dim=0).tolist()  # one host sync for all slots
        slots = [self.projector(self.vision(images[:, i])) for i in range(len(present)) if present[i]]
        lang = self.embed_tokens(tokens) * math.sqrt(self.cfg.vlm.width)  # (B, T, W)
        embs = torch.cat([*slots, lang.to(self.dtype)], dim=1)
        patches = self.cfg.vision.num_patches
        kept = image_masks[:, [i for i in range(len(present)) if present[i]]]  # (B, N')
        pad = torch.cat([kept.repeat_interleave(patches, dim=1), token_masks], dim=1)
        return embs, pad

    def suffix_ar(self, batch: int, device: torch.device) -> Tensor:
        """Block starts of the suffix (B, S): pi0 [1, 1, 0, ...] (state | actions), pi0.5 [1, 0, ...]."""
        ar = torch.zeros(batch, self.cfg.suffix_len, dtype=torch.int32, device=device)
        ar[:, 0] = 1
        if not self.cfg.pi05:
            ar[:, 1] = 1
        return ar

    def embed_suffix(self, state: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """state (B, A), x_t (B, H, A) float32, t (B,) -> embeddings (B, S, We), adaRMS cond (B, We)|None."""
        width = self.cfg.expert.width
        time_emb = sinusoidal_time_embedding(t, width, self.cfg.min_period, self.cfg.max_period).to(
            self.dtype
        )
        action_emb = self.action_in_proj(x_t.to(self.dtype))  # (B, H, We)
        if self.cfg.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb))))
            return action_emb, cond
        mixed = torch.cat([action_emb, time_emb[:, None, :].expand_as(action_emb)], dim=-1)
        action_time = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(mixed)))
        state_emb = self.state_proj(state.to(self.dtype))[:, None, :]  # (B, 1, We)
        return torch.cat([state_emb, action_time], dim=1), None

    # ---- attention -------------------------------------------------------------------------

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, S, D), mask (B, 1, T, S) bool -> (B, T, Hq*D)."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        B, _, T, _ = q.shape
        return out.transpose(1, 2).reshape(B, T, -1)

    def joint_forward(
        self, embs: list[Tensor], mask: Tensor, positions: Tensor, conds: list[Tensor | None]
    ) -> list[Tensor]:
        """Run the experts together over the concatenated sequence, layer by layer, no cache.

        embs[i] (B, T_i, W_i) goes through stack i (0 = VLM, 1 = action expert); mask (B, T, T)
        bool over the concatenation; positions (B, T). Returns each stack's final-normed output.
        This is the reference (training-style) computation; inference uses prefill + denoise_step.
        """
        stacks = [self.vlm, self.expert][: len(embs)]
        cfg = self.cfg.vlm
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        xs = list(embs)
        lengths = [x.shape[1] for x in xs]
        for li in range(cfg.depth):
            layers = [stack.layer(li) for stack in stacks]
            qs, ks, vs, gates = [], [], [], []
            for layer, x, cond in zip(layers, xs, conds, strict=False):
                h, gate = layer.input_norm(x, cond)
                q, k, v = layer.qkv(h)
                qs.append(q)
                ks.append(k)
                vs.append(v)
                gates.append(gate)
            q = apply_rope(torch.cat(qs, dim=2), cos, sin)
            k = apply_rope(torch.cat(ks, dim=2), cos, sin)
            attn = self._attend(q, k, torch.cat(vs, dim=2), mask[:, None])
            parts = attn.split(lengths, dim=1)
            xs = [
                layer.finish(x, a, g, c)
                for layer, x, a, g, c in zip(layers, xs, parts, gates, conds, strict=False)
            ]
        return [stack.norm(x, c)[0] for stack, x, c in zip(stacks, xs, conds, strict=False)]

    def prefill(self, prefix_embs: Tensor, prefix_pad: Tensor, cache: KVCache) -> None:
        """Run the prefix through the VLM, writing every layer's keys/values into the cache.

        Only the keys/values are needed: the last layer skips its queries, attention output and MLP.
        """
        cfg = self.cfg.vlm
        positions = torch.cumsum(prefix_pad.long(), dim=1) - 1
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        ar = torch.zeros_like(prefix_pad, dtype=torch.int32)
        mask = block_causal_mask(ar, prefix_pad)[:, None]  # (B, 1, P, P)
        x = prefix_embs
        for li in range(cfg.depth):
            layer = self.vlm.layer(li)
            h, _ = layer.input_norm(x)
            q, k, v = layer.qkv(h)
            k = apply_rope(k, cos, sin)
            cache.k[li] = k
            cache.v[li] = v
            if li == cfg.depth - 1:
                break
            attn = self._attend(apply_rope(q, cos, sin), k, v, mask)
            x = layer.finish(x, attn, None, None)

    def suffix_context(self, prefix_pad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What every Euler step shares: mask (B, 1, S, P + S) bool and RoPE cos/sin (B, 1, S, D)."""
        cfg = self.cfg.expert
        B, P = prefix_pad.shape
        S = self.cfg.suffix_len
        positions = (
            prefix_pad.sum(dim=1, keepdim=True) + torch.arange(S, device=prefix_pad.device)[None]
        )  # (B, S)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        ones = torch.ones(B, S, dtype=torch.bool, device=prefix_pad.device)
        suffix_mask = block_causal_mask(self.suffix_ar(B, prefix_pad.device), ones)  # (B, S, S)
        mask = torch.cat([prefix_pad[:, None, :].expand(B, S, P), suffix_mask], dim=2)[:, None]
        return mask, cos, sin

    def denoise_step(
        self, cache: KVCache, context: tuple[Tensor, Tensor, Tensor], state: Tensor, x_t: Tensor, t: Tensor
    ) -> Tensor:
        """One velocity evaluation: the suffix through the action expert against the cached prefix.

        context = suffix_context(prefix_pad); state (B, A), x_t (B, H, A) float32, t (B,)
        -> v_t (B, H, A) float32.
        """
        mask, cos, sin = context
        x, cond = self.embed_suffix(state, x_t, t)  # (B, S, We)
        for li in range(self.cfg.expert.depth):
            layer = self.expert.layer(li)
            h, gate = layer.input_norm(x, cond)
            q, k, v = layer.qkv(h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys = torch.cat([cache.k[li], k], dim=2)  # (B, Hkv, P + S, D)
            values = torch.cat([cache.v[li], v], dim=2)
            attn = self._attend(q, keys, values, mask)
            x = layer.finish(x, attn, gate, cond)
        out, _ = self.expert.norm(x, cond)
        return self.action_out_proj(out[:, -self.cfg.action_horizon :]).float()

    # ---- sampling --------------------------------------------------------------------------

    def sample_actions(
        self,
        images: Tensor,
        image_masks: Tensor,
        tokens: Tensor,
        token_masks: Tensor,
        state: Tensor,
        noise: Tensor,
        num_steps: int | None = None,
        prefix: rtc.BatchPrefix | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Euler integration from noise (t = 1) to actions (t = 0).

        `prefix` asks for real-time chunking on some rows (models/rtc.py; the time there is
        tau = 1 - t and velocities point toward the data, hence the sign flips). A guided batch
        must run with gradients allowed (torch.no_grad, not inference_mode).
        Returns actions (B, H, A) float32 in normalised units and the last step's velocity (B, H, A).
        """
        steps = num_steps or self.cfg.num_steps
        prefix_embs, prefix_pad = self.embed_prefix(images, image_masks, tokens, token_masks)
        B, P, _ = prefix_embs.shape
        vlm = self.cfg.vlm
        cache = KVCache(
            vlm.depth,
            B,
            vlm.num_kv_heads,
            P,
            vlm.head_dim,
            self.dtype,
            prefix_embs.device,
        )
        self.prefill(prefix_embs, prefix_pad, cache)
        context = self.suffix_context(prefix_pad)
        dt = -1.0 / steps
        x_t = noise.float()
        v_t = torch.zeros_like(x_t)
        t = torch.ones(B, dtype=torch.float32, device=x_t.device)
        for _ in range(steps):
            if prefix is not None and prefix.hard:
                x_t = rtc.inpaint_hard(x_t, 1.0 - t, noise, prefix)
            if prefix is not None and prefix.guided:
                step_t = t

                def toward_data(x: Tensor, step_t: Tensor = step_t) -> Tensor:
                    return -self.denoise_step(cache, context, state, x, step_t)

                v_t = -rtc.guided_velocity(x_t, 1.0 - t, toward_data, prefix)
            else:
                v_t = self.denoise_step(cache, context, state, x_t, t)
            x_t = x_t + dt * v_t
            t = t + dt
        if prefix is not None and prefix.hard:
            x_t = torch.where(prefix.hard_mask[:, :, None], prefix.actions, x_t)
        return x_t, v_t

    def flow_matching_loss(
        self,
        images: Tensor,
        image_masks: Tensor,
        tokens: Tensor,
        token_masks: Tensor,
        state: Tensor,
        actions: Tensor,
        noise: Tensor,
        t: Tensor,
    ) -> Tensor:
        """The training objective (openpi's compute_loss): actions (B, H, A) normalised and padded,
        noise (B, H, A), t (B,) in (0, 1] -> squared error (B, H, A).

        x_t = t * noise + (1 - t) * actions is the point on the straight path at time t; the target
        velocity is d x_t / dt = noise - actions, which sample_actions integrates from t = 1 to 0.
        """
        tt = t[:, None, None]
        x_t = tt * noise + (1.0 - tt) * actions
        v_t = self.velocity_full(images, image_masks, tokens, token_masks, state, x_t, t)
        return (v_t - (noise - actions)).pow(2)

    def velocity_full(
        self,
        images: Tensor,
        image_masks: Tensor,
        tokens: Tensor,
        token_masks: Tensor,
        state: Tensor,
        x_t: Tensor,
        t: Tensor,
    ) -> Tensor:
        """The velocity computing prefix and suffix together in one pass (no cache): the training
        forward, and the reference the cached inference path is checked against."""
        prefix_embs, prefix_pad = self.embed_prefix(images, image_masks, tokens, token_masks)
        suffix_embs, cond = self.embed_suffix(state, x_t, t)
        B, S = suffix_embs.shape[:2]
        pad = torch.cat([prefix_pad, torch.ones(B, S, dtype=torch.bool, device=prefix_pad.device)], dim=1)
        ar = torch.cat(
            [torch.zeros_like(prefix_pad, dtype=torch.int32), self.suffix_ar(B, pad.device)], dim=1
        )
        positions = torch.cumsum(pad.long(), dim=1) - 1
        _, out = self.joint_forward(
            [prefix_embs, suffix_embs], block_causal_mask(ar, pad), positions, [None, cond]
        )
        return self.action_out_proj(out[:, -self.cfg.action_horizon :]).float()


def sample_flow_time(batch: int, generator: torch.Generator | None = None) -> Tensor:
    """Training times t (B,) as openpi draws them: Beta(1.5, 1) scaled into [0.001, 1]; more weight
    near t = 1 (noise), where the flow's first, hardest steps are."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    beta = u ** (1.0 / 1.5)  # inverse CDF of Beta(1.5, 1): F(x) = x^1.5
    return (beta * 0.999 + 0.001).float()


def build(cfg: Pi0Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Pi0Model:
    """Construct (random init, or on the meta device without memory)."""
    with torch.device(device):
        model = Pi0Model(cfg)
    return model.to(dtype=dtype)


def init_random_weights(model: nn.Module, seed: int) -> None:
    """Deterministic random weights from one seed, independent of the global RNG.

    Weights ~ N(0, 1/fan_in) (activations stay O(1)); biases 0; norm scales 0 (= identity for
    Gemma's (1 + w)); LayerNorm weights 1; embeddings ~ N(0, 1/width).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name and "dense" not in name
            if leaf == "bias":
                value = torch.zeros(param.shape)
            elif is_norm:
                layer_norm = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.LayerNorm)
                value = torch.ones(param.shape) if layer_norm else torch.zeros(param.shape)
            elif param.ndim >= 2:
                value = torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel())
            else:
                value = torch.randn(param.shape, generator=generator) * 0.02
            param.copy_(value.to(param.dtype))
