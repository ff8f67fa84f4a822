"""The stream ordering rules, deterministically: direct calls into a StreamSession, and the engine's
one request path with the preprocessing pool and the model thread stepped by hand (no sleeps, no
timing): newest observation wins, a skipped observation is counted and listed once, an answer never
goes to a stale sequence number, the chunk memory changes only from answers sent. Also the
empty-instruction rule and the warm-up hook, which live on the same path."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_settings
from tests.support.toy_model import ToyPolicy
from vla_inference.engine import (
    Answer,
    Decoded,
    Failed,
    InferenceEngine,
    Notices,
    RateLimited,
    Skipped,
    StreamSession,
)
from vla_inference.models.base import InvalidObservation, Observation
from vla_inference.telemetry.metrics import Metrics

FAR = 60.0  # deadlines far away: nothing here expires


# ---- the session alone -----------------------------------------------------------------------------


@dataclass(eq=False)
class Item:
    seq: int
    live: bool = True


def test_a_newer_observation_replaces_the_queued_one():
    session = StreamSession()
    one, two, three = Item(session.observe()), Item(session.observe()), Item(session.observe())
    assert session.offer(one) == (True, None)
    assert session.offer(two) == (True, one)  # one is the caller's to skip
    assert session.pending is two
    one.live = False
    assert session.offer(three) == (True, two)
    assert session.pending is three


def test_an_observation_older_than_the_queued_one_is_not_queued():
    session = StreamSession()
    one, two = Item(session.observe()), Item(session.observe())
    assert session.offer(two) == (True, None)
    assert session.offer(one) == (False, None)
    assert session.pending is two  # the newer one keeps its place


def test_an_observation_on_the_model_is_not_replaced():
    session = StreamSession()
    one, two = Item(session.observe()), Item(session.observe())
    session.offer(one)
    session.dequeued(one)  # into a batch
    assert session.pending is None
    assert session.offer(two) == (True, None)  # queued behind it, one is still answered


def test_a_queued_observation_that_already_ended_is_not_replaced_but_dropped():
    session = StreamSession()
    one, two = Item(session.observe()), Item(session.observe())
    session.offer(one)
    one.live = False  # expired or cancelled: its own outcome, not a skip
    assert session.offer(two) == (True, None)
    session.dequeued(one)  # the model thread drops it later; the newer one stays pending
    assert session.pending is two


def test_skipped_observations_are_listed_once_in_the_next_answer():
    session = StreamSession()
    for _ in range(3):
        session.observe()
    session.skipped("a")
    session.skipped("b")
    assert session.answer(3) == ("a", "b")
    assert session.answer(3) == ()  # listed once


def test_an_answer_never_goes_to_a_stale_sequence_number():
    session = StreamSession()
    for _ in range(3):
        session.observe()
    session.skipped("x")
    assert session.answer(2) == ("x",)
    with pytest.raises(Skipped):
        session.answer(1)
    assert session.answer(3) == ()


def test_the_chunk_memory_changes_only_from_answers_sent():
    session = StreamSession()
    chunk = np.arange(6, dtype=np.float32).reshape(3, 2)
    session.answer(session.observe())  # answered, not sent
    assert session.chunk("") is None
    with pytest.raises(InvalidObservation, match="previous_request_id"):
        session.chunk("a")
    session.sent("a", chunk, latency_s=0.05)
    np.testing.assert_array_equal(session.chunk("a"), chunk)
    np.testing.assert_array_equal(session.chunk(""), chunk)  # empty: the last one sent
    assert session.estimate_delay(100.0) == 5  # ceil(0.05 s x 100 Hz)


def test_the_rate_is_a_token_bucket_with_one_seconds_burst():
    now = [0.0]
    session = StreamSession(max_rate_hz=2, clock=lambda: now[0])
    session.allow()
    session.allow()
    with pytest.raises(RateLimited, match="VLA_MAX_STREAM_RATE_HZ=2"):
        session.allow()
    now[0] = 0.5  # one token back
    session.allow()
    with pytest.raises(RateLimited):
        session.allow()
    unlimited = StreamSession(max_rate_hz=0)
    for _ in range(1000):
        unlimited.allow()


# ---- the engine, stepped by hand -----------------------------------------------------------------------


class ManualPool(concurrent.futures.Executor):
    """The preprocessing pool, run by hand: jobs wait until the test runs them, in the order it picks."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def job() -> None:
            future.set_result(fn(*args, **kwargs))

        self.jobs.append(job)
        return future

    def run(self, index: int) -> None:
        self.jobs[index]()


