"""SmolVLAStatic: SmolVLA sampling with static shapes (VLA_COMPILE; models/common/static.py).

The same two functions as the eager sampler (SmolVLAModel.prefix and SmolVLAModel.euler_step),
compiled once per batch bucket (static.FlowRunner), with every length fixed:

    prefix    P = len(slots) * I + tokenizer_max_length + 1: every image slot a camera can fill (a
              slot without a camera in a row is masked padding, as LeRobot's `empty_cameras`
              fillers are) and the prompt padded to the tokenizer's max_length (padding tokens
              masked), so the prefix keys/values (and the cross layers' projections of them) go
              into one KV cache allocated once per bucket;
    steps     the Euler loop stays in Python (flow.integrate) and replays the compiled step, the
              step's time (tau, t) passed as tensors;
    chunking  none, hard, and guided with the velocity held constant; guidance with the Jacobian
              is refused here (the policy runs it eagerly).

Equal to SmolVLAModel.sample up to float rounding (masked padding changes no real token's value).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from vla_inference.models.common import static
from vla_inference.models.common.transformer import KVCache
from vla_inference.models.smolvla.model import SmolVLABatch, SmolVLAModel, SuffixContext


class SmolVLAStatic(static.FlowRunner[SmolVLABatch, SuffixContext, KVCache]):
    def __init__(
        self,
        model: SmolVLAModel,
        slots: Iterable[int],
        *,
        backend: str = "inductor",
        compile: bool = True,
    ) -> None:
        super().__init__(model, model.action_in_proj.weight.device, backend=backend, compile=compile)
        self.model = model
        self.slots = tuple(sorted(set(slots)))
        self.prompt_len = model.cfg.tokenizer_max_length
        self.prefix_len = model.prefix_length(self.slots, self.prompt_len)
        self._caches: dict[int, KVCache] = {}

    def cache(self, bucket: int) -> KVCache:
        """The bucket's prefix KV cache (L, bucket, Hkv, P, D), allocated on first use."""
        vlm, like = self.model.cfg.vlm, self.model.action_in_proj.weight
        return static.kv_cache(
            self._caches, bucket, vlm.depth, vlm.num_kv_heads, self.prefix_len, vlm.head_dim, like
        )

    def fits(self, batch: SmolVLABatch) -> bool:
        """Whether the batch's prompt fits the padded length (LeRobot truncates to it by default)."""
        return batch.tokens.shape[1] <= self.prompt_len

    def pad(self, batch: SmolVLABatch) -> SmolVLABatch:
        """The prompt at tokenizer_max_length (padding masked)."""
        return batch._replace(
            tokens=static.pad_columns(batch.tokens, self.prompt_len),
            token_masks=static.pad_columns(batch.token_masks, self.prompt_len, False),
        )

    def initial_noise(self, noise: Tensor) -> Tensor:
        return self.model.initial_noise(noise)

    def prefix(self, batch: SmolVLABatch, cache: KVCache) -> SuffixContext:
        return self._prefix(batch, cache, self.slots)  # type: ignore[no-any-return]
