"""How a request ended, whatever the wire: the status a client is told and the counting of it.

Both transports (gRPC in servicer.py, openpi's websocket protocol in openpi.py) turn an exception
into an `Outcome` with `classify` and count every request once with `record`, so the metrics and
the messages a robot engineer reads are the same on either. Clients never see a traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vla_inference.engine import (
    DeadlineExceeded,
    Draining,
    EngineError,
    InferenceEngine,
    ModelFailure,
    QueueFull,
    ResourceExhausted,
)
from vla_inference.models.base import InvalidObservation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """A failed request: a gRPC status name (INVALID_ARGUMENT, UNAVAILABLE, ...) and one line."""

    status: str
    message: str


class Unavailable(Exception):
    """The server cannot take requests (the model is loading, or the server is draining)."""


class RateLimited(Exception):
    """A stream sends faster than VLA_MAX_STREAM_RATE_HZ."""


# The engine's kinds of failure -> the status a client is told.
ENGINE_STATUS: dict[type[EngineError], str] = {
    QueueFull: "RESOURCE_EXHAUSTED",
    ResourceExhausted: "RESOURCE_EXHAUSTED",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    Draining: "UNAVAILABLE",
    ModelFailure: "INTERNAL",
}


def classify(exc: BaseException, where: str) -> Outcome:
    """The status and message for a request that raised `exc`; unexpected errors are logged here."""
    if isinstance(exc, InvalidObservation):
        return Outcome("INVALID_ARGUMENT", f"invalid observation: {exc}")
    if isinstance(exc, Unavailable):
        return Outcome("UNAVAILABLE", str(exc))
    if isinstance(exc, RateLimited):
        return Outcome("RESOURCE_EXHAUSTED", str(exc))
    if isinstance(exc, EngineError):
        return Outcome(ENGINE_STATUS.get(type(exc), "INTERNAL"), exc.message)
    log.exception("unexpected error in %s", where)
    return Outcome("INTERNAL", f"internal error ({type(exc).__name__}); see server log")


def record(engine: InferenceEngine | None, status: str, embodiment: str = "", seconds: float = 0.0) -> None:
    """Count one request's outcome in vla_inference_requests_total (and its latency when OK)."""
    if engine is not None:
        engine.record(status, embodiment, seconds)