class Rig:
    """An engine whose preprocessing jobs and model batches run when the test says so."""

    def __init__(self, model: ToyPolicy, engine: InferenceEngine, pool: ManualPool) -> None:
        self.model = model
        self.engine = engine
        self.pool = pool

    def submit(
        self, request_id: str, session: StreamSession | None = None, instruction: str | None = None, **kw: Any
    ) -> asyncio.Task[Answer]:
        def decode() -> Decoded:
            text = f"task {request_id}" if instruction is None else instruction
            return Decoded(observation(text), **kw)

        return asyncio.ensure_future(
            self.engine.submit(
                decode, time.monotonic() + FAR, protocol="grpc", request_id=request_id, session=session
            )
        )

    async def settle(self, until: Callable[[], bool] = lambda: False) -> None:
        """Let the loop run what is ready (a bounded number of turns: no waiting on time)."""
        for _ in range(50):
            if until():
                return
            await asyncio.sleep(0)

    def step(self) -> int:
        """One batch of what is queued now, on this thread."""
        return self.engine.model_thread.step()

    def count(self, status: str, protocol: str = "grpc") -> float:
        value = self.engine.metrics.registry.get_sample_value(
            "vla_inference_requests_total",
            {"model": self.model.model_id, "protocol": protocol, "status": status},
        )
        return value or 0.0

    @property
    def skipped_total(self) -> float:
        return self.engine.metrics.registry.get_sample_value("vla_stream_observations_skipped_total") or 0.0


def observation(instruction: str) -> Observation:
    return Observation(
        images={"base": np.zeros((8, 8, 3), np.uint8)},
        joint_positions=np.zeros(7, np.float32),
        instruction=instruction,
        seed=1,
    )


def with_rig(
    scenario: Callable[[Rig], Coroutine[Any, Any, None]],
    model_class: type[ToyPolicy] = ToyPolicy,
    **settings: Any,
) -> None:
    async def main() -> None:
        config = make_settings(**settings)
        model = model_class(config)
        model.load(None, "cpu")
        pool = ManualPool()
        engine = InferenceEngine(model, config, Metrics(model.model_id), pool=pool)
        await engine.start(threaded=False)
        try:
            await scenario(Rig(model, engine, pool))
        finally:
            await engine.close()

    asyncio.run(main())


def test_newest_observation_wins_and_each_skip_is_counted_and_listed_once():
    async def scenario(rig: Rig) -> None:
        with rig.engine.stream() as session:
            tasks = [rig.submit(f"o{i}", session) for i in (1, 2, 3)]
            await rig.settle(lambda: len(rig.pool.jobs) == 3)
            for index in range(3):  # each preprocessed in turn: o2 replaces o1, o3 replaces o2
                rig.pool.run(index)
            assert rig.step() == 1
            await rig.settle(lambda: all(t.done() for t in tasks))
            for skipped in tasks[:2]:
                with pytest.raises(Skipped):
                    skipped.result()
            answer = tasks[2].result()
            assert answer.skipped == ("o1", "o2")
            assert rig.model.seen_instructions == ["task o3"]  # only the newest reached the model
            assert rig.skipped_total == 2 and rig.count("SKIPPED") == 2 and rig.count("OK") == 1
            fourth = rig.submit("o4", session)
            await rig.settle(lambda: len(rig.pool.jobs) == 4)
            rig.pool.run(3)
            rig.step()
            assert (await fourth).skipped == ()  # listed once, in the next answer only

    with_rig(scenario)


