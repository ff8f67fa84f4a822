"""Static shapes for torch.compile and CUDA graphs (VLA_COMPILE): batch buckets, row padding, the
compile call and the persistent buffers.

A compiled family never shows the compiler a new shape after its warm-up:

    rows     a batch of n rows runs as buckets of BUCKETS sizes: n = 3 runs as 4 (the last row
             repeated as padding, only the real rows' results kept); n > 8 runs as pieces of 8
             and a last, rounded-up piece;
    lengths  each family pads its prefix to one fixed length (padding tokens masked), so the
             prefix keys/values live in a cache allocated once per bucket;
    steps    the loop over denoising steps / decoded tokens stays in Python; each step is one
             compiled call whose time (tau, t, the cache column) is a tensor argument, so every
             step of a bucket replays the same graph instead of specialising on the step index.

`compile_static` is torch.compile(fullgraph=True, dynamic=False): a graph break is an error, not
a silent fallback. On CUDA it uses mode="reduce-overhead" (CUDA graphs via cudagraph trees; the
caches are marked static addresses, so writing them inside a graph is allowed). On the CPU the
same graphs run through inductor without CUDA graphs. The backend is a setting
(VLA_COMPILE_BACKEND: "inductor" serves; tests use "aot_eager", the same graph capture without
code generation, to keep compile times short).

A family's static runner (models/<family>/static.py) compiles the very step functions its eager
sampler calls: only the shapes differ (padded rows and columns, caches per bucket).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from vla_inference.models import rtc
from vla_inference.models.common import flow
from vla_inference.models.common.transformer import KVCache

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8)
MAX_BUCKET = BUCKETS[-1]

BACKENDS = ("inductor", "aot_eager", "eager")  # VLA_COMPILE_BACKEND; "inductor" serves

F = TypeVar("F", bound=Callable[..., Any])
B = TypeVar("B", bound=tuple[Any, ...])  # a family's batch (a NamedTuple)
C = TypeVar("C")  # what its prefix returns for the steps
K = TypeVar("K")  # its per-bucket cache


def bucket_for(rows: int) -> int:
    """The smallest bucket holding `rows` (1 <= rows <= MAX_BUCKET)."""
    for bucket in BUCKETS:
        if rows <= bucket:
            return bucket
    raise ValueError(f"{rows} rows exceed the largest bucket ({MAX_BUCKET}); split the batch first")


def pieces(rows: int) -> list[tuple[int, int, int]]:
    """(start, stop, bucket) per piece of a batch of `rows`: pieces of MAX_BUCKET, the last rounded up."""
    out = []
    for start in range(0, rows, MAX_BUCKET):
        stop = min(rows, start + MAX_BUCKET)
        out.append((start, stop, bucket_for(stop - start)))
    return out


def buckets_up_to(batch_size: int) -> tuple[int, ...]:
    """The buckets a server with VLA_BATCH_SIZE = batch_size can meet."""
    largest = bucket_for(min(max(batch_size, 1), MAX_BUCKET))
    return tuple(b for b in BUCKETS if b <= largest)


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """t (n, ...) -> a new (rows, ...) tensor with the last row repeated: padding rows are valid
    inputs (no empty masks, no NaN) whose outputs are dropped. Always a new tensor, made in the
    caller's grad mode (under inference_mode an inference tensor, as dynamo's guards expect)."""
    n = t.shape[0]
    return torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])])


def run_in_pieces(batch: Any, run: Callable[[int, int, int, Any], Sequence[Tensor]]) -> list[Tensor]:
    """A batch through a per-bucket function. `batch` is a tree of named tuples whose tensors all
    have the batch's rows first; for each piece, run(bucket, start, stop, the same tree with its
    rows padded to the bucket); each output's real rows, concatenated over the pieces. Outputs are
    cloned: a CUDA graph reuses its output buffers on the next replay."""
    leaves = [leaf for leaf in pytree.tree_leaves(batch) if isinstance(leaf, Tensor)]
    outputs = []
    for start, stop, bucket in pieces(leaves[0].shape[0]):
        padded = pytree.tree_map_only(
            Tensor, functools.partial(_piece, start=start, stop=stop, rows=bucket), batch
        )
        outputs.append([out[: stop - start].clone() for out in run(bucket, start, stop, padded)])
    return [torch.cat(parts) for parts in zip(*outputs, strict=True)]


def _piece(t: Tensor, start: int, stop: int, rows: int) -> Tensor:
    return pad_rows(t[start:stop], rows)


def kv_cache(
    caches: dict[int, KVCache],
    bucket: int,
    layers: int,
    kv_heads: int,
    length: int,
    head_dim: int,
    like: Tensor,
) -> KVCache:
    """caches[bucket]: a persistent KV cache (layers, bucket, kv_heads, length, head_dim) in `like`'s
    dtype and device, allocated on first use."""
    if bucket not in caches:
        caches[bucket] = cache = KVCache.allocate(layers, bucket, kv_heads, length, head_dim, like)
        persistent(cache.k)
        persistent(cache.v)
    return caches[bucket]


def pad_columns(t: Tensor, length: int, value: float | bool = 0) -> Tensor:
    """t (B, T, ...) -> (B, length, ...), right-padded with `value`."""
    missing = length - t.shape[1]
    if missing == 0:
        return t
    if missing < 0:
        raise ValueError(f"{t.shape[1]} columns exceed the static length {length}")
    fill = t.new_full((t.shape[0], missing, *t.shape[2:]), value)
    return torch.cat([t, fill], dim=1)


def compile_static(fn: F, device: torch.device, backend: str) -> F:
    """torch.compile(fn) for static shapes: fullgraph (a graph break raises), dynamic=False, and on
    CUDA with inductor mode="reduce-overhead" (CUDA graphs). `backend`: VLA_COMPILE_BACKEND."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; known: {', '.join(BACKENDS)}")
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode=mode)  # type: ignore[return-value]


