"""Pi0FastStatic: pi0-FAST's decoding with static shapes (VLA_COMPILE; models/common/static.py).

The same two functions as the eager decoder (Pi0FastModel.prefill and Pi0FastModel.decode_step),
compiled once per batch bucket, with every length fixed:

    prefix    P = slots * patches + prompt_len: every image slot of the checkpoint (one without a
              camera in a row is masked) and the whole padded prompt with its decode-time BOS
              (LeRobot pads to tokenizer_max_length; the padding is masked);
    cache     (L, bucket, Hkv, P + budget - 1, D), allocated once per bucket (a static address
              for CUDA graphs): the prefix and one column per further token;
    steps     the loop over tokens stays in Python (model.decode) and replays the step's graph:
              the cache column and the token index are tensors in the state, so every token of a
              bucket runs the same graph; the written tokens travel in the state, and the state is
              copied out of the graph's buffers after each call (a CUDA graph reuses its output
              memory on the next replay).

Rows still stop on their own (the host reads the rows' stop flags once per step, between graph
calls) and a bucket stops decoding when all its rows have stopped. Equal to the eager decoder up
to float rounding: the same tokens (the tests: identical on the CPU, float32), probabilities within
1e-5 (the padded prompt changes only the summation order).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from vla_inference.models.common import static
from vla_inference.models.common.transformer import KVCache
from vla_inference.models.pi0_fast.model import (
    DecodeState,
    Generated,
    Pi0FastBatch,
    Pi0FastModel,
    Rules,
    decode,
    finished,
)


class Pi0FastStatic:
    def __init__(
        self,
        model: Pi0FastModel,
        slots: int,
        prompt_len: int,
        budget: int,
        *,
        backend: str = "inductor",
        compile: bool = True,
    ) -> None:
        self.model = model
        self.slots = slots
        self.prompt_len = prompt_len  # prompt tokens, the decode-time BOS included
        self.budget = budget
        self.length = model.prefix_length(slots, prompt_len) + budget - 1  # S
        self.device = model.vlm.embed_tokens.weight.device
        self.compiled = compile
        wrap = functools.partial(static.compile_static, device=self.device, backend=backend)
        self._prefill = wrap(model.prefill) if compile else model.prefill
        self._step = wrap(model.decode_step) if compile else model.decode_step
        self._caches: dict[int, KVCache] = {}

    def fits(self, batch: Pi0FastBatch) -> bool:
        return tuple(batch.images.shape[1:2]) == (self.slots,) and batch.tokens.shape[1] == self.prompt_len

    def cache(self, bucket: int) -> KVCache:
        """The bucket's KV cache (L, bucket, Hkv, S, D), allocated on first use."""
        vlm, like = self.model.cfg.vlm, self.model.vlm.embed_tokens.weight
        return static.kv_cache(
            self._caches, bucket, vlm.depth, vlm.num_kv_heads, self.length, vlm.head_dim, like
        )

    def generate(
        self, batch: Pi0FastBatch, rules: Rules, stop_early: bool = True, limit: int | None = None
    ) -> Generated:
        """As Pi0FastModel.generate with the runner's budget (model.decode's `stop_early` and
        `limit`); the batch must fit (static lengths)."""
        if not self.fits(batch):
            raise ValueError(
                f"a batch of {batch.images.shape[1]} image slots and {batch.tokens.shape[1]} prompt tokens "
                f"does not fit the static {self.slots} / {self.prompt_len}"
            )
        with torch.inference_mode():
            tokens, probs, lengths, stopped = static.run_in_pieces(
                batch,
                lambda bucket, start, stop, piece: self._run(bucket, piece, rules, stop_early, limit),
            )
            return Generated(tokens, probs, lengths, stopped)

    def _run(
        self, bucket: int, batch: Pi0FastBatch, rules: Rules, stop_early: bool, limit: int | None
    ) -> Generated:
        cache = self.cache(bucket)
        static.begin_call(self.device)

        def prefill(b: Pi0FastBatch, c: KVCache, r: Rules) -> DecodeState:
            return _copied(self._prefill(b, c, r))

        def step(c: KVCache, s: DecodeState, r: Rules) -> DecodeState:
            return _copied(self._step(c, s, r))

        return finished(decode(prefill, step, batch, cache, rules, stop_early, limit), rules)


def _copied(state: DecodeState) -> DecodeState:
    """The state out of a graph's output buffers (the next replay overwrites them)."""
    return pytree.tree_map_only(Tensor, torch.clone, state)  # type: ignore[no-any-return]
