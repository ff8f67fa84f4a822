"""How a request ended, whatever the wire: the status a client is told and the counting of it.

Both transports (gRPC in servicer.py, openpi's websocket protocol in openpi.py) turn an exception
into an `Outcome` with `classify` and count every request once with `record`, so the metrics and
the messages a robot engineer reads are the same on either. Clients never see a traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vla_inference.engine import EngineError, InferenceEngine
from vla_inference.models.base import InvalidObservation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """A failed request: a gRPC status name (INVALID_ARGUMENT, UNAVAILABLE, ...) and one line."""

    status: str
    message: str


class Unavailable(Exception):
    """The server cannot take requests yet (the model is loading)."""


def classify(exc: BaseException, where: str) -> Outcome:
    """The status and message for a request that raised `exc`; unexpected errors are logged here."""
    if isinstance(exc, InvalidObservation):
        return Outcome("INVALID_ARGUMENT", f"invalid observation: {exc}")
    if isinstance(exc, Unavailable):
        return Outcome("UNAVAILABLE", str(exc))
    if isinstance(exc, EngineError):
        return Outcome(exc.status, exc.message)
    log.exception("unexpected error in %s", where)
    return Outcome("INTERNAL", f"internal error ({type(exc).__name__}); see server log")


def record(engine: InferenceEngine | None, status: str, embodiment: str = "", seconds: float = 0.0) -> None:
    """Count one request's outcome in vla_inference_requests_total (and its latency when OK)."""
    if engine is None:
        return
    metrics = engine.metrics
    metrics.count(status)
    if status == "OK":
        metrics.inference_latency.labels(
            model=metrics.model_name, embodiment=embodiment or "default"
        ).observe(seconds)
