"""NVIDIA GR00T N1.5 as one PyTorch file: Eagle 2.5 backbone + flow-matching DiT action head.

Written from the public architecture (NVIDIA/Isaac-GR00T, N1.5 release), not copied. Runs on CPU
and CUDA with F.scaled_dot_product_attention (upstream asserts flash-attention 2).

    images (N_img, 3, 224, 224) --SigLIP tower--> (N_img, 256, 1152) --mlp1--> (N_img, 256, 2048)
    prompt ids (B, L) with 256 <IMG_CONTEXT> ids per image --embed, scatter image rows-->
    Qwen3 (first `select_layer` layers, final RMSNorm) -> (B, L, 2048) = backbone features
    vlln LayerNorm -> 4-layer VL self-attention adapter -> vl (B, L, 2048)
    state (B, 1, 64) --state_encoder[emb]--> (B, 1, 1536)
    Euler flow from noise x_0 ~ N(0, I) (B, 16, 32), 4 steps of dt = 1/4:
        tokens = [state (1), future tokens (32), action_encoder[emb](x_t, t) + pos (16)]  (B, 49, 1536)
        DiT (16 blocks, even: cross-attention to vl, odd: self-attention; AdaLN on t)
        v = action_decoder[emb](DiT out)[:, -16:]  (B, 16, 32);  x += dt * v

Module and parameter names mirror the upstream checkpoint (backbone.eagle_model..., action_head...),
so the checkpoint mapping is a plain name match (see checkpoint.py).

Deliberate differences from upstream (documented, both only matter for padded batches):
  * the backbone attention mask is honoured by the VL adapter and the DiT cross-attention
    (upstream ignores it there; a single unpadded sample is identical), so a padded batch
    equals its samples run one by one;
  * prompts are right-padded (the LM is causal, so real tokens never see padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models import rtc


@dataclass(frozen=True)
class GrootConfig:
    # --- vision tower (SiglipVisionModel layout; N1.5 ships SigLIP2-400M weights in it) ---
    vit_hidden: int = 1152
    vit_layers: int = 27
    vit_heads: int = 16
    vit_intermediate: int = 4304
    vit_eps: float = 1e-6
    patch_size: int = 14
    image_size: int = 224
    # --- connector (Eagle mlp1) ---
    use_pixel_shuffle: bool = False  # N1.5: "1mlp_nops" = one Linear, no pixel shuffle
    downsample_ratio: float = 0.5
    mlp_connector_layers: int = 1
    # --- language model (Qwen3-1.7B, truncated) ---
    vocab_size: int = 151680
    llm_hidden: int = 2048
    llm_layers: int = 28  # as in the LM config; only `select_layer` of them are built
    select_layer: int = 12
    llm_heads: int = 16
    llm_kv_heads: int = 8
    llm_head_dim: int = 128
    llm_intermediate: int = 6144
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    image_token_id: int = 151669  # <IMG_CONTEXT>
    project_to_dim: int | None = None  # backbone.eagle_linear; None in N1.5
    # --- action head ---
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
    # DiT
    dit_heads: int = 32
    dit_head_dim: int = 48
    dit_layers: int = 16
    dit_output_dim: int = 1024
    cross_attention_dim: int = 2048
    interleave_self_attention: bool = True
    dit_norm_eps: float = 1e-5
    # VL self-attention adapter
    vlsa_heads: int = 32
    vlsa_head_dim: int = 64
    vlsa_layers: int = 4

    @property
    def num_image_tokens(self) -> int:
        side = self.image_size // self.patch_size
        if self.use_pixel_shuffle:
            return int(side * side * self.downsample_ratio**2)
        return side * side

    @property
    def dit_inner_dim(self) -> int:
        return self.dit_heads * self.dit_head_dim

    @property
    def vlsa_inner_dim(self) -> int:
        return self.vlsa_heads * self.vlsa_head_dim


SIZES: dict[str, GrootConfig] = {
    "n1.5-3b": GrootConfig(),
    # Tiny: every code path of the real model, seconds on a CPU.
    "tiny": GrootConfig(
        vit_hidden=32,
        vit_layers=2,
        vit_heads=2,
        vit_intermediate=64,
        patch_size=8,
        image_size=32,  # 4 x 4 = 16 image tokens
        vocab_size=96,
        llm_hidden=64,
        llm_layers=4,
        select_layer=2,
        llm_heads=4,
        llm_kv_heads=2,
        llm_head_dim=16,
        llm_intermediate=96,
        image_token_id=95,
        backbone_embedding_dim=64,
        input_embedding_dim=48,
        hidden_size=40,
        max_state_dim=16,
        action_dim=8,
        action_horizon=16,
        num_target_vision_tokens=4,
        max_seq_len=64,
        dit_heads=4,
        dit_head_dim=12,
        dit_layers=4,
        dit_output_dim=40,
        cross_attention_dim=64,
        vlsa_heads=4,
        vlsa_head_dim=16,
        vlsa_layers=2,
    ),
}


def config_for(name: str, **overrides: object) -> GrootConfig:
    return replace(SIZES[name], **overrides)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# shared pieces


def _key_mask(mask: Tensor | None) -> Tensor | None:
    """(B, S) bool keep-mask -> (B, 1, 1, S) bool for SDPA (True = attend)."""
    if mask is None:
        return None
    return mask[:, None, None, :]


class SiglipAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (N, P, D)
        n, p, d = x.shape
        q, k, v = (
            proj(x).view(n, p, self.heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v)  # (N, H, P, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(n, p, d))


class SiglipMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.vit_hidden, eps=cfg.vit_eps)
        self.self_attn = SiglipAttention(cfg.vit_hidden, cfg.vit_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.vit_hidden, eps=cfg.vit_eps)
        self.mlp = SiglipMLP(cfg.vit_hidden, cfg.vit_intermediate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.vit_hidden, cfg.patch_size, stride=cfg.patch_size)
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = nn.Embedding(num_patches, cfg.vit_hidden)

    def forward(self, pixels: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, P, D)
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None]


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.vit_layers))


class SiglipTransformer(nn.Module):
    """SigLIP vision tower; the output is last_hidden_state (post_layernorm), no pooling head."""

    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.vit_hidden, eps=cfg.vit_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.vision_model = SiglipTransformer(cfg)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.vision_model(pixels)


# ----------------------------------------------------------------------------------------------
# Qwen3


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions (B, L) -> cos, sin (B, 1, L, Dh), rotate-half layout."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    freqs = positions.float()[..., None] * inv_freq  # (B, L, Dh/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.llm_heads, cfg.llm_kv_heads, cfg.llm_head_dim
        self.q_proj = nn.Linear(cfg.llm_hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.llm_hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.llm_hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.llm_hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:  # x (B, L, D)
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.llm_hidden, cfg.llm_intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.llm_hidden, cfg.llm_intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.llm_intermediate, cfg.llm_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.llm_hidden, cfg.rms_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.llm_hidden, cfg.rms_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """Qwen3 decoder truncated to `select_layer` layers; returns norm(hidden after the last one).

    Upstream keeps `hidden_states[select_layer]` of the HF model whose layer list was cut to
    `select_layer`, and HF applies the final norm to the last hidden state, hence `norm` here.
    """

    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.llm_hidden)
        self.layers = nn.ModuleList(Qwen3Layer(cfg) for _ in range(cfg.select_layer))
        self.norm = RMSNorm(cfg.llm_hidden, cfg.rms_eps)

    def forward(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:  # (B, L, D), (B, L) bool
        b, n, _ = embeds.shape
        positions = torch.arange(n, device=embeds.device)[None].expand(b, n)
        cos, sin = rope_cos_sin(positions, self.cfg.llm_head_dim, self.cfg.rope_theta, embeds.dtype)
        causal = torch.ones(n, n, dtype=torch.bool, device=embeds.device).tril()
        mask = causal[None, None] & attention_mask[:, None, None, :]  # (B, 1, L, L)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """Holds `.model` so that names match `language_model.model.*`; lm_head is unused (tied)."""

    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.model = Qwen3Model(cfg)


# ----------------------------------------------------------------------------------------------
# Eagle 2.5 backbone


class EagleModel(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = SiglipVisionModel(cfg)
        vit_out = cfg.vit_hidden * (int(1 / cfg.downsample_ratio) ** 2 if cfg.use_pixel_shuffle else 1)
        if cfg.mlp_connector_layers == 2:
            self.mlp1: nn.Sequential = nn.Sequential(
                nn.LayerNorm(vit_out),
                nn.Linear(vit_out, cfg.llm_hidden),
                nn.GELU(),
                nn.Linear(cfg.llm_hidden, cfg.llm_hidden),
            )
        elif cfg.mlp_connector_layers == 1:
            self.mlp1 = nn.Sequential(nn.Linear(vit_out, cfg.llm_hidden))
        else:
            raise ValueError(f"mlp_connector_layers must be 1 or 2, got {cfg.mlp_connector_layers}")
        self.language_model = Qwen3ForCausalLM(cfg)

    def pixel_shuffle(self, x: Tensor) -> Tensor:  # (N, W, H, C) -> (N, W*r, H*r, C/r^2)
        r = self.cfg.downsample_ratio
        n, w, h, c = x.shape
        x = x.reshape(n, w, int(h * r), int(c / r)).permute(0, 2, 1, 3)
        x = x.reshape(n, int(h * r), int(w * r), int(c / (r * r)))
        return x.permute(0, 2, 1, 3).contiguous()

    def extract_feature(self, pixels: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, T_img, D_llm)
        x = self.vision_model(pixels)
        if self.cfg.use_pixel_shuffle:
            side = int(x.shape[1] ** 0.5)
            x = self.pixel_shuffle(x.reshape(x.shape[0], side, side, -1))
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.mlp1(x)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        embeds = self.language_model.model.embed_tokens(input_ids)  # (B, L, D)
        vit = self.extract_feature(pixels)  # (N_img, T_img, D)
        selected = input_ids == self.cfg.image_token_id  # (B, L)
        if int(selected.sum()) != vit.shape[0] * vit.shape[1]:
            raise ValueError(
                f"prompt has {int(selected.sum())} image tokens, "
                f"the {vit.shape[0]} images have {vit.shape[1]} tokens each"
            )
        embeds = embeds.masked_scatter(selected[..., None], vit.to(embeds.dtype).reshape(-1))
        return self.language_model.model(embeds, attention_mask)


class EagleBackbone(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.eagle_model = EagleModel(cfg)
        self.eagle_linear: nn.Module = (
            nn.Linear(cfg.llm_hidden, cfg.project_to_dim) if cfg.project_to_dim is not None else nn.Identity()
        )

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.eagle_linear(self.eagle_model(pixels, input_ids, attention_mask))


# ----------------------------------------------------------------------------------------------
# action head


class Attention(nn.Module):
    """diffusers-style attention (to_q/to_k/to_v/to_out.0) with an optional key padding mask."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, kv_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(kv_dim or query_dim, inner)
        self.to_v = nn.Linear(kv_dim or query_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(key_mask))
        return self.to_out[0](y.transpose(1, 2).reshape(b, n, -1))


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """diffusers FeedForward("gelu-approximate"): net.0 = GELU proj, net.1 dropout, net.2 out."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class AdaLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # x (B, T, D), temb (B, D)
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class TransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock as GR00T uses it: one attention (self or cross) + FF."""

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
        self.attn1 = Attention(dim, heads, head_dim, kv_dim)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=affine)
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: Tensor,
        temb: Tensor | None = None,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        h = self.norm1(x, temb) if self.ada_norm else self.norm1(x)
        x = x + self.attn1(h, context, key_mask)
        return x + self.ff(self.norm3(x))


