"""What a transport hands the engine (a decode step) and what it gets back (an Answer).

Every transport serves a request the same way (engine/scheduler.py, `InferenceEngine.submit`):

    answer = await engine.submit(decode, deadline, protocol="grpc", request_id=..., session=...)

`decode` is the transport's own CPU-side part: its message -> `Decoded` (checks that name the
transport's fields, image decoding, layout mapping). The engine runs it in the preprocessing pool,
then the instruction rule, `model.prepare` and the real-time chunking prefix, queues the sample on
the model thread and returns the Answer, or raises `Failed` (engine/outcome.py).

A transport adds only what is its own: the decode step, the deadline, its protocol label, and how
an Answer or an Outcome goes on its wire. One whose message carries several samples (GR00T's
ZeroMQ `get_action` with a batch axis) submits each sample with its own decode step and gathers
the answers: each sample is then batched, counted and answered like any other request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vla_inference.engine.realtime import Applied, RtcRequest
from vla_inference.models.base import ActionPrediction, Observation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoded:
    """A transport's message as the engine takes it."""

    observation: Observation
    rtc: RtcRequest | None = None  # real-time chunking, when the message asks for it
    # The instruction's name in the transport's message, for the error that names it.
    instruction_field: str = "language_instruction"


Decode = Callable[[], Decoded]


@dataclass(frozen=True)
class Timing:
    """Where a request's time went (seconds), as the answers report it."""

    decode_s: float  # the transport's decode step
    preprocess_s: float  # model.prepare and the real-time chunking prefix
    queue_s: float
    model_s: float  # the batch's forward pass
    postprocess_s: float
    total_s: float  # arrival (submit) to answer
    batch_size: int


@dataclass(frozen=True)
class Answer:
    """A request's answer."""

    prediction: ActionPrediction
    embodiment: str  # the embodiment the model resolved
    timing: Timing
    rtc: Applied | None = None  # what real-time chunking did, when it was asked for
    skipped: tuple[str, ...] = ()  # stream: request ids skipped since the previous answer


class Notices:
    """Warnings logged once per scope (a stream, a connection, the process); thread-safe."""

    def __init__(self, scope: str) -> None:
        self.scope = scope  # what "once" is per, for the log line
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        log.warning(message, *args)
