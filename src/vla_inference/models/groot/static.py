"""GR00T sampling with static shapes (VLA_COMPILE; models/common/static.py), N1.5 and N1.7.

The same two functions as the eager sampler (action_head.GrootNetwork.prefix and .euler_step),
compiled once per batch bucket (static.FlowRunner), with every length fixed:

    prompt    padded to `prompt_len` (padding masked; N1.5 pads on the right, the LM being causal;
              N1.7 on the left, as its processor does, the padding's M-RoPE positions 1) and the
              images to `images_per_row` per row (zero images past a row's own are never read), so
              the DiT's cross-attention keys/values go into one cache allocated once per bucket;
    steps     the Euler loop stays in Python (flow.integrate) and replays the compiled step, the
              step's time (tau, bucket) passed as tensors;
    chunking  none, hard, and guided with the velocity held constant; guidance with the Jacobian
              is refused here (the policy runs it eagerly).

A batch with a longer prompt or more images does not fit (`fits`); the policy runs it eagerly.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from vla_inference.models.common import static
from vla_inference.models.groot.action_head import GrootNetwork
from vla_inference.models.groot.model import GrootBatch
from vla_inference.models.groot.n17 import Groot17Batch

B = TypeVar("B", GrootBatch, Groot17Batch)


class _Runner(static.FlowRunner[B, Tensor, Tensor], Generic[B]):
    def __init__(
        self,
        model: GrootNetwork,
        prompt_len: int,  # tokens: every prompt is padded to this
        images_per_row: int,  # images per sample: missing ones are zero images
        *,
        backend: str = "inductor",
        compile: bool = True,
    ) -> None:
        device = model.action_head.action_encoder.W1.W.device
        super().__init__(model, device, backend=backend, compile=compile)
        self.model, self.prompt_len, self.images_per_row = model, prompt_len, images_per_row
        self._caches: dict[int, Tensor] = {}

    def fits(self, batch: B) -> bool:
        return batch.input_ids.shape[1] <= self.prompt_len and batch.pixels.shape[1] <= self.images_per_row

    def cache(self, bucket: int) -> Tensor:
        """The bucket's cross-attention keys/values (C, 2, bucket, h, prompt_len, d), made once."""
        if bucket not in self._caches:
            self._caches[bucket] = static.persistent(self.model.new_context(bucket, self.prompt_len))
        return self._caches[bucket]

    def pad(self, batch: B) -> B:
        """The prompt at prompt_len, the images at images_per_row (zeros), the state in the model's dtype."""
        if not self.fits(batch):
            raise ValueError("the batch exceeds the static prompt length or images per row")
        pixels = batch.pixels
        extra = self.images_per_row - pixels.shape[1]
        if extra:
            pixels = torch.cat([pixels, pixels.new_zeros(pixels.shape[0], extra, *pixels.shape[2:])], dim=1)
        return batch._replace(pixels=pixels, state=batch.state.to(self.model.dtype), **self.pad_prompt(batch))

    def pad_prompt(self, batch: B) -> dict[str, Tensor]:
        raise NotImplementedError

    def initial_noise(self, noise: Tensor) -> Tensor:
        return noise.to(self.model.dtype)  # bf16 on CUDA, as the eager sampler


class GrootStatic(_Runner[GrootBatch]):
    """N1.5: the prompt right-padded."""

    def pad_prompt(self, batch: GrootBatch) -> dict[str, Tensor]:
        return {
            "input_ids": static.pad_columns(batch.input_ids, self.prompt_len),
            "attention_mask": static.pad_columns(batch.attention_mask, self.prompt_len, False),
        }


class Groot17Static(_Runner[Groot17Batch]):
    """N1.7: the prompt left-padded, the padding's M-RoPE positions 1 (upstream's)."""

    def pad_prompt(self, batch: Groot17Batch) -> dict[str, Tensor]:
        return {
            "input_ids": _pad_left(batch.input_ids, self.prompt_len, 0),
            "attention_mask": _pad_left(batch.attention_mask, self.prompt_len, False),
            "positions": _pad_left(batch.positions, self.prompt_len, 1),
        }


def _pad_left(t: Tensor, length: int, value: Any) -> Tensor:
    """t (..., L) -> (..., length), left-padded with `value`."""
    missing = length - t.shape[-1]
    if missing <= 0:
        return t
    return torch.cat([t.new_full((*t.shape[:-1], missing), value), t], dim=-1)
