"""GrootStatic: GR00T sampling with static shapes (VLA_COMPILE; models/common/static.py).

The same two functions as the eager sampler (GR00TN15.prefix and GR00TN15.euler_step), compiled
once per batch bucket (static.FlowRunner), with every length fixed:

    prompt    right-padded to `prompt_len` (padding masked; the LM is causal) and the images to
              `images_per_row` per row (zero images past a row's own are never read), so the DiT's
              cross-attention keys/values go into one cache allocated once per bucket;
    steps     the Euler loop stays in Python (flow.integrate) and replays the compiled step, the
              step's time (tau, bucket) passed as tensors;
    chunking  none, hard, and guided with the velocity held constant; guidance with the Jacobian
              is refused here (the policy runs it eagerly).

A batch with a longer prompt or more images does not fit (`fits`); the policy runs it eagerly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vla_inference.models.common import static
from vla_inference.models.groot.model import GR00TN15, GrootBatch


class GrootStatic(static.FlowRunner[GrootBatch, Tensor, Tensor]):
    def __init__(
        self,
        model: GR00TN15,
        prompt_len: int,  # tokens: every prompt is padded to this
        images_per_row: int,  # camera views per sample: missing ones are zero images
        *,
        backend: str = "inductor",
        compile: bool = True,
    ) -> None:
        super().__init__(model, model.action_head.future_tokens.device, backend=backend, compile=compile)
        self.model, self.prompt_len, self.images_per_row = model, prompt_len, images_per_row
        self._caches: dict[int, Tensor] = {}

    def fits(self, batch: GrootBatch) -> bool:
        return batch.input_ids.shape[1] <= self.prompt_len and batch.pixels.shape[1] <= self.images_per_row

    def cache(self, bucket: int) -> Tensor:
        """The bucket's cross-attention keys/values (C, 2, bucket, h, prompt_len, d), made once."""
        if bucket not in self._caches:
            self._caches[bucket] = static.persistent(self.model.new_context(bucket, self.prompt_len))
        return self._caches[bucket]

    def pad(self, batch: GrootBatch) -> GrootBatch:
        """The prompt at prompt_len, the images at images_per_row (zeros), the state in the model's dtype."""
        if not self.fits(batch):
            raise ValueError("the batch exceeds the static prompt length or images per row")
        pixels = batch.pixels
        extra = self.images_per_row - pixels.shape[1]
        if extra:
            pixels = torch.cat([pixels, pixels.new_zeros(pixels.shape[0], extra, *pixels.shape[2:])], dim=1)
        return batch._replace(
            pixels=pixels,
            input_ids=static.pad_columns(batch.input_ids, self.prompt_len),
            attention_mask=static.pad_columns(batch.attention_mask, self.prompt_len, False),
            state=batch.state.to(self.model.dtype),
        )

    def initial_noise(self, noise: Tensor) -> Tensor:
        return noise.to(self.model.dtype)  # bf16 on CUDA, as the eager sampler