class SelfAttentionTransformer(nn.Module):
    """The VL adapter: plain pre-LN self-attention blocks over the backbone tokens."""

    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                cfg.vlsa_inner_dim,
                cfg.vlsa_heads,
                cfg.vlsa_head_dim,
                ada_norm=False,
                affine=True,
                eps=1e-5,
                kv_dim=None,
            )
            for _ in range(cfg.vlsa_layers)
        )

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        for block in self.transformer_blocks:
            x = block(x, key_mask=key_mask)
        return x


def timestep_features(t: Tensor, dim: int = 256) -> Tensor:
    """diffusers Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1): (B,) -> (B, 256)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    args = t.float()[:, None] * exponent.exp()[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEncoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def forward(self, t: Tensor) -> Tensor:  # (B,) int buckets -> (B, D)
        w = self.timestep_embedder.linear_1.weight
        return self.timestep_embedder(timestep_features(t).to(w.dtype))


class DiT(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dit_inner_dim
        self.timestep_encoder = TimestepEncoder(dim)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                cfg.dit_heads,
                cfg.dit_head_dim,
                ada_norm=True,
                affine=False,
                eps=cfg.dit_norm_eps,
                kv_dim=None if self._is_self_attn(i) else cfg.cross_attention_dim,
            )
            for i in range(cfg.dit_layers)
        )
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, cfg.dit_output_dim)

    def _is_self_attn(self, i: int) -> bool:
        return self.cfg.interleave_self_attention and i % 2 == 1

    def forward(self, x: Tensor, vl: Tensor, vl_mask: Tensor | None, t: Tensor) -> Tensor:
        temb = self.timestep_encoder(t)  # (B, D)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, temb) if self._is_self_attn(i) else block(x, temb, context=vl, key_mask=vl_mask)
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
    """(B, T) -> (B, T, dim) = [sin, cos] of t * 10000^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32, device=t.device) * (math.log(10000.0) / half))
    args = t.float()[..., None] * freqs
    return torch.cat([args.sin(), args.cos()], dim=-1)


