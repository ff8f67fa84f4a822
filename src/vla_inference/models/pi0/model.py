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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models import rtc
from vla_inference.models.common import flow, static
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
        flow_dims=4,
    ),
}


# --------------------------------------------------------------------------------------------
# pi0's own pieces: adaptive RMSNorm, time embedding, the block-causal mask
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


def block_causal_mask(ar: Tensor, pad: Tensor) -> Tensor:
    """Reference mask rule. ar (B, T) int (1 starts a new block), pad (B, T) bool -> (B, T, T) bool.

    Query i sees key j when cumsum(ar)[j] <= cumsum(ar)[i] and both are valid tokens. Every token
    also sees itself, so padding rows are never empty (their outputs are never read).
    """
    c = torch.cumsum(ar, dim=1)
    mask = (c[:, None, :] <= c[:, :, None]) & pad[:, None, :] & pad[:, :, None]
    return mask | torch.eye(ar.shape[1], dtype=torch.bool, device=ar.device)


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

    def embed_prefix(
        self,
        images: Tensor,
        image_masks: Tensor,
        tokens: Tensor,
        token_masks: Tensor,
        slots: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """images (B, N, 3, S, S) in [-1, 1], image_masks (B, N), tokens/token_masks (B, T)
        -> embeddings (B, P, W), pad mask (B, P) with P = N' * patches + T, N' the slots present in
        at least one sample (a slot absent from the whole batch contributes no tokens), or the
        given `slots` (static shapes: no host sync; a slot masked in a row is masked padding)."""
        if slots is None:
            slots = [i for i, there in enumerate(image_masks.any(dim=0).tolist()) if there]  # one sync
        present = list(slots)
        slot_embs = [self.projector(self.vision(images[:, i])) for i in present]
        lang = self.vlm.embed_tokens(tokens) * math.sqrt(self.cfg.vlm.width)  # (B, T, W)
        embs = torch.cat([*slot_embs, lang.to(self.dtype)], dim=1)
        kept = image_masks[:, present]  # (B, N')
        pad = torch.cat([kept.repeat_interleave(self.cfg.vision.num_patches, dim=1), token_masks], dim=1)
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

    def prefill(self, prefix_embs: Tensor, prefix_pad: Tensor, cache: KVCache | None = None) -> KVCache:
        """Run the prefix through the VLM; return every layer's keys/values (B, Hkv, P, D), written
        into `cache` when it is given (and large enough), else into a new one.

        Only the keys/values are needed: the last layer skips its queries, attention and MLP.
        """
        cfg = self.cfg.vlm
        positions = torch.cumsum(prefix_pad.long(), dim=1) - 1
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        mask = block_causal_mask(torch.zeros_like(prefix_pad, dtype=torch.int32), prefix_pad)[:, None]
        cache = self.vlm.new_cache(prefix_embs.shape[0], prefix_embs.shape[1], prefix_embs, cache)
        x = prefix_embs
        for li in range(cfg.depth - 1):
            x = self.vlm.layer(li)(x, cos, sin, mask, cache, li)
        last = self.vlm.layer(cfg.depth - 1)
        _, k, v = last.self_attn.qkv(last.input_layernorm(x), cos, sin)
        cache.update(cfg.depth - 1, 0, k, v)
        return cache

    def suffix_context(self, prefix_pad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What every Euler step shares: mask (B, 1, S, P + S) bool and RoPE cos/sin (B, 1, S, D)."""
        cfg = self.cfg.expert
        B, P = prefix_pad.shape
        S = self.cfg.suffix_len
        positions = prefix_pad.sum(dim=1, keepdim=True) + torch.arange(S, device=prefix_pad.device)[None]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # (B, 1, S, D)
        ones = torch.ones(B, S, dtype=torch.bool, device=prefix_pad.device)
        suffix_mask = block_causal_mask(self.suffix_ar(B, prefix_pad.device), ones)  # (B, S, S)
        mask = torch.cat([prefix_pad[:, None, :].expand(B, S, P), suffix_mask], dim=2)[:, None]
        return mask, cos, sin

    def denoise_step(
        self, cache: KVCache, context: tuple[Tensor, Tensor, Tensor], state: Tensor, x_t: Tensor, t: Tensor
    ) -> Tensor:
        """One velocity evaluation: the suffix through the action expert against the cached prefix.

        context = suffix_context(prefix_pad); state (B, A), x_t (B, H, A) float32, t (B,)
        -> v_t (B, H, A) in x_t's dtype.
        """
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
        """Euler integration from noise (t = 1) to actions (t = 0) with the shared sampler.

        `prefix` asks for real-time chunking on some rows (models/rtc.py); a guided batch must run
        with gradients allowed (torch.no_grad, not inference_mode). Returns actions (B, H, A) float32
        in normalised units and the last step's velocity toward the data (B, H, A).
        """
        steps = num_steps or self.cfg.num_steps
        prefix_embs, prefix_pad = self.embed_prefix(images, image_masks, tokens, token_masks)
        cache = self.prefill(prefix_embs, prefix_pad)
        context = self.suffix_context(prefix_pad)
        batch = prefix_embs.shape[0]

        flow_mask = self.flow_mask(noise)

        def toward_data(x: Tensor, step: int) -> Tensor:
            t = torch.full((batch,), 1.0 - step / steps, dtype=x.dtype, device=x.device)
            v = -self.denoise_step(cache, context, state, x, t)
            return v if flow_mask is None else v * flow_mask

        noise = noise.to(torch.promote_types(noise.dtype, torch.float32))
        return flow.euler(toward_data, noise if flow_mask is None else noise * flow_mask, steps, prefix)

    # ---- static shapes (VLA_COMPILE: Pi0Static, models/common/static.py) ----------------------

    def prefix_static(
        self,
        cache_k: Tensor,
        cache_v: Tensor,
        images: Tensor,
        image_masks: Tensor,
        tokens: Tensor,
        token_masks: Tensor,
        slots: tuple[int, ...],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The prefix with fixed shapes: every slot in `slots`, the prompt at max_token_len, the
        keys/values written into cache_k / cache_v (L, B, Hkv, P, D) in place. Returns the suffix
        context (mask, cos, sin) every step shares."""
        embs, pad = self.embed_prefix(images, image_masks, tokens, token_masks, slots)
        self.prefill(embs, pad, KVCache(cache_k, cache_v))
        return self.suffix_context(pad)

    def step_static(
        self,
        cache_k: Tensor,
        cache_v: Tensor,
        context: tuple[Tensor, Tensor, Tensor],
        state: Tensor,
        x: Tensor,
        tau: Tensor,
        t: Tensor,
        noise: Tensor,
        prefix: rtc.StaticPrefix,
        steps: int,
    ) -> tuple[Tensor, Tensor]:
        """One Euler step of sample_actions (flow.static_step) against the cached prefix, with the
        batch's hard and constant-velocity guided real-time chunking (none: zeros). tau (B,) =
        step / steps, t = 1 - tau as the network sees it. Returns (x after the step, velocity
        toward the data)."""
        cache = KVCache(cache_k, cache_v)
        flow_mask = self.flow_mask(noise)

        def toward_data(x_in: Tensor) -> Tensor:
            v = -self.denoise_step(cache, context, state, x_in, t)
            return v if flow_mask is None else v * flow_mask

        return flow.static_step(toward_data, x, tau, 1.0 / steps, noise, prefix)

    def flow_mask(self, like: Tensor) -> Tensor | None:
        """(A,) 1 for the dims the flow runs in, 0 for the padding (None: every dim)."""
        if not 0 < self.cfg.flow_dims < self.cfg.action_dim:
            return None
        mask = torch.zeros(self.cfg.action_dim, dtype=like.dtype, device=like.device)
        mask[: self.cfg.flow_dims] = 1
        return mask

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
        With cfg.flow_dims the padding has no noise and a zero target.
        """
        flow_mask = self.flow_mask(noise)
        if flow_mask is not None:
            noise = noise * flow_mask
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
        """The velocity v_t computing prefix and suffix together in one pass (no cache): the training
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


class Pi0Static:
    """Pi0Model.sample_actions with static shapes (VLA_COMPILE; models/common/static.py).

    prefix    P = len(slots) * patches + max_token_len: every slot a camera can fill (one masked in
              a row is masked padding) and the whole prompt (padding tokens masked), so the prefix
              keys/values go into one KV cache allocated once per bucket;
    compiled  prefix_static (towers, projector, VLM prefill into the cache) and step_static (one
              Euler step through the action expert), each once per bucket; a call replays them
              (CUDA graphs on a GPU) with the 10 steps' times as tensor arguments;
    chunking  none, hard, and guided with the velocity held constant; guidance with the Jacobian
              is refused here (the policy runs it eagerly: it differentiates through the expert
              at every step).
    Equal to sample_actions up to float rounding (the masked padding changes no valid value).
    """

    def __init__(
        self,
        model: Pi0Model,
        slots: Iterable[int] | None = None,
        compile: bool = True,
        backend: str | None = None,
    ) -> None:
        cfg = model.cfg
        self.model = model
        self.slots = tuple(sorted(set(range(len(cfg.image_slots)) if slots is None else slots)))
        self.prefix_len = len(self.slots) * cfg.vision.num_patches + cfg.max_token_len
        self.device = model.action_in_proj.weight.device
        self.compiled = compile
        self._prefix = (
            static.compile_static(model.prefix_static, self.device, backend)
            if compile
            else model.prefix_static
        )
        self._step = (
            static.compile_static(model.step_static, self.device, backend) if compile else model.step_static
        )
        self._caches: dict[int, KVCache] = {}
        self._times: dict[tuple[int, int, torch.dtype], list[tuple[Tensor, Tensor]]] = {}

    def cache(self, bucket: int) -> KVCache:
        """The bucket's prefix KV cache (L, bucket, Hkv, P, D), allocated on first use."""
        vlm, like = self.model.cfg.vlm, self.model.action_in_proj.weight
        return static.kv_cache(
            self._caches, bucket, vlm.depth, vlm.num_kv_heads, self.prefix_len, vlm.head_dim, like
        )

    def times(self, bucket: int, steps: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """(tau, t) (bucket,) per step, as the eager sampler makes them: tau = step / steps, t = 1 - tau."""
        key = (bucket, steps, dtype)
        if key not in self._times:
            full = functools.partial(torch.full, (bucket,), dtype=dtype, device=self.device)
            self._times[key] = [(full(i / steps), full(1.0 - i / steps)) for i in range(steps)]
        return self._times[key]

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
        """As Pi0Model.sample_actions (tokens may be trimmed: they are padded to max_token_len)."""
        cfg = self.model.cfg
        steps = num_steps or cfg.num_steps
        with torch.inference_mode():
            noise = noise.to(torch.promote_types(noise.dtype, torch.float32))
            flow_mask = self.model.flow_mask(noise)
            if flow_mask is not None:
                noise = noise * flow_mask
            chunking = rtc.BatchPrefix.static_inputs(prefix, noise)
            tokens = static.pad_columns(tokens, cfg.max_token_len)
            token_masks = static.pad_columns(token_masks, cfg.max_token_len, False)
            rows = (images, image_masks, tokens, token_masks, state, noise, *chunking)
            actions, velocities = static.run_in_pieces(
                rows, lambda bucket, start, stop, piece: self._run(bucket, steps, piece)
            )
            return actions, velocities

    def _run(self, bucket: int, steps: int, piece: list[Tensor]) -> tuple[Tensor, Tensor]:
        """One bucket: piece = the padded rows (images, image_masks, tokens, token_masks, state, noise,
        then the StaticPrefix's four)."""
        images, image_masks, tokens, token_masks, state, noise = piece[:6]
        chunking = rtc.StaticPrefix(*piece[6:])
        cache = self.cache(bucket)
        static.begin_call(self.device)
        context = self._prefix(cache.k, cache.v, images, image_masks, tokens, token_masks, self.slots)

        def step(x: Tensor, tau: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            return self._step(cache.k, cache.v, context, state, x, tau, t, noise, chunking, steps)

        return static.denoise(step, self.times(bucket, steps, noise.dtype), noise, chunking)


def build(cfg: Pi0Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Pi0Model:
    """Construct (random init, or on the meta device without memory)."""
    with torch.device(device):
        model = Pi0Model(cfg)
    return model.to(dtype=dtype)
