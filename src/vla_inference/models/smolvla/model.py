"""SmolVLA (LeRobot): SmolVLM2's vision tower and connector, its first text layers, and a narrower
action expert that alternates self-attention with cross-attention to the VLM's keys/values.

Written from the public description of the model (huggingface/lerobot v0.4.4,
src/lerobot/policies/smolvla/: modeling_smolvla.py, smolvlm_with_expert.py; transformers'
SmolVLM classes), on the shared pieces of models/common (VisionTower, Decoder, KVCache, attend,
the Euler sampler). `checkpoint.py` maps our names to LeRobot's files.

Shapes: B batch, N image slots, G patch grid side, s pixel-shuffle scale, I image tokens per slot
((G / s)^2), T language tokens, P prefix tokens (N * I + T + 1), S suffix tokens (= H), H action
horizon (chunk_size), A padded state / action dim (32), W VLM width, We expert width, Hq / Hkv
query / key-value heads, D head dim, L layers (VLM and expert alike).

One forward:

    prefix = [slot 0: I image tokens | ... | slot N-1 | T language tokens | state token]
              image and language tokens: one bidirectional block; the state token starts its own
              block (it sees the whole prefix, nothing in the prefix sees it)
    suffix = [H action tokens], each its own block: causal among themselves (pi0's are one block)

    prefill   the prefix through the L kept VLM layers once, keys/values into a KV cache;
    a step    the suffix through the action expert against the cache, layer by layer:
              self layers  (l % every == 0)  queries/keys/values from the expert's own
                           projections at absolute positions; keys = [VLM layer l's cached
                           keys | own keys], mask = real prefix + causal actions;
              cross layers (the others)       queries from the expert at positions restarting at
                           0; keys/values = the expert's k_proj / v_proj (Hkv * D -> Hkv * D)
                           applied to VLM layer l's cached, already-rotated keys/values; actions
                           see only the real prefix.
              The cross layers' projected keys/values depend on the prefix alone, so `prefill`
              computes them once and stores them in those layers' cache rows (LeRobot recomputes
              them at every step; the values are the same). A step is then a pure function of
              x_t: `denoise_step` reads the cache and writes nothing (guided real-time chunking
              differentiates through it; the compiled runner replays it).

Sampling is one prefix (`prefix`: the prefix into a preallocated KV cache, and the context every
step shares) and one Euler step (`euler_step`, through models/common/flow.py): `sample` runs them
eagerly, static.py (VLA_COMPILE) compiles the same two functions with static shapes.

Conventions taken from the reference (file references in /work/notes/smolvla.md):
- image tokens are multiplied by sqrt(W) as a tensor of the embedding's dtype, language tokens by
  sqrt(W) as a Python float; the state token (Linear(A -> W)) is not scaled;
- RoPE is SmolVLA's own, base 10000 in float32 (angle = position / 10000^(2i/D), rotate-half),
  for the VLM and the expert alike; SmolVLM's rope_theta is not used;
- RMSNorm eps and head layout of the expert are the text model's (a copy of its config), width
  int(0.75 W), MLP 256 * ceil(4 * int(2 We / 3) / 256);
- time embedding: sin/cos of t * 2π / period, periods geometric in [4e-3, 4], [sin, cos] order,
  in float64; concatenated to the action embedding, then Linear(2 We -> We), SiLU, Linear;
- flow matching: t = 1 noise, t = 0 the action chunk, v_t = noise - actions; 10 Euler steps with
  t = 1.0 + step * (-1 / steps) in Python doubles (LeRobot after #2600), x <- x + dt v. The shared
  sampler runs tau = step / steps toward the data with the velocity -v_t: its update
  x + (1 / steps)(-v_t) is bit-identical to the reference's x + (-1 / steps) v_t.

Exact shortcuts (they change no real token's value): an image slot masked out in every sample of
the batch (a missing camera, LeRobot's `empty_cameras` fillers) is left out of the prefix, since
its tokens are masked padding that moves no position; the last VLM layer computes only its
keys/values; padding tokens attend to themselves only (models/common/masks.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models import rtc
from vla_inference.models.common import flow
from vla_inference.models.common.masks import block_causal_mask, present_slots
from vla_inference.models.common.transformer import (
    Decoder,
    DecoderConfig,
    DecoderLayer,
    KVCache,
    apply_rope,
    attend,
)
from vla_inference.models.common.vit import VisionTower, ViTConfig

SMOLVLM2_VOCAB_SIZE = 49_280
ROPE_BASE = 10_000.0  # SmolVLA's own RoPE, not SmolVLM's rope_theta


def expert_mlp_dim(width: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """The expert's MLP size: LeRobot's rule 256 * ceil(4 * int(2 width / 3) / 256)."""
    hidden = multiplier * int(2 * width / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def expert_config(vlm: DecoderConfig, width_multiplier: float = 0.75) -> DecoderConfig:
    """The action expert: a copy of the text model's config at int(multiplier * W) width, the same
    depth (the kept layers), heads, head dim and eps."""
    width = int(vlm.width * width_multiplier)
    return replace(vlm, width=width, mlp_dim=expert_mlp_dim(width))


def smolvlm_text(
    width: int, depth: int, mlp_dim: int, heads: int, kv_heads: int, head_dim: int, eps: float = 1e-5
) -> DecoderConfig:
    """A SmolVLM (Llama) text model, truncated to `depth` layers, with SmolVLA's RoPE base."""
    return DecoderConfig(
        width=width,
        depth=depth,
        mlp_dim=mlp_dim,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=ROPE_BASE,
        norm_eps=eps,
        activation="silu",
    )


