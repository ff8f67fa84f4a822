"""Why the engine could not answer a request: the engine's own kinds. The transport maps each to
its status (transport/servicer.py)."""

from __future__ import annotations


class EngineError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class QueueFull(EngineError):
    """More requests in flight than VLA_MAX_QUEUE_SIZE."""


class ResourceExhausted(EngineError):
    """The device ran out of memory even for this request alone."""


class DeadlineExceeded(EngineError):
    """The request's deadline passed before it was answered."""


class Draining(EngineError):
    """The server is shutting down."""


class ModelFailure(EngineError):
    """The model failed on this request (the log has the details)."""


class Skipped(EngineError):
    """A stream observation replaced by a newer one before it reached the model."""
