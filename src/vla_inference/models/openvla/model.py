"""OpenVLA (Prismatic DINOv2+SigLIP -> MLP projector -> Llama-2) in plain PyTorch.

One file, gpt-fast style. Module and parameter names equal the published HF checkpoint
(openvla/openvla-7b), so a checkpoint's state dict loads with no renaming:

  vision_backbone.featurizer.*        DINOv2 ViT-L/14 + 4 registers (timm vit_large_patch14_reg4_dinov2)
  vision_backbone.fused_featurizer.*  SigLIP ViT-SO400M/14          (timm vit_so400m_patch14_siglip_224)
  projector.fc1/fc2/fc3               fused GELU MLP (2176 -> 8704 -> 4096 -> 4096)
  language_model.model.*, language_model.lm_head.weight   Llama-2 (HF LlamaForCausalLM names)

The towers keep timm's names, except LayerScale's `gamma`, which the OpenVLA port renamed to
`scale_factor` (modeling_prismatic.ls_apply_patch). Each tower's features are the patch tokens
after its second-to-last block (no final norm); the last block, the final norm and SigLIP's
attention-pool head exist only so that the checkpoint loads strictly, and are never run.

Decoding is greedy over the full vocabulary, like the reference `predict_action`. Batches are
left-padded: every sample has its own positions (RoPE starts at 0 at its BOS) and a key mask,
so a batch yields the same tokens as its samples one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ViTConfig:
    """One timm VisionTransformer tower."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 4096
    reg_tokens: int = 0  # DINOv2-reg: 4
    class_token: bool = False  # DINOv2: True (not position-embedded: timm no_embed_class)
    layer_scale: bool = False  # DINOv2: True (ls1/ls2.scale_factor)
    attn_pool: bool = False  # SigLIP: timm "map" head (kept for loading only)
    norm_eps: float = 1e-6
    act: str = "gelu"  # timm builds both towers with exact (erf) GELU

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32064  # 32000 Llama-2 tokens + 64 padding (pad_to_multiple_of)
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    intermediate: int = 11008
    norm_eps: float = 1e-6  # transformers' LlamaConfig default; OpenVLA's text_config does not override it
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class OpenVLAConfig:
    dino: ViTConfig = field(default_factory=ViTConfig)
    siglip: ViTConfig = field(default_factory=ViTConfig)
    llm: LlamaConfig = field(default_factory=LlamaConfig)
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256

    @property
    def vision_dim(self) -> int:
        return self.dino.width + self.siglip.width

    @property
    def num_patches(self) -> int:
        return self.dino.num_patches

    @property
    def action_vocab_size(self) -> int:
        """The vocabulary size that de-tokenisation counts back from (reference: 32064 - 64 = 32000)."""
        return self.llm.vocab_size - self.pad_to_multiple_of

    @classmethod
    def named(cls, name: str) -> OpenVLAConfig:
        try:
            return NAMED_CONFIGS[name]
        except KeyError:
            raise ValueError(f"unknown OpenVLA size {name!r}; known: {', '.join(NAMED_CONFIGS)}") from None


DINOV2_L14_REG4 = ViTConfig(
    width=1024, depth=24, heads=16, mlp_hidden=4096, reg_tokens=4, class_token=True, layer_scale=True
)
SIGLIP_SO400M_14 = ViTConfig(width=1152, depth=27, heads=16, mlp_hidden=4304, attn_pool=True)

NAMED_CONFIGS: dict[str, OpenVLAConfig] = {
    # openvla/openvla-7b: dinosiglip-vit-so-224px + llama2-7b-pure
    "7b": OpenVLAConfig(dino=DINOV2_L14_REG4, siglip=SIGLIP_SO400M_14, llm=LlamaConfig()),
    # Test size: same structure (registers, layer scale, attention pool), the real 32064 vocabulary.
    "tiny": OpenVLAConfig(
        dino=replace(DINOV2_L14_REG4, image_size=28, patch_size=7, width=32, depth=3, heads=2, mlp_hidden=64),
        siglip=replace(
            SIGLIP_SO400M_14, image_size=28, patch_size=7, width=48, depth=3, heads=2, mlp_hidden=80
        ),
        llm=LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate=128, max_seq_len=512),
    ),
}


def _act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_tanh", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unsupported activation {name!r}")