@dataclass(frozen=True)
class SmolVLAConfig:
    vision: ViTConfig  # SmolVLM's SigLIP tower (all layers, final LayerNorm)
    vlm: DecoderConfig  # the kept text layers (depth = LeRobot's num_vlm_layers)
    expert: DecoderConfig
    vocab_size: int = SMOLVLM2_VOCAB_SIZE
    scale_factor: int = 4  # the connector's pixel shuffle
    self_attn_every_n_layers: int = 2  # expert layer l is a self layer when l % n == 0 (n <= 0: none)
    max_state_dim: int = 32
    max_action_dim: int = 32
    chunk_size: int = 50
    num_steps: int = 10
    tokenizer_max_length: int = 48
    min_period: float = 4e-3
    max_period: float = 4.0

    def __post_init__(self) -> None:
        vlm, expert, vision = self.vlm, self.expert, self.vision
        if expert.depth != vlm.depth:
            raise ValueError("the action expert must have as many layers as the kept VLM layers")
        layout = ("num_heads", "num_kv_heads", "head_dim")
        if any(getattr(vlm, k) != getattr(expert, k) for k in layout):
            raise ValueError("the VLM and the action expert must share the attention layout")
        if vision.output != "final" or vision.num_prefix_tokens:
            raise ValueError("SmolVLM's vision tower has no prefix tokens and ends with its final norm")
        if vision.grid % self.scale_factor:
            raise ValueError(f"patch grid {vision.grid} is not divisible by scale {self.scale_factor}")

    @classmethod
    def named(cls, name: str) -> SmolVLAConfig:
        if name not in SIZES:
            raise ValueError(f"unknown SmolVLA size {name!r}; known: {', '.join(SIZES)}")
        return SIZES[name]

    @property
    def image_tokens(self) -> int:
        """I: tokens per image after the pixel shuffle."""
        return (self.vision.grid // self.scale_factor) ** 2

    def is_self_layer(self, layer: int) -> bool:
        n = self.self_attn_every_n_layers
        return n > 0 and layer % n == 0

    def prefix_len(self, slots: int, tokens: int | None = None) -> int:
        """P for `slots` images and `tokens` language tokens (default tokenizer_max_length)."""
        return slots * self.image_tokens + (self.tokenizer_max_length if tokens is None else tokens) + 1


_SMOLVLM2_500M_TEXT = smolvlm_text(960, 16, 2560, heads=15, kv_heads=5, head_dim=64)
_TINY_TEXT = smolvlm_text(48, 4, 96, heads=3, kv_heads=1, head_dim=16)

SIZES: dict[str, SmolVLAConfig] = {
    # lerobot/smolvla_base and its fine-tunes: SmolVLM2-500M-Video-Instruct, first 16 of 32 text
    # layers, expert 0.75 x 960 = 720 wide.
    "smolvla_base": SmolVLAConfig(
        vision=ViTConfig(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16, image_size=512),
        vlm=_SMOLVLM2_500M_TEXT,
        expert=expert_config(_SMOLVLM2_500M_TEXT),
    ),
    # ours: tests (64 px, patch 8, grid 8 -> 4 tokens per image; 2 self + 2 cross expert layers)
    "tiny": SmolVLAConfig(
        vision=ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=64),
        vlm=_TINY_TEXT,
        expert=expert_config(_TINY_TEXT),
        vocab_size=512,
        chunk_size=6,
        tokenizer_max_length=12,
    ),
}


