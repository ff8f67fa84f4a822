"""OpenVLA's greedy decoding and OpenVLA-OFT's forward with static shapes (VLA_COMPILE;
models/common/static.py).

OpenVLAStatic:
The same two functions as the eager decoder (OpenVLA.prefill and OpenVLA.decode_step), compiled
once per batch bucket: the prompt (BOS included) is padded to `prompt_len` tokens, so a sequence
is T0 = N + prompt_len columns and the KV cache, allocated once per bucket, T0 + max_new_tokens;
the decode step's cache column is a tensor, so every token replays one graph. A longer prompt does
not fit (`fits`): the policy decodes it eagerly.

OFTStatic: OpenVLA-OFT's one step (OpenVLAOFT.forward: the whole chunk from one bidirectional pass)
compiled once per batch bucket, the prompt (BOS included) padded to `prompt_len` tokens, so a row is
OFTConfig.sequence_len(prompt_len - 1) columns whatever its prompt; no cache (one pass, nothing
decoded after it). A longer prompt does not fit: the policy runs it eagerly.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from vla_inference.models.common import static
from vla_inference.models.common.transformer import KVCache
from vla_inference.models.openvla.model import DecodeOutput, OpenVLA, OpenVLABatch, decode, decode_columns
from vla_inference.models.openvla.oft import OFTBatch, OpenVLAOFT


class OpenVLAStatic:
    def __init__(
        self,
        model: OpenVLA,
        prompt_len: int,
        max_new_tokens: int,
        *,
        backend: str = "inductor",
        compile: bool = True,
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
        self._prefill = wrap(model.prefill) if compile else model.prefill
        self._step = wrap(model.decode_step) if compile else model.decode_step
        self._caches: dict[int, KVCache] = {}
        self._columns = decode_columns(self.start, max_new_tokens, self.device)

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return prompt_len <= self.prompt_len and max_new_tokens <= self.max_new_tokens

    def cache(self, bucket: int) -> KVCache:
        """The bucket's KV cache (L, bucket, H, T0 + max_new_tokens, D), allocated on first use."""
        llm, like = self.model.cfg.llm, self.model.lm_head.weight
        return static.kv_cache(
            self._caches, bucket, llm.depth, llm.num_kv_heads, self.length, llm.head_dim, like
        )

    def generate(self, pixels: Tensor, prompts: list[Tensor], max_new_tokens: int) -> DecodeOutput:
        """As OpenVLA.generate; the prompts must fit."""
        longest = max(int(p.shape[0]) for p in prompts)
        if not self.fits(longest, max_new_tokens):
            raise ValueError(
                f"{longest} prompt tokens / {max_new_tokens} action tokens exceed the static "
                f"{self.prompt_len} / {self.max_new_tokens}"
            )
        with torch.inference_mode():
            batch = self.model.layout(pixels, prompts, width=self.prompt_len - 1)
            tokens, probs = static.run_in_pieces(
                batch, lambda bucket, start, stop, piece: self._run(bucket, max_new_tokens, piece)
            )
            return DecodeOutput(tokens=tokens, probs=probs)

    def _run(self, bucket: int, n: int, batch: OpenVLABatch) -> tuple[Tensor, Tensor]:
        cache = self.cache(bucket)
        static.begin_call(self.device)
        out = decode(self._prefill, self._step, batch, cache, self._columns[:n])
        return out.tokens, out.probs


class OFTStatic:
    def __init__(
        self, model: OpenVLAOFT, prompt_len: int, *, backend: str = "inductor", compile: bool = True
    ) -> None:
        self.model = model
        self.prompt_len = prompt_len
        self.length = model.cfg.sequence_len(prompt_len - 1)
        if self.length > model.cfg.vla.max_seq_len:
            raise ValueError(
                f"a static sequence of {self.length} tokens exceeds the model's {model.cfg.vla.max_seq_len}"
            )
        self.device = model.action_head.model.fc2.weight.device
        self.compiled = compile
        self._forward = (
            static.compile_static(model.forward, self.device, backend) if compile else model.forward
        )

    def fits(self, prompt_len: int) -> bool:
        return prompt_len <= self.prompt_len

    def predict(self, pixels: Tensor, proprio: Tensor, prompts: list[Tensor]) -> Tensor:
        """As OpenVLAOFT.forward on the prompts laid out eagerly: normalised actions (B, chunk, D)."""
        longest = max(int(p.shape[0]) for p in prompts)
        if not self.fits(longest):
            raise ValueError(f"{longest} prompt tokens exceed the static {self.prompt_len}")
        with torch.inference_mode():
            batch = OFTBatch(self.model.layout(pixels, prompts, width=self.prompt_len - 1), proprio)
            (actions,) = static.run_in_pieces(batch, lambda bucket, start, stop, piece: self._run(piece))
            return actions

    def _run(self, batch: OFTBatch) -> tuple[Tensor]:
        static.begin_call(self.device)
        return (self._forward(batch),)