# ------------------------------------------------------------------------------------------------
# Vision towers (timm VisionTransformer layout)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, N, C)
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C)
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, d)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = _act(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(width))  # timm: gamma; renamed by the OpenVLA port

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale_factor


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = ViTAttention(cfg)
        self.ls1: nn.Module = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden, cfg.act)
        self.ls2: nn.Module = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """timm's MAP head of SigLIP. Present in the checkpoint; OpenVLA never runs it."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden, cfg.act)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        if cfg.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))  # patches only
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        if cfg.attn_pool:
            self.attn_pool = AttentionPoolLatent(cfg)

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, num_patches, width): patch tokens after the second-to-last block."""
        x = self.patch_embed(pixels) + self.pos_embed  # (B, N, C)
        prefix = []
        if self.cfg.class_token:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.cfg.reg_tokens:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1)  # (B, P + N, C): [cls, reg..., patches]
        for block in self.blocks[: len(self.blocks) - 1]:
            x = block(x)
        return x[:, self.cfg.num_prefix_tokens :]


class PrismaticVisionBackbone(nn.Module):
    def __init__(self, cfg: OpenVLAConfig) -> None:
        super().__init__()
        self.featurizer = VisionTransformer(cfg.dino)
        self.fused_featurizer = VisionTransformer(cfg.siglip)

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 6, S, S): DINOv2-normalised then SigLIP-normalised -> (B, N, 1024 + 1152)."""
        dino, siglip = pixels.split([3, 3], dim=1)
        return torch.cat([self.featurizer(dino), self.fused_featurizer(siglip)], dim=2)


class PrismaticProjector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


# ------------------------------------------------------------------------------------------------
# Llama-2


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Like HF Llama: normalise in fp32, cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), HF "rotate_half" layout, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # x (B, h, T, d)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Preallocated (B_max, kv_heads, S_max, head_dim) keys and values; grown only when a call needs more."""

    def __init__(self) -> None:
        super().__init__()
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def reserve(self, batch: int, seq: int, heads: int, head_dim: int, like: Tensor) -> None:
        k = self.k
        if (
            k is None
            or k.shape[0] < batch
            or k.shape[2] < seq
            or k.dtype != like.dtype
            or k.device != like.device
        ):
            if k is not None and k.dtype == like.dtype and k.device == like.device:
                batch, seq = max(batch, k.shape[0]), max(seq, k.shape[2])  # grow, never shrink
            self.k = self.v = None  # free the old cache before allocating the new one
            shape = (batch, heads, seq, head_dim)
            self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, h, T, d) at columns start..start+T; return the filled part (B, h, start+T, d)."""
        assert self.k is not None and self.v is not None, "reserve() first"
        b, end = k.shape[0], start + k.shape[2]
        self.k[:b, :, start:end] = k
        self.v[:b, :, start:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * d, cfg.dim, bias=False)
        self.cache = KVCache()

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_start: int | None = None
    ) -> Tensor:
        """x (B, T, D); mask (B, 1, T, S) bool, True = attend; cache_start: write to the KV cache there."""
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = self.k_proj(x).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_start is not None:
            k, v = self.cache.update(cache_start, k, v)  # (B, h_kv, S, d)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=cfg.n_kv_heads != cfg.n_heads
        )  # (B, h, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_start: int | None = None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self, embeds: Tensor, positions: Tensor, mask: Tensor, cache_start: int | None = None
    ) -> Tensor:
        """embeds (B, T, D), positions (B, T), mask (B, 1, T, S) -> final-normed hidden (B, T, D)."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_start)
        return self.norm(x)

    def reserve_cache(self, batch: int, seq: int, like: Tensor) -> None:
        for layer in self.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            layer.self_attn.cache.reserve(batch, seq, self.cfg.n_kv_heads, self.cfg.head_dim, like)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)


# ------------------------------------------------------------------------------------------------
# OpenVLA


@dataclass
class DecodeOutput:
    tokens: Tensor  # (B, n) int64 greedy token ids
    probs: Tensor  # (B, n) float32 softmax probability of each chosen token


