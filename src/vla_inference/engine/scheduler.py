"""The inference engine: admission, the one request path, stream sessions and the model thread's life.

Every transport (gRPC Predict and StreamControl, the openpi websocket, ...) serves a request with
one call (engine/request.py):

    answer = await engine.submit(decode, deadline, protocol="grpc", request_id=..., session=...)

  1. a stream's rate (StreamSession.allow), then admission: counted in flight, or refused at once
     (QueueFull / Draining); then `on_admitted` (gRPC sends its response headers there, so a
     refusal is known never to have run);
  2. in the preprocessing pool (VLA_MAX_WORKERS threads): the transport's `decode`, a stream's
     history (StreamSession.fill: the earlier steps the model reads), the instruction rule,
     `model.prepare` and a real-time chunking prefix; the sample goes straight
     onto the model thread (model_thread.py: batching, the forward pass, failure isolation), whose
     fill window waits for requests still in this step;
  3. the caller's own future gets its answer, or DeadlineExceeded at its deadline; a stream's
     StreamSession (session.py) keeps its ordering rules;
  4. the outcome is counted, once (outcome.py): the Answer is returned, or `Failed` raised
     (`Skipped` for a stream observation a newer one replaced).

Cancelling the caller drops its request before it reaches the model. The event loop never runs
model code; it only creates futures and receives answers (one callback per batch).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from vla_inference.config import Settings
from vla_inference.engine import realtime
from vla_inference.engine.batching import RecentPeak
from vla_inference.engine.errors import DeadlineExceeded, Draining, QueueFull, Skipped
from vla_inference.engine.model_thread import Completed, ModelThread, WorkItem
from vla_inference.engine.outcome import Failed, Outcome, Outcomes
from vla_inference.engine.pool import PreprocessPool
from vla_inference.engine.realtime import Applied
from vla_inference.engine.request import Answer, Decode, Decoded, Notices, Timing
from vla_inference.engine.session import HistorySpec, StreamSession
from vla_inference.models.base import (
    InvalidObservation,
    ModelDescription,
    NoValidAction,
    Observation,
    PreparedSample,
    VLAModel,
)
from vla_inference.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

EMPTY_INSTRUCTION = (
    "the model needs a language instruction (the task, e.g. 'pick up the red cup'); send one, or set "
    "VLA_ALLOW_EMPTY_INSTRUCTION=true to serve observations without one"
)


def preprocessing_threads(max_workers: int) -> int:
    """VLA_MAX_WORKERS, but no more threads than the cores this process may run on leave beside
    the one the event loop (gRPC) needs, and at least two (a primary and a spare, engine/pool.py)
    unless VLA_MAX_WORKERS asks for one: decoding and preprocessing are CPU work, and threads
    beyond the cores only take turns at the GIL and the caches (measured on 2 cores with the
    forward pass stubbed: 4 threads of a ThreadPoolExecutor cost 0.1 ms more CPU per request than 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return min(max_workers, max(2, cores - 1))


@dataclass
class _Prepared:
    """What the preprocessing step made of a request."""

    sample: PreparedSample
    decode_s: float
    preprocess_s: float
    rtc: Applied | None


class InferenceEngine:
    """Owns the model, its thread, the preprocessing pool, admission and the counting of outcomes.

    `pool` replaces the preprocessing pool (tests run its jobs by hand)."""

    def __init__(
        self,
        model: VLAModel,
        settings: Settings,
        metrics: Metrics,
        *,
        pool: concurrent.futures.Executor | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.outcomes = Outcomes(metrics)
        self._fleet = RecentPeak()  # the most requests in flight at once, lately (batching.py)
        self.model_thread = ModelThread(model, settings, metrics, fleet=self._fleet.read)
        self._pool = pool or PreprocessPool(preprocessing_threads(settings.max_workers))
        self._notices = Notices("process")  # warnings logged once for unary requests
        self._started = False
        self._in_flight = 0
        self._draining = False
        self._sessions = 0
        metrics.bind_queue_depth(lambda: float(self.queue_depth))
        metrics.in_flight.set_function(lambda: float(self._in_flight))
        metrics.active_streams.set_function(lambda: float(self._sessions))

    @property
    def model_info(self) -> ModelDescription:
        return self.model.model_info

    # --- the request path -----------------------------------------------------------------------
    async def submit(
        self,
        decode: Decode,
        deadline: float,
        *,
        protocol: str,
        request_id: str = "",
        session: StreamSession | None = None,
        notices: Notices | None = None,
        on_admitted: Callable[[], Awaitable[None]] | None = None,
    ) -> Answer:
        """Serve one request (see the module docstring); its outcome is counted here, once.

        decode: the transport's message -> Decoded, run in the preprocessing pool; what it raises
          (InvalidObservation naming the transport's field) is the request's outcome.
        deadline: time.monotonic() by which the answer is due.
        protocol: the metrics label (grpc, openpi, ...).
        session: the stream the request belongs to (its ordering rules and chunk memory).
        notices: where warnings are logged once (default: the session's, else once per process).
        on_admitted: awaited once the request is admitted, before any work.

        Raises Failed (the outcome a client is told), Skipped (a newer observation of the session
        replaced it), or CancelledError when the caller is cancelled.
        """
        assert self._started, "engine not started"
        arrival = time.monotonic()
        try:
            if session is not None:
                session.allow()
            with self._admit():
                if on_admitted is not None:
                    await on_admitted()
                answer = await self._serve(decode, deadline, arrival, request_id, session, notices)
        except asyncio.CancelledError as exc:
            self.outcomes.failed(protocol, exc)
            raise
        except Skipped as exc:
            if session is not None:
                session.skipped(request_id)
                self.metrics.stream_skipped.inc()
            self.outcomes.failed(protocol, exc)
            raise
        except Exception as exc:
            raise Failed(self.outcomes.failed(protocol, exc)) from exc
        self.outcomes.answered(protocol, answer.embodiment, answer.timing.total_s)
        return answer

    def refused(self, protocol: str, exc: BaseException) -> Outcome:
        """Count a request its transport refused before submitting it (e.g. a frame over the size
        limit, or while the server is not serving); the outcome to tell the client."""
        return self.outcomes.failed(protocol, exc)

    async def _serve(
        self,
        decode: Decode,
        deadline: float,
        arrival: float,
        request_id: str,
        session: StreamSession | None,
        notices: Notices | None,
    ) -> Answer:
        loop = asyncio.get_running_loop()
        item = WorkItem(loop.create_future(), loop, deadline, request_id, session)
        if session is not None:
            item.seq = session.observe()
        if notices is None:
            notices = session.notices if session is not None else self._notices
        prepared: list[_Prepared] = []

        def job() -> None:
            try:
                result = self._prepare(decode, session, notices, item.seq, deadline)
            except BaseException as exc:
                self.model_thread.prepared(None)
                item.fail(exc)
                return
            prepared.append(result)
            item.sample = result.sample
            self.model_thread.prepared(item)

        self.model_thread.preparing()
        try:
            self._pool.submit(job)
        except RuntimeError:  # the pool was shut down: the server is stopping
            self.model_thread.prepared(None)
            raise Draining("server is shutting down; retry on another replica") from None
        done = await self._wait(item)
        skipped = session.answer(item.seq) if session is not None else ()
        p = prepared[0]
        timing = Timing(
            decode_s=p.decode_s,
            preprocess_s=p.preprocess_s,
            queue_s=done.queue_s,
            model_s=done.model_s,
            postprocess_s=done.postprocess_s,
            total_s=time.monotonic() - arrival,
            batch_size=done.batch_size,
        )
        return Answer(done.prediction, p.sample.embodiment, timing, p.rtc, skipped)

    def _prepare(
        self, decode: Decode, session: StreamSession | None, notices: Notices, seq: int, deadline: float
    ) -> _Prepared:
        """The preprocessing pool's part of a request."""
        t0 = time.monotonic()
        try:
            decoded = decode()
        except BaseException:
            if session is not None:
                session.abandon(seq)  # later observations of the stream stop waiting for it
            raise
        if session is not None:
            filled = session.fill(seq, decoded.observation, deadline)
            if filled is not decoded.observation:
                decoded = dataclasses.replace(decoded, observation=filled)
        t1 = time.monotonic()
        sample = self.model.prepare(self._instruction(decoded, notices))
        applied = None
        if decoded.rtc is not None:
            # A stream's previous chunk is the last one it had been sent when this line runs.
            sample.rtc, applied = realtime.resolve(
                decoded.rtc, self.model, sample.embodiment, self.settings, session
            )
        t2 = time.monotonic()
        self.metrics.preprocess_time.observe(t2 - t0)
        return _Prepared(sample, t1 - t0, t2 - t1, applied)

    def _instruction(self, decoded: Decoded, notices: Notices) -> Observation:
        """The empty-instruction rule: a model that reads language needs an instruction, unless
        VLA_ALLOW_EMPTY_INSTRUCTION lets an empty one through (with a warning, once per scope)."""
        observation = decoded.observation
        if observation.instruction.strip() or not self.model_info.takes_language:
            return observation
        if not self.settings.allow_empty_instruction:
            raise InvalidObservation(decoded.instruction_field, EMPTY_INSTRUCTION)
        notices.warn_once(
            "empty-instruction",
            "an observation without a language instruction (%s) went to the model, as "
            "VLA_ALLOW_EMPTY_INSTRUCTION=true allows: it acts without being told its task "
            "(logged once per %s)",
            decoded.instruction_field,
            notices.scope,
        )
        return observation

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

    @contextlib.contextmanager
    def _admit(self) -> Iterator[None]:
        """Count a request in flight for its whole life; refuse it when the server is full or draining."""
        if self._draining:
            raise Draining("server is shutting down; retry on another replica")
        if self._in_flight >= self.settings.max_queue_size:
            raise QueueFull(
                f"server is at capacity ({self._in_flight} requests in flight, VLA_MAX_QUEUE_SIZE="
                f"{self.settings.max_queue_size}); retry shortly"
            )
        self._in_flight += 1
        self._fleet.note(self._in_flight)
        try:
            yield
        finally:
            self._in_flight -= 1

    # --- streams --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stream(self) -> Iterator[StreamSession]:
        """One stream's session for its whole life (counted in active streams)."""
        self._sessions += 1
        try:
            yield StreamSession(self.settings.max_stream_rate_hz, history=HistorySpec.of(self.model_info))
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
        return max(0, self._in_flight - self.model_thread.executing)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def stuck(self) -> bool:
        """True while one forward pass has run longer than VLA_STUCK_AFTER_S."""
        started = self.model_thread.forward_started
        return started is not None and time.monotonic() - started > self.settings.stuck_after_s

    @property
    def draining(self) -> bool:
        return self._draining

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self, *, threaded: bool = True) -> None:
        """Start the model thread and run the model's warm-up hook on it (`warm_up(VLA_BATCH_SIZE)`).
        threaded=False leaves the thread unstarted: a test steps it (`model_thread.step()`)."""
        warmed = self.model_thread.call(self.model.warm_up, self.settings.batch_size)
        if threaded:
            self.model_thread.start()
        else:
            self.model_thread.step()
        await asyncio.wrap_future(warmed)
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
            await asyncio.wrap_future(self.model_thread.call(self._warmup_batch, [sample] * size))
        log.info("warm-up done: %d batches (sizes %s)", len(sizes), sizes)

    def _warmup_batch(self, samples: list[PreparedSample]) -> None:
        """forward + finish of a dummy batch; an answer without an action (an autoregressive model
        given a black frame) still warmed the model up."""
        for raw, sample in zip(self.model.forward(samples), samples, strict=True):
            with contextlib.suppress(NoValidAction):
                self.model.finish(raw, sample)

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests; wait up to grace_s for admitted ones. True when all were answered."""
        self._draining = True
        end = time.monotonic() + grace_s
        while self._in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return self._in_flight == 0

    async def close(self) -> None:
        self.model_thread.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
