"""Why the engine could not answer a request: the engine's own kinds. engine/outcome.py maps each
to the status a client is told, whatever the transport."""

from __future__ import annotations


class EngineError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class QueueFull(EngineError):
    """More requests in flight than VLA_MAX_QUEUE_SIZE."""


class ResourceExhausted(EngineError):
    """The device ran out of memory even for this request alone."""


class RateLimited(EngineError):
    """A stream sends faster than VLA_MAX_STREAM_RATE_HZ."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it was answered."""


class Draining(EngineError):
    """The server is shutting down."""


class NotServing(EngineError):
    """The server cannot take requests now (the model is loading, or a forward pass hangs)."""


class ModelFailure(EngineError):
    """The model failed on this request (the log has the details)."""


class Skipped(EngineError):
    """A stream observation replaced by a newer one before it reached the model."""
