"""Why the engine could not answer a request. The transport maps each to a gRPC status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class; `status` is the gRPC status name the transport answers with."""

    status = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class QueueFull(EngineError):
    status = "RESOURCE_EXHAUSTED"


class ResourceExhausted(EngineError):
    """The device ran out of memory even for this request alone."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(EngineError):
    status = "DEADLINE_EXCEEDED"


class Draining(EngineError):
    status = "UNAVAILABLE"


class ModelFailure(EngineError):
    status = "INTERNAL"


class Skipped(EngineError):
    """A stream observation replaced by a newer one before it reached the model."""

    status = "SKIPPED"
