"""The inference engine: admission, the request path, stream sessions and the model thread's life.

Lifecycle of a request:
  admit()   -> counted in flight; refused at once (QueueFull / Draining) when over the bound
  run()     -> `prepare` (decode + model.prepare, and a stream's real-time chunking) in the
               preprocessing pool (VLA_MAX_WORKERS threads), which queues the sample straight on
               the model thread (model_thread.py: batching, the forward pass, failure isolation);
               the caller's own future gets its own answer, or DeadlineExceeded at its deadline

Cancelling the caller drops its request before it reaches the model. The event loop never runs
model code; it only creates futures and receives answers (one callback per batch).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from vla_inference.config import Settings
from vla_inference.engine import realtime
from vla_inference.engine.errors import DeadlineExceeded, Draining, QueueFull
from vla_inference.engine.model_thread import Completed, ModelThread, StreamSession, WorkItem
from vla_inference.engine.realtime import Applied, ChunkMemory, RtcRequest
from vla_inference.models import rtc
from vla_inference.models.base import ModelDescription, Observation, PreparedSample, VLAModel
from vla_inference.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


class HasSample(Protocol):
    sample: PreparedSample


P = TypeVar("P", bound=HasSample)
T = TypeVar("T")

__all__ = ["Completed", "InferenceEngine", "StreamSession"]


class InferenceEngine:
    """Owns the model, its thread, the preprocessing pool and admission."""

    def __init__(self, model: VLAModel, settings: Settings, metrics: Metrics) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(
            settings.max_workers, thread_name_prefix="preprocess"
        )
        self._thread = ModelThread(model, settings, metrics)
        self._started = False
        self._in_flight = 0
        self._draining = False
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
        return max(0, self._in_flight - self._thread.executing)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def stuck(self) -> bool:
        """True while one forward pass has run longer than VLA_STUCK_AFTER_S."""
        started = self._thread.forward_started
        return started is not None and time.monotonic() - started > self.settings.stuck_after_s

    @property
    def draining(self) -> bool:
        return self._draining

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._thread.start()
        self._started = True

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
            await asyncio.wrap_future(self._thread.call(self.model.predict_batch, [sample] * size))
        log.info("warm-up done: %d batches (sizes %s)", len(sizes), sizes)

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests; wait up to grace_s for admitted ones. True when all were answered."""
        self._draining = True
        end = time.monotonic() + grace_s
        while self._in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return self._in_flight == 0

    async def close(self) -> None:
        self._thread.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

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

    async def run(
        self,
        prepare: Callable[[], P],
        deadline: float,
        request_id: str = "",
        session: StreamSession | None = None,
    ) -> tuple[P, Completed]:
        """`prepare()` in the preprocessing pool, then the model; (what prepare returned, the answer).

        `prepare` returns an object with the PreparedSample as `.sample`; its exceptions (e.g.
        InvalidObservation) are raised here. The answer comes by `deadline` (time.monotonic()).
        """
        assert self._started, "engine not started"
        loop = asyncio.get_running_loop()
        item = WorkItem(loop.create_future(), loop, deadline, request_id, session)
        if session is not None:
            item.seq = session.next_seq()
        prepared: list[P] = []

        def job() -> None:
            try:
                result = prepare()
            except BaseException as exc:
                self._thread.prepared(None)
                item.fail(exc)
                return
            prepared.append(result)
            item.sample = result.sample
            self._thread.prepared(item)

        self._thread.preparing()
        self._pool.submit(job)
        completed = await self._wait(item)
        return prepared[0], completed

    async def preprocess(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work in the preprocessing pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def infer(self, sample: PreparedSample, deadline: float, request_id: str = "") -> Completed:
        """A sample already prepared (by `preprocess`): queue it on the model thread, await the answer."""
        assert self._started, "engine not started"
        loop = asyncio.get_running_loop()
        item = WorkItem(loop.create_future(), loop, deadline, request_id, sample=sample)
        self._thread.preparing()
        self._thread.prepared(item)
        return await self._wait(item)

    async def _wait(self, item: WorkItem) -> Completed:
        """The item's answer until its deadline; cancelling the caller drops it."""

        # A timer on the item's own future rather than wait_for(shield(...)): when the deadline
        # and an answer coincide, wait_for leaves the shield's exception unretrieved and asyncio
        # logs it as an error.
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
            if item.session is not None:
                self._thread.take_pending(item.session, item)

    def take_skipped(self, session: StreamSession) -> list[str]:
        """Request ids of the session's observations skipped since the last call."""
        return self._thread.take_skipped(session)
