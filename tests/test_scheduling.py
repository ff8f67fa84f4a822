"""Issue 28: the fill window as a function of the fleet and the device time (engine/batching.py),
the model thread's pipelining and wake-ups, no head-of-line blocking behind a slow decode, decoding
at the model's input size for every family, and the bench's simulated device."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_settings
from tests.support.toy_model import ToyPolicy
from vla_inference.engine import Decoded, InferenceEngine
from vla_inference.engine.batching import GO, MEASURING, WAIT, Batching, DeviceTimes, FillPlan, RecentPeak
from vla_inference.engine.pool import PreprocessPool
from vla_inference.engine.scheduler import preprocessing_threads
from vla_inference.models.base import Observation
from vla_inference.telemetry.metrics import Metrics

MS = 1e-3


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- the fleet, the device time, the plan ------------------------------------------------------------


def test_the_fleet_is_unknown_until_requests_have_been_in_flight_for_a_whole_period():
    clock = Clock()
    peak = RecentPeak(period_s=1.0, clock=clock)
    assert peak.read() is None
    peak.note(3)
    clock.now += 0.5
    peak.note(8)
    assert peak.read() is None  # half a period of traffic: nothing known yet
    clock.now += 0.6
    peak.note(2)
    assert peak.read() == 8  # the previous period's peak still counts
    clock.now += 1.0
    peak.note(5)
    assert peak.read() == 5  # the period with 8 is two periods back: forgotten
    clock.now += 3.0
    assert peak.read() is None  # a quiet spell: unknown again
    peak.note(1)
    assert peak.read() is None


def test_the_fixed_part_of_a_forward_pass_is_the_fit_of_the_times_seen():
    times = DeviceTimes()
    assert times.fixed_cost() is None
    times.observe(8, 30.5 * MS)
    assert times.fixed_cost() == pytest.approx(30.5 * MS)  # one size: K unknown, the whole pass
    for b in (1, 4, 8, 16):
        for _ in range(30):  # moving averages settle on t(b) = 20 + 1.5 (b - 1) ms
            times.observe(b, (20 + 1.5 * (b - 1)) * MS)
    assert times.fixed_cost() == pytest.approx(18.5 * MS, rel=1e-3)  # T1 - K
    assert times.mean(16) == pytest.approx(42.5 * MS, rel=1e-3)


def batching(
    fleet: int | None, gap_s: float | None, fixed_s: float | None, window_ms: float = 2.0
) -> Batching:
    b = Batching(max_batch=8, window_s=window_ms * MS, fleet=lambda: fleet)
    if fixed_s is not None:
        b.device.observe(8, fixed_s)
    if gap_s is not None:
        for i in range(6):
            b.arrived(10.0 + i * gap_s)
    return b


def test_a_fleet_that_comes_back_within_the_fixed_cost_is_waited_for():
    plan = batching(fleet=8, gap_s=1 * MS, fixed_s=20 * MS).plan(opened=50.0)
    assert plan.mode == WAIT and plan.target == 8
    # stretched: at most the fixed cost, at most twice the fleet's return (8 x 1 ms)
    assert plan.end(queued=3, preparing=2, last_arrival=50.0) == pytest.approx(50.016)
    # none being preprocessed and none arrived for 4 gaps (at least the window): it left
    assert plan.end(queued=3, preparing=0, last_arrival=50.010) == pytest.approx(50.014)
    assert plan.end(queued=8, preparing=0, last_arrival=50.010) is None  # all here: go


def test_a_fleet_too_slow_to_come_back_is_not_waited_for_beyond_the_requests_being_decoded():
    plan = batching(fleet=32, gap_s=1 * MS, fixed_s=20 * MS).plan(opened=50.0)
    assert plan.mode == GO and plan.target == 8  # the batch limit caps the target
    assert plan.end(queued=3, preparing=5, last_arrival=50.0) == pytest.approx(50.010)
    assert plan.end(queued=3, preparing=0, last_arrival=50.0) == pytest.approx(50.002)


def test_a_lone_robot_is_not_held_for_the_window():
    plan = batching(fleet=1, gap_s=20 * MS, fixed_s=20 * MS, window_ms=500).plan(opened=50.0)
    assert plan.end(queued=1, preparing=0, last_arrival=50.0) is None
    # ... but a request still being preprocessed may join
    assert plan.end(queued=1, preparing=1, last_arrival=50.0) == pytest.approx(50.5)


def test_until_the_device_time_is_known_the_window_stretches_while_requests_are_decoded():
    plan = batching(fleet=None, gap_s=None, fixed_s=None).plan(opened=50.0)
    assert plan.mode == MEASURING and plan.target == 8
    assert plan.end(queued=2, preparing=1, last_arrival=50.0) == pytest.approx(50.010)
    assert plan.end(queued=2, preparing=0, last_arrival=50.0) == pytest.approx(50.002)


def test_fill_plan_end_never_precedes_the_window_when_waiting_for_a_fleet():
    plan = FillPlan(WAIT, 8, opened=1.0, window_end=1.005, stretch_end=1.030, idle_s=0.001)
    assert plan.end(queued=2, preparing=0, last_arrival=0.5) == pytest.approx(1.005)


# ---- the model thread ----------------------------------------------------------------------------------


def observation(i: int, instruction: str | None = None) -> Observation:
    return Observation(
        images={"base": np.full((8, 8, 3), i, np.uint8)},
        joint_positions=np.zeros(7, np.float32),
        instruction=instruction or f"task {i}",
        seed=i,
    )


def with_engine(
    scenario: Callable[[InferenceEngine, ToyPolicy], Any], model: ToyPolicy | None = None, **settings: Any
) -> None:
    async def main() -> None:
        config = make_settings(**settings)
        toy = model or ToyPolicy(config)
        toy.load(None, "cpu")
        engine = InferenceEngine(toy, config, Metrics(toy.model_id))
        await engine.start()
        try:
            await scenario(engine, toy)
        finally:
            await engine.close()

    asyncio.run(main())


def submit(engine: InferenceEngine, decode: Callable[[], Decoded], request_id: str = "") -> asyncio.Task[Any]:
    return asyncio.ensure_future(
        engine.submit(decode, time.monotonic() + 30, protocol="grpc", request_id=request_id)
    )


class SlowFinish(ToyPolicy):
    """finish() of the first batch waits for `release`; the forward passes are recorded."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.release = threading.Event()
        self.finishing = threading.Event()
        self.forwards: list[list[str]] = []

    def forward(self, samples: Any) -> list[Any]:
        self.forwards.append([s.inputs[1] for s in samples])
        return super().forward(samples)

    def finish(self, raw: Any, sample: Any) -> Any:
        if sample.inputs[1] == "first":
            self.finishing.set()
            assert self.release.wait(10)
        return super().finish(raw, sample)


