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

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vla_inference.engine.errors import RateLimited, Skipped
from vla_inference.engine.realtime import ChunkMemory
from vla_inference.engine.request import Notices
from vla_inference.models.base import ModelDescription, Observation


@dataclass(frozen=True)
class HistorySpec:
    """What a model reads of earlier steps, per embodiment (ModelDescription)."""

    images: Mapping[str, tuple[int, ...]]  # embodiment -> offsets (< 0) whose frames it reads
    joints: Mapping[str, tuple[int, ...]]  # embodiment -> offsets whose joint positions it reads
    default: str  # the embodiment of an observation without a tag

    @classmethod
    def of(cls, info: ModelDescription) -> HistorySpec | None:
        """The model's history, or None when it reads none."""
        if not any(info.image_history.values()) and not any(info.state_history.values()):
            return None
        return cls(dict(info.image_history), dict(info.state_history), info.default_embodiment)

    @property
    def depth(self) -> int:
        """Observations to keep: the largest |offset|."""
        return max(-o for offsets in (*self.images.values(), *self.joints.values()) for o in offsets)


@dataclass(frozen=True)
class _Step:
    """What the stream keeps of one observation."""

    images: Mapping[str, np.ndarray] | None  # None: the model reads no frame history
    joints: np.ndarray | None


class Queued(Protocol):
    """What the session knows of a queued request (engine/model_thread.py: WorkItem)."""

    seq: int

    @property
    def live(self) -> bool: ...  # not yet answered, expired or cancelled


class StreamSession:
    """One stream's ordering, skipped observations, chunk memory and rate (see the module docstring)."""

    def __init__(
        self,
        max_rate_hz: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        history: HistorySpec | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._resolved_cv = threading.Condition(self._lock)
        self._history = history
        self._steps: dict[int, _Step] = {}  # seq -> what the history keeps of it
        self._first: _Step | None = None  # the stream's first observation (stands in before it)
        self._resolved = 0  # every seq <= this one was filled or abandoned
        self._resolved_later: set[int] = set()
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

    # --- a preprocessing thread: history -----------------------------------------------------------------
    def fill(self, seq: int, observation: Observation, deadline: float | None = None) -> Observation:
        """Observation `seq` with the earlier steps its embodiment reads filled from the stream (what
        it sends itself wins), remembered for the later ones (see the module docstring). Waits until
        every earlier observation was filled or abandoned, at the latest until `deadline`
        (time.monotonic())."""
        spec = self._history
        if spec is None:
            return observation
        tag = observation.embodiment.strip() or spec.default
        wanted_images = [o for o in spec.images.get(tag, ()) if o not in observation.past_images]
        wanted_joints = [o for o in spec.joints.get(tag, ()) if o not in observation.past_joint_positions]
        own = _Step(
            images=dict(observation.images) if any(spec.images.values()) else None,
            joints=np.asarray(observation.joint_positions) if any(spec.joints.values()) else None,
        )
        with self._resolved_cv:
            while self._resolved < seq - 1:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break  # an earlier observation never came back (shutdown): use what is there
                self._resolved_cv.wait(remaining)
            past_images = dict(observation.past_images)
            past_joints = dict(observation.past_joint_positions)
            for offset in wanted_images:
                step = self._step_at(seq + offset, own)
                if step.images is not None:
                    past_images[offset] = step.images
            for offset in wanted_joints:
                step = self._step_at(seq + offset, own)
                if step.joints is not None:
                    past_joints[offset] = step.joints
            self._remember(seq, own, spec.depth)
        if not wanted_images and not wanted_joints:
            return observation
        return dataclasses.replace(observation, past_images=past_images, past_joint_positions=past_joints)

    def abandon(self, seq: int) -> None:
        """Observation `seq` will never be filled (its decoding failed): later ones stop waiting for it."""
        if self._history is None:
            return
        with self._resolved_cv:
            self._resolve(seq)

    def _step_at(self, target: int, own: _Step) -> _Step:
        """The kept observation at seq `target`, else the newest kept before it, else the stream's
        first (before k observations came), else the observation itself. Under the lock."""
        earlier = [s for s in self._steps if s <= target]
        if earlier:
            return self._steps[max(earlier)]
        return self._first if self._first is not None else own

    def _remember(self, seq: int, step: _Step, depth: int) -> None:
        """Keep `step`, drop what no later observation can read, mark seq resolved. Under the lock."""
        if self._first is None:
            self._first = step
        self._steps[seq] = step
        for old in [s for s in self._steps if s < seq - depth]:
            del self._steps[old]
        self._resolve(seq)

    def _resolve(self, seq: int) -> None:
        self._resolved_later.add(seq)
        while self._resolved + 1 in self._resolved_later:
            self._resolved += 1
            self._resolved_later.discard(self._resolved)
        self._resolved_cv.notify_all()

    # --- for tests and gauges (a snapshot) --------------------------------------------------------
    @property
    def pending(self) -> Queued | None:
        with self._lock:
            return self._pending

    @property
    def kept(self) -> tuple[int, ...]:
        """The sequence numbers whose frames / joint positions the history keeps."""
        with self._lock:
            return tuple(sorted(self._steps))
