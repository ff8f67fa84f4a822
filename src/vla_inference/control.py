"""The robot's side of chunked control with real-time chunking: an action queue and a control loop.

    from vla_inference.client import VLAClient
    from vla_inference.control import ChunkQueue, RealtimeController

    with VLAClient("gpu-host:50051") as client, client.control() as session:
        queue = ChunkQueue(execute_horizon=8, method="guided", control_hz=50)
        RealtimeController(session, queue, capture=robot.observe, execute=robot.act).run(seconds=60)

ChunkQueue keeps no clock: the robot calls `next_action()` once per control tick. It asks for a
new chunk (`needs_chunk()`) when `execute_horizon` actions of the current one have been executed,
fills the observation's `rtc` fields (how many actions of the current chunk were executed, the
delay d it expects, the chunk it is executing), and when the answer arrives `on_chunk()` swaps in
the new chunk at index d, the number of ticks that passed since the observation was captured, so
the new chunk's first action is never replayed late. Between the request and the answer the robot
keeps executing the current chunk; when it runs out, `next_action()` returns None (a stall: hold
still). The delay the queue announces is the largest of its recent measured ones (or a fixed one).

RealtimeController is the wall-clock loop around it for a real robot: a tick every 1 / control_hz
seconds, requests sent from a background thread so ticks never wait for the network. The
simulated robot (`vla-inference sim --mode realtime`) drives the same ChunkQueue in virtual time.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.client import ControlSession

METHODS = {
    "": pb.RTC_METHOD_UNSPECIFIED,
    "none": pb.RTC_METHOD_NONE,
    "guided": pb.RTC_METHOD_GUIDED,
    "hard": pb.RTC_METHOD_HARD,
}


@dataclass
class _Chunk:
    actions: np.ndarray  # (N, D) robot units
    request_id: str
    position: int = 0  # index of the next action to execute


class ChunkQueue:
    """The action queue of a chunked controller (see the module docstring)."""

    def __init__(
        self,
        execute_horizon: int,
        *,
        method: str = "",
        control_hz: float = 0.0,
        delay_steps: int | None = None,
        max_guidance: float = 0.0,
    ) -> None:
        if execute_horizon < 1:
            raise ValueError("execute_horizon must be at least 1")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(m or repr('') for m in METHODS)}")
        self.execute_horizon = execute_horizon
        self.method = method
        self.control_hz = control_hz
        self.fixed_delay = delay_steps
        self.max_guidance = max_guidance
        self._current: _Chunk | None = None
        self._delays: collections.deque[int] = collections.deque(maxlen=5)
        self.stalls = 0
        self.ticks = 0

    # --- per tick ---------------------------------------------------------------------------------
    def next_action(self) -> np.ndarray | None:
        """The action for this tick, or None when the queue is empty (hold still: a stall)."""
        self.ticks += 1
        chunk = self._current
        if chunk is None or chunk.position >= len(chunk.actions):
            self.stalls += 1
            return None
        chunk.position += 1
        return chunk.actions[chunk.position - 1]

    def needs_chunk(self) -> bool:
        """Time to capture an observation and ask for the next chunk."""
        chunk = self._current
        return chunk is None or chunk.position >= min(self.execute_horizon, len(chunk.actions))

    # --- requests ---------------------------------------------------------------------------------
    def expected_delay(self) -> int:
        if self.fixed_delay is not None:
            return self.fixed_delay
        return max(self._delays) if self._delays else 0

    def rtc_fields(self, *, stateless: bool = False) -> pb.RealTimeChunking:
        """Observation.rtc for an observation captured now.

        stateless: send the current chunk itself (previous_actions) instead of naming it, for a
        server that does not know it (Predict, or a stream just reopened on another replica)."""
        chunk = self._current
        fields = pb.RealTimeChunking(
            method=METHODS[self.method],
            executed_actions=chunk.position if chunk is not None else 0,
            control_rate_hz=self.control_hz,
            previous_request_id=chunk.request_id if chunk is not None and not stateless else "",
            max_guidance=self.max_guidance,
        )
        if chunk is not None and stateless:
            fields.previous_actions.extend(pb.Action(joint_commands=row.tolist()) for row in chunk.actions)
        if chunk is not None and (self.fixed_delay is not None or self._delays):
            fields.delay_actions = self.expected_delay()
        return fields

    def on_chunk(
        self, actions: Sequence[Sequence[float]] | np.ndarray, request_id: str, elapsed_ticks: int
    ) -> None:
        """The chunk answering the observation `request_id`, captured `elapsed_ticks` ticks ago."""
        self._delays.append(elapsed_ticks)
        self._current = _Chunk(np.asarray(actions, np.float32), request_id, min(elapsed_ticks, len(actions)))


class RealtimeController:
    """Wall-clock control loop around a ChunkQueue for a real robot.

    capture() -> pb.Observation (its request_id must be unique per observation); execute(action) with
    an action in robot units, or None to hold still. Requests run on a background thread.
    """

    def __init__(
        self,
        session: ControlSession,
        queue: ChunkQueue,
        capture: Callable[[], pb.Observation],
        execute: Callable[[np.ndarray | None], None],
    ) -> None:
        if queue.control_hz <= 0:
            raise ValueError("a real-time controller needs the queue's control_hz")
        self.session, self.queue, self.capture, self.execute = session, queue, capture, execute
        self._lock = threading.Lock()
        self._in_flight: threading.Thread | None = None
        self._reopens = session.reopens
        self.error: BaseException | None = None

    def _request(self, observation: pb.Observation, captured_tick: int) -> None:
        try:
            chunk = self.session.act(observation)
        except BaseException as exc:  # surfaced by run()
            self.error = exc
            return
        if chunk.HasField("error"):  # this observation was refused: keep executing, ask again
            return
        with self._lock:
            elapsed = self.queue.ticks - captured_tick
            self.queue.on_chunk([a.joint_commands for a in chunk.actions], observation.request_id, elapsed)

    def run(self, seconds: float) -> None:
        period = 1.0 / self.queue.control_hz
        next_tick = time.monotonic()
        end = next_tick + seconds
        while time.monotonic() < end and self.error is None:
            with self._lock:
                if self.queue.needs_chunk() and (self._in_flight is None or not self._in_flight.is_alive()):
                    observation = self.capture()
                    # A stream reopened on another replica starts afresh there: send the chunk itself.
                    moved = self.session.reopens != self._reopens
                    self._reopens = self.session.reopens
                    observation.rtc.CopyFrom(self.queue.rtc_fields(stateless=moved))
                    self._in_flight = threading.Thread(
                        target=self._request, args=(observation, self.queue.ticks), daemon=True
                    )
                    self._in_flight.start()
                action = self.queue.next_action()
            self.execute(action)
            next_tick += period
            time.sleep(max(0.0, next_tick - time.monotonic()))
        if self._in_flight is not None:
            self._in_flight.join(timeout=max(1.0, 10 * period))
        if self.error is not None:
            raise self.error


def delay_for(latency_s: float, control_hz: float) -> int:
    """Control ticks that pass during a request of `latency_s` (the next tick after the answer)."""
    return math.ceil(latency_s * control_hz - 1e-9) if control_hz > 0 else 0