def test_the_next_batch_runs_while_the_last_one_is_postprocessed():
    config = make_settings(batch_size=4, batch_timeout_ms=0)
    model = SlowFinish(config)

    async def scenario(engine: InferenceEngine, toy: ToyPolicy) -> None:
        first = submit(engine, lambda: Decoded(observation(1, "first")))
        while not model.finishing.is_set():  # the first batch's postprocessing has started and waits
            await asyncio.sleep(0.005)
        second = submit(engine, lambda: Decoded(observation(2, "second")))
        deadline = time.monotonic() + 10
        while ["second"] not in model.forwards and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert ["second"] in model.forwards  # forwarded while the first batch is still in finish()
        assert not first.done()
        model.release.set()
        await asyncio.gather(first, second)
        assert [f for f in model.forwards if f != ["warm up"]][:2] == [["first"], ["second"]]

    with_engine(scenario, model, batch_size=4, batch_timeout_ms=0)


def test_a_producer_wakes_the_model_thread_only_when_its_wait_can_end():
    config = make_settings(batch_size=8, batch_timeout_ms=1000)
    model = ToyPolicy(config)
    model.load(None, "cpu")
    engine = InferenceEngine(model, config, Metrics(model.model_id))
    thread = engine.model_thread
    notified: list[int] = []
    real_notify = thread._cond.notify

    def counting_notify(n: int = 1) -> None:
        notified.append(len(thread._queue))
        real_notify(n)

    thread._cond.notify = counting_notify  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()
    try:
        items = []
        for _ in range(4):
            thread.preparing()
        thread._wake_at = 8  # the model thread waits for 8 (a fleet of 8)
        for i in range(4):
            item = _work_item(loop, model, i)
            items.append(item)
            thread.prepared(item)
        # four queued, none left preprocessing: the last one may end the wait, the others may not
        assert notified == [4]
        thread._wake_at = None  # the model thread is busy: nobody is woken
        thread.preparing()
        thread.prepared(_work_item(loop, model, 9))
        assert notified == [4]
    finally:
        loop.close()


