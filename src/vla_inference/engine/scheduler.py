"""Dynamic batching scheduler and the single model worker.

Lifecycle of a request:
  admit()        -> counted in flight; refused at once (QueueFull / Draining) when over the bound
  preprocess()   -> decode + model.prepare in the worker pool (VLA_MAX_WORKERS threads)
  infer()        -> queued; the scheduler task coalesces compatible samples (equal batch_key) into
                    one batch of up to VLA_BATCH_SIZE, waiting at most VLA_BATCH_TIMEOUT_MS after
                    the oldest queued request, and hands it to the one model thread
  answer         -> the caller's own future gets its own result

Expired and cancelled requests are dropped before they reach the model. A stream session holds
at most one queued observation: a newer one replaces it (the old one is answered Skipped).
The event loop never runs model code; it only moves futures.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vla_inference.config import Settings
from vla_inference.engine import realtime
from vla_inference.engine.errors import (
    DeadlineExceeded,
    Draining,
    EngineError,
    ModelFailure,
    QueueFull,
    ResourceExhausted,
    Skipped,
)
from vla_inference.engine.realtime import Applied, ChunkMemory, RtcRequest
from vla_inference.models import rtc
from vla_inference.models.base import (
    ActionPrediction,
    ModelDescription,
    Observation,
    PreparedSample,
    VLAModel,
)
from vla_inference.telemetry.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
PREPROCESS_WAIT_FACTOR = 5


@dataclass(frozen=True)
class Completed:
    """A request's answer with where its time went (seconds)."""

    prediction: ActionPrediction
    queue_s: float
    model_s: float
    postprocess_s: float
    batch_size: int


@dataclass(eq=False)
class _WorkItem:
    sample: PreparedSample
    future: asyncio.Future[Completed]
    enqueued_at: float
    deadline: float
    request_id: str
    session: StreamSession | None = None

    @property
    def live(self) -> bool:
        return not self.future.done()


@dataclass(eq=False)
class StreamSession:
    """Per-StreamControl state: the observation waiting in the queue, if any, and the chunks the
    stream was sent (for real-time chunking)."""

    pending: _WorkItem | None = None
    skipped: list[str] = field(default_factory=list)
    memory: ChunkMemory = field(default_factory=ChunkMemory)

    def take_skipped(self) -> list[str]:
        skipped, self.skipped = self.skipped, []
        return skipped


def _is_out_of_memory(exc: BaseException) -> bool:
    # Only look at torch when a model already imported it: importing it here, on the model thread
    # at the first failure, would stall the worker for seconds.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower()


