"""OpenVLA: Prismatic's fused DINOv2 + SigLIP towers -> MLP projector -> Llama-2, on models/common.

    pixels (B, 6, S, S) = [DINOv2-normalised RGB | SigLIP-normalised RGB]
      -> dino tower (B, N, Wd) ++ siglip tower (B, N, Ws)   (patch tokens after each tower's
         second-to-last block, no final norm: the towers build neither the last block nor the norm)
      -> projector fc1 -> GELU -> fc2 -> GELU -> fc3  (B, N, W)
    sequence = [BOS, patch_1 .. patch_N, prompt tokens after BOS]  -> Llama decoder -> lm_head

Decoding is greedy over the full vocabulary, like the reference `predict_action`. A batch's
prompts of different lengths are laid out [BOS | patches | padding | text]: the padding is masked
and RoPE positions count valid tokens only, so a batch yields the same tokens as its samples one
by one. checkpoint.py maps our names to the HF checkpoint's and names the towers by timm id.

Decoding is one prefill (`prefill`) and one decode step (`decode_step`, one token; its cache
column a tensor): `generate` runs them eagerly, static.py (VLA_COMPILE) compiles the same two with
the prompt padded to a fixed length and a KV cache per batch bucket.

`Prismatic` is what OpenVLA shares with OpenVLA-OFT (oft.py): the towers, the projector, the Llama
decoder, the batch layout and the prefix embedding; `OpenVLA` adds lm_head and greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models.common.transformer import Decoder, DecoderConfig, KVCache
from vla_inference.models.common.vit import PENULTIMATE, VisionTower, ViTConfig

STATIC_PROMPT_TOKENS = 64  # VLA_COMPILE: prompt tokens (BOS included) the compiled decoder takes
LLAMA2_7B = DecoderConfig(width=4096, depth=32, mlp_dim=11008, num_heads=32, num_kv_heads=32, head_dim=128)

# timm ids of the towers Prismatic's fused backbones name (Prismatic keeps each tower's features
# after its second-to-last block). DINOv2: class token, LayerScale, 4 registers for "_reg4_"
# (then timm leaves the prefix tokens out of the position embedding); ViT-g has a packed-SwiGLU MLP.
# timm builds SigLIP with exact GELU. Image sizes: the SigLIP id's own; DINOv2's from config.json.


def _dinov2(width: int, depth: int, heads: int, mlp: int, act: str, registers: bool) -> ViTConfig:
    return ViTConfig(
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        act=act,
        class_token=True,
        reg_tokens=4 if registers else 0,
        pos_embed_prefix=not registers,
        layer_scale=True,
        output=PENULTIMATE,
    )


def _siglip(width: int, depth: int, heads: int, mlp: int, patch: int, size: int) -> ViTConfig:
    return ViTConfig(
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp,
        patch_size=patch,
        image_size=size,
        act="gelu",
        output=PENULTIMATE,
    )


_DINOV2_SIZES = {
    "small": (384, 12, 6, 1536, "gelu"),
    "base": (768, 12, 12, 3072, "gelu"),
    "large": (1024, 24, 16, 4096, "gelu"),
    "giant": (1536, 40, 24, 8192, "swiglu"),
}
_SIGLIP_SIZES = {"base_patch16": (768, 12, 12, 3072, 16), "so400m_patch14": (1152, 27, 16, 4304, 14)}
TIMM_TOWERS: dict[str, ViTConfig] = {
    **{
        f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2": _dinov2(*dims, registers=registers)
        for size, dims in _DINOV2_SIZES.items()
        for registers in (False, True)
    },
    **{
        f"vit_{size}_siglip_{px}": _siglip(*dims, size=px)
        for size, dims in _SIGLIP_SIZES.items()
        for px in (224, 384)
    },
}


@dataclass(frozen=True)
class OpenVLAConfig:
    dino: ViTConfig = field(default_factory=lambda: TIMM_TOWERS["vit_large_patch14_reg4_dinov2"])
    siglip: ViTConfig = field(default_factory=lambda: TIMM_TOWERS["vit_so400m_patch14_siglip_224"])
    llm: DecoderConfig = LLAMA2_7B
    vocab_size: int = 32064  # 32000 Llama-2 tokens + 64 padding (pad_to_multiple_of)
    max_seq_len: int = 2048
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
        return self.vocab_size - self.pad_to_multiple_of

    @classmethod
    def named(cls, name: str, **overrides: object) -> OpenVLAConfig:
        """A size of the table SIZES ("7b", "tiny"), optionally with fields replaced."""
        if name not in SIZES:
            raise ValueError(f"unknown OpenVLA size {name!r}; known: {', '.join(SIZES)}")
        return replace(SIZES[name], **overrides)  # type: ignore[arg-type]


SIZES: dict[str, OpenVLAConfig] = {
    # openvla/openvla-7b: dinosiglip-vit-so-224px + llama2-7b-pure
    "7b": OpenVLAConfig(),
    # Test size: the same structure (registers, layer scale, skipped last block), the real vocabulary.
    "tiny": OpenVLAConfig(
        dino=replace(
            TIMM_TOWERS["vit_large_patch14_reg4_dinov2"],
            image_size=28,
            patch_size=7,
            width=32,
            depth=3,
            num_heads=2,
            mlp_dim=64,
        ),
        siglip=replace(
            TIMM_TOWERS["vit_so400m_patch14_siglip_224"],
            image_size=28,
            patch_size=7,
            width=48,
            depth=3,
            num_heads=2,
            mlp_dim=80,
        ),
        llm=DecoderConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=4, head_dim=16),
        max_seq_len=512,
    ),
}


class PrismaticProjector(nn.Module):
    """Prismatic's fused GELU MLP: vision_dim -> 4 vision_dim -> llm width -> llm width."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class OpenVLABatch(NamedTuple):
    """A batch's prompts laid out for decoding (Prismatic.layout), every tensor with the rows first."""

    pixels: Tensor  # (B, 6, S, S), or (B, I, 6, S, S) for I images: DINOv2- then SigLIP-normalised RGB
    bos: Tensor  # (B, 1) int64: each prompt's first token
    text: Tensor  # (B, Lt) int64: the prompt after BOS, left-padded (pad_token_id)
    text_valid: Tensor  # (B, Lt) bool


