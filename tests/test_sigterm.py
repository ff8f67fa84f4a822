"""SIGTERM under load against a real server process (tests/support/serve_toy.py): every accepted
request is answered with its own answer, new ones are refused UNAVAILABLE, and the process exits 0
within the grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from tests.conftest import make_settings
from tests.support.toy_model import ToyPolicy, expected_actions
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.api.v1 import vla_inference_pb2_grpc as pb_grpc
from vla_inference.client import make_observation
from vla_inference.models.base import Observation

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 5.0
WORKERS = 8


@dataclass
class Outcome:
    request_id: str
    sent: float
    finished: float
    code: grpc.StatusCode
    correct: bool


def _image(worker: int, seq: int) -> np.ndarray:
    return np.full((8, 8, 3), (worker * 31 + seq * 7) % 256, np.uint8)


def _request(worker: int, seq: int) -> pb.Observation:
    observation = make_observation(
        None, [worker * 0.1, seq * 0.01, 0, 0, 0, 0, 0], f"w{worker}", request_id=f"w{worker}-{seq}", seed=seq
    )
    observation.camera_image = _image(worker, seq).tobytes()
    observation.camera_image_encoding = pb.IMAGE_ENCODING_RAW_RGB
    observation.camera_image_width = observation.camera_image_height = 8
    return observation


def _expected(model: ToyPolicy, worker: int, seq: int) -> np.ndarray:
    request = _request(worker, seq)
    sample = model.prepare(
        Observation(
            images={"base": _image(worker, seq)},
            joint_positions=np.asarray(request.joint_positions, np.float32),
            instruction=request.language_instruction,
            embodiment="",
            seed=seq,
        )
    )
    return expected_actions(sample)


def test_sigterm_under_load_drains_refuses_new_and_exits_zero(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLA_")}
    env["PYTHONPATH"] = str(ROOT)
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.serve_toy", "--grace", str(GRACE_S), "--batch-cost", "0.1"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    killer = threading.Timer(90, process.kill)  # never leave a server behind
    killer.start()
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert line.startswith("PORT "), f"server did not start: {line!r}\n{log_path.read_text()}"
        target = f"127.0.0.1:{int(line.split()[1])}"
        model = ToyPolicy(make_settings())
        model.load(None, "cpu")
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def worker(index: int) -> None:
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.VLAInferenceStub(channel)
                for seq in range(10_000):
                    sent = time.monotonic()
                    try:
                        chunk = stub.Predict(_request(index, seq), timeout=GRACE_S * 2)
                        code = grpc.StatusCode.OK
                        correct = chunk.request_id == f"w{index}-{seq}" and np.allclose(
                            [a.joint_commands for a in chunk.actions], _expected(model, index, seq), atol=1e-5
                        )
                    except grpc.RpcError as exc:
                        code, correct = exc.code(), False
                    with lock:
                        outcomes.append(Outcome(f"w{index}-{seq}", sent, time.monotonic(), code, correct))
                    if code != grpc.StatusCode.OK:
                        return  # refused: this client stops, as a robot would fail over

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        sigterm_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=GRACE_S * 3)
        returncode = process.wait(timeout=GRACE_S + 10)
        exit_s = time.monotonic() - sigterm_at
        with grpc.insecure_channel(target) as channel:
            try:
                pb_grpc.VLAInferenceStub(channel).Predict(_request(0, 0), timeout=2)
                after_exit = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                after_exit = exc.code()
    finally:
        killer.cancel()
        if process.poll() is None:
            process.kill()
        if process.stdout:
            process.stdout.close()
    server_log = log_path.read_text()
    assert returncode == 0, server_log
    assert exit_s < GRACE_S + 1.5, f"exit took {exit_s:.1f} s"
    assert not any(t.is_alive() for t in threads)
    before = [o for o in outcomes if o.sent < sigterm_at]
    after = [o for o in outcomes if o.sent >= sigterm_at]
    # accepted before SIGTERM: answered, with its own answer
    assert all(o.code == grpc.StatusCode.OK and o.correct for o in before), [
        (o.request_id, o.code) for o in before if not o.correct
    ]
    # sent after SIGTERM: answered, or refused UNAVAILABLE (retryable) -- never failed another way
    refused = {grpc.StatusCode.UNAVAILABLE}
    assert all(o.code == grpc.StatusCode.OK or o.code in refused for o in after), [
        (o.request_id, o.code) for o in after
    ]
    assert sum(o.code == grpc.StatusCode.UNAVAILABLE for o in after) >= WORKERS // 2
    answered = [o for o in outcomes if o.code == grpc.StatusCode.OK]
    assert len(answered) >= WORKERS and all(o.correct for o in answered)
    assert len({o.request_id for o in outcomes}) == len(outcomes)  # each request answered once
    # requests in flight at SIGTERM were answered, not dropped
    assert any(o.sent < sigterm_at < o.finished for o in answered), "no request was in flight at SIGTERM"
    # every client's last request -- sent after SIGTERM -- was refused
    last = {o.request_id.split("-")[0]: o for o in sorted(outcomes, key=lambda o: o.sent)}
    assert len(last) == WORKERS
    assert all(o.code in refused and o.sent >= sigterm_at for o in last.values())
    assert after_exit == grpc.StatusCode.UNAVAILABLE
    assert "signal received: draining" in server_log and "stopped" in server_log
