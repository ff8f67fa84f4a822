"""Real-time chunking on the server side: what a stream remembers, and the prefix of a request.

A StreamControl session remembers the chunks it was sent (ChunkMemory: the last few, at the model's
full horizon in its own normalised units) and how long its recent requests took; its
StreamSession (engine/session.py) owns that memory. An observation
with `rtc` set becomes a models.rtc.Prefix here: the previous chunk (remembered, or sent in robot
units and normalised by the model), the executed count, the delay d (given, or estimated from the
stream's latency and the robot's control rate) and the method (given, or VLA_RTC_METHOD).
The math lives in models/rtc.py; the sampling in each flow-matching family.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vla_inference.config import Settings
from vla_inference.models import rtc
from vla_inference.models.base import InvalidObservation, VLAModel

CHUNKS_REMEMBERED = 8
LATENCIES_REMEMBERED = 8


@dataclass(frozen=True)
class RtcRequest:
    """Observation.rtc, decoded and checked by the transport."""

    method: str  # "" = the server's default
    executed: int
    delay: int | None  # None = estimate (stream) or 0 (Predict)
    control_hz: float
    previous_request_id: str
    previous_actions: np.ndarray | None  # (N, action_dim) robot units, or None
    max_guidance: float  # 0 = the server's default


@dataclass(frozen=True)
class Applied:
    """What was done, echoed in ActionChunk.rtc."""

    method: str
    delay: int
    overlap: int
    delay_estimated: bool


class StreamMemory(Protocol):
    """What a request's prefix reads of its stream (engine/session.py: StreamSession)."""

    def chunk(self, request_id: str) -> np.ndarray | None: ...

    def estimate_delay(self, control_hz: float) -> int: ...


class ChunkMemory:
    """One stream's recent chunks (by request id) and server-side latencies. Not thread-safe: its
    StreamSession calls it under the session's lock."""

    def __init__(self) -> None:
        self._chunks: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCIES_REMEMBERED)
        self._last: str | None = None

    def remember(self, request_id: str, chunk: np.ndarray | None, latency_s: float) -> None:
        self._latencies.append(latency_s)
        if chunk is None:
            return
        self._chunks[request_id] = chunk
        self._chunks.move_to_end(request_id)
        self._last = request_id
        while len(self._chunks) > CHUNKS_REMEMBERED:
            self._chunks.popitem(last=False)

    def chunk(self, request_id: str) -> np.ndarray | None:
        """The chunk answering `request_id`, or the last one sent when it is empty."""
        if not request_id:
            return self._chunks.get(self._last) if self._last is not None else None
        if request_id not in self._chunks:
            raise InvalidObservation(
                "rtc.previous_request_id",
                f"no chunk answered request {request_id!r} on this stream (the server keeps the last "
                f"{CHUNKS_REMEMBERED}); send the request_id of a recent observation, or leave it empty",
            )
        return self._chunks[request_id]

    def estimate_delay(self, control_hz: float) -> int:
        """ceil(latency x rate) with the slowest of the recent requests: a delay guessed short
        leaves the robot executing actions the new chunk did not keep; one guessed long costs little."""
        if control_hz <= 0 or not self._latencies:
            return 0
        return math.ceil(max(self._latencies) * control_hz - 1e-9)


def default_method(supported: tuple[str, ...], settings: Settings) -> str:
    """VLA_RTC_METHOD where the model supports it, else none."""
    return settings.rtc_method if settings.rtc_method in supported else rtc.NONE


def resolve(
    request: RtcRequest,
    model: VLAModel,
    embodiment: str,
    settings: Settings,
    memory: StreamMemory | None,
) -> tuple[rtc.Prefix | None, Applied]:
    """The prefix for one request (None when there is nothing to continue) and the account of it."""
    info = model.model_info
    method = request.method or default_method(info.rtc_methods, settings)
    if method != rtc.NONE and method not in info.rtc_methods:
        raise InvalidObservation(
            "rtc.method",
            f"{info.family} does not support real-time chunking ({method!r}): it predicts "
            + ("one action at a time" if info.family == "openvla" else "no chunks to inpaint")
            + "; send method NONE or leave rtc unset",
        )
    previous: np.ndarray | None = None
    if request.previous_actions is not None:
        previous = model.normalize_actions(request.previous_actions, embodiment)
    elif memory is not None:
        previous = memory.chunk(request.previous_request_id)
    estimated = request.delay is None and memory is not None
    if request.delay is not None:
        delay = request.delay
    else:
        delay = memory.estimate_delay(request.control_hz) if memory is not None else 0
    if method == rtc.NONE or previous is None:
        return None, Applied(rtc.NONE, 0, 0, estimated)
    beta = request.max_guidance or settings.rtc_max_guidance
    prefix = rtc.build_prefix(
        previous,
        request.executed,
        delay,
        info.horizon,
        method,
        beta,
        settings.rtc_schedule,
        settings.rtc_guidance_jacobian,
    )
    if prefix.overlap == 0:
        return None, Applied(rtc.NONE, 0, 0, estimated)
    return prefix, Applied(method, prefix.delay, prefix.overlap, estimated)
