"""pi0-FAST: one PaliGemma (SigLIP tower + projector + Gemma decoder + LM head) that writes an
action chunk as FAST tokens, one token at a time. No action expert, no flow.

Written from the public description (Pertsch et al. 2025; LeRobot policies/pi0_fast, openpi
models/pi0_fast.py), on the shared pieces of models/common (VisionTower, Decoder, KVCache) and the
PaliGemma sizes of the pi0 family (GEMMA_VARIANTS, SIGLIP_VARIANTS). `checkpoint.py` maps our names
to LeRobot's file; the prompt and action-token conventions live in `prompt.py` and
`fast_tokenizer.py`.

Shapes: B batch, N image slots, T prompt tokens, P prefix tokens (N * patches + T), K token budget
(tokens a decode writes at most), S cache columns (P + K - 1), V vocabulary, W width, L layers,
Hkv key-value heads, D head dim.

One sequence, a prefix-LM:

    prefix  = [image slot 0 | slot 1 | ... | prompt tokens]   bidirectional among its valid tokens
    decoded = [g0, g1, ...]                                   causal: the prefix and earlier tokens

Decoding is one prefill (`prefill`) and one decode step (`decode_step`), run by one loop (`decode`)
eagerly (`generate`) and compiled with static shapes (static.py, VLA_COMPILE):

- `prefill` runs the prefix once into a preallocated KVCache (columns 0..P-1) and picks g0 from
  the logits of each row's last valid prefix token. The cache's remaining K - 1 columns are the
  budget: one per later token.
- `decode_step` feeds the last token of every row at cache column P + t - 1 (the same column for
  every row: the batch stays aligned) and picks the next. Rows are right-padded and their padding
  masked, so a row's answer is the same in any batch (positions are per row: cumsum of the valid
  tokens; the fed token's position is the row's valid-prefix count + t - 1 + `position_offset`: 0
  in LeRobot, 1 in openpi, whose decode positions skip one slot).
- A row stops on its own when it writes `stop_token` ("|" for LeRobot checkpoints); afterwards it
  records `pad_token` with probability 0 (its compute continues, its answer does not change). The
  loop ends when every row has stopped (one host read per step, outside the step) or after K tokens.
- Both take and return tensors only (NamedTuples; the decoding rules are Python constants), with
  static shapes and no host synchronisation: the tokens written so far live in the state.

Conventions taken from the reference:
- token embeddings are multiplied by sqrt(W) rounded to the weight dtype (transformers >= 5.4's
  GemmaTextScaledWordEmbedding, which LeRobot uses since its #3374); image tokens are not scaled;
- logits = LM head(final-normed hidden) in the weight dtype; LeRobot's LM head is its own
  parameter (the PiGemma swap unties transformers' tie; both tensors are saved and trained), openpi
  ties it to the embedding: `Pi0FastConfig.tied_lm_head`;
- greedy = argmax (first index on ties); temperature T > 0 samples softmax(logits / T) by an
  exponential race (argmax of p / E, E ~ Exp(1)) whose noise is a hash of (the row's seed, the
  token index, the vocabulary id) computed in the step: a row's draw depends on its own seed only
  (not on the batch, the device or the compiled path), and the step stays a pure function;
- each written token's probability under softmax(logits) (T = 1) is kept: the policy's confidence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models.common.transformer import Decoder, DecoderConfig, KVCache
from vla_inference.models.common.vit import VisionTower, ViTConfig
from vla_inference.models.pi0.model import GEMMA_VARIANTS, PALIGEMMA_VOCAB_SIZE, SIGLIP_VARIANTS


@dataclass(frozen=True)
class Pi0FastConfig:
    vision: ViTConfig
    vlm: DecoderConfig
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    tied_lm_head: bool = False  # True: logits use the token embedding (openpi); False: own LM head (LeRobot)

    @classmethod
    def named(cls, name: str, **overrides: object) -> Pi0FastConfig:
        """A size of the table SIZES ("pi0fast_base", "tiny"), optionally with fields replaced."""
        if name not in SIZES:
            raise ValueError(f"unknown pi0-FAST size {name!r}; known: {', '.join(SIZES)}")
        return replace(SIZES[name], **overrides)  # type: ignore[arg-type]


SIZES: dict[str, Pi0FastConfig] = {
    # LeRobot's lerobot/pi0fast-base layout: SigLIP So400m/14 at 224 + Gemma 2B, vocab 257152
    "pi0fast_base": Pi0FastConfig(SIGLIP_VARIANTS["so400m"], GEMMA_VARIANTS["gemma_2b"]),
    # tests: tiny SigLIP (patch 28, 64 tokens an image) + openpi's "dummy" Gemma, a 1024-token vocab
    "tiny": Pi0FastConfig(SIGLIP_VARIANTS["tiny"], GEMMA_VARIANTS["dummy"], vocab_size=1024),
}


class Pi0FastBatch(NamedTuple):
    """A batch's inputs to the decoder (policy.collate), every tensor with the rows first."""

    images: Tensor  # (B, N, 3, S, S) in [-1, 1], the model's dtype
    image_masks: Tensor  # (B, N) bool: the slot has a camera image
    tokens: Tensor  # (B, T) int64: the prompt, right-padded, then LeRobot's decode-time BOS
    token_masks: Tensor  # (B, T) bool
    seeds: Tensor  # (B,) int64 in [0, 2^32): each row's sampling key (`row_key`; temperature > 0)