def _work_item(loop: asyncio.AbstractEventLoop, model: ToyPolicy, i: int) -> Any:
    from vla_inference.engine.model_thread import WorkItem

    item = WorkItem(loop.create_future(), loop, time.monotonic() + 30)
    item.sample = model.prepare(observation(i))
    return item


def test_a_slow_decode_does_not_hold_the_others_batch():
    release = threading.Event()

    def slow() -> Decoded:
        assert release.wait(20)
        return Decoded(observation(0, "slow"))

    async def scenario(engine: InferenceEngine, toy: ToyPolicy) -> None:
        stuck = submit(engine, slow)
        await asyncio.sleep(0.01)
        quick = [submit(engine, lambda i=i: Decoded(observation(i))) for i in range(1, 4)]
        # answered while the slow decode is still running: held at most the stretched window
        done, _ = await asyncio.wait(quick, timeout=10)
        assert len(done) == 3 and not release.is_set() and not stuck.done()
        release.set()
        answer = await stuck
        assert answer.timing.batch_size == 1

    with_engine(scenario, batch_size=8, batch_timeout_ms=20, max_workers=4)


def test_the_primary_preprocessing_thread_does_the_work_in_order():
    pool = PreprocessPool(3, spare_after_s=30.0)
    try:
        ran: list[tuple[int, str]] = []
        futures = [
            pool.submit(lambda i=i: ran.append((i, threading.current_thread().name))) for i in range(20)
        ]
        for future in futures:
            future.result(10)
        assert [i for i, _ in ran] == list(range(20))
        assert {name for _, name in ran} == {"preprocess_0"}  # no spare stepped in
    finally:
        pool.shutdown()


def test_a_spare_preprocessing_thread_steps_in_behind_a_slow_job():
    pool = PreprocessPool(2, spare_after_s=0.02)
    release = threading.Event()
    try:
        slow = pool.submit(release.wait, 20)
        quick = pool.submit(lambda: threading.current_thread().name)
        assert quick.result(10) == "preprocess_1"  # while the primary is still in the slow job
        assert not slow.done()
        release.set()
        assert slow.result(10) is True
    finally:
        release.set()
        pool.shutdown()


def test_a_preprocessing_pool_shut_down_refuses_and_cancels():
    pool = PreprocessPool(1, spare_after_s=30.0)
    release, started = threading.Event(), threading.Event()

    def job() -> bool:
        started.set()
        return release.wait(20)

    running = pool.submit(job)
    assert started.wait(10)
    queued = pool.submit(lambda: 1)
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: 2)
    release.set()
    assert running.result(10) is True


def test_preprocessing_threads_leave_a_core_to_the_event_loop():
    import os

    cores = len(os.sched_getaffinity(0))
    assert preprocessing_threads(64) == max(2, cores - 1)
    assert preprocessing_threads(1) == 1


# ---- decoding at the model's input size, every family ---------------------------------------------------


