"""The inference engine: admission, the one request path, stream sessions, the model worker."""

from vla_inference.engine.errors import (
    DeadlineExceeded,
    Draining,
    EngineError,
    ModelFailure,
    NotServing,
    QueueFull,
    RateLimited,
    ResourceExhausted,
    Skipped,
)
from vla_inference.engine.outcome import Failed, Outcome
from vla_inference.engine.request import Answer, Decode, Decoded, Notices, Timing
from vla_inference.engine.scheduler import InferenceEngine
from vla_inference.engine.session import StreamSession

__all__ = [
    "Answer",
    "DeadlineExceeded",
    "Decode",
    "Decoded",
    "Draining",
    "EngineError",
    "Failed",
    "InferenceEngine",
    "ModelFailure",
    "NotServing",
    "Notices",
    "Outcome",
    "QueueFull",
    "RateLimited",
    "ResourceExhausted",
    "Skipped",
    "StreamSession",
    "Timing",
]
