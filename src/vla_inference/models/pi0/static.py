"""Pi0Static: pi0 / pi0.5 sampling with static shapes (VLA_COMPILE; models/common/static.py).

The same two functions as the eager sampler (Pi0Model.prefix and Pi0Model.euler_step), compiled
once per batch bucket (static.FlowRunner), with every length fixed:

    prefix    P = len(slots) * patches + max_token_len: every slot a camera can fill (one masked in
              a row is masked padding) and the whole prompt (padding tokens masked), so the prefix
              keys/values go into one KV cache allocated once per bucket;
    steps     the Euler loop stays in Python (flow.integrate) and replays the compiled step, the
              step's time (tau, t) passed as tensors;
    chunking  none, hard, and guided with the velocity held constant; guidance with the Jacobian
              is refused here (the policy runs it eagerly: it differentiates through the expert
              at every step).

Equal to Pi0Model.sample up to float rounding (the masked padding changes no valid value).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from vla_inference.models.common import static
from vla_inference.models.common.transformer import KVCache
from vla_inference.models.pi0.model import Pi0Batch, Pi0Model, SuffixContext


class Pi0Static(static.FlowRunner[Pi0Batch, SuffixContext, KVCache]):
    def __init__(
        self,
        model: Pi0Model,
        slots: Iterable[int] | None = None,
        *,
        backend: str = "inductor",
        compile: bool = True,
    ) -> None:
        super().__init__(model, model.action_in_proj.weight.device, backend=backend, compile=compile)
        cfg = model.cfg
        self.model = model
        self.slots = tuple(sorted(set(range(len(cfg.image_slots)) if slots is None else slots)))
        self.prefix_len = model.prefix_length(self.slots, cfg.max_token_len)
        self._caches: dict[int, KVCache] = {}

    def cache(self, bucket: int) -> KVCache:
        """The bucket's prefix KV cache (L, bucket, Hkv, P, D), allocated on first use."""
        vlm, like = self.model.cfg.vlm, self.model.action_in_proj.weight
        return static.kv_cache(
            self._caches, bucket, vlm.depth, vlm.num_kv_heads, self.prefix_len, vlm.head_dim, like
        )

    def pad(self, batch: Pi0Batch) -> Pi0Batch:
        """The prompt at max_token_len (padding masked)."""
        length = self.model.cfg.max_token_len
        return batch._replace(
            tokens=static.pad_columns(batch.tokens, length),
            token_masks=static.pad_columns(batch.token_masks, length, False),
        )

    def initial_noise(self, noise: Tensor) -> Tensor:
        return self.model.initial_noise(noise)

    def prefix(self, batch: Pi0Batch, cache: KVCache) -> SuffixContext:
        return self._prefix(batch, cache, self.slots)  # type: ignore[no-any-return]