def _write(family: str, path: Path) -> Path:
    """A tiny checkpoint of `family` (tests/helpers), as the other tests of each family write it."""
    if family == "openvla":
        from tests.helpers.openvla_checkpoints import write_tiny_openvla_checkpoint

        return write_tiny_openvla_checkpoint(path)
    if family == "openvla-oft":
        from tests.helpers.oft_checkpoints import write_tiny_oft_checkpoint

        return write_tiny_oft_checkpoint(path, convert=True)
    if family == "groot":
        from tests.helpers.groot_checkpoints import write_tiny_groot_checkpoint

        return write_tiny_groot_checkpoint(path)
    if family == "groot-n1.7":
        from tests.helpers.groot17_checkpoints import write_tiny_groot17_checkpoint

        return write_tiny_groot17_checkpoint(path)
    if family == "smolvla":
        from tests.helpers.smolvla_checkpoints import write_tiny_smolvla

        return write_tiny_smolvla(path)
    from tests.helpers.pi0_fast_checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint(path)


@pytest.mark.parametrize(
    "family", ["pi0", "pi0-fast", "openvla", "openvla-oft", "groot", "groot-n1.7", "smolvla"]
)
def test_every_family_says_what_size_its_frames_are_decoded_at(family: str, tmp_path: Path):
    from vla_inference.config import Settings
    from vla_inference.models.registry import create_model

    if family == "pi0":
        settings = Settings(model_type="pi0", device="cpu")  # the embedded default
    else:
        settings = Settings(model_path=str(_write(family, tmp_path / family)), device="cpu")
    model = create_model(settings)
    model.load(settings.model_path or None, "cpu")
    info = model.model_info
    assert info.decode_size is not None  # VLA_JPEG_SCALED_DECODE applies to every family
    if family == "groot":
        assert info.decode_size == (64, 48)  # the tiny metadata's camera resolution, resized to first
    else:
        assert info.decode_size == info.image_size


def test_groot_decodes_a_camera_without_a_resolution_at_the_size_before_its_crop():
    from vla_inference.models.groot.embodiments import Camera, Embodiment
    from vla_inference.models.groot.policy import decode_size

    def emb(resolutions: list[tuple[int, int] | None], crop: float | None) -> Embodiment:
        cameras = tuple(Camera(f"c{i}", r) for i, r in enumerate(resolutions))
        return Embodiment("t", 1, "t", (), (), cameras, crop)

    assert decode_size([emb([None], 0.95)], 224) == (236, 236)  # ceil(224 / 0.95)
    assert decode_size([emb([None], None)], 224) == (224, 224)
    assert decode_size([emb([(320, 240)], 0.95), emb([(256, 256)], None)], 224) == (320, 256)


# ---- the bench's simulated device -----------------------------------------------------------------------


def test_the_simulated_device_waits_t_of_b_without_holding_a_core_or_the_gil():
    from bench.serve import DeviceTime, SimulatedDevice

    device = DeviceTime.parse("150,10")
    assert device.seconds(1) == pytest.approx(0.150) and device.seconds(4) == pytest.approx(0.180)
    assert device.capacity(4) == pytest.approx(4 / 0.180)
    with pytest.raises(ValueError):
        DeviceTime.parse("20")
    config = make_settings()
    inner = ToyPolicy(config)
    sim = SimulatedDevice(inner, device)
    sim.load(None, "cpu")
    sample = sim.prepare(observation(1))
    cpu: list[float] = []

    def run() -> None:
        c, w = time.thread_time(), time.perf_counter()
        sim.forward([sample] * 4)
        cpu.append(time.thread_time() - c)
        cpu.append(time.perf_counter() - w)

    worker = threading.Thread(target=run)
    spins = 0
    worker.start()
    while worker.is_alive():  # this thread keeps running Python while the device "computes"
        spins += 1
    worker.join()
    thread_cpu, wall = cpu
    assert wall >= 0.180
    assert thread_cpu < 0.05 * wall  # a sleep, not a busy wait
    assert spins > 1000
