"""The VLAInference handlers: each request goes through the engine's one entry, `submit`.

The gRPC transport's own parts: its decode step (transport/codec.py), the deadline, the response
headers, the stream's answer order and its drain, and the status of each outcome. The engine
counts every request's outcome in `vla_inference_requests_total{protocol="grpc"}`. Clients never
see a traceback.

UNAVAILABLE is a refusal before any model work (loading, draining) and comes without response
headers; an admitted call gets its headers at once (`_commit`, the engine's `on_admitted`), so
clients' retry policies (vla_inference.channels) retry refusals on another replica and never a
call that may have run. A stream open when the drain begins answers the observations it already
read, then ends UNAVAILABLE; the client reopens it elsewhere (vla_inference.client.ControlSession).
"""

from __future__ import annotations

import asyncio
import functools
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
    Answer,
    Failed,
    InferenceEngine,
    NotServing,
    Outcome,
    Skipped,
    StreamSession,
)
from vla_inference.telemetry.gpu import GpuMonitor
from vla_inference.transport import codec

log = logging.getLogger(__name__)

PROTOCOL = "grpc"
LOADING_MESSAGE = "the model is still loading; retry when health reports SERVING"
DRAINING_MESSAGE = "server is shutting down; retry on another replica"
STREAM_DRAINED_MESSAGE = (
    "this replica is shutting down: the stream ends here; reopen it (another replica serves it, "
    "with fresh stream state)"
)


@dataclass(frozen=True)
class _Reply:
    """One stream answer: the chunk, and the engine's Answer when it is not an error."""

    chunk: pb.ActionChunk
    answer: Answer | None = None

    def sent(self, session: StreamSession) -> None:
        """The chunk was written to the client: its session remembers it (real-time chunking)."""
        if self.answer is not None:
            session.sent(
                self.chunk.request_id, self.answer.prediction.model_actions, self.answer.timing.total_s
            )


class ServerState:
    """What the server is doing; shared by the handlers, the health services and the server."""

    LOADING = "LOADING"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    DRAINING = "DRAINING"

    def __init__(self) -> None:
        self.phase = self.LOADING
        self.started = time.monotonic()
        self.protocol_ports: dict[str, int] = {}  # the front doors that are on (ModelInfo.protocol_ports)
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
        """The engine, or NotServing while loading or draining: a refusal before any model work."""
        engine = self._engine_ref()
        if engine is None or self.state.phase == ServerState.LOADING:
            raise NotServing(LOADING_MESSAGE)
        if self.state.phase == ServerState.DRAINING:
            raise NotServing(DRAINING_MESSAGE)
        return engine

    def _deadline(self, context: grpc.aio.ServicerContext, arrival: float) -> tuple[float, str]:
        """The call's deadline (monotonic) and how it was chosen, for error messages."""
        remaining = context.time_remaining()
        default = self.settings.timeout_ms / 1000
        if remaining is not None and remaining < default:
            return arrival + max(0.0, remaining), f"client deadline {remaining * 1000:.0f} ms"
        return arrival + default, f"VLA_TIMEOUT_MS={self.settings.timeout_ms}"

    def _decode(
        self, engine: InferenceEngine, request: pb.Observation | codec.MalformedMessage
    ) -> functools.partial[Any]:
        """The request's decode step, for the engine's preprocessing pool."""
        return functools.partial(codec.decode, request, self.settings, engine.model_info)

    # --- RPCs -----------------------------------------------------------------------------------
    async def Predict(
        self, request: pb.Observation | codec.MalformedMessage, context: grpc.aio.ServicerContext
    ) -> pb.ActionChunk:
        arrival = time.monotonic()
        try:
            engine = self._engine()
        except NotServing as refusal:
            loaded = self._engine_ref()
            if loaded is not None:  # draining (counted; while loading there is no engine to count in)
                loaded.refused(PROTOCOL, refusal)
            await context.abort(grpc.StatusCode.UNAVAILABLE, refusal.message)
            raise
        deadline, budget = self._deadline(context, arrival)
        try:
            answer = await engine.submit(
                self._decode(engine, request),
                deadline,
                protocol=PROTOCOL,
                request_id=request.request_id,
                on_admitted=lambda: _commit(context),
            )
        except Failed as failed:
            outcome = failed.outcome
            if outcome.status == "DEADLINE_EXCEEDED":
                outcome = Outcome(outcome.status, f"{outcome.message} ({budget})")
            await _abort(context, outcome)
            raise AssertionError("unreachable") from None  # abort raises
        return codec.action_chunk(request, answer, engine.model_info.name)

    async def StreamControl(
        self,
        request_iterator: AsyncIterator[pb.Observation | codec.MalformedMessage],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ActionChunk]:
        try:
            engine = self._engine()
        except NotServing as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
            return
        await _commit(context)
        answers: asyncio.Queue[asyncio.Task[_Reply | None] | _DrainSignal | None] = asyncio.Queue()
        tasks: set[asyncio.Task[Any]] = set()
        unregister = self.state.on_drain(lambda: answers.put_nowait(_DRAIN))
        with engine.stream() as session:

            async def read() -> None:
                try:
                    async for request in request_iterator:
                        step = asyncio.create_task(self._stream_step(engine, request, session))
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
                                reply = await pending
                                if reply is not None and not _refused_by_drain(reply.chunk):
                                    yield reply.chunk
                                    reply.sent(session)
                        await context.abort(grpc.StatusCode.UNAVAILABLE, STREAM_DRAINED_MESSAGE)
                        return
                    reply = await step
                    if reply is not None:
                        yield reply.chunk
                        reply.sent(session)
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
    ) -> _Reply | None:
        """One observation of a stream; its answer carries a failure inline. None: a newer
        observation overtook it before it reached the model (the session's rules)."""
        try:
            answer = await engine.submit(
                self._decode(engine, request),
                time.monotonic() + self.settings.timeout_ms / 1000,
                protocol=PROTOCOL,
                request_id=request.request_id,
                session=session,
            )
        except Skipped:
            return None
        except Failed as failed:
            return _Reply(
                pb.ActionChunk(
                    request_id=request.request_id,
                    observation_timestamp=request.timestamp,
                    model_name=engine.model_info.name,
                    error=pb.StreamError(
                        code=_status(failed.outcome).value[0], message=failed.outcome.message
                    ),
                )
            )
        return _Reply(codec.action_chunk(request, answer, engine.model_info.name), answer)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            engine = self._engine()
        except NotServing as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
            raise
        return codec.model_info_message(engine.model_info, self.settings, self.state.protocol_ports)

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


def _status(outcome: Outcome) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, outcome.status, grpc.StatusCode.INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, outcome: Outcome) -> None:
    """context.abort, quiet when the call already ended (client deadline or cancel won the race):
    gRPC would log that as an error with a traceback; it is an ordinary cancellation."""
    try:
        await context.abort(_status(outcome), outcome.message)
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
