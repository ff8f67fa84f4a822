"""pi0-FAST: one PaliGemma (SigLIP tower + projector + Gemma decoder + LM head) that writes an
action chunk as FAST tokens, one token at a time. No action expert, no flow.

Written from the public description (Pertsch et al. 2025; LeRobot policies/pi0_fast, openpi
models/pi0_fast.py), on the shared pieces of models/common (VisionTower, Decoder, KVCache) and the
PaliGemma sizes of the pi0 family. `checkpoint.py` maps our names to LeRobot's file; the prompt and
action-token conventions live there and in `fast_tokenizer.py`.

Shapes: B batch, N image slots, T prompt tokens, P prefix tokens (N * patches + T), K decode budget
(tokens generated at most), S cache columns (P + K - 1), V vocabulary, W width, L layers,
Hkv key-value heads, D head dim.

One sequence, a prefix-LM:

    prefix  = [image slot 0 | slot 1 | ... | prompt tokens]   bidirectional among its valid tokens
    decoded = [g0, g1, ...]                                   causal: the prefix and earlier tokens

- Prefill runs the prefix once into a preallocated KVCache (columns 0..P-1); the logits of each
  row's last valid prefix token give g0.
- Each decode step feeds one token per row at cache column P + t (the same column for every row:
  the batch stays aligned) and returns the next one. Rows are right-padded: a row's padding is
  masked, never attended to, so a row's answer is the same in any batch (positions are per row:
  cumsum of the valid tokens; the fed token's position is the row's valid-prefix count + t +
  `position_offset`: 0 in LeRobot, 1 in openpi, whose decode positions skip one slot).
- A row stops on its own when it emits `stop_token` ("|" for LeRobot checkpoints, EOS for openpi);
  afterwards it is fed padding and records `pad_token` (its compute continues, its answer does not
  change). The loop ends when every row has stopped (one host check per step, outside the step) or
  after K tokens.
- `decode_step` takes and returns tensors only (NamedTuples), with static shapes and no host sync:
  the eager loop calls it, and a static runner can compile it (CUDA graphs).

Conventions taken from the reference:
- token embeddings are multiplied by sqrt(W) rounded to the weight dtype (transformers >= 5.4's
  GemmaTextScaledWordEmbedding, which LeRobot uses since its #3374); image tokens are not scaled;
- logits = LM head(final-normed hidden) in the weight dtype; LeRobot's LM head is its own
  parameter (the PiGemma swap unties transformers' tie; both tensors are saved and trained), openpi
  ties it to the embedding: `Pi0FastConfig.tied_lm_head`;
- greedy = argmax (first index on ties); temperature T samples softmax(logits / T) with the noise
  given as a tensor (Exp(1) race: argmax(p / E) is a sample of p), so the step stays a pure function;
- confidence: each decoded token's probability under softmax(logits) (T = 1) is returned; the
  detokeniser averages it over the action tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models.common.transformer import Decoder, DecoderConfig, KVCache
from vla_inference.models.common.vit import VisionTower, ViTConfig
from vla_inference.models.pi0.model import GEMMA_VARIANTS, PALIGEMMA_VOCAB_SIZE, SIGLIP_VARIANTS


@dataclass(frozen=True)
class Pi0FastConfig:
    vision: ViTConfig
    text: DecoderConfig
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    tied_lm_head: bool = False  # True: logits use the token embedding (openpi); False: own LM head (LeRobot)

    @classmethod
    def named(cls, name: str) -> Pi0FastConfig:
        if name not in SIZES:
            raise ValueError(f"unknown pi0-FAST size {name!r}; known: {', '.join(SIZES)}")
        return SIZES[name]


SIZES: dict[str, Pi0FastConfig] = {
    # LeRobot's lerobot/pi0fast-base layout: SigLIP So400m/14 at 224 + Gemma 2B, vocab 257152
    "pi0fast_base": Pi0FastConfig(SIGLIP_VARIANTS["so400m"], GEMMA_VARIANTS["gemma_2b"]),
    # tests: tiny SigLIP (patch 28, 64 tokens an image) + openpi's "dummy" Gemma, a 1024-token vocab
    "tiny": Pi0FastConfig(SIGLIP_VARIANTS["tiny"], GEMMA_VARIANTS["dummy"], vocab_size=1024),
}


class DecodeState(NamedTuple):
    """What one decode step reads (and returns for the next one). Tensors only, fixed shapes."""

    token: Tensor  # (B,) int64: the token fed this step
    position: Tensor  # (B,) int64: its RoPE position
    column: Tensor  # (1,) int64: the cache column it is written to
    keys: Tensor  # (B, S) bool: cache columns the row attends to (earlier steps' columns set)
    done: Tensor  # (B,) bool: the row has emitted its stop token


class StepOut(NamedTuple):
    state: DecodeState  # the next step's input
    token: Tensor  # (B,) int64: the token this step produced (pad_token for a done row)
    prob: Tensor  # (B,) float32: its probability under softmax(logits) (0 for a done row)


class Generated(NamedTuple):
    tokens: Tensor  # (B, K) int64: g0, g1, ... up to and including the stop token, then pad_token
    probs: Tensor  # (B, K) float32: each token's probability (0 past the end)
    lengths: Tensor  # (B,) int64: tokens produced (the stop token included)
    stopped: Tensor  # (B,) bool: the row emitted its stop token within the budget


def prefix_lm_mask(pad: Tensor) -> Tensor:
    """pad (B, P) bool -> (B, 1, P, P) bool: valid tokens see every valid token (bidirectional);
    every token also sees itself, so a padding row is never empty (its output is never read)."""
    eye = torch.eye(pad.shape[1], dtype=torch.bool, device=pad.device)
    return ((pad[:, None, :] & pad[:, :, None]) | eye)[:, None]


class Pi0FastModel(nn.Module):
    def __init__(self, cfg: Pi0FastConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.text.width)
        self.text = Decoder(cfg.text, vocab_size=cfg.vocab_size)
        self.lm_head = None if cfg.tied_lm_head else nn.Linear(cfg.text.width, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embed_tokens.weight.dtype

    # ---- embeddings and logits ---------------------------------------------------------------

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) -> (B, T, W): embed * sqrt(W), the scale rounded to the weight dtype."""
        weight = self.text.embed_tokens.weight
        scale = torch.tensor(self.cfg.text.width**0.5, dtype=torch.float32).to(weight.dtype)
        return F.embedding(tokens, weight) * scale.to(weight.device)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., W) final-normed -> logits (..., V) in the weight dtype."""
        weight = self.text.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def embed_prefix(
        self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor
    ) -> tuple[Tensor, Tensor]:
        """images (B, N, 3, S, S) in [-1, 1], image_masks (B, N), tokens / token_masks (B, T)
        -> embeddings (B, P, W), valid (B, P) with P = N * patches + T."""
        patches = self.cfg.vision.num_patches
        slots = [self.projector(self.vision(images[:, i])).to(self.dtype) for i in range(images.shape[1])]
        embs = torch.cat([*slots, self.embed_tokens(tokens)], dim=1)
        pad = torch.cat([image_masks.repeat_interleave(patches, dim=1), token_masks], dim=1)
        return embs, pad

    # ---- prefill and decode ------------------------------------------------------------------

    def prefill(
        self,
        images: Tensor,
        image_masks: Tensor,
        tokens: Tensor,
        token_masks: Tensor,
        cache: KVCache,
    ) -> tuple[Tensor, Tensor]:
        """The prefix into cache columns 0..P-1 (cache batch = B). Returns the logits of each row's
        last valid prefix token (B, V) and the prefix validity (B, P)."""
        embs, pad = self.embed_prefix(images, image_masks, tokens, token_masks)
        positions = torch.cumsum(pad.long(), dim=1) - 1  # (B, P)
        hidden = self.text(embs, positions, prefix_lm_mask(pad), cache, 0)  # (B, P, W)
        columns = torch.arange(pad.shape[1], device=pad.device)
        last = torch.where(pad, columns, -1).amax(dim=1)  # (B,) the last valid column
        rows = torch.arange(pad.shape[0], device=pad.device)
        return self.logits(hidden[rows, last]), pad

    def decode_step(
        self,
        cache_k: Tensor,
        cache_v: Tensor,
        state: DecodeState,
        stop_token: int,
        pad_token: int,
        temperature: float = 0.0,
        noise: Tensor | None = None,
    ) -> StepOut:
        """Feed state.token (B,) at state.column; sample the next token. cache_k / cache_v
        (L, B, Hkv, S, D) are written in place. `noise` (B, V): Exp(1) samples when temperature > 0."""
        cache = KVCache(cache_k, cache_v)
        keys = state.keys.index_fill(1, state.column, True)  # (B, S) this token sees itself
        x = self.embed_tokens(state.token[:, None])  # (B, 1, W)
        hidden = self.text(x, state.position[:, None], keys[:, None, None, :], cache, state.column)
        token, prob = sample(self.logits(hidden[:, 0]), temperature, noise)  # (B,), (B,)
        token = torch.where(state.done, torch.full_like(token, pad_token), token)
        prob = torch.where(state.done, torch.zeros_like(prob), prob)
        done = state.done | (token == stop_token)
        return StepOut(DecodeState(token, state.position + 1, state.column + 1, keys, done), token, prob)

    def generate(
        self,
        images: Tensor,
        image_masks: Tensor,
        tokens: Tensor,
        token_masks: Tensor,
        *,
        budget: int,
        stop_token: int,
        pad_token: int = 0,
        temperature: float = 0.0,
        position_offset: int = 0,
        generator: torch.Generator | None = None,
        cache: KVCache | None = None,
    ) -> Generated:
        """Greedy (temperature 0) or sampled decoding of at most `budget` tokens per row, each row
        stopping on its own at `stop_token`. `cache` is reused when large enough (KVCache.reserve)."""
        if budget < 1:
            raise ValueError("the decode budget must be at least one token")
        B = tokens.shape[0]
        P = images.shape[1] * self.cfg.vision.num_patches + tokens.shape[1]
        cache = self.text.new_cache(B, P + budget - 1, self.text.embed_tokens.weight, cache)
        if cache.k.shape[1] != B or cache.k.shape[3] != P + budget - 1:  # the step needs exact shapes
            cache = KVCache(cache.k[:, :B, :, : P + budget - 1], cache.v[:, :B, :, : P + budget - 1])
        logits, pad = self.prefill(images, image_masks, tokens, token_masks, cache)
        token, prob = sample(logits, temperature, self._noise(logits, temperature, generator))
        out_tokens = torch.full((B, budget), pad_token, dtype=torch.long, device=tokens.device)
        out_probs = torch.zeros(B, budget, dtype=torch.float32, device=tokens.device)
        out_tokens[:, 0], out_probs[:, 0] = token, prob
        keys = F.pad(pad, (0, budget - 1), value=False)  # (B, S)
        state = DecodeState(
            token,
            pad.sum(dim=1) + position_offset,
            torch.tensor([P], dtype=torch.long, device=tokens.device),
            keys,
            token == stop_token,
        )
        steps = 1
        while steps < budget and not bool(state.done.all()):  # the one host check per step
            noise = self._noise(logits, temperature, generator)
            out = self.decode_step(cache.k, cache.v, state, stop_token, pad_token, temperature, noise)
            out_tokens[:, steps], out_probs[:, steps] = out.token, out.prob
            state, steps = out.state, steps + 1
        is_stop = out_tokens == stop_token
        first_stop = torch.where(is_stop, torch.arange(budget, device=tokens.device), budget).amin(dim=1)
        stopped = is_stop.any(dim=1)
        lengths = torch.where(stopped, first_stop + 1, torch.full_like(first_stop, steps))
        return Generated(out_tokens, out_probs, lengths, stopped)

    @staticmethod
    def _noise(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor | None:
        if temperature <= 0:
            return None
        return torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(
            generator=generator
        )


def sample(logits: Tensor, temperature: float, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """logits (B, V) -> token (B,) int64 and its probability under softmax(logits) (B,) float32.
    Greedy when temperature <= 0; else argmax(softmax(logits / T) / noise), noise ~ Exp(1)."""
    logits = logits.float()
    if temperature > 0:
        assert noise is not None, "sampling needs Exp(1) noise"
        token = (torch.softmax(logits / temperature, dim=-1) / noise).argmax(dim=-1)
    else:
        token = logits.argmax(dim=-1)
    prob = torch.softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0]
    return token, prob


def build(
    cfg: Pi0FastConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Pi0FastModel:
    """Construct (random init, or on the meta device without memory)."""
    with torch.device(device):
        model = Pi0FastModel(cfg)
    return model.to(dtype=dtype)