def test_an_older_observation_preprocessed_late_is_never_queued():
    async def scenario(rig: Rig) -> None:
        with rig.engine.stream() as session:
            one, two = rig.submit("o1", session), rig.submit("o2", session)
            await rig.settle(lambda: len(rig.pool.jobs) == 2)
            rig.pool.run(1)  # o2 is queued first
            rig.pool.run(0)  # o1 arrives at the queue after it: skipped, not queued
            assert rig.step() == 1
            assert rig.step() == 0  # nothing else was queued
            await rig.settle(lambda: one.done() and two.done())
            with pytest.raises(Skipped):
                one.result()
            assert two.result().skipped == ("o1",)
            assert rig.model.seen_instructions == ["task o2"]
            assert rig.skipped_total == 1

    with_rig(scenario)


def test_an_observation_on_the_model_is_answered_and_the_newer_one_follows():
    class Hooked(ToyPolicy):
        during_forward: Callable[[], None] | None = None

        def forward(self, samples):  # type: ignore[no-untyped-def]
            hook, self.during_forward = self.during_forward, None
            if hook is not None:
                hook()  # o2 finishes preprocessing while o1 runs
            return super().forward(samples)

    async def scenario(rig: Rig) -> None:
        with rig.engine.stream() as session:
            one, two = rig.submit("o1", session), rig.submit("o2", session)
            await rig.settle(lambda: len(rig.pool.jobs) == 2)
            rig.pool.run(0)
            rig.model.during_forward = lambda: rig.pool.run(1)  # type: ignore[attr-defined]
            assert rig.step() == 1  # o1 on the model; o2 queued meanwhile, not replacing it
            assert rig.step() == 1  # o2
            await rig.settle(lambda: one.done() and two.done())
            assert one.result().skipped == () and two.result().skipped == ()
            assert rig.model.seen_instructions == ["task o1", "task o2"]
            assert rig.skipped_total == 0 and rig.count("OK") == 2

    with_rig(scenario, Hooked)


def test_a_replaced_observation_whose_caller_left_is_counted_cancelled_not_skipped():
    async def scenario(rig: Rig) -> None:
        with rig.engine.stream() as session:
            one, two = rig.submit("o1", session), rig.submit("o2", session)
            await rig.settle(lambda: len(rig.pool.jobs) == 2)
            rig.pool.run(0)
            rig.pool.run(1)  # o1 is replaced: its Skipped answer is on its way to the loop ...
            one.cancel()  # ... but its caller leaves first
            rig.step()
            await rig.settle(lambda: one.done() and two.done())
            assert one.cancelled()
            assert two.result().skipped == ()  # not listed: it ended cancelled
            assert rig.skipped_total == 0 and rig.count("SKIPPED") == 0
            assert rig.count("CANCELLED") == 1 and rig.count("OK") == 1

    with_rig(scenario)


def test_requests_without_a_session_batch_together_and_count_once():
    async def scenario(rig: Rig) -> None:
        tasks = [rig.submit(f"u{i}") for i in range(3)]
        await rig.settle(lambda: len(rig.pool.jobs) == 3)
        for index in range(3):
            rig.pool.run(index)
        assert rig.step() == 3  # one batch: nothing replaces anything outside a stream
        answers = await asyncio.gather(*tasks)
        assert [a.timing.batch_size for a in answers] == [3, 3, 3]
        assert rig.count("OK") == 3 and rig.skipped_total == 0

    with_rig(scenario, batch_size=4)


# ---- the empty-instruction rule (issue 23) -----------------------------------------------------------


