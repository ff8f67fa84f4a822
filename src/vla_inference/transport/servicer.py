"""The VLAInference handlers: admission, preprocessing, engine, answer, and one status per outcome.

Every request ends with exactly one counted outcome in `vla_inference_requests_total`
(OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE, INTERNAL, CANCELLED,
or SKIPPED for stale stream observations). Clients never see a traceback.

UNAVAILABLE is a refusal before any model work (loading, draining) and comes without response
headers; an admitted call gets its headers at once (`_commit`), so clients' retry policies
(vla_inference.channels) retry refusals on another replica and never a call that may have run.
A stream open when the drain begins answers the observations it already read, then ends
UNAVAILABLE; the client reopens it elsewhere (vla_inference.client.ControlSession).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.api.v1 import vla_inference_pb2_grpc as pb_grpc
from vla_inference.config import Settings
from vla_inference.engine import (
    Completed,
    DeadlineExceeded,
    InferenceEngine,
    Skipped,
    StreamSession,
)
from vla_inference.engine.realtime import Applied, ChunkMemory
from vla_inference.models.base import PreparedSample
from vla_inference.telemetry.gpu import GpuMonitor
from vla_inference.transport import codec
from vla_inference.transport.outcome import RateLimited, classify, record
from vla_inference.transport.outcome import Unavailable as _Unavailable

log = logging.getLogger(__name__)

DRAINING_MESSAGE = "server is shutting down; retry on another replica"
STREAM_DRAINED_MESSAGE = (
    "this replica is shutting down: the stream ends here; reopen it (another replica serves it, "
    "with fresh stream state)"
)


@dataclass
class _Failure:
    status: grpc.StatusCode
    message: str


@dataclass
class _Prepared:
    sample: PreparedSample
    decode_s: float
    preprocess_s: float
    rtc: Applied | None = None  # what real-time chunking did, when asked for


class ServerState:
    """What the server is doing; shared by the handlers, the health services and the server."""

    LOADING = "LOADING"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    DRAINING = "DRAINING"

    def __init__(self) -> None:
        self.phase = self.LOADING
        self.started = time.monotonic()
        self._on_drain: set[Callable[[], None]] = set()

    def begin_drain(self) -> None:
        """Enter DRAINING and tell every open stream, so each ends with UNAVAILABLE."""
        self.phase = self.DRAINING
        for callback in list(self._on_drain):
            callback()

    def on_drain(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` when the drain begins; returns the function that unregisters it."""
        self._on_drain.add(callback)
        return lambda: self._on_drain.discard(callback)