class Rules(NamedTuple):
    """How a checkpoint decodes: Python constants (a compiled step specialises on them)."""

    stop_token: int  # a row stops after writing it ("|" for LeRobot checkpoints, EOS for openpi)
    pad_token: int  # what a stopped row records
    temperature: float = 0.0  # 0: greedy
    position_offset: int = 0  # decode positions after the prefix: LeRobot 0, openpi 1


class DecodeState(NamedTuple):
    """Where decoding stands: what the next decode step reads. Tensors only, fixed shapes."""

    token: Tensor  # (B,) int64: the last token written, fed by the next step
    position: Tensor  # (B,) int64: its RoPE position when fed
    step: Tensor  # (1,) int64: tokens written so far (the next one's index)
    keys: Tensor  # (B, S) bool: cache columns the row attends to
    done: Tensor  # (B,) bool: the row has written its stop token
    tokens: Tensor  # (B, K) int64: the tokens written (pad_token after the stop and unwritten)
    probs: Tensor  # (B, K) float32: each one's probability under softmax(logits) (0 past the stop)
    seeds: Tensor  # (B,) int64: the rows' sampling keys


class Generated(NamedTuple):
    """A finished decode on the host's terms."""

    tokens: Tensor  # (B, K) int64: g0, g1, ... up to and including the stop token, then pad_token
    probs: Tensor  # (B, K) float32: each token's probability (0 past the end)
    lengths: Tensor  # (B,) int64: tokens written (the stop token included)
    stopped: Tensor  # (B,) bool: the row wrote its stop token within the budget


def prefix_lm_mask(pad: Tensor) -> Tensor:
    """pad (B, P) bool -> (B, 1, P, P) bool: valid tokens see every valid token (bidirectional);
    every token also sees itself, so a padding row is never empty (its output is never read)."""
    eye = torch.eye(pad.shape[1], dtype=torch.bool, device=pad.device)
    return ((pad[:, None, :] & pad[:, :, None]) | eye)[:, None]


# ---- sampling: an exponential race with hashed noise ------------------------------------------

_MASK32 = 0xFFFF_FFFF


@overload
def mix32(x: Tensor) -> Tensor: ...
@overload
def mix32(x: int) -> int: ...
def mix32(x: Tensor | int) -> Tensor | int:
    """A bijection of [0, 2^32) with good avalanche (xor-shift, multiply; lowbias32's shape). Works on
    Python ints and on int64 tensors alike: the multipliers are below 2^31, so every product of a
    32-bit value fits an int64 exactly (no overflow, the same bits on every device)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _MASK32
    return x ^ (x >> 16)


def row_key(seed: int) -> int:
    """A sample's 63-bit seed -> its 32-bit sampling key (Pi0FastBatch.seeds)."""
    seed &= (1 << 64) - 1
    return mix32((seed & _MASK32) ^ mix32(seed >> 32))


