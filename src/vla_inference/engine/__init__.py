"""The inference engine: admission, dynamic batching, deadlines, stream sessions, the model worker."""

from vla_inference.engine.errors import (
    DeadlineExceeded,
    Draining,
    EngineError,
    ModelFailure,
    QueueFull,
    ResourceExhausted,
    Skipped,
)
from vla_inference.engine.scheduler import Completed, InferenceEngine, StreamSession

__all__ = [
    "Completed",
    "DeadlineExceeded",
    "Draining",
    "EngineError",
    "InferenceEngine",
    "ModelFailure",
    "QueueFull",
    "ResourceExhausted",
    "Skipped",
    "StreamSession",
]