def persistent(t: Tensor) -> Tensor:
    """A buffer that lives for the model's life (a KV cache): its address is static to CUDA graphs,
    so a graph may write it in place and the next graph read it without a copy."""
    torch._dynamo.mark_static_address(t)
    return t


def begin_call(device: torch.device) -> None:
    """Mark a new inference call for cudagraph trees (the previous call's outputs may be reused)."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def warm_up(what: str, buckets: Iterable[int], run: Callable[[int], object]) -> None:
    """Compile and capture every bucket now, logging the time: run(bucket) twice each (cudagraph
    trees run a new graph once, then record it; the third call replays)."""
    started = time.perf_counter()
    done = []
    for bucket in buckets:
        run(bucket)
        run(bucket)
        done.append(bucket)
    log.info(
        "VLA_COMPILE: %s compiled for batch buckets %s in %.1f s",
        what,
        ", ".join(map(str, done)),
        time.perf_counter() - started,
    )


class FlowRunner(Generic[B, C, K]):
    """What the flow families' static runners share (pi0/static.py, groot/static.py): the
    network's own `prefix` and `euler_step` compiled once per bucket, the step times made once, and
    the loop: each bucket's padded rows -> the cache -> prefix -> flow.integrate over the compiled
    step. A family says how to pad a batch to its static lengths (`pad`), which cache a bucket has
    (`cache`) and how its prefix is called (`prefix`)."""

    def __init__(self, network: Any, device: torch.device, *, backend: str, compile: bool) -> None:
        self.network = network
        self.device = device
        self.compiled = compile
        wrap = functools.partial(compile_static, device=device, backend=backend)
        self._prefix = wrap(network.prefix) if compile else network.prefix
        self._step = wrap(network.euler_step) if compile else network.euler_step
        self._times: dict[tuple[int, int, torch.dtype], list[flow.StepTime]] = {}

    def pad(self, batch: B) -> B:
        """The batch at the static lengths (its rows are padded to the bucket later)."""
        return batch

    def initial_noise(self, noise: Tensor) -> Tensor:
        return noise

    def cache(self, bucket: int) -> K:
        """The bucket's persistent cache, allocated on first use."""
        raise NotImplementedError

    def prefix(self, batch: B, cache: K) -> C:
        return self._prefix(batch, cache)  # type: ignore[no-any-return]

    def times(self, bucket: int, steps: int, dtype: torch.dtype) -> list[flow.StepTime]:
        """The eager sampler's step times (network.times), made once per (bucket, steps, dtype)."""
        key = (bucket, steps, dtype)
        if key not in self._times:
            self._times[key] = self.network.times(bucket, steps, dtype, self.device)
        return self._times[key]

    def sample(
        self, batch: B, noise: Tensor, steps: int, chunking: rtc.Chunking | None = None
    ) -> tuple[Tensor, Tensor]:
        """As the network's eager `sample`: actions and the last velocity (B, H, A) each."""
        with torch.inference_mode():
            noise = self.initial_noise(noise)
            rows = (self.pad(batch), noise, rtc.Chunking.for_static(chunking, noise))
            actions, velocities = run_in_pieces(
                rows, lambda bucket, start, stop, piece: self._bucket(bucket, steps, *piece)
            )
            return actions, velocities

    def _bucket(
        self, bucket: int, steps: int, batch: B, noise: Tensor, chunking: rtc.Chunking
    ) -> tuple[Tensor, Tensor]:
        cache = self.cache(bucket)
        begin_call(self.device)
        context = self.prefix(batch, cache)

        def step(x: Tensor, time: flow.StepTime) -> tuple[Tensor, Tensor]:
            return self._step(cache, context, batch, x, time, noise, chunking, 1.0 / steps)  # type: ignore[no-any-return]

        return flow.integrate(step, self.times(bucket, steps, noise.dtype), noise, chunking)