@pytest.mark.parametrize("instruction", ["", "   "])
def test_a_missing_instruction_is_invalid_argument_naming_the_transports_field(instruction):
    async def scenario(rig: Rig) -> None:
        grpc_request = rig.submit("g", instruction=instruction)
        openpi_request = rig.submit("o", instruction=instruction, instruction_field="prompt")
        await rig.settle(lambda: len(rig.pool.jobs) == 2)
        rig.pool.run(0)
        rig.pool.run(1)
        for task, field in ((grpc_request, "language_instruction"), (openpi_request, "prompt")):
            with pytest.raises(Failed) as failed:
                await task
            assert failed.value.outcome.status == "INVALID_ARGUMENT"
            assert failed.value.outcome.message.startswith(
                f"invalid observation: {field}: the model needs a language instruction"
            )
            assert "VLA_ALLOW_EMPTY_INSTRUCTION" in failed.value.outcome.message
        assert rig.model.seen_instructions == []

    with_rig(scenario)


def test_allowed_empty_instructions_reach_the_model_with_one_warning_per_scope(caplog):
    caplog.set_level(logging.WARNING, logger="vla_inference.engine")

    async def scenario(rig: Rig) -> None:
        notices = Notices("openpi connection")
        with rig.engine.stream() as stream_a, rig.engine.stream() as stream_b:
            scopes: list[StreamSession | Notices | None] = [None, None, stream_a, stream_a, stream_b, notices]
            tasks = []
            for i, scope in enumerate(scopes):
                kw: dict[str, Any] = {}
                if isinstance(scope, StreamSession):
                    kw["session"] = scope
                elif scope is not None:
                    kw["notices"] = scope
                tasks.append(
                    asyncio.ensure_future(
                        rig.engine.submit(
                            lambda: Decoded(observation("")),
                            time.monotonic() + FAR,
                            protocol="grpc",
                            request_id=f"e{i}",
                            **kw,
                        )
                    )
                )
            await rig.settle(lambda: len(rig.pool.jobs) == len(scopes))
            for index in range(len(scopes)):
                rig.pool.run(index)
                rig.step()  # one at a time: a stream's second observation would replace its first
            await asyncio.gather(*tasks)
        assert rig.model.seen_instructions == [""] * len(scopes)
        warnings = [r.getMessage() for r in caplog.records if "without a language instruction" in r.message]
        # once for the process (unary), once per stream, once for the connection
        assert len(warnings) == 4, warnings
        assert sum("once per stream" in w for w in warnings) == 2
        assert sum("once per openpi connection" in w for w in warnings) == 1
        assert sum("once per process" in w for w in warnings) == 1

    with_rig(scenario, allow_empty_instruction=True)


def test_models_that_take_no_language_need_no_instruction():
    class Wordless(ToyPolicy):
        def load(self, checkpoint_path, device):  # type: ignore[no-untyped-def]
            super().load(checkpoint_path, device)
            self._info = dataclasses.replace(self.model_info, takes_language=False)

    async def scenario(rig: Rig) -> None:
        task = rig.submit("w", instruction="")
        await rig.settle(lambda: len(rig.pool.jobs) == 1)
        rig.pool.run(0)
        rig.step()
        assert (await task).timing.batch_size == 1
        assert rig.model.seen_instructions == [""]

    with_rig(scenario, Wordless)


# ---- the warm-up hook ------------------------------------------------------------------------------------


def test_the_engine_calls_warm_up_once_on_the_model_thread_before_any_batch():
    class Recording(ToyPolicy):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.calls: list[tuple[str, int]] = []

        def warm_up(self, max_batch: int) -> None:
            import threading

            self.calls.append((threading.current_thread().name, max_batch))

        def forward(self, samples):  # type: ignore[no-untyped-def]
            self.calls.append(("forward", len(samples)))
            return super().forward(samples)

    async def main() -> None:
        config = make_settings(batch_size=4)
        model = Recording(config)
        model.load(None, "cpu")
        engine = InferenceEngine(model, config, Metrics(model.model_id))
        await engine.start()
        await engine.warmup(2)
        await engine.close()
        assert model.calls == [("model-worker", 4), ("forward", 1), ("forward", 4)]

    asyncio.run(main())
