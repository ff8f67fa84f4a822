"""A stream's history (engine/session.py StreamSession.fill), deterministically: direct calls into a
session, threads ordered by events (no sleeps), and the engine's request path with the
preprocessing pool stepped by hand (tests/test_stream_session.py's rig). Offset -k of observation
seq is observation seq - k of the stream; before k came, the stream's first stands in; what an
observation sends itself wins; an abandoned one is replaced by the newest earlier one; memory keeps
only max |offset| observations, and nothing for a model that reads no history."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_settings
from tests.support.toy_model import ToyPolicy
from tests.test_stream_session import FAR, Rig, with_rig
from vla_inference.engine import Decoded, Failed, StreamSession
from vla_inference.engine.session import HistorySpec
from vla_inference.models.base import InvalidObservation, Observation, PreparedSample

SPEC = HistorySpec(images={"droid": (-3, -1)}, joints={"droid": (-1,)}, default="droid")


def frame(value: int) -> dict[str, np.ndarray]:
    return {"base": np.full((2, 2, 3), value, np.uint8)}


def obs(value: int, embodiment: str = "", **kw: Any) -> Observation:
    return Observation(
        images=frame(value),
        joint_positions=np.full(2, float(value), np.float32),
        instruction="t",
        embodiment=embodiment,
        **kw,
    )


def seen(o: Observation) -> dict[int, int]:
    """offset -> the value of the frame filled in there."""
    return {offset: int(images["base"][0, 0, 0]) for offset, images in o.past_images.items()}


def test_offsets_take_the_observation_that_many_steps_earlier_and_the_first_before_that() -> None:
    session = StreamSession(history=SPEC)
    got = [session.fill(seq, obs(10 * seq)) for seq in range(1, 6)]
    assert seen(got[0]) == {-3: 10, -1: 10}  # the first observation stands in for its own past
    assert seen(got[1]) == {-3: 10, -1: 10}
    assert seen(got[2]) == {-3: 10, -1: 20}
    assert seen(got[3]) == {-3: 10, -1: 30}
    assert seen(got[4]) == {-3: 20, -1: 40}
    assert float(got[4].past_joint_positions[-1][0]) == 40.0
    assert session.kept == (2, 3, 4, 5)  # bounded: the last max |offset| + 1, nothing older


def test_what_the_observation_sends_wins_and_other_embodiments_get_nothing() -> None:
    session = StreamSession(history=SPEC)
    session.fill(1, obs(10))
    sent = session.fill(2, obs(20, past_images={-1: frame(99)}))
    assert seen(sent) == {-1: 99, -3: 10}
    other = session.fill(3, obs(30, embodiment="libero"))  # reads no history: left as it came
    assert seen(other) == {} and other.past_joint_positions == {}
    assert seen(session.fill(4, obs(40))) == {-3: 10, -1: 30}  # it is still remembered


def test_an_abandoned_observation_is_replaced_by_the_newest_earlier_one() -> None:
    session = StreamSession(history=SPEC)
    session.fill(1, obs(10))
    session.fill(2, obs(20))
    session.abandon(3)  # its decoding failed
    assert seen(session.fill(4, obs(40))) == {-3: 10, -1: 20}


def test_fill_waits_for_every_earlier_observation_of_the_stream() -> None:
    """Observation 2 preprocessed before observation 1 still reads observation 1 as its step -1."""
    session = StreamSession(history=SPEC)
    started, result = threading.Event(), {}

    def second() -> None:
        started.set()
        result["o"] = session.fill(2, obs(20), deadline=time.monotonic() + FAR)

    thread = threading.Thread(target=second)
    thread.start()
    started.wait()
    assert "o" not in result  # it cannot finish before observation 1 is filled
    session.fill(1, obs(10))
    thread.join(timeout=FAR)
    assert seen(result["o"]) == {-3: 10, -1: 10}


def test_fill_gives_up_waiting_at_the_deadline() -> None:
    session = StreamSession(history=SPEC)
    late = session.fill(2, obs(20), deadline=time.monotonic() - 1)  # observation 1 never came back
    assert seen(late) == {-3: 20, -1: 20}


def test_a_model_without_history_keeps_nothing() -> None:
    toy = ToyPolicy(make_settings())
    toy.load(None, "cpu")
    assert HistorySpec.of(toy.model_info) is None
    session = StreamSession(history=None)
    observation = obs(1)
    assert session.fill(1, observation) is observation and session.kept == ()
    reads = dataclasses.replace(toy.model_info, image_history={"arm7": (-2,)}, state_history={"arm6": (-5,)})
    spec = HistorySpec.of(reads)
    assert spec == HistorySpec({"arm7": (-2,)}, {"arm6": (-5,)}, "arm7") and spec.depth == 5


class _HistoryToy(ToyPolicy):
    """The toy policy reading the frame 2 steps back and the joints 1 step back (arm7), and
    refusing an observation that lacks them, as GR00T N1.7 does."""

    seen_past: list[tuple[int, float]]

    def load(self, checkpoint_path: str | None, device: str) -> None:
        super().load(checkpoint_path, device)
        self._info = dataclasses.replace(
            self.model_info, image_history={"arm7": (-2,)}, state_history={"arm7": (-1,)}
        )
        self.seen_past = []

    def prepare(self, observation: Observation) -> PreparedSample:
        if -2 not in observation.past_images or -1 not in observation.past_joint_positions:
            raise InvalidObservation("history", "missing offsets [-2] / [-1]")
        self.seen_past.append(
            (
                int(observation.past_images[-2]["base"][0, 0, 0]),
                float(observation.past_joint_positions[-1][0]),
            )
        )
        return super().prepare(observation)


def _rig_observation(value: int) -> Observation:
    return Observation(
        images={"base": np.full((8, 8, 3), value, np.uint8)},
        joint_positions=np.full(7, float(value), np.float32),
        instruction=f"task {value}",
        seed=1,
    )


def test_the_engine_fills_a_streams_history_and_predict_needs_it_sent() -> None:
    async def scenario(rig: Rig) -> None:
        model = rig.model
        assert isinstance(model, _HistoryToy)

        def submit(value: int, session: StreamSession | None, fail: bool = False) -> Any:
            def decode() -> Decoded:
                if fail:
                    raise InvalidObservation("camera_image", "not a decodable JPEG")
                return Decoded(_rig_observation(value))

            return rig.engine.submit(
                decode, time.monotonic() + FAR, protocol="grpc", request_id=str(value), session=session
            )

        with rig.engine.stream() as session:
            for index, (value, fail) in enumerate(((10, False), (20, True), (30, False), (40, False))):
                task = asyncio.ensure_future(submit(value, session, fail))
                await rig.settle(lambda n=index + 1: len(rig.pool.jobs) == n)  # type: ignore[misc]
                rig.pool.run(index)
                if not fail:
                    rig.step()
                await rig.settle(task.done)
                if fail:
                    with pytest.raises(Failed):
                        task.result()
                else:
                    task.result()
            # 10: its own past; 30: -2 is 10 (20 failed: abandoned), -1 falls back to 10 as well;
            # 40: -2 is 20 -> abandoned -> the newest kept before it, 10; -1 is 30
            assert model.seen_past == [(10, 10.0), (10, 10.0), (10, 30.0)]
            assert session.kept == (3, 4)  # 1 dropped (depth 2), 2 never came
        unary = asyncio.ensure_future(submit(50, None))  # Predict: nothing is filled in
        await rig.settle(lambda: len(rig.pool.jobs) == 5)
        rig.pool.run(4)
        await rig.settle(unary.done)
        with pytest.raises(Failed) as failed:
            unary.result()
        assert failed.value.outcome.status == "INVALID_ARGUMENT"
        assert "history" in failed.value.outcome.message

    with_rig(scenario, _HistoryToy)
