"""Soak (bounded, loopback): concurrent unary clients and ping-pong streams, mixed with clients that
cancel, let deadlines expire, disconnect mid-stream and send bad frames among good ones.

At the end: every good request got exactly its own answer (request id and content), none lost or
duplicated, no session or admission leaked, and `vla_inference_requests_total` by status adds up
to what the clients saw -- exactly for every request whose outcome the client knows, and within
the bounds of the race for requests the client itself cut short (cancel, deadline, disconnect).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import time
import zlib

import grpc
import numpy as np
import pytest

from tests.support.toy_model import ToyPolicy, expected_actions
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.api.v1 import vla_inference_pb2_grpc as pb_grpc
from vla_inference.client import make_observation
from vla_inference.models.base import Observation

SOAK_S = float(os.environ.get("SOAK_SECONDS", "20"))
OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
SIDE = 8
SERVER_THREADS = ("test-server", "preprocess", "model-worker")  # see conftest.py, engine/scheduler.py


class Ledger:
    """What the clients saw. `exact`: outcomes the client knows the server also recorded.
    `racy`: requests the client cut short; the server records each at most once, as OK, CANCELLED
    or DEADLINE_EXCEEDED, or not at all when it never saw the request."""

    def __init__(self) -> None:
        self.exact: collections.Counter[str] = collections.Counter()
        self.racy = 0
        self.answers: collections.Counter[str] = collections.Counter()  # good request id -> answers
        self.sent_good: set[str] = set()
        self.wrong: list[str] = []

    def check_answer(self, model: ToyPolicy, request: pb.Observation, chunk: pb.ActionChunk) -> None:
        self.answers[request.request_id] += 1
        if chunk.request_id != request.request_id or chunk.HasField("error"):
            self.wrong.append(f"{request.request_id}: got {chunk.request_id} {chunk.error}")
            return
        want = _expected(model, request)
        got = np.asarray([a.joint_commands for a in chunk.actions])
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
            self.wrong.append(f"{request.request_id}: wrong actions")


def _good(request_id: str) -> pb.Observation:
    rng = random.Random(request_id)
    observation = make_observation(
        None,
        [rng.uniform(-1, 1) for _ in range(7)],
        f"task {rng.randrange(5)}",
        request_id=request_id,
        seed=zlib.crc32(request_id.encode()),
    )
    observation.camera_image = bytes(rng.randrange(256) for _ in range(SIDE * SIDE * 3))
    observation.camera_image_encoding = pb.IMAGE_ENCODING_RAW_RGB
    observation.camera_image_width = observation.camera_image_height = SIDE
    return observation


def _bad(request_id: str) -> pb.Observation:
    observation = _good(request_id)
    kind = zlib.crc32(request_id.encode()) % 3
    if kind == 0:
        observation.camera_image = b"\xff\xd8 not a jpeg"
        observation.camera_image_encoding = pb.IMAGE_ENCODING_JPEG
    elif kind == 1:
        observation.joint_positions[0] = float("nan")
    else:
        observation.embodiment_tag = "no-such-robot"
    return observation


def _expected(model: ToyPolicy, request: pb.Observation) -> np.ndarray:
    image = np.frombuffer(request.camera_image, np.uint8).reshape(SIDE, SIDE, 3)
    sample = model.prepare(
        Observation(
            images={"base": image},
            joint_positions=np.asarray(request.joint_positions, np.float32),
            instruction=request.language_instruction,
            embodiment="",
            seed=request.seed,
        )
    )
    return expected_actions(sample)


async def _soak(target: str, model: ToyPolicy, ledger: Ledger) -> None:
    end = time.monotonic() + SOAK_S
    counter = iter(range(10**9))

    def new_id(kind: str) -> str:
        return f"{kind}-{next(counter)}"

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.VLAInferenceStub(channel)

        async def unary_good() -> None:
            while time.monotonic() < end:
                request = _good(new_id("u"))
                ledger.sent_good.add(request.request_id)
                chunk = await stub.Predict(request, timeout=10)  # a failure fails the test
                ledger.exact["OK"] += 1
                ledger.check_answer(model, request, chunk)

        async def unary_bad() -> None:
            while time.monotonic() < end:
                try:
                    await stub.Predict(_bad(new_id("b")), timeout=10)
                    ledger.wrong.append("bad request answered OK")
                except grpc.aio.AioRpcError as exc:
                    ledger.exact[exc.code().name] += 1
                await asyncio.sleep(0.005)

        async def unary_cut_short(rng: random.Random, by_deadline: bool) -> None:
            while time.monotonic() < end:
                request = _good(new_id("d" if by_deadline else "c"))
                delay = rng.uniform(0.0, 0.03)
                call = stub.Predict(request, timeout=delay if by_deadline else 10)
                if not by_deadline:
                    await asyncio.sleep(delay)
                    call.cancel()
                try:
                    chunk = await call
                except (asyncio.CancelledError, grpc.aio.AioRpcError):
                    ledger.racy += 1  # the server may or may not have seen / answered it
                else:
                    ledger.exact["OK"] += 1
                    ledger.sent_good.add(request.request_id)
                    ledger.check_answer(model, request, chunk)
                await asyncio.sleep(0.005)

        async def stream(rng: random.Random, disconnect: bool) -> None:
            while time.monotonic() < end:
                call = stub.StreamControl(timeout=30)
                frames = rng.randrange(3, 25)
                cut_at = rng.randrange(frames) if disconnect else -1
                for index in range(frames):
                    bad = rng.random() < 0.15 and index != cut_at  # the cut frame is a good one
                    request = (_bad if bad else _good)(new_id("sb" if bad else "s"))
                    await call.write(request)
                    if index == cut_at:
                        await asyncio.sleep(rng.uniform(0.0, 0.01))
                        call.cancel()  # disconnect with this frame outstanding
                        ledger.racy += 1
                        break
                    chunk = await call.read()
                    assert chunk is not grpc.aio.EOF
                    if bad:
                        code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                        if chunk.request_id != request.request_id or chunk.error.code != code:
                            ledger.wrong.append(f"{request.request_id}: {chunk.error}")
                        ledger.exact["INVALID_ARGUMENT"] += 1
                    else:
                        ledger.sent_good.add(request.request_id)
                        ledger.exact["OK"] += 1
                        ledger.check_answer(model, request, chunk)
                else:
                    await call.done_writing()
                    assert await call.read() is grpc.aio.EOF
                    assert await call.code() == OK

        rng = random.Random(8)
        tasks = [unary_good() for _ in range(6)]
        tasks += [unary_bad()]
        tasks += [unary_cut_short(random.Random(rng.random()), by_deadline=d) for d in (True, True, False)]
        tasks += [stream(random.Random(rng.random()), disconnect=False) for _ in range(3)]
        tasks += [stream(random.Random(rng.random()), disconnect=True) for _ in range(2)]
        await asyncio.gather(*tasks)


@pytest.mark.slow
def test_soak_every_good_request_gets_exactly_its_answer_and_metrics_add_up(server_factory, caplog):
    caplog.set_level(logging.WARNING)
    holder: dict[str, ToyPolicy] = {}

    def factory(settings):
        holder["m"] = ToyPolicy(settings, batch_cost_s=0.002, sample_cost_s=0.0005)
        return holder["m"]

    running = server_factory(
        factory, batch_size=8, batch_timeout_ms=2, max_queue_size=512, max_stream_rate_hz=0, timeout_ms=10_000
    )
    model = holder["m"]
    ledger = Ledger()
    asyncio.run(_soak(running.target, model, ledger))

    engine = running.server.engine
    assert engine is not None
    registry = running.server.metrics.registry

    def server_counts() -> dict[str, float]:
        counts = {}
        for metric in registry.collect():
            if metric.name == "vla_inference_requests":
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        counts[sample.labels["status"]] = sample.value
        return counts

    # let cut-short requests finish on the server, then require a stable picture
    deadline = time.monotonic() + 10
    previous: dict[str, float] = {}
    while time.monotonic() < deadline:
        counts = server_counts()
        if engine.in_flight == 0 and engine.sessions == 0 and counts == previous:
            break
        previous = counts
        time.sleep(0.2)

    assert ledger.wrong == []
    assert engine.in_flight == 0, "admissions leaked"
    assert engine.sessions == 0, "stream sessions leaked"
    assert engine.queue_depth == 0
    # every good request answered exactly once, none lost, none duplicated
    assert set(ledger.answers) == ledger.sent_good
    assert all(n == 1 for n in ledger.answers.values())
    assert ledger.exact["OK"] > 200 and ledger.exact["INVALID_ARGUMENT"] > 20 and ledger.racy > 20

    counts = server_counts()
    unexpected = set(counts) - {"OK", "INVALID_ARGUMENT", "CANCELLED", "DEADLINE_EXCEEDED"}
    assert not unexpected, counts
    # exact where the client knows the outcome ...
    assert counts.get("INVALID_ARGUMENT", 0) == ledger.exact["INVALID_ARGUMENT"]
    racy_ok = counts.get("OK", 0) - ledger.exact["OK"]
    assert racy_ok >= 0, (counts, ledger.exact)
    # ... and each cut-short request counted at most once, as OK, CANCELLED or DEADLINE_EXCEEDED
    racy_counted = racy_ok + counts.get("CANCELLED", 0) + counts.get("DEADLINE_EXCEEDED", 0)
    assert racy_counted <= ledger.racy, (counts, ledger.exact, ledger.racy)
    assert running.client().health().state == "SERVING"
    # ordinary client behaviour (cancel, deadline, disconnect, bad input) makes the server log no
    # errors: records from the server's loop thread and its worker pools (the clients' grpc.aio
    # threads are left out: they may complain once their loop is closed)
    errors = [
        f"{r.threadName}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and r.threadName.startswith(SERVER_THREADS)
        # gRPC's own record when the client left just as its answer was being sent (a benign race
        # inside grpc.aio that the handler cannot see); the abort path handles its own version
        and not r.getMessage().startswith("ExecuteBatchError raised in core")
        # grpc.aio's process-wide poller, shared by the test's client loops and the server loop,
        # delivering an event for a client loop that asyncio.run already closed: an artefact of
        # many event loops in one test process, not of the server
        and not (
            r.getMessage().startswith("Exception in callback PollerCompletionQueue._handle_events")
            and r.exc_info is not None
            and "Event loop is closed" in str(r.exc_info[1])
        )
    ]
    assert errors == [], errors[:3]