def race_noise(seeds: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Exp(1) noise (B, V) float32 for token `step` (1,) of rows keyed `seeds` (B,): each value a
    hash of (key, step, vocabulary id), 24 bits of it as a uniform u in (0, 1), then -log(u)."""
    row = mix32(seeds ^ mix32(step))  # (B,)
    ids = torch.arange(vocab, device=seeds.device)
    bits = mix32(mix32(row[:, None] ^ ids[None]) ^ row[:, None])  # (B, V)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(uniform)


def choose(logits: Tensor, temperature: float, seeds: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """logits (B, V) -> token (B,) int64 and its probability under softmax(logits) (B,) float32.
    Greedy when temperature <= 0; else argmax(softmax(logits / T) / E), E ~ Exp(1) (race_noise)."""
    logits = logits.float()
    if temperature > 0:
        noise = race_noise(seeds, step, logits.shape[-1])
        token = (torch.softmax(logits / temperature, dim=-1) / noise).argmax(dim=-1)
    else:
        token = logits.argmax(dim=-1)
    prob = torch.softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0]
    return token, prob


# ---- the network ----------------------------------------------------------------------------


class Pi0FastModel(nn.Module):
    def __init__(self, cfg: Pi0FastConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = nn.Linear(cfg.vision.width, cfg.vlm.width)
        self.vlm = Decoder(cfg.vlm, vocab_size=cfg.vocab_size)
        self.lm_head = None if cfg.tied_lm_head else nn.Linear(cfg.vlm.width, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.vlm.embed_tokens.weight.dtype

    # ---- embeddings and logits ---------------------------------------------------------------

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) -> (B, T, W): embed * sqrt(W), the scale rounded to the weight dtype."""
        weight = self.vlm.embed_tokens.weight
        scale = torch.tensor(self.cfg.vlm.width**0.5, dtype=torch.float32).to(weight.dtype)
        return F.embedding(tokens, weight) * scale.to(weight.device)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., W) final-normed -> logits (..., V) in the weight dtype."""
        weight = self.vlm.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def embed_prefix(self, batch: Pi0FastBatch) -> tuple[Tensor, Tensor]:
        """-> embeddings (B, P, W), valid (B, P) with P = N * patches + T."""
        patches = self.cfg.vision.num_patches
        images = batch.images
        slots = [self.projector(self.vision(images[:, i])).to(self.dtype) for i in range(images.shape[1])]
        embs = torch.cat([*slots, self.embed_tokens(batch.tokens)], dim=1)
        pad = torch.cat([batch.image_masks.repeat_interleave(patches, dim=1), batch.token_masks], dim=1)
        return embs, pad

    def prefix_length(self, slots: int, tokens: int) -> int:
        """P: the prefix tokens of `slots` image slots and `tokens` prompt tokens."""
        return slots * self.cfg.vision.num_patches + tokens

    def new_cache(self, batch: int, length: int) -> KVCache:
        vlm = self.cfg.vlm
        return KVCache.allocate(
            vlm.depth, batch, vlm.num_kv_heads, length, vlm.head_dim, self.vlm.embed_tokens.weight
        )

    # ---- decoding: one prefill and one decode step, run eagerly here and compiled in static.py ----

    def prefill(self, batch: Pi0FastBatch, cache: KVCache, rules: Rules) -> DecodeState:
        """The prefix into cache columns 0..P-1 and the first token; the cache (L, B, Hkv, S, D)
        has one more column per later token: the budget K = S - P + 1. No host synchronisation."""
        embs, pad = self.embed_prefix(batch)  # (B, P, W), (B, P)
        B, P = pad.shape
        S = cache.k.shape[3]
        budget = S - P + 1
        positions = torch.cumsum(pad.long(), dim=1) - 1  # (B, P)
        hidden = self.vlm(embs, positions, prefix_lm_mask(pad), cache, 0)  # (B, P, W)
        columns = torch.arange(P, device=pad.device)
        last = torch.where(pad, columns, -1).amax(dim=1)  # (B,) each row's last valid column
        rows = torch.arange(B, device=pad.device)
        step = torch.zeros(1, dtype=torch.long, device=pad.device)
        token, prob = choose(self.logits(hidden[rows, last]), rules.temperature, batch.seeds, step)
        tokens = torch.full((B, budget), rules.pad_token, dtype=torch.long, device=pad.device)
        probs = torch.zeros(B, budget, dtype=torch.float32, device=pad.device)
        return DecodeState(
            token=token,
            position=pad.sum(dim=1) + rules.position_offset,
            step=step + 1,
            keys=F.pad(pad, (0, budget - 1), value=False),
            done=token == rules.stop_token,
            tokens=tokens.index_copy(1, step, token[:, None]),
            probs=probs.index_copy(1, step, prob[:, None]),
            seeds=batch.seeds,
        )

    def decode_step(self, cache: KVCache, state: DecodeState, rules: Rules) -> DecodeState:
        """Feed state.token of every row at cache column P + step - 1 (written in place) and write
        the next token at index `step`; a stopped row writes pad_token. No host synchronisation."""
        S, K = state.keys.shape[1], state.tokens.shape[1]
        column = state.step + (S - K)  # P + step - 1
        keys = state.keys.index_fill(1, column, True)  # (B, S): the fed token sees itself
        x = self.embed_tokens(state.token[:, None])  # (B, 1, W)
        hidden = self.vlm(x, state.position[:, None], keys[:, None, None, :], cache, column)
        token, prob = choose(self.logits(hidden[:, 0]), rules.temperature, state.seeds, state.step)
        token = torch.where(state.done, torch.full_like(token, rules.pad_token), token)
        prob = torch.where(state.done, torch.zeros_like(prob), prob)
        return DecodeState(
            token=token,
            position=state.position + 1,
            step=state.step + 1,
            keys=keys,
            done=state.done | (token == rules.stop_token),
            tokens=state.tokens.index_copy(1, state.step, token[:, None]),
            probs=state.probs.index_copy(1, state.step, prob[:, None]),
            seeds=state.seeds,
        )

    @torch.inference_mode()
    def generate(self, batch: Pi0FastBatch, rules: Rules, budget: int) -> Generated:
        """Decoding of at most `budget` tokens per row, eagerly, each row stopping on its own."""
        if budget < 1:
            raise ValueError("the decode budget must be at least one token")
        P = self.prefix_length(batch.images.shape[1], batch.tokens.shape[1])
        cache = self.new_cache(batch.tokens.shape[0], P + budget - 1)
        return finished(decode(self.prefill, self.decode_step, batch, cache, rules), rules)


def decode(
    prefill: Callable[[Pi0FastBatch, KVCache, Rules], DecodeState],
    step: Callable[[KVCache, DecodeState, Rules], DecodeState],
    batch: Pi0FastBatch,
    cache: KVCache,
    rules: Rules,
    stop_early: bool = True,
    limit: int | None = None,
) -> DecodeState:
    """The decode loop (eager and static alike): prefill, then a step per further token until
    every row has stopped (one host read per step; `stop_early=False` runs on), the budget is
    written, or `limit` tokens are (the warm-up; a benchmark's time to first token)."""
    state = prefill(batch, cache, rules)
    budget = state.tokens.shape[1]
    for _ in range(1, budget if limit is None else min(limit, budget)):
        if stop_early and bool(state.done.all()):
            break
        state = step(cache, state, rules)
    return state


def finished(state: DecodeState, rules: Rules) -> Generated:
    """The tokens, probabilities, lengths and stops of a decode's last state."""
    budget = state.tokens.shape[1]
    is_stop = (state.tokens == rules.stop_token) & (
        torch.arange(budget, device=state.tokens.device) < state.step
    )
    stopped = is_stop.any(dim=1)
    first = torch.where(is_stop, torch.arange(budget, device=is_stop.device), budget).amin(dim=1)
    lengths = torch.where(stopped, first + 1, state.step.expand_as(first))
    return Generated(state.tokens, state.probs, lengths, stopped)


def build(
    cfg: Pi0FastConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Pi0FastModel:
    """Construct (random init, or on the meta device without memory)."""
    with torch.device(device):
        model = Pi0FastModel(cfg)
    return model.to(dtype=dtype)
