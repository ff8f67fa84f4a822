"""The engine over a real server: batching, backpressure, deadlines, cancellation, streams, faults."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from tests.support.toy_model import EMBODIMENTS, ToyPolicy, expected_actions
from vla_inference.client import AsyncVLAClient, VLAError, make_observation
from vla_inference.models.base import Observation

RNG = np.random.default_rng(0)


def image(i: int) -> np.ndarray:
    return np.full((32, 32, 3), (i * 37) % 256, np.uint8)


def joints(i: int, n: int = 7) -> list[float]:
    return [float(i) + 0.1 * k for k in range(n)]


def alone(model: ToyPolicy, i: int, embodiment: str = "arm7") -> np.ndarray:
    """What request i gets when served alone (computed in-process through the same model)."""
    obs = Observation(
        images={"base": image(i)},
        joint_positions=np.asarray(joints(i, EMBODIMENTS[embodiment]), np.float32),
        instruction=f"task {i}",
        embodiment=embodiment,
        seed=1000 + i,
    )
    return expected_actions(model.prepare(obs))[: model.model_info.chunk_size]


def scrape(running) -> str:
    return urllib.request.urlopen(running.metrics_url, timeout=5).read().decode()


def batches_holding(model: ToyPolicy, instruction: str) -> list[int]:
    """Sizes of the forward passes that held a request with `instruction`, in order."""
    sizes, start = [], 0
    for size in model.batches:
        if instruction in model.seen_instructions[start : start + size]:
            sizes.append(size)
        start += size
    return sizes


def test_concurrent_clients_each_get_their_own_answer_in_shared_batches(server_factory):
    running = server_factory(
        lambda s: ToyPolicy(s, batch_cost_s=0.02), batch_size=8, batch_timeout_ms=20, max_queue_size=64
    )
    model = running.server.model

    def call(i: int):
        embodiment = "arm6" if i % 3 == 0 else "arm7"
        with running.client() as client:
            chunk = client.predict(
                image(i),
                joints(i, EMBODIMENTS[embodiment]),
                f"task {i}",
                seed=1000 + i,
                request_id=f"req-{i}",
                embodiment=embodiment,
            )
        return i, embodiment, chunk

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(48)))
    for i, embodiment, chunk in results:
        assert chunk.request_id == f"req-{i}"
        got = np.array([a.joint_commands for a in chunk.actions])
        # JPEG of a flat image is near-exact; tolerance covers its rounding
        np.testing.assert_allclose(got, alone(model, i, embodiment), atol=2e-2)
    assert max(model.batches) > 1, model.batches  # requests really shared forward passes
    assert max(model.batches) <= 8
    assert max(r[2].timing.batch_size for r in results) > 1
    text = scrape(running)
    assert '{model="toy/embedded-random",protocol="grpc",status="OK"} 48.0' in text


def test_incompatible_requests_never_share_a_batch(server_factory):
    seen: list[list[str]] = []

    class Recording(ToyPolicy):
        def forward(self, samples):
            seen.append([s.embodiment for s in samples])
            return super().forward(samples)

    running = server_factory(lambda s: Recording(s, batch_cost_s=0.05), batch_size=8, batch_timeout_ms=100)

    def call(i: int):
        embodiment = "arm6" if i % 2 else "arm7"
        with running.client() as client:
            client.predict(image(i), joints(i, EMBODIMENTS[embodiment]), "x", embodiment=embodiment)

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(call, range(24)))
    assert sum(map(len, seen[1:])) == 24, seen  # seen[0]: the warm-up batch
    assert all(len(set(batch)) == 1 for batch in seen), seen
    # ... and yet both kinds were batched: there was something to keep apart
    assert {batch[0] for batch in seen if len(batch) > 1} == {"arm6", "arm7"}, seen


def test_full_queue_refuses_at_once_with_resource_exhausted(server_factory):
    running = server_factory(lambda s: ToyPolicy(s, batch_cost_s=0.3), max_queue_size=2)

    def call(i: int):
        with running.client() as client:
            t0 = time.monotonic()
            try:
                client.predict(image(i), joints(i), "x")
                return "OK", time.monotonic() - t0
            except VLAError as exc:
                return exc.code.name, time.monotonic() - t0

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(call, range(6)))
    refused = [t for code, t in outcomes if code == "RESOURCE_EXHAUSTED"]
    assert refused, outcomes
    assert all(t < 0.25 for t in refused), outcomes  # refused at once, not after waiting
    assert sum(code == "OK" for code, _ in outcomes) >= 2
    assert 'status="RESOURCE_EXHAUSTED"' in scrape(running)


def test_expired_requests_never_reach_the_model(server_factory):
    running = server_factory(lambda s: ToyPolicy(s, batch_cost_s=0.4))
    model = running.server.model
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(lambda: running.client().predict(image(0), joints(0), "blocker"))
        time.sleep(0.1)
        with running.client() as client, pytest.raises(VLAError) as info:
            client.predict(image(1), joints(1), "late one", timeout=0.15)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        blocker.result(10)
    time.sleep(0.2)
    assert "late one" not in model.seen_instructions
    # the server did see it (it expired there, or the client's cancel at its deadline reached it)
    text = scrape(running)
    assert 'status="DEADLINE_EXCEEDED"' in text or 'status="CANCELLED"' in text


def test_server_default_timeout_applies_when_client_sets_none(server_factory):
    running = server_factory(lambda s: ToyPolicy(s, batch_cost_s=0.5), timeout_ms=100)
    channel = grpc.insecure_channel(running.target)
    from vla_inference.api.v1 import vla_inference_pb2_grpc as pb_grpc

    stub = pb_grpc.VLAInferenceStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(make_observation(image(0), joints(0), "x"))  # no client deadline
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "VLA_TIMEOUT_MS=100" in info.value.details()
    channel.close()


def test_cancelled_requests_are_dropped(server_factory):
    running = server_factory(lambda s: ToyPolicy(s, batch_cost_s=0.4))
    model = running.server.model

    async def scenario():
        async with AsyncVLAClient(running.target) as client:
            first = asyncio.ensure_future(client.predict(image(0), joints(0), "first"))
            await asyncio.sleep(0.1)
            doomed = asyncio.ensure_future(client.predict(image(1), joints(1), "cancelled one"))
            await asyncio.sleep(0.05)
            doomed.cancel()
            await first
            await asyncio.sleep(0.6)

    asyncio.run(scenario())
    assert "cancelled one" not in model.seen_instructions
    assert 'status="CANCELLED"' in scrape(running)


def test_stream_answers_in_order_naming_each_observation(server_factory):
    running = server_factory(ToyPolicy)
    observations = [
        make_observation(image(i), joints(i), f"task {i}", request_id=f"s-{i}", timestamp=i + 0.5)
        for i in range(10)
    ]

    def paced():
        for obs in observations:
            yield obs
            time.sleep(0.01)

    with running.client() as client:
        chunks = list(client.stream(paced(), timeout=30))
    ids = [c.request_id for c in chunks]
    answered = [int(x.split("-")[1]) for x in ids]
    assert answered == sorted(answered)
    assert ids[-1] == "s-9"  # the newest is never skipped
    for chunk in chunks:
        assert chunk.observation_timestamp == int(chunk.request_id.split("-")[1]) + 0.5
        assert not chunk.HasField("error")
    skipped = [s for c in chunks for s in c.skipped_request_ids]
    assert sorted(set(ids) | set(skipped)) == sorted(o.request_id for o in observations)


def test_stream_skips_stale_observations_when_model_is_slower(server_factory):
    running = server_factory(lambda s: ToyPolicy(s, batch_cost_s=0.15))
    observations = [make_observation(image(i), joints(i), "x", request_id=f"f-{i}") for i in range(12)]

    def fast():
        for obs in observations:
            yield obs
            time.sleep(0.02)

    with running.client() as client:
        chunks = list(client.stream(fast(), timeout=30))
    ids = [c.request_id for c in chunks]
    skipped = [s for c in chunks for s in c.skipped_request_ids]
    assert len(ids) < 12 and skipped
    assert ids[-1] == "f-11"
    assert set(ids).isdisjoint(skipped)
    text = scrape(running)
    line = next(x for x in text.splitlines() if x.startswith("vla_stream_observations_skipped_total"))
    assert float(line.split()[1]) == len(skipped)


def test_bad_frame_in_stream_is_reported_inline_and_stream_goes_on(server_factory):
    running = server_factory(ToyPolicy)
    frames = [
        make_observation(image(0), joints(0), "x", request_id="good-0"),
        make_observation(image(1), [float("nan")] * 7, "x", request_id="bad-1"),
        make_observation(image(2), joints(2), "x", request_id="good-2"),
    ]

    def paced():
        for f in frames:
            yield f
            time.sleep(0.05)

    with running.client() as client:
        chunks = list(client.stream(paced(), timeout=30))
    by_id = {c.request_id: c for c in chunks}
    assert by_id["bad-1"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "joint_positions" in by_id["bad-1"].error.message
    assert len(by_id["good-2"].actions) == 8 and not by_id["good-2"].HasField("error")


def test_many_streams_open_and_close_without_leaking(server_factory):
    running = server_factory(ToyPolicy)

    def one(i: int):
        with running.client() as client:
            chunks = list(
                client.stream(
                    iter([make_observation(image(i), joints(i), "x", request_id=str(i))]), timeout=10
                )
            )
        return len(chunks)

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(one, range(60))) == 60

    async def abandon():
        async with AsyncVLAClient(running.target) as client:
            call = client.stream(iter([make_observation(image(0), joints(0), "x")] * 3))
            async for _ in call:
                call.cancel()
                break

    for _ in range(5):
        asyncio.run(abandon())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        engine = running.server.engine
        if engine.sessions == 0 and engine.in_flight == 0:
            break
        time.sleep(0.05)
    assert running.server.engine.sessions == 0
    assert running.server.engine.in_flight == 0
    with running.client() as client:
        assert client.health().active_streams == 0


def test_stream_rate_limit(server_factory):
    running = server_factory(ToyPolicy, max_stream_rate_hz=5)
    burst = [make_observation(image(i), joints(i), "x", request_id=str(i)) for i in range(20)]
    with running.client() as client:
        chunks = list(client.stream(iter(burst), timeout=30))
    limited = [c for c in chunks if c.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
    assert limited and "VLA_MAX_STREAM_RATE_HZ" in limited[0].error.message


def test_warmup_runs_before_serving(server_factory):
    running = server_factory(lambda s: ToyPolicy(s), warmup_batches=3, batch_size=4)
    assert running.server.model.batches == [1, 4, 4]


def test_exception_fails_only_its_own_request(server_factory):
    # A long window: the batch closes as soon as all 8 are in, so "fail" has batch-mates to spare.
    running = server_factory(lambda s: ToyPolicy(s, batch_cost_s=0.05), batch_size=8, batch_timeout_ms=300)
    model = running.server.model

    def call(i: int):
        instruction = "fail" if i == 3 else f"ok {i}"
        with running.client() as client:
            try:
                client.predict(image(i), joints(i), instruction)
                return "OK"
            except VLAError as exc:
                return exc.code.name

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, range(8)))
    assert outcomes[3] == "INTERNAL"
    assert outcomes.count("OK") == 7
    failing = batches_holding(model, "fail")
    assert failing[0] > 1 and failing[-1] == 1, model.batches  # shared a batch, then failed alone


def test_out_of_memory_retries_smaller_batches(server_factory):
    running = server_factory(lambda s: ToyPolicy(s, batch_cost_s=0.05), batch_size=8, batch_timeout_ms=300)
    model = running.server.model

    def call(i: int):
        with running.client() as client:
            return client.predict(image(i), joints(i), "oom" if i == 0 else f"ok {i}").request_id == ""

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(call, range(6)))  # every request answered, the OOM one too (alone)
    oom = batches_holding(model, "oom")
    assert oom[0] > 1 and oom[-1] == 1, model.batches  # halved until it ran alone
    assert oom == sorted(oom, reverse=True), oom


def test_hung_worker_turns_health_not_serving_and_deadlines_cut_it(server_factory):
    running = server_factory(lambda s: ToyPolicy(s), stuck_after_s=0.3)
    model = running.server.model
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(running.target)
    health = health_pb2_grpc.HealthStub(channel)
    with running.client() as client:
        with pytest.raises(VLAError) as info:
            client.predict(image(0), joints(0), "hang", timeout=0.5)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert client.health().state == "NOT_SERVING"
        model.release_hang.set()
        time.sleep(0.6)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert len(client.predict(image(1), joints(1), "after").actions) == 8
    channel.close()


def test_drain_answers_accepted_requests_and_refuses_new_ones(server_factory):
    running = server_factory(lambda s: ToyPolicy(s, batch_cost_s=0.2), batch_size=1)
    results: list[str] = []
    lock = threading.Lock()

    def call(i: int):
        with running.client() as client:
            try:
                client.predict(image(i), joints(i), "x", timeout=10)
                outcome = "OK"
            except VLAError as exc:
                outcome = exc.code.name
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.15)
    stopper = threading.Thread(target=running.stop, kwargs={"grace_s": 5.0})
    stopper.start()
    time.sleep(0.05)
    call(99)  # arrives during the drain
    for t in threads:
        t.join()
    stopper.join()
    assert results.count("OK") == 4, results
    assert results[-1] == "UNAVAILABLE" or "UNAVAILABLE" in results
