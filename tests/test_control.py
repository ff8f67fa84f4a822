"""The robot-side chunk queue, and the real-time controller against a real server."""

from __future__ import annotations

import numpy as np
import pytest

from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.client import make_observation
from vla_inference.control import ChunkQueue, RealtimeController, delay_for

IMAGE = np.zeros((32, 32, 3), np.uint8)


def _chunk(start: float, n: int = 10) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None].repeat(2, axis=1)


def test_queue_swaps_in_the_new_chunk_at_the_delay() -> None:
    queue = ChunkQueue(execute_horizon=4, method="guided", control_hz=50.0)
    assert queue.needs_chunk() and queue.rtc_fields().executed_actions == 0
    assert not queue.rtc_fields().HasField("delay_actions")  # nothing measured yet: the server estimates
    assert queue.next_action() is None and queue.stalls == 1  # nothing to execute yet
    queue.on_chunk(_chunk(0), "a", elapsed_ticks=1)
    executed = [queue.next_action()[0] for _ in range(3)]  # type: ignore[index]
    assert executed == [1.0, 2.0, 3.0] and queue.needs_chunk()  # index 4 reached: ask again
    fields = queue.rtc_fields()
    assert fields.executed_actions == 4 and fields.previous_request_id == "a"
    assert (
        fields.method == pb.RTC_METHOD_GUIDED and fields.delay_actions == 1 and fields.control_rate_hz == 50
    )
    # two ticks pass before the answer: the old chunk goes on, then the new one starts at index 2
    assert [queue.next_action()[0] for _ in range(2)] == [4.0, 5.0]  # type: ignore[index]
    queue.on_chunk(_chunk(100), "b", elapsed_ticks=2)
    assert queue.next_action()[0] == 102.0  # type: ignore[index]
    assert queue.expected_delay() == 2 and queue.rtc_fields().delay_actions == 2
    # For a server that does not know chunk "b" (a stream reopened elsewhere): the chunk itself.
    stateless = queue.rtc_fields(stateless=True)
    assert stateless.previous_request_id == "" and stateless.executed_actions == 3
    assert [a.joint_commands[0] for a in stateless.previous_actions] == list(_chunk(100)[:, 0])


def test_queue_stalls_when_the_chunk_runs_out() -> None:
    queue = ChunkQueue(execute_horizon=8, delay_steps=3)
    queue.on_chunk(_chunk(0, n=2), "a", elapsed_ticks=0)
    assert queue.needs_chunk() is False
    assert [a is None for a in (queue.next_action(), queue.next_action(), queue.next_action())] == [
        False,
        False,
        True,
    ]
    assert queue.stalls == 1 and queue.needs_chunk()
    assert queue.rtc_fields().delay_actions == 3  # the fixed delay wins over measurements


def test_bad_queue_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="execute_horizon"):
        ChunkQueue(0)
    with pytest.raises(ValueError, match="method"):
        ChunkQueue(4, method="soft")
    assert delay_for(0.021, 100.0) == 3 and delay_for(0.02, 100.0) == 2 and delay_for(5.0, 0.0) == 0


def test_realtime_controller_drives_a_robot_against_a_server(server_factory) -> None:  # type: ignore[no-untyped-def]
    running = server_factory(chunk_size=50)
    executed: list[np.ndarray | None] = []
    counter = iter(range(10**6))

    def capture() -> pb.Observation:
        return make_observation(IMAGE, [0.0] * 7, "pick up the cup", request_id=f"r{next(counter)}", seed=1)

    with running.client() as client, client.control() as session:
        queue = ChunkQueue(execute_horizon=8, method="hard", control_hz=20.0)
        RealtimeController(session, queue, capture, executed.append).run(seconds=2.0)
    actions = [a for a in executed if a is not None]
    assert 35 <= len(executed) <= 41  # a tick every 50 ms
    assert len(actions) > 0.5 * len(executed)  # moving while the server computes, not stalled
    assert all(a.shape == (7,) for a in actions)
    assert queue.stalls == sum(a is None for a in executed)
