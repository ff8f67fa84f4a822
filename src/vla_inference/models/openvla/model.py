"""OpenVLA: Prismatic's fused DINOv2 + SigLIP towers -> MLP projector -> Llama-2, on models/common.

    pixels (B, 6, S, S) = [DINOv2-normalised RGB | SigLIP-normalised RGB]
      -> dino tower (B, N, Wd) ++ siglip tower (B, N, Ws)   (patch tokens after each tower's
         second-to-last block, no final norm: the towers build neither the last block nor the norm)
      -> projector fc1 -> GELU -> fc2 -> GELU -> fc3  (B, N, W)
    sequence = [BOS, patch_1 .. patch_N, prompt tokens after BOS]  -> Llama decoder -> lm_head

Decoding is greedy over the full vocabulary, like the reference `predict_action`. Batches are
left-padded: every sample has its own positions (RoPE starts at 0 at its BOS) and a key mask, so a
batch yields the same tokens as its samples one by one. checkpoint.py maps our names to the HF
checkpoint's and names the towers by timm id.

OpenVLAStatic (VLA_COMPILE) runs the same decoding with static shapes: the prompt padded to a
fixed length as [BOS | patches | padding | text] (positions count valid tokens only, so values
are unchanged), a KV cache preallocated to that length + the action tokens once per batch bucket,
a compiled prefill and a compiled one-token decode step that writes its column of the cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models.common import static
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
    def named(cls, name: str) -> OpenVLAConfig:
        try:
            return NAMED_CONFIGS[name]
        except KeyError:
            raise ValueError(f"unknown OpenVLA size {name!r}; known: {', '.join(NAMED_CONFIGS)}") from None


NAMED_CONFIGS: dict[str, OpenVLAConfig] = {
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


@dataclass
class DecodeOutput:
    tokens: Tensor  # (B, n) int64 greedy token ids
    probs: Tensor  # (B, n) float32 softmax probability of each chosen token


class OpenVLA(nn.Module):
    def __init__(self, cfg: OpenVLAConfig) -> None:
        super().__init__()
        if cfg.dino.num_patches != cfg.siglip.num_patches:
            raise ValueError(
                f"the two towers must yield the same number of patches ({cfg.dino.num_patches} != "
                f"{cfg.siglip.num_patches}): same image size / patch size grid"
            )
        self.cfg = cfg
        self.dino = VisionTower(cfg.dino)
        self.siglip = VisionTower(cfg.siglip)
        self.projector = PrismaticProjector(cfg.vision_dim, cfg.llm.width)
        self.llm = Decoder(cfg.llm, vocab_size=cfg.vocab_size)
        self.lm_head = nn.Linear(cfg.llm.width, cfg.vocab_size, bias=False)
        self._cache: KVCache | None = None

    def patch_features(self, pixels: Tensor) -> Tensor:
        """(B, 6, S, S): DINOv2-normalised then SigLIP-normalised -> (B, N, Wd + Ws)."""
        dino, siglip = pixels.split([3, 3], dim=1)
        return torch.cat([self.dino(dino), self.siglip(siglip)], dim=2)

    def embed_prefix(self, pixels: Tensor, prompts: list[Tensor]) -> tuple[Tensor, Tensor]:
        """pixels (B, 6, S, S), prompts: B (L_i,) ids starting with BOS -> embeds (B, T0, W), pad (B,).

        As the reference does, the projected patches go right after each prompt's BOS token:
        [BOS, patch_1..patch_N, text...]. Shorter samples are left-padded with zeros; pad[i] is
        the number of padding columns in front of sample i.
        """
        patches = self.projector(self.patch_features(pixels))  # (B, N, W)
        seqs = []
        for i, prompt in enumerate(prompts):
            text = self.llm.embed_tokens(prompt.to(pixels.device))  # (L_i, W)
            seqs.append(torch.cat([text[:1], patches[i].to(text.dtype), text[1:]]))  # (N + L_i, W)
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
        batch = len(prompts)
        embeds, pad = self.embed_prefix(pixels, prompts)  # (B, T0, W), (B,)
        t0 = embeds.shape[1]
        col = torch.arange(t0, device=device)  # (T0,)
        valid = col[None, :] >= pad[:, None]  # (B, T0) key is a real token
        positions = (col[None, :] - pad[:, None]).clamp(min=0)  # (B, T0) RoPE starts at 0 at each BOS

        total = t0 + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {total} tokens exceeds the model's {self.cfg.max_seq_len}")
        cache = self._cache = self.llm.new_cache(batch, total, embeds, self._cache)  # reused across calls
        key_valid = torch.zeros((batch, total), dtype=torch.bool, device=device)
        key_valid[:, :t0] = valid
        causal = col[:, None] >= col[None, :]  # (T0, T0)
        # Pad queries may see themselves so that no softmax row is empty; their outputs are unused.
        mask = (causal[None] & key_valid[:, None, :t0]) | torch.eye(t0, dtype=torch.bool, device=device)[None]
        hidden = self.llm(embeds, positions, mask[:, None], cache, start=0)  # (B, T0, W)
        logits = self.lm_head(hidden[:, -1]).float()  # (B, V)

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
            x = self.llm.embed_tokens(token[:, None])  # (B, 1, W)
            step_mask = key_valid[:, None, None, : column + 1]  # (B, 1, 1, S)
            hidden = self.llm(x, (next_pos + step)[:, None], step_mask, cache, start=column)
            logits = self.lm_head(hidden[:, -1]).float()
        return DecodeOutput(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1))

    # --- static shapes (VLA_COMPILE: OpenVLAStatic, models/common/static.py) -------------------

    def greedy(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """hidden (B, W) of the last position -> greedy token (B,) and its softmax probability (B,)."""
        logits = self.lm_head(hidden).float()  # (B, V)
        token = logits.argmax(-1)
        return token, torch.softmax(logits, -1).gather(1, token[:, None])[:, 0]

    def prefill_static(
        self,
        cache_k: Tensor,
        cache_v: Tensor,
        pixels: Tensor,
        bos: Tensor,
        text: Tensor,
        text_valid: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The prompt with fixed columns: [BOS | patches | padding | text], T0 = 1 + N + Lt.

        pixels (B, 6, S, S); bos (B, 1) ids; text (B, Lt) the prompt after BOS, left-padded, with
        text_valid (B, Lt). Keys/values go to columns 0..T0 of cache_k / cache_v (L, B, H, S, D).
        Returns the first greedy token and its probability (B,), the valid keys (B, S) and the
        next token's position (B,)."""
        patches = self.projector(self.patch_features(pixels))  # (B, N, W)
        embed = self.llm.embed_tokens
        embeds = torch.cat([embed(bos), patches.to(embed.weight.dtype), embed(text)], dim=1)  # (B, T0, W)
        B, T0, _ = embeds.shape
        valid = torch.cat([text_valid.new_ones(B, 1 + patches.shape[1]), text_valid], dim=1)  # (B, T0)
        positions = (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)  # RoPE counts valid tokens
        col = torch.arange(T0, device=embeds.device)
        causal = col[:, None] >= col[None, :]
        # Padding queries see themselves too (no empty softmax row); their outputs are never read.
        mask = (causal[None] & valid[:, None, :]) | torch.eye(T0, dtype=torch.bool, device=embeds.device)[
            None
        ]
        hidden = self.llm(embeds, positions, mask[:, None], KVCache(cache_k, cache_v), start=0)
        token, prob = self.greedy(hidden[:, -1])
        key_valid = torch.cat([valid, valid.new_zeros(B, cache_k.shape[3] - T0)], dim=1)  # (B, S)
        return token, prob, key_valid, valid.sum(dim=1)

    def decode_static(
        self,
        cache_k: Tensor,
        cache_v: Tensor,
        token: Tensor,
        position: Tensor,
        column: Tensor,
        key_valid: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One decoded token: token (B,) at RoPE position (B,), its keys/values written at cache
        column (1,) long; the attention covers the whole cache through key_valid (B, S).
        Returns the next greedy token, its probability, the valid keys and the next position."""
        key_valid = key_valid | (torch.arange(key_valid.shape[1], device=column.device) == column)[None]
        x = self.llm.embed_tokens(token[:, None])  # (B, 1, W)
        hidden = self.llm(
            x, position[:, None], key_valid[:, None, None, :], KVCache(cache_k, cache_v), start=column
        )
        next_token, prob = self.greedy(hidden[:, -1])
        return next_token, prob, key_valid, position + 1


class OpenVLAStatic:
    """OpenVLA.generate with static shapes (VLA_COMPILE; models/common/static.py).

    The prompt (BOS included) is padded to `prompt_len` tokens, so a sequence is T0 = N + prompt_len
    columns and the KV cache, allocated once per bucket, T0 + max_new_tokens. Compiled once per
    bucket: prefill_static (towers, projector, Llama prefill) and decode_static (one token; the
    same graph for every column, the column a tensor). A longer prompt does not fit (`fits`): the
    policy decodes it eagerly.
    """

    def __init__(
        self,
        model: OpenVLA,
        prompt_len: int,
        max_new_tokens: int,
        compile: bool = True,
        backend: str | None = None,
    ) -> None:
        self.model = model
        self.prompt_len = prompt_len
        self.max_new_tokens = max_new_tokens
        self.start = model.cfg.num_patches + prompt_len  # T0, the first generated token's column
        self.length = self.start + max_new_tokens
        if self.length > model.cfg.max_seq_len:
            raise ValueError(
                f"a static sequence of {self.length} tokens exceeds the model's {model.cfg.max_seq_len}"
            )
        self.device = model.lm_head.weight.device
        self.compiled = compile
        wrap = functools.partial(static.compile_static, device=self.device, backend=backend)
        self._prefill = wrap(model.prefill_static) if compile else model.prefill_static
        self._decode = wrap(model.decode_static) if compile else model.decode_static
        self._caches: dict[int, KVCache] = {}
        self._columns: list[Tensor] = []

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return prompt_len <= self.prompt_len and max_new_tokens <= self.max_new_tokens

    def cache(self, bucket: int) -> KVCache:
        """The bucket's KV cache (L, bucket, H, T0 + max_new_tokens, D), allocated on first use."""
        llm, like = self.model.cfg.llm, self.model.lm_head.weight
        return static.kv_cache(
            self._caches, bucket, llm.depth, llm.num_kv_heads, self.length, llm.head_dim, like
        )

    def columns(self) -> list[Tensor]:
        """The cache column (1,) of each decode step's token."""
        if not self._columns:
            self._columns = [
                torch.tensor([self.start + i], device=self.device) for i in range(self.max_new_tokens)
            ]
        return self._columns

    def generate(self, pixels: Tensor, prompts: list[Tensor], max_new_tokens: int) -> DecodeOutput:
        """As OpenVLA.generate; the prompts must fit."""
        longest = max(int(p.shape[0]) for p in prompts)
        if not self.fits(longest, max_new_tokens):
            raise ValueError(
                f"{longest} prompt tokens / {max_new_tokens} action tokens exceed the static "
                f"{self.prompt_len} / {self.max_new_tokens}"
            )
        with torch.inference_mode():
            B, width = len(prompts), self.prompt_len - 1
            bos = torch.stack([p[:1] for p in prompts]).to(self.device)
            text = torch.full((B, width), self.model.cfg.pad_token_id, dtype=torch.long)
            text_valid = torch.zeros(B, width, dtype=torch.bool)
            for row, prompt in enumerate(prompts):
                n = int(prompt.shape[0]) - 1
                if n:
                    text[row, width - n :] = prompt[1:]
                    text_valid[row, width - n :] = True
            rows = (pixels, bos, text.to(self.device), text_valid.to(self.device))
            tokens, probs = static.run_in_pieces(
                rows, lambda bucket, start, stop, piece: self._run(bucket, max_new_tokens, *piece)
            )
            return DecodeOutput(tokens=tokens, probs=probs)

    def _run(
        self, bucket: int, n: int, pixels: Tensor, bos: Tensor, text: Tensor, text_valid: Tensor
    ) -> tuple[Tensor, Tensor]:
        cache = self.cache(bucket)
        static.begin_call(self.device)
        token, prob, key_valid, position = self._prefill(cache.k, cache.v, pixels, bos, text, text_valid)
        tokens, probs = [token], [prob]
        for column in self.columns()[: n - 1]:
            token, prob, key_valid, position = self._decode(
                cache.k, cache.v, token, position, column, key_valid
            )
            tokens.append(token)
            probs.append(prob)
        return torch.stack(tokens, 1), torch.stack(probs, 1)  # new tensors: safe from the next replay