class VLAInferenceServicer(pb_grpc.VLAInferenceServicer):
    def __init__(
        self,
        settings: Settings,
        state: ServerState,
        engine_ref: Callable[[], InferenceEngine | None],
        gpu: GpuMonitor,
    ) -> None:
        self.settings = settings
        self.state = state
        self._engine_ref = engine_ref
        self._gpu = gpu

    # --- helpers ----------------------------------------------------------------------------------
    def _engine(self) -> InferenceEngine:
        """The engine, or _Unavailable while loading or draining: a refusal before any model work."""
        engine = self._engine_ref()
        if engine is None or self.state.phase == ServerState.LOADING:
            raise _Unavailable("the model is still loading; retry when health reports SERVING")
        if self.state.phase == ServerState.DRAINING:
            raise _Unavailable(DRAINING_MESSAGE)
        return engine

    def _deadline(self, context: grpc.aio.ServicerContext, arrival: float) -> tuple[float, str]:
        """The call's deadline (monotonic) and how it was chosen, for error messages."""
        remaining = context.time_remaining()
        default = self.settings.timeout_ms / 1000
        if remaining is not None and remaining < default:
            return arrival + max(0.0, remaining), f"client deadline {remaining * 1000:.0f} ms"
        return arrival + default, f"VLA_TIMEOUT_MS={self.settings.timeout_ms}"

    def _prepare(
        self, engine: InferenceEngine, request: pb.Observation, memory: ChunkMemory | None
    ) -> _Prepared:
        """Decode, model preprocessing and real-time chunking; runs in the preprocessing pool.

        A stream's previous chunk is the one it had been sent when this observation was decoded."""
        t0 = time.monotonic()
        info = engine.model_info
        observation = codec.observation_from_proto(request, self.settings, info)
        t1 = time.monotonic()
        sample = engine.prepare(observation)
        prepared = _Prepared(sample, t1 - t0, 0.0)
        rtc_request = codec.rtc_request(request, info)
        if rtc_request is not None:
            sample.rtc, prepared.rtc = engine.resolve_rtc(rtc_request, sample.embodiment, memory)
        prepared.preprocess_s = time.monotonic() - t1
        engine.record_preprocess(prepared.decode_s + prepared.preprocess_s)
        return prepared

    async def _run(
        self,
        engine: InferenceEngine,
        request: pb.Observation,
        deadline: float,
        session: StreamSession | None = None,
    ) -> tuple[_Prepared, Completed]:
        """Checks that need no decoding (here, on the loop), then preprocessing and the model."""
        codec.check_envelope(request, self.settings, engine.model_info)
        memory = session.memory if session is not None else None
        return await engine.run(
            lambda: self._prepare(engine, request, memory), deadline, request.request_id, session
        )

    def _failure(self, exc: BaseException, where: str) -> _Failure:
        outcome = classify(exc, where)
        return _Failure(getattr(grpc.StatusCode, outcome.status, grpc.StatusCode.INTERNAL), outcome.message)

    def _record(
        self, engine: InferenceEngine | None, status: str, embodiment: str = "", seconds: float = 0.0
    ) -> None:
        record(engine, status, embodiment, seconds)

    def _answer(
        self,
        engine: InferenceEngine,
        request: pb.Observation,
        prepared: _Prepared,
        done: Completed,
        arrival: float,
        skipped: list[str] | None = None,
        total: float | None = None,
    ) -> pb.ActionChunk:
        """Count a success and build its ActionChunk (`total`: seconds since arrival, default now)."""
        if total is None:
            total = time.monotonic() - arrival
        self._record(engine, "OK", prepared.sample.embodiment, total)
        return codec.action_chunk(
            request,
            done,
            engine.model_info.name,
            decode_s=prepared.decode_s,
            preprocess_s=prepared.preprocess_s,
            total_s=total,
            skipped=skipped,
            rtc=prepared.rtc,
        )

    # --- RPCs -----------------------------------------------------------------------------------
    async def Predict(
        self, request: pb.Observation | codec.MalformedMessage, context: grpc.aio.ServicerContext
    ) -> pb.ActionChunk:
        arrival = time.monotonic()
        engine = self._engine_ref()
        try:
            engine = self._engine()
            with engine.admit():
                await _commit(context)
                request = codec.require_observation(request)
                deadline, budget = self._deadline(context, arrival)
                try:
                    prepared, done = await self._run(engine, request, deadline)
                except DeadlineExceeded as exc:
                    raise DeadlineExceeded(f"{exc.message} ({budget})") from None
            return self._answer(engine, request, prepared, done, arrival)
        except asyncio.CancelledError:
            self._record(engine, "CANCELLED")
            raise
        except Exception as exc:
            failure = self._failure(exc, "Predict")
        self._record(engine, failure.status.name)
        await _abort(context, failure)
        raise AssertionError("unreachable")  # abort raises

    async def StreamControl(
        self,
        request_iterator: AsyncIterator[pb.Observation | codec.MalformedMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ActionChunk]:
        try:
            engine = self._engine()
        except _Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            return
        await _commit(context)
        answers: asyncio.Queue[asyncio.Task[pb.ActionChunk | None] | _DrainSignal | None] = asyncio.Queue()
        tasks: set[asyncio.Task[Any]] = set()
        limiter = _RateLimiter(self.settings.max_stream_rate_hz)
        unregister = self.state.on_drain(lambda: answers.put_nowait(_DRAIN))
        with engine.stream() as session:

            async def read() -> None:
                try:
                    async for request in request_iterator:
                        allowed = limiter.allow()
                        step = asyncio.create_task(self._stream_step(engine, request, session, allowed))
                        tasks.add(step)
                        step.add_done_callback(tasks.discard)
                        await answers.put(step)
                finally:
                    # Always end the answer loop, also when reading fails: `await reader` below then
                    # re-raises the failure instead of the stream hanging until its deadline.
                    answers.put_nowait(None)

            reader = asyncio.create_task(read())
            try:
                while True:
                    step = await answers.get()
                    if step is None:
                        break
                    if isinstance(step, _DrainSignal):
                        # Answer what was already read, then end: the client reopens elsewhere.
                        reader.cancel()
                        while not answers.empty():
                            pending = answers.get_nowait()
                            if isinstance(pending, asyncio.Task):
                                chunk = await pending
                                if chunk is not None and not _refused_by_drain(chunk):
                                    yield chunk
                        await context.abort(grpc.StatusCode.UNAVAILABLE, STREAM_DRAINED_MESSAGE)
                        return
                    chunk = await step
                    if chunk is not None:
                        yield chunk
                await reader
            finally:
                unregister()
                reader.cancel()
                for task in list(tasks):
                    task.cancel()

    async def _stream_step(
        self,
        engine: InferenceEngine,
        request: pb.Observation | codec.MalformedMessage,
        session: StreamSession,
        allowed: bool,
    ) -> pb.ActionChunk | None:
        """One observation of a stream; its answer carries a failure inline. An observation that a
        newer one overtook before reaching the model is skipped (engine: newest wins)."""
        arrival = time.monotonic()
        try:
            if not allowed:
                rate = self.settings.max_stream_rate_hz
                raise RateLimited(f"stream sends faster than VLA_MAX_STREAM_RATE_HZ={rate:g}")
            with engine.admit():
                observation = codec.require_observation(request)
                deadline = arrival + self.settings.timeout_ms / 1000
                prepared, done = await self._run(engine, observation, deadline, session)
                # The latency the delay estimate uses is the total_ms the answer reports.
                latency = time.monotonic() - arrival
                session.memory.remember(observation.request_id, done.prediction.model_actions, latency)
        except asyncio.CancelledError:
            self._record(engine, "CANCELLED")
            raise
        except Skipped:
            self._record(engine, "SKIPPED")
            return None
        except Exception as exc:
            failure = self._failure(exc, "StreamControl")
            self._record(engine, failure.status.name)
            return pb.ActionChunk(
                request_id=request.request_id,
                observation_timestamp=request.timestamp,
                model_name=engine.model_info.name,
                error=pb.StreamError(code=failure.status.value[0], message=failure.message),
            )
        return self._answer(
            engine, observation, prepared, done, arrival, engine.take_skipped(session), latency
        )

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            engine = self._engine()
        except _Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise
        return codec.model_info_message(engine.model_info, self.settings)

    async def HealthCheck(self, request: Any, context: grpc.aio.ServicerContext) -> pb.HealthStatus:
        engine = self._engine_ref()
        reading = self._gpu.read()
        return pb.HealthStatus(
            ready=self.state.phase == ServerState.SERVING,
            gpu_utilization=reading.utilization_percent if reading else 0.0,
            uptime_seconds=time.monotonic() - self.state.started,
            queue_depth=engine.queue_depth if engine else 0,
            state=self.state.phase,
            model_name=engine.model_info.name if engine and self.state.phase != ServerState.LOADING else "",
            gpu_memory_used_bytes=reading.memory_used_bytes if reading else 0,
            gpu_memory_total_bytes=reading.memory_total_bytes if reading else 0,
            requests_in_flight=engine.in_flight if engine else 0,
            active_streams=engine.sessions if engine else 0,
        )


async def _abort(context: grpc.aio.ServicerContext, failure: _Failure) -> None:
    """context.abort, quiet when the call already ended (client deadline or cancel won the race):
    gRPC would log that as an error with a traceback; it is an ordinary cancellation."""
    try:
        await context.abort(failure.status, failure.message)
    except grpc.aio.AbortError:
        raise
    except Exception:
        if not context.done():
            raise
        raise asyncio.CancelledError() from None


async def _commit(context: grpc.aio.ServicerContext) -> None:
    """Send the response headers now that the request is admitted, before any model work.

    gRPC's retry policy only retries a call whose headers the client has not received, so this
    draws the line for clients: UNAVAILABLE without headers (loading, draining, connection
    refused) was never run and is retried on another replica; once headers arrived the call may
    have executed and a later failure (e.g. the replica died) is never retried."""
    try:
        await context.send_initial_metadata(())
    except grpc.aio.UsageError:
        raise
    except Exception:
        # gRPC could not send them: the call ended under us (the client cancelled, its deadline
        # passed, or the connection went), perhaps before the context says so. An ordinary cancel.
        raise asyncio.CancelledError() from None


def _refused_by_drain(chunk: pb.ActionChunk) -> bool:
    return chunk.HasField("error") and chunk.error.code == grpc.StatusCode.UNAVAILABLE.value[0]


class _DrainSignal:
    """Put into a stream's answer queue when the server starts draining."""


_DRAIN = _DrainSignal()


class _RateLimiter:
    """Token bucket per stream: a burst of one second's worth, refilled at `rate_hz`."""

    def __init__(self, rate_hz: float) -> None:
        self.rate = rate_hz
        self.tokens = max(1.0, rate_hz)
        self.last = time.monotonic()

    def allow(self) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