# --------------------------------------------------------------------------------------------
# SmolVLA's own pieces
# --------------------------------------------------------------------------------------------


class SmolVLABatch(NamedTuple):
    """A batch's inputs to the sampler (policy.collate), every tensor with the rows first."""

    images: Tensor  # (B, N, 3, S, S) in [-1, 1], the model's dtype
    image_masks: Tensor  # (B, N) bool: False = a missing camera (its tokens are padding)
    tokens: Tensor  # (B, T) int64, right-padded
    token_masks: Tensor  # (B, T) bool
    state: Tensor  # (B, A) float32, normalised, zero-padded


class SuffixContext(NamedTuple):
    """What every Euler step shares (made once per prefix by `suffix_context`)."""

    self_mask: Tensor  # (B, 1, S, P + S) bool: real prefix tokens, then causal actions
    cross_mask: Tensor  # (B, 1, S, P) bool: real prefix tokens
    self_cos: Tensor  # (B, 1, S, D) float32: absolute positions (after the real prefix)
    self_sin: Tensor
    cross_cos: Tensor  # (B, 1, S, D) float32: positions 0..S-1
    cross_sin: Tensor


def rope_tables(positions: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """SmolVLA's RoPE: positions (B, T) -> cos, sin (B, 1, T, D) float32, angle = position /
    10000^(2i / D) (a division, as the reference computes it), halves repeated (rotate-half)."""
    exponents = (2.0 / head_dim) * torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device)
    timescale = ROPE_BASE**exponents  # (D/2,)
    radians = positions.to(torch.float32)[..., None] / timescale  # (B, T, D/2)
    emb = torch.cat([radians, radians], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos(), emb.sin()


def time_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """t (B,) -> (B, dim) float64: [sin(t 2π / period), cos(t 2π / period)], periods geometric."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * t[:, None]  # (B, dim/2) float64
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def network_time(step: int, steps: int) -> float:
    """The time t the network sees at Euler step `step`: 1.0 + step * (-1 / steps) in Python
    doubles, then float32 (LeRobot since #2600; before, a float32 tensor accumulated dt)."""
    return 1.0 + step * (-1.0 / steps)


class Connector(nn.Module):
    """SmolVLM's connector: pixel shuffle (each s x s block of patches becomes one token of
    s^2 * Cv features, row-major over the block) and a projection without bias.

    x (B, G*G, Cv) -> (B, (G/s)^2, W).
    """

    def __init__(self, vision_width: int, width: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(vision_width * scale * scale, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        s, g = self.scale, math.isqrt(N)
        x = x.view(B, g // s, s, g // s, s, C).permute(0, 1, 3, 2, 4, 5)  # (B, G/s, G/s, s, s, Cv)
        return cast(Tensor, self.proj(x.reshape(B, (g // s) ** 2, s * s * C)))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class SmolVLAModel(nn.Module):
    def __init__(self, cfg: SmolVLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        vlm, expert = cfg.vlm, cfg.expert
        self.vision = VisionTower(cfg.vision)
        self.connector = Connector(cfg.vision.width, vlm.width, cfg.scale_factor)
        self.vlm = Decoder(vlm, vocab_size=cfg.vocab_size)
        self.expert = Decoder(expert)
        kv_dim = vlm.num_kv_heads * vlm.head_dim
        for li in range(expert.depth):
            if not cfg.is_self_layer(li):  # cross layers project the VLM's cached keys/values
                attn = self.expert.layer(li).self_attn
                attn.k_proj = nn.Linear(kv_dim, kv_dim, bias=False)
                attn.v_proj = nn.Linear(kv_dim, kv_dim, bias=False)
        self.state_proj = nn.Linear(cfg.max_state_dim, vlm.width)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, expert.width)
        self.action_out_proj = nn.Linear(expert.width, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * expert.width, expert.width)
        self.action_time_mlp_out = nn.Linear(expert.width, expert.width)

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    # ---- the prefix ------------------------------------------------------------------------

    def embed_images(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) in [-1, 1] -> image tokens (B, I, W), scaled by sqrt(W)."""
        x = self.connector(self.vision(images))
        return x * torch.tensor(x.shape[-1] ** 0.5, dtype=x.dtype, device=x.device)

    def embed_prefix(
        self, batch: SmolVLABatch, slots: tuple[int, ...] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-> embeddings (B, P, W), pad (B, P) bool, ar (B, P) int (1 at the state token only).

        P = N' * I + T + 1 with N' the slots present in at least one sample (`present_slots`, one
        host sync), or exactly the given `slots` (static shapes: a slot masked in a row is masked
        padding)."""
        images, image_masks, tokens, token_masks, state = batch
        if slots is None:
            slots = present_slots(image_masks)
        B, dtype = tokens.shape[0], self.dtype
        embs, pads = [], []
        if slots:
            shape = images.shape[2:]
            picked = images[:, list(slots)].reshape(B * len(slots), *shape)  # every slot in one pass
            image_tokens = self.embed_images(picked.to(dtype))  # (B * N', I, W)
            embs.append(image_tokens.reshape(B, len(slots) * self.cfg.image_tokens, -1))
            pads.append(image_masks[:, list(slots)].repeat_interleave(self.cfg.image_tokens, dim=1))
        lang = self.vlm.embed_tokens(tokens)
        embs.append((lang * math.sqrt(lang.shape[-1])).to(dtype))  # (B, T, W)
        pads.append(token_masks.bool())
        embs.append(self.state_proj(state.to(dtype))[:, None, :])  # (B, 1, W), not scaled
        pads.append(torch.ones(B, 1, dtype=torch.bool, device=tokens.device))
        pad = torch.cat(pads, dim=1)
        ar = torch.zeros_like(pad, dtype=torch.int32)
        ar[:, -1] = 1  # the state token starts its own block
        return torch.cat(embs, dim=1), pad, ar

    def prefill(self, embs: Tensor, pad: Tensor, ar: Tensor, cache: KVCache | None = None) -> KVCache:
        """The prefix through the kept VLM layers; returns the cache (L, B, Hkv, P, D) the expert
        reads: self layers hold the VLM layer's keys/values (keys rotated), cross layers the
        expert's k_proj / v_proj of them. Written into `cache` when it is large enough."""
        cfg = self.cfg.vlm
        B, P, _ = embs.shape
        cos, sin = rope_tables(torch.cumsum(pad.long(), dim=1) - 1, cfg.head_dim)
        mask = block_causal_mask(ar, pad)[:, None]  # (B, 1, P, P)
        cache = self.vlm.new_cache(B, P, embs, cache)
        x = embs
        for li in range(cfg.depth - 1):
            x = self.vlm.layer(li)(x, cos, sin, mask, cache, li)
        last = self.vlm.layer(cfg.depth - 1)  # only its keys/values are read
        _, k, v = last.self_attn.qkv(last.input_layernorm(x), cos, sin)
        cache.update(cfg.depth - 1, 0, k, v)
        for li in range(cfg.depth):
            if not self.cfg.is_self_layer(li):
                attn = self.expert.layer(li).self_attn
                k, v = cache.view(li, B, P)
                cache.update(li, 0, _project_heads(attn.k_proj, k), _project_heads(attn.v_proj, v))
        return cache

    def suffix_context(self, pad: Tensor) -> SuffixContext:
        """pad (B, P) the prefix's real tokens -> the masks and RoPE tables every step shares."""
        B, P = pad.shape
        S, D = self.cfg.chunk_size, self.cfg.expert.head_dim
        steps = torch.arange(S, device=pad.device)[None].expand(B, S)
        self_cos, self_sin = rope_tables(pad.sum(dim=1, keepdim=True) + steps, D)
        cross_cos, cross_sin = rope_tables(steps, D)
        prefix = pad[:, None, :].expand(B, S, P)
        causal = torch.ones(S, S, dtype=torch.bool, device=pad.device).tril()[None].expand(B, S, S)
        self_mask = torch.cat([prefix, causal], dim=2)[:, None]
        return SuffixContext(self_mask, prefix[:, None], self_cos, self_sin, cross_cos, cross_sin)

    # ---- one denoising step ----------------------------------------------------------------

    def embed_suffix(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t (B, H, A), t (B,) float32 -> action tokens (B, H, We)."""
        action = self.action_in_proj(x_t.to(self.dtype))
        time = time_embedding(t, action.shape[-1], self.cfg.min_period, self.cfg.max_period).to(action.dtype)
        mixed = torch.cat([action, time[:, None, :].expand_as(action)], dim=2)
        return cast(Tensor, self.action_time_mlp_out(F.silu(self.action_time_mlp_in(mixed))))

    def denoise_step(self, cache: KVCache, context: SuffixContext, x_t: Tensor, t: Tensor) -> Tensor:
        """One velocity evaluation, a pure function of x_t: the suffix through the expert against
        the cached prefix (nothing is written). x_t (B, H, A), t (B,) float32 -> v_t (B, H, A) in
        x_t's dtype (v_t points toward the noise: x_{t+dt} = x_t + dt v_t with dt < 0)."""
        x = self.embed_suffix(x_t, t)  # (B, S, We)
        B, P = x.shape[0], context.cross_mask.shape[-1]
        for li in range(self.cfg.expert.depth):
            layer = self.expert.layer(li)
            h = layer.input_layernorm(x)
            cached_k, cached_v = cache.view(li, B, P)  # (B, Hkv, P, D)
            if self.cfg.is_self_layer(li):
                q, k, v = layer.self_attn.qkv(h, context.self_cos, context.self_sin)
                keys, values = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
                attn = attend(q, keys, values, context.self_mask)
            else:
                q = _heads(layer.self_attn.q_proj(h), layer.self_attn.head_dim)
                q = apply_rope(q, context.cross_cos, context.cross_sin)
                attn = attend(q, cached_k, cached_v, context.cross_mask)
            x = _finish(layer, x, attn)
        out = self.expert.norm(x)
        return cast(Tensor, self.action_out_proj(out)).to(x_t.dtype)

    # ---- sampling: one prefix and one Euler step, run eagerly here and compiled in static.py ----

    def prefix(self, batch: SmolVLABatch, cache: KVCache, slots: tuple[int, ...]) -> SuffixContext:
        """The prefix of the batch (images of `slots`, prompt, state) into `cache`; the context
        every Euler step shares. No host synchronisation: static.py compiles it once per bucket."""
        embs, pad, ar = self.embed_prefix(batch, slots)
        self.prefill(embs, pad, ar, cache)
        return self.suffix_context(pad)

    def euler_step(
        self,
        cache: KVCache,
        context: SuffixContext,
        batch: SmolVLABatch,
        x: Tensor,
        time: flow.StepTime,
        noise: Tensor,
        chunking: rtc.Chunking | None,
        dt: float,
        differentiate: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """One Euler step of the flow (models/common/flow.py), x (B, H, A) toward the data at
        time.tau, the network at LeRobot's time time.t, with the batch's real-time chunking.
        Returns (x after the step, the velocity toward the data). The state is in the prefix:
        `batch` is not read here."""

        def toward_data(x_in: Tensor) -> Tensor:
            return -self.denoise_step(cache, context, x_in, time.t)

        return flow.euler_step(toward_data, x, time.tau, dt, noise, chunking, differentiate)

    def times(self, batch: int, steps: int, dtype: torch.dtype, device: torch.device) -> list[flow.StepTime]:
        """(tau, t) (batch,) per step: tau = step / steps in `dtype`, t = `network_time` in float32."""
        full = functools.partial(torch.full, (batch,), device=device)
        return [
            flow.StepTime(full(i / steps, dtype=dtype), full(network_time(i, steps), dtype=torch.float32))
            for i in range(steps)
        ]

    def initial_noise(self, noise: Tensor) -> Tensor:
        """The noise the flow starts from, at least float32."""
        return noise.to(torch.promote_types(noise.dtype, torch.float32))

    def prefix_length(self, slots: tuple[int, ...], tokens: int) -> int:
        """P: the prefix tokens of `slots` image slots, `tokens` prompt tokens and the state."""
        return self.cfg.prefix_len(len(slots), tokens)

    def encode(
        self, batch: SmolVLABatch, slots: tuple[int, ...] | None = None
    ) -> tuple[KVCache, SuffixContext]:
        """The eager prefix: a KV cache allocated for the batch's prefix (the `slots` given, else
        those present in some row: one host sync), filled by `prefix`, and the steps' context."""
        slots = present_slots(batch.image_masks) if slots is None else slots
        B, T = batch.tokens.shape
        vlm = self.cfg.vlm
        length, like = self.prefix_length(slots, T), self.action_in_proj.weight
        cache = KVCache.allocate(vlm.depth, B, vlm.num_kv_heads, length, vlm.head_dim, like)
        return cache, self.prefix(batch, cache, slots)

    def sample(
        self, batch: SmolVLABatch, noise: Tensor, steps: int, chunking: rtc.Chunking | None = None
    ) -> tuple[Tensor, Tensor]:
        """Euler integration from noise (t = 1) to actions (t = 0), eagerly (dynamic shapes: the
        image slots present in the batch, the prompt as long as the batch's).

        noise (B, H, A). `chunking` asks for real-time chunking on some rows (models/rtc.py); a
        batch guided with the Jacobian must run with gradients allowed (torch.no_grad, not
        inference_mode). Returns actions (B, H, A) float32 in normalised units and the last step's
        velocity toward the data."""
        cache, context = self.encode(batch)
        return flow.integrate_network(self, cache, context, batch, self.initial_noise(noise), steps, chunking)


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)


def _project_heads(proj: nn.Module, x: Tensor) -> Tensor:
    """A Linear over the flattened heads of each token: (B, Hkv, P, D) -> (B, Hkv, P, D)."""
    B, H, P, D = x.shape
    flat = x.transpose(1, 2).reshape(B, P, H * D)
    return cast(Tensor, proj(flat)).view(B, P, H, D).transpose(1, 2)


def _finish(layer: DecoderLayer, x: Tensor, attn: Tensor) -> Tensor:
    """The residual and MLP half of a layer: x (B, T, W), attn (B, T, Hq*D)."""
    x = x + layer.self_attn.o_proj(attn)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def build(
    cfg: SmolVLAConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SmolVLAModel:
    """Construct (random init, or on the meta device without memory)."""
    with torch.device(device):
        model = SmolVLAModel(cfg)
    return model.to(dtype=dtype)
