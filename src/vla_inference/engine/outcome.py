"""How a request ended, whatever the wire: the status a client is told, and the one place it is counted.

`InferenceEngine.submit` ends every request it is given here: `Outcomes.answered` for an answer,
`Outcomes.failed` for anything else (the exception becomes an `Outcome` with `classify`). A
transport turns the `Failed` it receives into its own wire format (a gRPC status, an inline stream
error, openpi's text frame) and never counts. Clients never see a traceback.

`vla_inference_requests_total{model, protocol, status}` counts each request once: OK,
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE, INTERNAL, CANCELLED, or
SKIPPED for stale stream observations (UNAUTHENTICATED is counted where the handshake is refused,
before any request exists); `vla_inference_latency_seconds{model, protocol, embodiment}` times the
answered ones.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from vla_inference.engine import errors
from vla_inference.models.base import InvalidObservation
from vla_inference.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

OK = "OK"
CANCELLED = "CANCELLED"
SKIPPED = "SKIPPED"


@dataclass(frozen=True)
class Outcome:
    """A request that got no answer: a gRPC status name (INVALID_ARGUMENT, UNAVAILABLE, ...) and one line."""

    status: str
    message: str


class Failed(Exception):
    """What `submit` raises for a request that got no answer (already counted): its Outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"{outcome.status}: {outcome.message}")
        self.outcome = outcome


# The engine's kinds of failure -> the status a client is told.
ENGINE_STATUS: dict[type[errors.EngineError], str] = {
    errors.QueueFull: "RESOURCE_EXHAUSTED",
    errors.ResourceExhausted: "RESOURCE_EXHAUSTED",
    errors.RateLimited: "RESOURCE_EXHAUSTED",
    errors.DeadlineExceeded: "DEADLINE_EXCEEDED",
    errors.Draining: "UNAVAILABLE",
    errors.NotServing: "UNAVAILABLE",
    errors.ModelFailure: "INTERNAL",
    errors.Skipped: SKIPPED,
}


def classify(exc: BaseException) -> Outcome:
    """The status and message for a request that raised `exc`; unexpected errors are logged here."""
    if isinstance(exc, InvalidObservation):
        return Outcome("INVALID_ARGUMENT", f"invalid observation: {exc}")
    if isinstance(exc, errors.EngineError):
        return Outcome(ENGINE_STATUS.get(type(exc), "INTERNAL"), exc.message)
    log.error("unexpected error serving a request", exc_info=exc)
    return Outcome("INTERNAL", f"internal error ({type(exc).__name__}); see server log")


class Outcomes:
    """Counts how requests ended, by protocol (grpc, openpi, ...)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def answered(self, protocol: str, embodiment: str, seconds: float) -> None:
        self.metrics.count(OK, protocol)
        self.metrics.inference_latency.labels(
            model=self.metrics.model_id, protocol=protocol, embodiment=embodiment or "default"
        ).observe(seconds)

    def failed(self, protocol: str, exc: BaseException) -> Outcome:
        """Count a request that ended with `exc` (CancelledError: CANCELLED); its outcome."""
        if isinstance(exc, asyncio.CancelledError):
            outcome = Outcome(CANCELLED, "the call was cancelled")
        else:
            outcome = classify(exc)
        self.metrics.count(outcome.status, protocol)
        return outcome
