"""One StreamControl stream's state, owned by one object and changed only through its methods.

Three threads touch a stream: the event loop (observations arrive, answers leave), a
preprocessing thread (the real-time chunking prefix reads the chunk memory) and the model thread
(the queue). Each method takes the session's one lock, so the rules below hold whichever thread
calls; none calls out of the session while holding it. The model thread calls `offer` and
`dequeued` while holding its own queue lock (always in that order: queue lock, then session lock).

One observation's life on its stream (`seq` = order of arrival):

    allow() ── over VLA_MAX_STREAM_RATE_HZ ───────────────────────────────────────► RATE_LIMITED
       │ observe() -> seq
       ▼
    ARRIVED ── decode / preprocessing fails ───────────────────────────────────────► FAILED
       │ offer(item)               [preprocessing done: it asks for the model queue]
       ├── older than the newest observation queued ────────────────────────────────► SKIPPED
       ▼
    QUEUED (the session's one pending item)
       ├── a newer one is offered: it takes the place ───────────────────────────────► SKIPPED
       ├── expires or is cancelled; the model thread drops it (dequeued) ─────────────► (gone)
       │ dequeued(item)            [the model thread put it in a batch]
       ▼
    RUNNING
       │ answer(seq)               [its answer reaches the loop]
       ├── older than an observation already answered ───────────────────────────────► SKIPPED
       ▼
    ANSWERED (carries the request ids skipped since the previous answer)
       │ sent(request_id, ...)     [the transport wrote it to the client]
       ▼
    SENT (its chunk is in the chunk memory: the next real-time chunking request continues it)

    SKIPPED: skipped(request_id), called once per skipped observation by the engine where it
    counts the outcome, lists the id once, in the next answer's skipped_request_ids.

The rules: the newest observation wins (a newer observation replaces a queued older one; one older
than an observation already queued is never queued); a skipped observation is counted and listed
once; an answer never goes to a sequence number older than one already answered; the chunk memory
changes only from answers actually sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from vla_inference.engine.errors import RateLimited, Skipped
from vla_inference.engine.realtime import ChunkMemory
from vla_inference.engine.request import Notices


class Queued(Protocol):
    """What the session knows of a queued request (engine/model_thread.py: WorkItem)."""

    seq: int

    @property
    def live(self) -> bool: ...  # not yet answered, expired or cancelled


class StreamSession:
    """One stream's ordering, skipped observations, chunk memory and rate (see the module docstring)."""

    def __init__(self, max_rate_hz: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._arrivals = 0  # observations received: the last sequence number given
        self._latest_queued = 0  # the sequence number of the newest observation queued
        self._latest_answered = 0
        self._pending: Queued | None = None  # the observation in the model queue, if any
        self._skipped: list[str] = []  # request ids skipped since the last answer
        self._memory = ChunkMemory()
        self._rate = max_rate_hz
        self._clock = clock
        self._tokens = max(1.0, max_rate_hz)  # token bucket: a burst of one second's worth
        self._refilled = clock()
        self.notices = Notices("stream")  # warnings logged once per stream

    # --- the event loop: arrival ------------------------------------------------------------------
    def allow(self) -> None:
        """Take one observation's token; RateLimited when the stream sends faster than its rate."""
        if self._rate <= 0:
            return
        with self._lock:
            now = self._clock()
            burst = max(1.0, self._rate)
            self._tokens = min(burst, self._tokens + (now - self._refilled) * self._rate)
            self._refilled = now
            if self._tokens < 1.0:
                raise RateLimited(f"stream sends faster than VLA_MAX_STREAM_RATE_HZ={self._rate:g}")
            self._tokens -= 1.0

    def observe(self) -> int:
        """A new observation arrived: its sequence number."""
        with self._lock:
            self._arrivals += 1
            return self._arrivals

    # --- the model thread: the queue --------------------------------------------------------------
    def offer(self, item: Queued) -> tuple[bool, Queued | None]:
        """Newest wins: (queue `item`?, the live older item it replaces, which the caller skips).
        False: an observation newer than `item` is already queued; the caller skips `item`."""
        with self._lock:
            if item.seq < self._latest_queued:
                return False, None
            replaced = self._pending if self._pending is not None and self._pending.live else None
            self._pending = item
            self._latest_queued = item.seq
            return True, replaced

    def dequeued(self, item: Queued) -> None:
        """`item` left the model queue (into a batch, or dropped as expired or cancelled)."""
        with self._lock:
            if self._pending is item:
                self._pending = None

    # --- the event loop: outcomes -----------------------------------------------------------------
    def skipped(self, request_id: str) -> None:
        """An observation ended skipped: list it in the next answer."""
        with self._lock:
            self._skipped.append(request_id)

    def answer(self, seq: int) -> tuple[str, ...]:
        """The answer to observation `seq` is ready: the request ids to list as skipped in it.
        Skipped when an answer to a newer observation was already given."""
        with self._lock:
            if seq < self._latest_answered:
                raise Skipped("an answer to a newer observation was already given")
            self._latest_answered = seq
            skipped, self._skipped = tuple(self._skipped), []
            return skipped

    def sent(self, request_id: str, chunk: np.ndarray | None, latency_s: float) -> None:
        """The answer to `request_id` reached the client: remember its chunk (model units, full
        horizon; None for models without chunks) and its latency, for real-time chunking."""
        with self._lock:
            self._memory.remember(request_id, chunk, latency_s)

    # --- a preprocessing thread: real-time chunking (engine/realtime.py StreamMemory) ---------------
    def chunk(self, request_id: str) -> np.ndarray | None:
        """The chunk sent in answer to `request_id` (the last one sent when empty)."""
        with self._lock:
            return self._memory.chunk(request_id)

    def estimate_delay(self, control_hz: float) -> int:
        with self._lock:
            return self._memory.estimate_delay(control_hz)

    # --- for tests and gauges (a snapshot) --------------------------------------------------------
    @property
    def pending(self) -> Queued | None:
        with self._lock:
            return self._pending
