"""pi0 / pi0.5: SigLIP vision tower, PaliGemma projector, Gemma VLM + Gemma action expert.

Written from the public description of the architecture (Physical-Intelligence/openpi: models/pi0.py,
gemma.py, siglip.py, models_pytorch/pi0_pytorch.py), on the shared pieces of models/common
(VisionTower, Decoder / DecoderLayer, KVCache, the Euler sampler). `checkpoint.py` maps our names
to each checkpoint format.

Shapes: B batch, N image slots, P prefix tokens, S suffix tokens, H action horizon, A padded action
dim (32), W width, Hq / Hkv query / key-value heads, D head dim, L layers.

The model is a prefix-LM over one sequence:

    prefix = [image slot 0 tokens | image slot 1 | image slot 2 | language tokens]    (bidirectional)
    suffix = pi0:   [state token | H action tokens]   (state: own block; actions: one block)
             pi0.5: [H action tokens]                  (one block; time enters through adaRMSNorm)

Block-causal: a token sees every valid token of its own and earlier blocks. The prefix never
sees the suffix, so the prefix runs once through the VLM filling a KV cache, and each Euler step
runs only the suffix through the action expert against that cache (the step's own keys/values are
joined to the cached ones per layer, so a step is a pure, differentiable function of x_t). The two
experts share attention layer by layer (same depth and head layout) but have separate weights.

Conventions taken from the reference:
- language embeddings are multiplied by sqrt(W); image tokens are not scaled;
- Gemma RMSNorm scales by (1 + weight); adaRMSNorm (pi0.5 expert only) maps the time condition to
  (scale, shift, gate): x_norm * (1 + scale) + shift, and the residual adds gate * branch;
- flow matching: t = 1 is noise, t = 0 the action; v_t = noise - action (the shared sampler runs
  tau = 1 - t with the velocity -v_t);
- time embedding: sin/cos of t * 2π / period, periods geometric in [4e-3, 4], [sin, cos] order.

Exact shortcuts (they change no valid token's value): an image slot masked out in every sample of
the batch is left out of the prefix; the last VLM layer computes only its keys/values; the policy
trims trailing padding tokens to the longest prompt of the batch. Every padding token attends to
itself only, so no softmax row is empty (no NaN) and padding never reaches valid tokens.

Sampling is one prefix (`prefix`) and one Euler step (`euler_step`): `sample` runs them eagerly,
static.py (VLA_COMPILE) compiles the same two functions with static shapes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
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
    attend,
    rope_cos_sin,
)
from vla_inference.models.common.vit import VisionTower, ViTConfig

PALIGEMMA_VOCAB_SIZE = 257_152
IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def _gemma(width: int, depth: int, mlp_dim: int, heads: int, head_dim: int) -> DecoderConfig:
    return DecoderConfig(
        width=width,
        depth=depth,
        mlp_dim=mlp_dim,
        num_heads=heads,
        num_kv_heads=1,
        head_dim=head_dim,
        activation="gelu_tanh",
        gemma_norm=True,
    )


GEMMA_VARIANTS: dict[str, DecoderConfig] = {
    "gemma_2b": _gemma(2048, 18, 16_384, 8, 256),
    "gemma_300m": _gemma(1024, 18, 4096, 8, 256),
    # openpi's LoRA fine-tuning variants have the base sizes (PyTorch checkpoints hold merged weights)
    "gemma_2b_lora": _gemma(2048, 18, 16_384, 8, 256),
    "gemma_300m_lora": _gemma(1024, 18, 4096, 8, 256),
    "dummy": _gemma(64, 4, 128, 8, 16),  # openpi's own test variant
    "demo": _gemma(64, 2, 128, 4, 16),  # ours: the random demo (fast on a small CPU)
    # ours: the embedded default policy trained in MetaWorld (sized to train in ~1 h on 2 cores)
    "metaworld_vlm": _gemma(128, 3, 384, 4, 32),
    "metaworld_expert": _gemma(96, 3, 256, 4, 32),
}

SIGLIP_VARIANTS: dict[str, ViTConfig] = {
    "so400m": ViTConfig(width=1152, depth=27, num_heads=16, mlp_dim=4304, patch_size=14, image_size=224),
    # ours: a tiny ViT on 224 px for tests and the demo (patch 28 -> 64 tokens per image)
    "tiny": ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=28, image_size=224),
    "tiny14": ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=14, image_size=224),
    # ours: the MetaWorld policy's camera (96 px, patch 16 -> 36 tokens)
    "metaworld": ViTConfig(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=16, image_size=96),
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
    # The flow runs in the first `flow_dims` action dims; the padding beyond stays exactly 0 (no
    # noise in, no velocity out). 0 = every dim, as openpi trains. Ours: a small model trained on a
    # 4-dim robot need not learn the 1/t-scaled noise of 28 padding dims.
    flow_dims: int = 0

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
        layout = ("depth", "num_heads", "num_kv_heads", "head_dim")
        if any(getattr(vlm, k) != getattr(expert, k) for k in layout):
            raise ValueError("the VLM and the action expert must share depth and attention layout")

    @property
    def vlm(self) -> DecoderConfig:
        return GEMMA_VARIANTS[self.vlm_variant]

    @property
    def expert(self) -> DecoderConfig:
        return GEMMA_VARIANTS[self.expert_variant]

    @property
    def vision(self) -> ViTConfig:
        return SIGLIP_VARIANTS[self.vision_variant]

    @property
    def suffix_len(self) -> int:
        return self.action_horizon + (0 if self.pi05 else 1)

    @classmethod
    def named(cls, name: str, **overrides: object) -> Pi0Config:
        """A size of the table SIZES (the published pi0 / pi05, openpi's dummy, ours), optionally
        with fields replaced."""
        if name not in SIZES:
            raise ValueError(f"unknown pi0 size {name!r}; known: {', '.join(SIZES)}")
        return replace(SIZES[name], **overrides)  # type: ignore[arg-type]


class Pi0Batch(NamedTuple):
    """A batch's inputs to the sampler (policy.collate), every tensor with the rows first."""

    images: Tensor  # (B, N, 3, S, S) in [-1, 1], the model's dtype
    image_masks: Tensor  # (B, N) bool: the slot has a camera image
    tokens: Tensor  # (B, T) int64, valid first
    token_masks: Tensor  # (B, T) bool
    state: Tensor  # (B, A) float32, normalised and padded


class SuffixContext(NamedTuple):
    """What every Euler step shares after the prefix (Pi0Model.suffix_context)."""

    mask: Tensor  # (B, 1, S, P + S) bool
    cos: Tensor  # (B, 1, S, D) RoPE of the suffix positions
    sin: Tensor


SIZES: dict[str, Pi0Config] = {
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
        flow_dims=4,
    ),
}