class OpenVLA(nn.Module):
    def __init__(self, cfg: OpenVLAConfig) -> None:
        super().__init__()
        if cfg.dino.num_patches != cfg.siglip.num_patches:
            raise ValueError("the two towers must yield the same number of patches")
        self.cfg = cfg
        self.vision_backbone = PrismaticVisionBackbone(cfg)
        self.projector = PrismaticProjector(cfg.vision_dim, cfg.llm.dim)
        self.language_model = LlamaForCausalLM(cfg.llm)

    def embed_prefix(self, pixels: Tensor, prompts: list[Tensor]) -> tuple[Tensor, Tensor]:
        """pixels (B, 6, S, S), prompts: B (L_i,) ids starting with BOS -> embeds (B, T0, D), pad (B,).

        As the reference does, the projected patches go right after each prompt's BOS token:
        [BOS, patch_1..patch_N, text...]. Shorter samples are left-padded with zeros; pad[i] is
        the number of padding columns in front of sample i.
        """
        patches = self.projector(self.vision_backbone(pixels))  # (B, N, D)
        embed = self.language_model.model.embed_tokens
        seqs = []
        for i, prompt in enumerate(prompts):
            text = embed(prompt.to(pixels.device))  # (L_i, D)
            seqs.append(torch.cat([text[:1], patches[i].to(text.dtype), text[1:]]))  # (N + L_i, D)
        t0 = max(s.shape[0] for s in seqs)
        embeds = seqs[0].new_zeros((len(seqs), t0, seqs[0].shape[1]))
        for i, seq in enumerate(seqs):
            embeds[i, t0 - seq.shape[0] :] = seq
        pad = torch.tensor([t0 - s.shape[0] for s in seqs], device=pixels.device)
        return embeds, pad

    @torch.inference_mode()
    def generate(self, pixels: Tensor, prompts: list[Tensor], max_new_tokens: int) -> DecodeOutput:
        """Greedy decoding for a batch of prompts of different lengths (left-padded internally).

        pixels (B, 6, S, S); prompts: B int64 (L_i,) token ids starting with BOS.
        """
        device = pixels.device
        lm = self.language_model
        batch = len(prompts)
        embeds, pad = self.embed_prefix(pixels, prompts)  # (B, T0, D), (B,)
        t0 = embeds.shape[1]
        col = torch.arange(t0, device=device)  # (T0,)
        valid = col[None, :] >= pad[:, None]  # (B, T0) key is a real token
        positions = (col[None, :] - pad[:, None]).clamp(min=0)  # (B, T0) RoPE starts at 0 at each BOS

        total = t0 + max_new_tokens
        if total > self.cfg.llm.max_seq_len:
            raise ValueError(f"sequence of {total} tokens exceeds the model's {self.cfg.llm.max_seq_len}")
        lm.model.reserve_cache(batch, total, embeds)
        key_valid = torch.zeros((batch, total), dtype=torch.bool, device=device)
        key_valid[:, :t0] = valid
        causal = col[:, None] >= col[None, :]  # (T0, T0)
        # Pad queries may see themselves so that no softmax row is empty; their outputs are unused.
        mask = (causal[None] & key_valid[:, None, :t0]) | torch.eye(t0, dtype=torch.bool, device=device)[None]
        hidden = lm.model(embeds, positions, mask[:, None], cache_start=0)  # (B, T0, D)
        logits = lm.lm_head(hidden[:, -1]).float()  # (B, V)

        tokens, probs = [], []
        next_pos = t0 - pad  # (B,) position of the first generated token of each sample
        for step in range(max_new_tokens):
            token = logits.argmax(-1)  # (B,)
            tokens.append(token)
            probs.append(torch.softmax(logits, -1).gather(1, token[:, None])[:, 0])
            if step == max_new_tokens - 1:
                break
            column = t0 + step
            key_valid[:, column] = True
            x = lm.model.embed_tokens(token[:, None])  # (B, 1, D)
            step_mask = key_valid[:, None, None, : column + 1]  # (B, 1, 1, S)
            hidden = lm.model(x, (next_pos + step)[:, None], step_mask, cache_start=column)
            logits = lm.lm_head(hidden[:, -1]).float()
        return DecodeOutput(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights for tests: matrices ~ N(0, 1/fan_in), norms ~1, biases small, layer scale 0.5..1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(param.shape, generator=generator)
            if leaf == "scale_factor":
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))
            elif leaf == "weight" and param.ndim == 1:  # LayerNorm / RMSNorm
                param.copy_(1.0 + 0.1 * noise)
            elif leaf == "bias" or param.ndim not in (2, 4):  # biases, tokens, pos_embed
                param.copy_(0.02 * noise)
            else:  # Linear (out, in), Conv2d (out, C, k, k), Embedding (V, D)
                param.copy_(noise / math.sqrt(param[0].numel()))