class DecodeState(NamedTuple):
    """Where decoding stands after a token: what the next decode step reads."""

    token: Tensor  # (B,) int64: the greedy token just chosen
    prob: Tensor  # (B,) float32: its softmax probability
    key_valid: Tensor  # (B, S) bool: cache columns holding a valid key
    position: Tensor  # (B,) int64: RoPE position of `token` when it is fed back


@dataclass
class DecodeOutput:
    tokens: Tensor  # (B, n) int64 greedy token ids
    probs: Tensor  # (B, n) float32 softmax probability of each chosen token


def rope_positions(valid: Tensor) -> Tensor:
    """valid (B, T) bool -> RoPE positions (B, T): each token's count of valid tokens before it, so a
    row's padding never moves its tokens (padding columns take their neighbour's position)."""
    return (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)


class Prismatic(nn.Module):
    """The Prismatic VLM OpenVLA and OpenVLA-OFT share: the two towers, the projector, the Llama
    decoder (without lm_head), the layout of a batch's prompts and the prefix embedding."""

    def __init__(self, cfg: OpenVLAConfig) -> None:
        super().__init__()
        if cfg.dino.num_patches != cfg.siglip.num_patches:
            raise ValueError(
                f"the two towers must yield the same number of patches ({cfg.dino.num_patches} != "
                f"{cfg.siglip.num_patches}): same image size / patch size grid"
            )
        self.vla_cfg = cfg
        self.dino = VisionTower(cfg.dino)
        self.siglip = VisionTower(cfg.siglip)
        self.projector = PrismaticProjector(cfg.vision_dim, cfg.llm.width)
        self.llm = Decoder(cfg.llm, vocab_size=cfg.vocab_size)

    def patch_features(self, pixels: Tensor) -> Tensor:
        """(B, 6, S, S): DINOv2-normalised then SigLIP-normalised -> (B, N, Wd + Ws)."""
        dino, siglip = pixels.split([3, 3], dim=1)
        return torch.cat([self.dino(dino), self.siglip(siglip)], dim=2)

    def image_tokens(self, pixels: Tensor) -> Tensor:
        """(B, 6, S, S) or (B, I, 6, S, S) -> projected patches (B, I*N, W): both towers on every
        image (one tower call for all of them), the images' patches in input order."""
        rows = pixels.shape[0]
        tokens = self.projector(self.patch_features(pixels.reshape(-1, *pixels.shape[-3:])))  # (B*I, N, W)
        return tokens.reshape(rows, -1, tokens.shape[-1])

    def layout(self, pixels: Tensor, prompts: list[Tensor], width: int | None = None) -> OpenVLABatch:
        """pixels (B, [I,] 6, S, S) and B prompts (L_i,) starting with BOS -> the batch, each prompt's
        text after BOS left-padded to `width` (default: the longest). Host-side, before the step."""
        longest = max(int(p.shape[0]) for p in prompts) - 1
        width = longest if width is None else width
        if longest > width:
            raise ValueError(f"a prompt of {longest} tokens after BOS exceeds the {width} columns")
        B = len(prompts)
        text = torch.full((B, width), self.vla_cfg.pad_token_id, dtype=torch.long)
        text_valid = torch.zeros(B, width, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            n = int(prompt.shape[0]) - 1
            if n:
                text[row, width - n :] = prompt[1:]
                text_valid[row, width - n :] = True
        bos = torch.stack([p[:1] for p in prompts]).long()
        device = pixels.device
        return OpenVLABatch(pixels, bos.to(device), text.to(device), text_valid.to(device))

    def embed(self, batch: OpenVLABatch, extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The prefix as the reference builds it, [BOS, patch_1..patch_N, (extra,) text] per row, here
        with the rows' padding between the patches (and `extra` (B, k, W), OFT's proprio token) and
        the text: embeddings (B, T0, W), valid (B, T0) with T0 = 1 + I*N + k + Lt."""
        embed = self.llm.embed_tokens
        dtype = embed.weight.dtype
        parts = [embed(batch.bos), self.image_tokens(batch.pixels).to(dtype)]  # (B, 1, W), (B, I*N, W)
        if extra is not None:
            parts.append(extra.to(dtype))
        prefix = sum(int(part.shape[1]) for part in parts)
        embeds = torch.cat([*parts, embed(batch.text)], dim=1)
        valid = torch.cat([batch.text_valid.new_ones(len(batch.bos), prefix), batch.text_valid], 1)
        return embeds, valid


class OpenVLA(Prismatic):
    def __init__(self, cfg: OpenVLAConfig) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        self.lm_head = nn.Linear(cfg.llm.width, cfg.vocab_size, bias=False)

    def greedy(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """hidden (B, W) of the last position -> greedy token (B,) and its softmax probability (B,)."""
        logits = self.lm_head(hidden).float()  # (B, V)
        token = logits.argmax(-1)
        return token, torch.softmax(logits, -1).gather(1, token[:, None])[:, 0]

    # ---- decoding: one prefill and one decode step, run eagerly here and compiled in static.py ----

    def prefill(self, batch: OpenVLABatch, cache: KVCache) -> DecodeState:
        """The prompts through the LLM, keys/values into columns 0..T0 of `cache` (L, B, H, S, D);
        the first greedy token. No host synchronisation: static.py compiles it per batch bucket."""
        embeds, valid = self.embed(batch)  # (B, T0, W), (B, T0)
        B, T0, _ = embeds.shape
        positions = rope_positions(valid)
        col = torch.arange(T0, device=embeds.device)
        causal = col[:, None] >= col[None, :]
        # Padding queries see themselves too (no empty softmax row); their outputs are never read.
        eye = torch.eye(T0, dtype=torch.bool, device=embeds.device)
        mask = (causal[None] & valid[:, None, :]) | eye[None]
        hidden = self.llm(embeds, positions, mask[:, None], cache, start=0)
        token, prob = self.greedy(hidden[:, -1])
        key_valid = torch.cat([valid, valid.new_zeros(B, cache.k.shape[3] - T0)], dim=1)  # (B, S)
        return DecodeState(token, prob, key_valid, valid.sum(dim=1))

    def decode_step(self, cache: KVCache, state: DecodeState, column: Tensor) -> DecodeState:
        """Feed back state.token at its RoPE position, its keys/values written at cache column
        (1,) long; the attention covers the whole cache through key_valid. The next greedy token."""
        key_valid = (
            state.key_valid | (torch.arange(state.key_valid.shape[1], device=column.device) == column)[None]
        )
        x = self.llm.embed_tokens(state.token[:, None])  # (B, 1, W)
        hidden = self.llm(x, state.position[:, None], key_valid[:, None, None, :], cache, start=column)
        token, prob = self.greedy(hidden[:, -1])
        return DecodeState(token, prob, key_valid, state.position + 1)

    def new_cache(self, batch: int, length: int) -> KVCache:
        llm = self.cfg.llm
        return KVCache.allocate(llm.depth, batch, llm.num_kv_heads, length, llm.head_dim, self.lm_head.weight)

    @torch.inference_mode()
    def generate(self, pixels: Tensor, prompts: list[Tensor], max_new_tokens: int) -> DecodeOutput:
        """Greedy decoding of `max_new_tokens` for a batch of prompts of different lengths, eagerly.

        pixels (B, 6, S, S); prompts: B int64 (L_i,) token ids starting with BOS."""
        batch = self.layout(pixels, prompts)
        start = 1 + self.cfg.num_patches + batch.text.shape[1]  # T0: the first generated token's column
        total = start + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {total} tokens exceeds the model's {self.cfg.max_seq_len}")
        cache = self.new_cache(len(prompts), total)
        return decode(
            self.prefill, self.decode_step, batch, cache, decode_columns(start, max_new_tokens, pixels.device)
        )


def decode_columns(start: int, count: int, device: torch.device) -> list[Tensor]:
    """The cache column (1,) of each decode step's token: start, start + 1, ..."""
    return [torch.tensor([start + i], device=device) for i in range(count)]


def decode(
    prefill: Callable[[OpenVLABatch, KVCache], DecodeState],
    step: Callable[[KVCache, DecodeState, Tensor], DecodeState],
    batch: OpenVLABatch,
    cache: KVCache,
    columns: list[Tensor],
) -> DecodeOutput:
    """The decode loop (eager and static alike): prefill, then a step per further token."""
    state = prefill(batch, cache)
    # Each token is copied out: a compiled step's outputs live in its CUDA graph's memory, which the
    # next replay overwrites (the state fed back is read by that replay before it writes).
    tokens, probs = [state.token.clone()], [state.prob.clone()]
    for column in columns[: len(columns) - 1]:
        state = step(cache, state, column)
        tokens.append(state.token.clone())
        probs.append(state.prob.clone())
    return DecodeOutput(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1))