# --------------------------------------------------------------------------------------------
# pi0's own pieces: adaptive RMSNorm, time embedding
# --------------------------------------------------------------------------------------------


class AdaRMSNorm(nn.Module):
    """Adaptive RMSNorm (pi0.5 expert): cond (B, C) -> scale, shift, gate, each (B, 1, W)."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)  # (B, 1, W) each
        out = normed * (1.0 + scale.float()) + shift.float()
        return out.to(x.dtype), gate.to(x.dtype)


def _norm(norm: nn.Module, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A layer norm of either expert: (normed x, residual gate or None)."""
    if isinstance(norm, AdaRMSNorm):
        assert cond is not None, "adaRMSNorm needs the time condition"
        return norm(x, cond)
    return norm(x), None


def _gated(branch: Tensor, gate: Tensor | None) -> Tensor:
    return branch if gate is None else branch * gate


def _layer_qkv(
    layer: DecoderLayer, x: Tensor, cond: Tensor | None, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    h, gate = _norm(layer.input_layernorm, x, cond)
    return (*layer.self_attn.qkv(h, cos, sin), gate)


def _layer_finish(
    layer: DecoderLayer, x: Tensor, attn: Tensor, gate: Tensor | None, cond: Tensor | None
) -> Tensor:
    """Residual + MLP half of a layer. x (B, T, W) input, attn (B, T, Hq*D)."""
    x = x + _gated(layer.self_attn.o_proj(attn), gate)
    h, gate2 = _norm(layer.post_attention_layernorm, x, cond)
    return x + _gated(layer.mlp(h), gate2)


def sinusoidal_time_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """t (B,) -> (B, dim) = [sin(2π t / period), cos(2π t / period)], periods geometric, float32."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.double()[:, None] * (2.0 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class Pi0Model(nn.Module):
    def __init__(self, cfg: Pi0Config) -> None:
        super().__init__()
        self.cfg = cfg
        vlm, expert = cfg.vlm, cfg.expert
        self.vision = VisionTower(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, vlm.width)
        self.vlm = Decoder(vlm, vocab_size=cfg.vocab_size)
        ada = (lambda dim: AdaRMSNorm(dim, expert.width, expert.norm_eps)) if cfg.pi05 else None
        self.expert = Decoder(expert, norm=ada)
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

    def embed_prefix(self, batch: Pi0Batch, slots: Sequence[int]) -> tuple[Tensor, Tensor]:
        """The prefix of `batch` over the image `slots` (the eager path: those present in some row,
        `present_slots`; the static path: every slot a camera can fill, masked where a row has none)
        -> embeddings (B, P, W), pad mask (B, P) with P = len(slots) * patches + T."""
        slot_embs = [self.projector(self.vision(batch.images[:, i])) for i in slots]
        lang = self.vlm.embed_tokens(batch.tokens) * math.sqrt(self.cfg.vlm.width)  # (B, T, W)
        embs = torch.cat([*slot_embs, lang.to(self.dtype)], dim=1)
        kept = batch.image_masks[:, list(slots)]  # (B, N')
        pad = torch.cat(
            [kept.repeat_interleave(self.cfg.vision.num_patches, dim=1), batch.token_masks], dim=1
        )
        return embs, pad

    def prefix_length(self, slots: Sequence[int], tokens: int) -> int:
        """P: the prefix tokens of `slots` image slots and `tokens` prompt tokens."""
        return len(slots) * self.cfg.vision.num_patches + tokens

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

    def joint_forward(
        self, embs: list[Tensor], mask: Tensor, positions: Tensor, conds: list[Tensor | None]
    ) -> list[Tensor]:
        """Run the experts together over the concatenated sequence, layer by layer, no cache.

        embs[i] (B, T_i, W_i) goes through stack i (0 = VLM, 1 = action expert); mask (B, T, T)
        bool over the concatenation; positions (B, T). Returns each stack's final-normed output.
        The training computation; inference uses prefill + denoise_step.
        """
        stacks = [self.vlm, self.expert][: len(embs)]
        cos, sin = rope_cos_sin(positions, self.cfg.vlm.head_dim, self.cfg.vlm.rope_theta)
        lengths = [x.shape[1] for x in embs]
        coss, sins = cos.split(lengths, dim=2), sin.split(lengths, dim=2)
        xs = list(embs)
        for li in range(self.cfg.vlm.depth):
            layers = [stack.layer(li) for stack in stacks]
            parts = [
                _layer_qkv(layer, x, cond, c, s)
                for layer, x, cond, c, s in zip(layers, xs, conds, coss, sins, strict=False)
            ]
            q, k, v = (torch.cat([cast(Tensor, p[i]) for p in parts], dim=2) for i in range(3))
            attn = attend(q, k, v, mask[:, None]).split(lengths, dim=1)
            xs = [
                _layer_finish(layer, x, a, p[3], c)
                for layer, x, a, p, c in zip(layers, xs, attn, parts, conds, strict=False)
            ]
        return [
            cast(Tensor, _norm(stack.norm, x, c)[0]) for stack, x, c in zip(stacks, xs, conds, strict=False)
        ]

    def prefill(self, prefix_embs: Tensor, prefix_pad: Tensor, cache: KVCache) -> None:
        """Run the prefix (B, P, W) through the VLM, writing every layer's keys/values (B, Hkv, P, D)
        into `cache` at column 0. Only the keys/values are needed: the last layer skips its
        queries, attention and MLP."""
        cfg = self.cfg.vlm
        positions = torch.cumsum(prefix_pad.long(), dim=1) - 1
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        mask = block_causal_mask(torch.zeros_like(prefix_pad, dtype=torch.int32), prefix_pad)[:, None]
        x = prefix_embs
        for li in range(cfg.depth - 1):
            x = self.vlm.layer(li)(x, cos, sin, mask, cache, li)
        last = self.vlm.layer(cfg.depth - 1)
        _, k, v = last.self_attn.qkv(last.input_layernorm(x), cos, sin)
        cache.update(cfg.depth - 1, 0, k, v)

    def suffix_context(self, prefix_pad: Tensor) -> SuffixContext:
        """What every Euler step shares: mask (B, 1, S, P + S) bool and RoPE cos/sin (B, 1, S, D)."""
        cfg = self.cfg.expert
        B, P = prefix_pad.shape
        S = self.cfg.suffix_len
        positions = prefix_pad.sum(dim=1, keepdim=True) + torch.arange(S, device=prefix_pad.device)[None]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # (B, 1, S, D)
        ones = torch.ones(B, S, dtype=torch.bool, device=prefix_pad.device)
        suffix_mask = block_causal_mask(self.suffix_ar(B, prefix_pad.device), ones)  # (B, S, S)
        mask = torch.cat([prefix_pad[:, None, :].expand(B, S, P), suffix_mask], dim=2)[:, None]
        return SuffixContext(mask, cos, sin)

    def denoise_step(
        self, cache: KVCache, context: SuffixContext, state: Tensor, x_t: Tensor, t: Tensor
    ) -> Tensor:
        """One velocity evaluation: the suffix through the action expert against the cached prefix.

        state (B, A), x_t (B, H, A) float32, t (B,) -> v_t (B, H, A) in x_t's dtype (openpi's
        direction: toward the noise)."""
        mask, cos, sin = context
        x, cond = self.embed_suffix(state, x_t, t)  # (B, S, We)
        batch, prefix_len = x.shape[0], mask.shape[-1] - x.shape[1]
        for li in range(self.cfg.expert.depth):
            layer = self.expert.layer(li)
            q, k, v, gate = _layer_qkv(layer, x, cond, cos, sin)
            cached_k, cached_v = cache.view(li, batch, prefix_len)
            keys, values = (
                torch.cat([cached_k, k], dim=2),
                torch.cat([cached_v, v], dim=2),
            )  # (B, Hkv, P+S, D)
            x = _layer_finish(layer, x, attend(q, keys, values, mask), gate, cond)
        out, _ = _norm(self.expert.norm, x, cond)
        return self.action_out_proj(out[:, -self.cfg.action_horizon :]).to(x_t.dtype)

    # ---- sampling: one prefix and one Euler step, run eagerly here and compiled in static.py ----

    def prefix(self, batch: Pi0Batch, cache: KVCache, slots: tuple[int, ...]) -> SuffixContext:
        """The prefix of the batch (images of `slots`, prompt) into `cache`; the context every Euler
        step shares. No host synchronisation: static.py compiles it once per batch bucket."""
        embs, pad = self.embed_prefix(batch, slots)
        self.prefill(embs, pad, cache)
        return self.suffix_context(pad)

    def euler_step(
        self,
        cache: KVCache,
        context: SuffixContext,
        batch: Pi0Batch,
        x: Tensor,
        time: flow.StepTime,
        noise: Tensor,
        chunking: rtc.Chunking | None,
        dt: float,
        differentiate: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """One Euler step of the flow (models/common/flow.py), x (B, H, A) toward the data at
        time.tau, the network at openpi's time time.t = 1 - tau, with the batch's real-time
        chunking. Returns (x after the step, the velocity toward the data)."""

        def toward_data(x_in: Tensor) -> Tensor:
            return self.masked(-self.denoise_step(cache, context, batch.state, x_in, time.t))

        return flow.euler_step(toward_data, x, time.tau, dt, noise, chunking, differentiate)

    def times(self, batch: int, steps: int, dtype: torch.dtype, device: torch.device) -> list[flow.StepTime]:
        """(tau, t) (batch,) per step: tau = step / steps, t = 1 - tau, each from Python floats."""
        full = functools.partial(torch.full, (batch,), dtype=dtype, device=device)
        return [flow.StepTime(full(i / steps), full(1.0 - i / steps)) for i in range(steps)]

    def initial_noise(self, noise: Tensor) -> Tensor:
        """The noise the flow starts from: at least float32, zero past `flow_dims`."""
        return self.masked(noise.to(torch.promote_types(noise.dtype, torch.float32)))

    def sample(
        self, batch: Pi0Batch, noise: Tensor, steps: int, chunking: rtc.Chunking | None = None
    ) -> tuple[Tensor, Tensor]:
        """Euler integration from noise (t = 1) to actions (t = 0), eagerly (dynamic shapes: the
        image slots present in the batch, the prompt as long as the batch's longest).

        `chunking` asks for real-time chunking on some rows (models/rtc.py); a batch guided with the
        Jacobian must run with gradients allowed (torch.no_grad, not inference_mode). Returns
        actions (B, H, A) float32 in normalised units and the last step's velocity toward the data."""
        slots = present_slots(batch.image_masks)  # one host sync
        B, T = batch.tokens.shape
        cfg = self.cfg.vlm
        cache = KVCache.allocate(
            cfg.depth, B, cfg.num_kv_heads, self.prefix_length(slots, T), cfg.head_dim, batch.images
        )
        context = self.prefix(batch, cache, slots)
        return flow.integrate_network(self, cache, context, batch, self.initial_noise(noise), steps, chunking)

    def masked(self, x: Tensor) -> Tensor:
        """x (..., A) with the action padding past `flow_dims` zeroed (the flow never moves it);
        x itself when the flow runs in every dim."""
        if not 0 < self.cfg.flow_dims < self.cfg.action_dim:
            return x
        mask = torch.zeros(self.cfg.action_dim, dtype=x.dtype, device=x.device)
        mask[: self.cfg.flow_dims] = 1
        return x * mask

    # ---- training ------------------------------------------------------------------------------

    def flow_matching_loss(self, batch: Pi0Batch, actions: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The training objective (openpi's compute_loss): actions (B, H, A) normalised and padded,
        noise (B, H, A), t (B,) in (0, 1] -> squared error (B, H, A).

        x_t = t * noise + (1 - t) * actions is the point on the straight path at time t; the target
        velocity is d x_t / dt = noise - actions, which `sample` integrates from t = 1 to 0.
        With cfg.flow_dims the padding has no noise and a zero target.
        """
        noise = self.masked(noise)
        tt = t[:, None, None]
        x_t = tt * noise + (1.0 - tt) * actions
        v_t = self.velocity_full(batch, x_t, t)
        return (v_t - (noise - actions)).pow(2)

    def velocity_full(self, batch: Pi0Batch, x_t: Tensor, t: Tensor) -> Tensor:
        """The velocity v_t computing prefix and suffix together in one pass (no cache): the training
        forward, and the reference the cached inference path is checked against."""
        prefix_embs, prefix_pad = self.embed_prefix(batch, present_slots(batch.image_masks))
        suffix_embs, cond = self.embed_suffix(batch.state, x_t, t)
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