class InferenceEngine:
    """Owns the model, its worker thread, the preprocessing pool and the request queue."""

    def __init__(self, model: VLAModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(
            settings.max_workers, thread_name_prefix="preprocess"
        )
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-worker")
        self._queue: collections.deque[_WorkItem] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._executing = 0
        self._draining = False
        self._forward_started: float | None = None
        self._model_free_since = 0.0  # when the last forward pass ended
        self._sessions = 0
        metrics.bind_queue_depth(lambda: float(self.queue_depth))
        metrics.in_flight.set_function(lambda: float(self._in_flight))
        metrics.active_streams.set_function(lambda: float(self._sessions))

    # --- what the transport asks of the model -------------------------------------------------
    @property
    def model_info(self) -> ModelDescription:
        return self.model.model_info

    def prepare(self, observation: Observation) -> PreparedSample:
        """The model's preprocessing (CPU; call it in the worker pool through `preprocess`)."""
        return self.model.prepare(observation)

    def resolve_rtc(
        self, request: RtcRequest, embodiment: str, memory: ChunkMemory | None
    ) -> tuple[rtc.Prefix | None, Applied]:
        """The real-time chunking prefix of one request (engine/realtime.py)."""
        return realtime.resolve(request, self.model, embodiment, self.settings, memory)

    # --- accounting -----------------------------------------------------------------------------
    def record(self, status: str, embodiment: str = "", seconds: float = 0.0) -> None:
        """Count one request's outcome (a gRPC status name, or SKIPPED); latency for answered ones."""
        self.metrics.count(status)
        if status == "OK":
            self.metrics.inference_latency.labels(
                model=self.metrics.model_id, embodiment=embodiment or "default"
            ).observe(seconds)

    def record_preprocess(self, seconds: float) -> None:
        self.metrics.preprocess_time.observe(seconds)

    @contextlib.contextmanager
    def stream(self) -> Iterator[StreamSession]:
        """One StreamControl session for its whole life (counted in active streams)."""
        self._sessions += 1
        try:
            yield StreamSession()
        finally:
            self._sessions -= 1

    @property
    def sessions(self) -> int:
        """Open stream sessions."""
        return self._sessions

    # --- state --------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests admitted and not yet on the model (preprocessing or queued)."""
        return max(0, self._in_flight - self._executing)

    @property
    def _preprocessing(self) -> int:
        """Admitted requests not yet queued nor executing: decoding or preprocessing right now."""
        return self._in_flight - self._executing - len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def stuck(self) -> bool:
        """True while one forward pass has run longer than VLA_STUCK_AFTER_S."""
        started = self._forward_started
        return started is not None and time.monotonic() - started > self.settings.stuck_after_s

    @property
    def draining(self) -> bool:
        return self._draining

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._schedule(), name="batch-scheduler")

    async def warmup(self, batches: int) -> None:
        """Run dummy batches (batch 1 and the largest batch) so the first real request is not slow."""
        if batches <= 0:
            return
        loop = asyncio.get_running_loop()
        observation = self.model.warmup_observation()
        sample = await loop.run_in_executor(self._pool, self.model.prepare, observation)
        sizes = [1, self.settings.batch_size][: max(1, batches)]
        sizes += [self.settings.batch_size] * (batches - len(sizes))
        for size in sizes:
            await loop.run_in_executor(self._worker, self.model.predict_batch, [sample] * size)
        log.info("warm-up done: %d batches (sizes %s)", len(sizes), sizes)

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests; wait up to grace_s for admitted ones. True when all were answered."""
        self._draining = True
        end = time.monotonic() + grace_s
        while self._in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return self._in_flight == 0

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for item in self._queue:
            if item.live:
                item.future.set_exception(Draining("server is shutting down"))
        self._queue.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._worker.shutdown(wait=False, cancel_futures=True)

    # --- request path -------------------------------------------------------------------------
    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request in flight for its whole life; refuse it when the server is full or draining."""
        if self._draining:
            raise Draining("server is shutting down; retry on another replica")
        if self._in_flight >= self.settings.max_queue_size:
            raise QueueFull(
                f"server is at capacity ({self._in_flight} requests in flight, VLA_MAX_QUEUE_SIZE="
                f"{self.settings.max_queue_size}); retry shortly"
            )
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def preprocess(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU preprocessing in the worker pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def submit(
        self,
        sample: PreparedSample,
        deadline: float,
        request_id: str = "",
        session: StreamSession | None = None,
    ) -> _WorkItem:
        """Queue one prepared sample now (synchronously, so queue order = call order)."""
        now = time.monotonic()
        item = _WorkItem(
            sample, asyncio.get_running_loop().create_future(), now, deadline, request_id, session
        )
        if deadline <= now:
            item.future.set_exception(
                DeadlineExceeded("deadline passed before the request reached the model")
            )
            return item
        if session is not None:
            stale = session.pending
            if stale is not None and stale.live:
                stale.future.set_exception(Skipped("replaced by a newer observation"))
                session.skipped.append(stale.request_id)
                self.metrics.stream_skipped.inc()
            session.pending = item
        self._queue.append(item)
        assert self._wakeup is not None, "engine not started"
        self._wakeup.set()
        return item

    async def wait(self, item: _WorkItem) -> Completed:
        """Wait for a submitted item's answer until its deadline; cancelling the caller drops it."""

        # A timer on the item's own future rather than wait_for(shield(...)): when the deadline
        # and an answer (or _prune's DeadlineExceeded) coincide, wait_for leaves the shield's
        # exception unretrieved and asyncio logs it as an error.
        def expire() -> None:
            if not item.future.done():
                item.future.set_exception(DeadlineExceeded("no answer within the deadline"))

        timer = asyncio.get_running_loop().call_later(max(0.0, item.deadline - time.monotonic()), expire)
        try:
            return await item.future  # cancelling the caller cancels the item: it is never run
        except asyncio.CancelledError:
            if item.future.done() and not item.future.cancelled():
                item.future.exception()  # answered as we were cancelled: mark it retrieved
            item.future.cancel()
            raise
        finally:
            timer.cancel()
            if item.session is not None and item.session.pending is item:
                item.session.pending = None

    async def infer(
        self,
        sample: PreparedSample,
        deadline: float,
        request_id: str = "",
        session: StreamSession | None = None,
    ) -> Completed:
        """submit() then wait(): one sample's answer by `deadline` (time.monotonic() seconds)."""
        return await self.wait(self.submit(sample, deadline, request_id, session))

    # --- scheduler ------------------------------------------------------------------------------
    def _prune(self) -> None:
        """Drop answered, cancelled and expired items from the head and middle of the queue."""
        now = time.monotonic()
        kept: collections.deque[_WorkItem] = collections.deque()
        for item in self._queue:
            if not item.live:
                continue
            if item.deadline <= now:
                item.future.set_exception(DeadlineExceeded("deadline passed while queued; not run"))
                continue
            kept.append(item)
        self._queue = kept

    def _compatible(self, key: Hashable) -> list[_WorkItem]:
        return [item for item in self._queue if item.sample.batch_key == key]

    async def _schedule(self) -> None:
        assert self._wakeup is not None
        max_batch = self.settings.batch_size
        delay = self.settings.batch_timeout_ms / 1000
        while True:
            self._prune()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue[0]
            key = first.sample.batch_key
            # The fill window opens when the oldest request arrived or when the model came free,
            # whichever is later, and stays open while admitted requests are still being decoded
            # (up to PREPROCESS_WAIT_FACTOR windows): under load, robots answered by the last pass
            # join the next one instead of splitting the fleet into alternating half batches.
            opened = max(first.enqueued_at, self._model_free_since)
            window_end = opened + delay
            stretch_end = opened + delay * PREPROCESS_WAIT_FACTOR
            while max_batch > 1 and len(self._compatible(key)) < max_batch:
                end = stretch_end if self._preprocessing > 0 else window_end
                remaining = end - time.monotonic()
                if remaining <= 0 or not first.live:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                self._prune()
            if not first.live:
                continue
            batch = self._compatible(key)[:max_batch]
            taken = set(map(id, batch))
            self._queue = collections.deque(item for item in self._queue if id(item) not in taken)
            for item in batch:
                if item.session is not None and item.session.pending is item:
                    item.session.pending = None
            await self._execute(batch)

    async def _execute(self, batch: list[_WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self._executing += len(batch)
        try:
            outcomes, model_s = await loop.run_in_executor(
                self._worker, self._run_batch, [item.sample for item in batch]
            )
        except Exception as exc:  # the worker itself failed (should not happen: _run_batch catches)
            log.exception("model worker failed")
            outcomes, model_s = [(ModelFailure(f"model failed: {type(exc).__name__}"), 0.0)] * len(batch), 0.0
        finally:
            self._executing -= len(batch)
            self._model_free_since = time.monotonic()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.model_time.observe(model_s)
        for item, (outcome, post_s) in zip(batch, outcomes, strict=True):
            self.metrics.queue_time.observe(started - item.enqueued_at)
            if item.future.done():
                continue  # answered meanwhile (deadline, cancel)
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(
                    Completed(outcome, started - item.enqueued_at, model_s, post_s, len(batch))
                )

    # --- model thread ---------------------------------------------------------------------------
    def _run_batch(
        self, samples: Sequence[PreparedSample]
    ) -> tuple[list[tuple[ActionPrediction | EngineError, float]], float]:
        """Forward + finish for one batch, isolating failures. Runs on the model thread."""
        self._forward_started = time.monotonic()
        try:
            raws, ok = self._forward_isolating(list(samples))
        finally:
            model_s = time.monotonic() - self._forward_started
            self._forward_started = None
        outcomes: list[tuple[ActionPrediction | EngineError, float]] = []
        for raw, sample, good in zip(raws, samples, ok, strict=True):
            if not good:
                outcomes.append((raw, 0.0))
                continue
            t0 = time.monotonic()
            try:
                outcomes.append((self.model.finish(raw, sample), time.monotonic() - t0))
            except Exception:
                log.exception("postprocessing failed")
                outcomes.append((ModelFailure("model postprocessing failed; see server log"), 0.0))
        return outcomes, model_s

    def _forward_isolating(self, samples: list[PreparedSample]) -> tuple[list[Any], list[bool]]:
        """Forward the batch; on failure split it so only the failing samples fail.

        Out of memory: halve the batch and retry (RESOURCE_EXHAUSTED only when one sample alone
        does not fit). Any other error: retry samples one by one (INTERNAL for the failing ones).
        """
        try:
            return list(self.model.forward(samples)), [True] * len(samples)
        except Exception as exc:
            oom = _is_out_of_memory(exc)
            if oom:
                _release_device_memory()
            if len(samples) == 1:
                if oom:
                    log.error("out of memory for a single sample: %s", exc)
                    return [ResourceExhausted("the model ran out of device memory for this request")], [False]
                log.exception("model forward failed")
                return [ModelFailure(f"model failed ({type(exc).__name__}); see server log")], [False]
            log.warning(
                "batch of %d failed (%s); retrying %s",
                len(samples),
                type(exc).__name__,
                "in halves" if oom else "one by one",
            )
            parts = (
                [samples[: len(samples) // 2], samples[len(samples) // 2 :]]
                if oom
                else [[s] for s in samples]
            )
            raws: list[Any] = []
            ok: list[bool] = []
            for part in parts:
                part_raws, part_ok = self._forward_isolating(part)
                raws += part_raws
                ok += part_ok
            return raws, ok


def _release_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