class MultiEmbodimentActionEncoder(nn.Module):
    def __init__(self, action_dim: int, dim: int, categories: int) -> None:
        super().__init__()
        self.dim = dim
        self.W1 = CategorySpecificLinear(categories, action_dim, dim)
        self.W2 = CategorySpecificLinear(categories, 2 * dim, dim)
        self.W3 = CategorySpecificLinear(categories, dim, dim)

    def forward(self, actions: Tensor, t: Tensor, ids: Tensor) -> Tensor:  # (B, T, A), (B,), (B,)
        b, n, _ = actions.shape
        a = self.W1(actions, ids)  # (B, T, D)
        tau = sinusoidal_features(t[:, None].expand(b, n), self.dim).to(a.dtype)
        x = self.W2(torch.cat([a, tau], dim=-1), ids)
        return self.W3(x * torch.sigmoid(x), ids)


class FlowmatchingActionHead(nn.Module):
    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DiT(cfg)
        n = cfg.max_num_embodiments
        self.state_encoder = CategorySpecificMLP(
            n, cfg.max_state_dim, cfg.hidden_size, cfg.input_embedding_dim
        )
        self.action_encoder = MultiEmbodimentActionEncoder(cfg.action_dim, cfg.input_embedding_dim, n)
        self.action_decoder = CategorySpecificMLP(n, cfg.hidden_size, cfg.hidden_size, cfg.action_dim)
        self.future_tokens = nn.Embedding(cfg.num_target_vision_tokens, cfg.input_embedding_dim)
        self.vlln: nn.Module = nn.LayerNorm(cfg.backbone_embedding_dim) if cfg.use_vlln else nn.Identity()
        self.vl_self_attention = SelfAttentionTransformer(cfg) if cfg.use_vlln else None
        if cfg.add_pos_embed:
            self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.input_embedding_dim)

    def process_backbone(self, features: Tensor, mask: Tensor) -> Tensor:
        x = self.vlln(features)
        if self.vl_self_attention is not None:
            x = self.vl_self_attention(x, mask)
        return x

    def velocity(
        self, vl: Tensor, vl_mask: Tensor, state_feat: Tensor, x: Tensor, bucket: Tensor, ids: Tensor
    ) -> Tensor:
        """One DiT evaluation: noisy actions x (B, H, A) at bucket (B,) -> velocity (B, H, A)."""
        a = self.action_encoder(x, bucket, ids)  # (B, H, D)
        if self.cfg.add_pos_embed:
            a = a + self.position_embedding.weight[: a.shape[1]][None]
        future = self.future_tokens.weight[None].expand(x.shape[0], -1, -1)
        tokens = torch.cat([state_feat, future, a], dim=1)  # (B, 1 + F + H, D)
        out = self.model(tokens, vl, vl_mask, bucket)
        return self.action_decoder(out, ids)[:, -self.cfg.action_horizon :]

    def sample(
        self,
        vl: Tensor,
        vl_mask: Tensor,
        state: Tensor,
        ids: Tensor,
        noise: Tensor,
        steps: int,
        prefix: rtc.BatchPrefix | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Euler integration from noise (t = 0) to actions (t = 1); returns (actions, last velocity).

        `prefix`: real-time chunking on some rows (models/rtc.py, whose convention this is).
        """
        state_feat = self.state_encoder(state, ids)  # (B, 1, D)
        x = noise
        dt = 1.0 / steps
        v = torch.zeros_like(x)
        for i in range(steps):
            tau = torch.full((x.shape[0],), i / steps, device=x.device, dtype=x.dtype)
            bucket = torch.full(
                (x.shape[0],), int(i / steps * self.cfg.num_timestep_buckets), device=x.device
            )
            if prefix is not None and prefix.hard:
                x = rtc.inpaint_hard(x, tau, noise, prefix)
            if prefix is not None and prefix.guided:

                def velocity(x_in: Tensor, bucket: Tensor = bucket) -> Tensor:
                    return self.velocity(vl, vl_mask, state_feat, x_in, bucket, ids)

                v = rtc.guided_velocity(x, tau, velocity, prefix)
            else:
                v = self.velocity(vl, vl_mask, state_feat, x, bucket, ids)
            x = x + dt * v
        if prefix is not None and prefix.hard:
            x = torch.where(prefix.hard_mask[:, :, None], prefix.actions.to(x.dtype), x)
        return x, v


class GR00TN15(nn.Module):
    """The whole policy network. `sample` is the inference entry point."""

    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = EagleBackbone(cfg)
        self.action_head = FlowmatchingActionHead(cfg)

    def sample(
        self,
        pixels: Tensor,  # (N_img, 3, S, S) normalised, all images of the batch in prompt order
        input_ids: Tensor,  # (B, L) right-padded
        attention_mask: Tensor,  # (B, L) bool
        state: Tensor,  # (B, 1, max_state_dim) normalised + zero-padded
        embodiment_ids: Tensor,  # (B,) long
        noise: Tensor,  # (B, H, action_dim)
        steps: int | None = None,
        prefix: rtc.BatchPrefix | None = None,  # real-time chunking rows (needs grad mode if guided)
    ) -> tuple[Tensor, Tensor]:
        dtype = self.action_head.future_tokens.weight.dtype
        features = self.backbone(pixels.to(dtype), input_ids, attention_mask)
        vl = self.action_head.process_backbone(features, attention_mask)
        return self.action_head.sample(
            vl,
            attention_mask,
            state.to(dtype),
            embodiment_ids,
            noise.to(dtype),
            steps or self.cfg.num_inference_timesteps,
            prefix,
        )
