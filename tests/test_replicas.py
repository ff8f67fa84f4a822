"""Several replicas, one client: real server processes (tests/support/serve_toy.py) on loopback.

The client is given every replica's address; gRPC balances calls round-robin over the healthy
ones, retries calls a replica refused before admitting them, and never retries a call that may
have run. Each replica answers with its own model name, so every answer says who served it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from tests.support.certs import make_pki
from tests.support.toy_model import ToyPolicy
from vla_inference import channels, cli
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.client import AsyncVLAClient, ChannelSecurity, VLAClient, VLAError, make_observation
from vla_inference.transport.servicer import ServerState

ROOT = Path(__file__).resolve().parents[1]
IMAGE = np.full((8, 8, 3), 90, np.uint8)
JOINTS = [0.1] * 7
REPLICA_ARGS = ("--grace", "5", "--batch-cost", "0.02", "--batch-size", "4")


@dataclass
class Replica:
    name: str
    process: subprocess.Popen[str]
    log: Path
    port: int = 0
    stopped: bool = False  # signalled by a test: replace before the next one

    def signal(self, signum: int) -> None:
        self.stopped = True
        self.process.send_signal(signum)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class Fleet:
    """Three toy replicas (batch cost 20 ms, drain grace 5 s). Tests SIGTERM or kill one; the next
    test gets it back (a fresh process on a new port) instead of waiting for a whole new fleet."""

    SIZE = 3

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("VLA_")}
        self.env.update(PYTHONPATH=str(ROOT), VLA_TORCH_THREADS="1", VLA_METRICS_ENABLED="false")
        self.replicas = [self._spawn(i) for i in range(self.SIZE)]
        self._wait_ports(self.replicas)

    def _spawn(self, index: int) -> Replica:
        name = f"replica{index}"
        log = self.workdir / f"{name}-{time.monotonic_ns()}.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.serve_toy", "--name", name, *REPLICA_ARGS],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        return Replica(name, process, log)

    def _wait_ports(self, replicas: list[Replica]) -> None:
        killer = threading.Timer(120, lambda: [r.process.kill() for r in replicas])
        killer.start()
        try:
            for replica in replicas:
                assert replica.process.stdout is not None
                line = replica.process.stdout.readline()
                assert line.startswith("PORT "), f"{replica.name} did not start: {replica.log.read_text()}"
                replica.port = int(line.split()[1])
        finally:
            killer.cancel()

    def heal(self) -> None:
        """Replace every replica that exited (or was told to)."""
        fresh = []
        for index, replica in enumerate(self.replicas):
            if replica.process.poll() is not None or replica.stopped:
                self._close(replica)
                self.replicas[index] = self._spawn(index)
                fresh.append(self.replicas[index])
        self._wait_ports(fresh)

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.replicas]

    def by_name(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    @staticmethod
    def _close(replica: Replica) -> None:
        try:
            replica.process.wait(timeout=10)  # a drain in progress finishes
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait(timeout=10)
        if replica.process.stdout:
            replica.process.stdout.close()

    def close(self) -> None:
        for replica in self.replicas:
            replica.process.kill()
            self._close(replica)


@pytest.fixture(scope="module")
def fleet_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def fleet(fleet_processes: Fleet) -> Fleet:
    """Three replicas, all running and SERVING."""
    fleet_processes.heal()
    return fleet_processes


def _observation(seq: int) -> pb.Observation:
    return make_observation(IMAGE, JOINTS, "spread", request_id=str(seq), seed=seq)


def _warm_up(client: VLAClient, replicas: int) -> None:
    """Until every replica has answered once (all connections up and healthy)."""
    seen: set[str] = set()
    end = time.monotonic() + 20
    while len(seen) < replicas and time.monotonic() < end:
        seen.add(client.predict_observation(_observation(0)).model_name)
    assert len(seen) == replicas, seen


@dataclass
class Outcome:
    sent: float
    finished: float
    code: grpc.StatusCode
    replica: str = ""


class Load:
    """`workers` threads calling Predict in a closed loop through one shared client."""

    def __init__(self, client: VLAClient, workers: int = 6) -> None:
        self.client = client
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def _run(self, worker: int) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            sent = time.monotonic()
            try:
                chunk = self.client.predict_observation(_observation(worker * 100_000 + seq), timeout=5)
                outcome = Outcome(sent, time.monotonic(), grpc.StatusCode.OK, chunk.model_name)
            except VLAError as exc:
                outcome = Outcome(sent, time.monotonic(), exc.code)
            with self._lock:
                self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


def test_load_spreads_over_replicas_and_sigterm_loses_no_request(fleet: Fleet):
    with VLAClient(fleet.targets) as client:
        _warm_up(client, 3)
        with Load(client) as load:
            time.sleep(1.5)
            draining = fleet.replicas[0]
            sigterm_at = time.monotonic()
            draining.signal(signal.SIGTERM)
            time.sleep(2.0)
        outcomes = load.snapshot()
        # Later calls keep working on the two others.
        after = collections.Counter(client.predict_observation(_observation(i)).model_name for i in range(12))
    returncode = draining.process.wait(timeout=10)

    before = [o for o in outcomes if o.finished < sigterm_at]
    shares = collections.Counter(o.replica for o in before)
    assert set(shares) == {"replica0", "replica1", "replica2"}, shares
    assert min(shares.values()) >= 0.15 * len(before), shares  # round-robin: about a third each
    # Nothing failed: calls running on replica0 were answered by its drain, calls it refused were
    # retried on another replica.
    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert not failed, collections.Counter(o.code.name for o in failed)
    late = [o for o in outcomes if o.sent > sigterm_at + 0.5]
    assert len(late) > 20
    assert not [o for o in late if o.replica == "replica0"]  # the draining replica got no new calls
    assert {o.replica for o in late} == {"replica1", "replica2"}
    assert set(after) == {"replica1", "replica2"}
    assert returncode == 0, draining.log.read_text()


def test_kill9_fails_only_calls_running_there_and_client_recovers(fleet: Fleet):
    with VLAClient(fleet.targets) as client:
        _warm_up(client, 3)
        with Load(client, workers=6) as load:
            time.sleep(1.0)
            killed_at = time.monotonic()
            fleet.replicas[1].signal(signal.SIGKILL)
            time.sleep(2.0)
        outcomes = load.snapshot()
    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    print(f"kill -9 of one of 3 replicas under 6 closed-loop workers: {len(failed)} calls failed")
    # Only calls already running on the killed replica fail (at most one per worker), and only
    # around the kill; they are UNAVAILABLE and were not retried elsewhere (they may have run).
    assert len(failed) <= 6
    assert all(o.code == grpc.StatusCode.UNAVAILABLE for o in failed), [o.code for o in failed]
    assert all(o.sent < killed_at + 0.1 and o.finished < killed_at + 1.0 for o in failed)
    # Recovery: every call sent from 0.5 s after the kill on succeeded, on the two others.
    late = [o for o in outcomes if o.sent > killed_at + 0.5]
    assert len(late) > 20
    assert all(o.code == grpc.StatusCode.OK for o in late)
    assert {o.replica for o in late} == {"replica0", "replica2"}


def test_refused_calls_are_retried_on_another_replica(server_factory):
    """A replica that refuses (draining, while its health still says SERVING) costs no call."""
    refusing = server_factory(lambda s: ToyPolicy(s, name="refusing"))
    serving = server_factory(lambda s: ToyPolicy(s, name="serving"))
    with VLAClient([refusing.target, serving.target]) as client:
        seen = {client.predict(IMAGE, JOINTS, "x").model_name for _ in range(10)}
        assert seen == {"refusing", "serving"}
        refusing.server.state.phase = ServerState.DRAINING  # refuses every call, health unchanged
        answers = collections.Counter(client.predict(IMAGE, JOINTS, "x").model_name for _ in range(20))
        refusing.server.state.phase = ServerState.SERVING
    assert answers == {"serving": 20}
    # About half of the calls went to `refusing` first: it refused them before admission
    # (counted UNAVAILABLE there) and the client retried each on `serving`.
    assert 5 <= _count(_metrics(refusing), "UNAVAILABLE") <= 20


def _metrics(running) -> str:  # type: ignore[no-untyped-def]
    import urllib.request

    with urllib.request.urlopen(running.metrics_url, timeout=5) as response:
        return response.read().decode()


def _count(text: str, status: str) -> float:
    for line in text.splitlines():
        if line.startswith("vla_inference_requests_total") and f'status="{status}"' in line:
            return float(line.split()[-1])
    return 0.0


def test_cli_takes_several_targets_and_health_probes_one_replica(server_factory, tmp_path, capsys):
    refusing = server_factory(lambda s: ToyPolicy(s, name="refusing"))
    serving = server_factory(lambda s: ToyPolicy(s, name="serving"))
    image = tmp_path / "frame.png"
    Image.fromarray(IMAGE).save(image)
    refusing.server.state.phase = ServerState.DRAINING  # refuses calls; health still SERVING
    targets = f"{refusing.target},{serving.target}"
    for _ in range(4):  # whichever replica a fresh client starts with, the call is answered
        joints = ["--joints", "0,0,0,0,0,0,0", "--instruction", "pick up the cup"]
        assert cli.main(["predict", "--target", targets, "--image", str(image), *joints]) == 0
        assert json.loads(capsys.readouterr().out)["model"] == "serving"
    assert cli.main(["info", "--target", targets]) == 0
    assert json.loads(capsys.readouterr().out)["modelName"] == "serving"
    refusing.call(refusing.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    # The probe reaches the replica it names, whatever its health, and reports it.
    assert cli.main(["health", "--target", refusing.target]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"
    assert cli.main(["health", "--target", serving.target]) == 0


def test_tls_and_tokens_across_replicas_given_by_address_or_name(server_factory, tmp_path):
    pki = make_pki(tmp_path)  # server certificate for localhost and 127.0.0.1
    token = "tok-fleet-0123456789abcdef"
    secured = {
        "tls_cert_file": str(pki.server.cert),
        "tls_key_file": str(pki.server.key),
        "auth_tokens": token,
    }
    replicas = [server_factory(lambda s, n=n: ToyPolicy(s, name=n), **secured) for n in ("a", "b")]
    ports = [r.server.port for r in replicas]
    security = ChannelSecurity(root_certificates=pki.ca.cert_pem, token=token)
    for targets in ([f"127.0.0.1:{p}" for p in ports], ",".join(f"localhost:{p}" for p in ports)):
        with VLAClient(targets, security=security) as client:
            served = collections.Counter(client.predict(IMAGE, JOINTS, "x").model_name for _ in range(8))
            assert set(served) == {"a", "b"}, (targets, served)
            assert client.health().state == "SERVING"
    with VLAClient(
        [f"127.0.0.1:{p}" for p in ports], security=ChannelSecurity(root_certificates=pki.ca.cert_pem)
    ) as c:
        with pytest.raises(VLAError) as info:
            c.predict(IMAGE, JOINTS, "x")  # health checks pass without a token; calls do not
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_targets_become_one_grpc_target():
    assert channels.resolve_target("localhost:50051") == channels.Target("localhost:50051")
    uri = "dns:///vla-inference-headless.robots.svc.cluster.local:50051"
    assert channels.resolve_target(uri) == channels.Target(uri)
    listed = "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    assert channels.resolve_target(listed).uri == listed  # a URI passes through, commas and all
    both = channels.Target("ipv4:10.0.0.1:1,10.0.0.2:2", server_name="10.0.0.1")
    assert channels.resolve_target(["10.0.0.1:1", "10.0.0.2:2"]) == both
    assert channels.resolve_target(" 10.0.0.1:1, 10.0.0.2:2 ") == both
    assert channels.resolve_target(["[::1]:1", "[::1]:2"]) == channels.Target("ipv6:[::1]:1,[::1]:2", "::1")
    named = channels.resolve_target(["localhost:1", "127.0.0.2:2"])
    assert named.uri.startswith("ipv4:127.0.0.1:1,") and named.uri.endswith(",127.0.0.2:2")
    assert named.server_name == "localhost"
    for bad in (["10.0.0.1", "10.0.0.2:2"], ["10.0.0.1:1", "[::1]:2"], "", ["dns:///a:1", "b:2"]):
        with pytest.raises(ValueError):
            channels.resolve_target(bad)


def test_service_config_balances_checks_health_and_retries_only_unavailable():
    config = json.loads(channels.service_config(True, channels.RetryPolicy()))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "vla_inference.v1.VLAInference"}
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "vla_inference.v1.VLAInference"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 3
    assert config["retryThrottling"]["maxTokens"] > 0
    plain = json.loads(channels.service_config(False, channels.NO_RETRY))
    assert plain == {}


def test_control_session_moves_to_another_replica_when_its_replica_drains(fleet: Fleet):
    with VLAClient(fleet.targets) as client:
        _warm_up(client, 3)
        with client.control() as session:
            first = session.act(_observation(1)).model_name
            assert session.act(_observation(2)).model_name == first  # a session stays on its replica
            fleet.by_name(first).signal(signal.SIGTERM)
            time.sleep(0.3)
            answers = [session.act(_observation(3 + i)) for i in range(5)]
        assert session.reopens == 1
        moved = {a.model_name for a in answers}
        assert len(moved) == 1 and first not in moved, (first, moved)
        assert all(len(a.actions) == 8 and not a.HasField("error") for a in answers)
    assert fleet.by_name(first).process.wait(timeout=10) == 0


def test_control_session_survives_its_replica_dying(fleet: Fleet):
    with VLAClient(fleet.targets) as client:
        _warm_up(client, 3)
        with client.control() as session:
            home = session.act(_observation(1)).model_name
            fleet.by_name(home).signal(signal.SIGKILL)
            fleet.by_name(home).process.wait(timeout=10)
            answers = [session.act(_observation(2 + i)) for i in range(3)]
        assert session.reopens == 1
        assert len({a.model_name for a in answers}) == 1 and home not in {a.model_name for a in answers}


def test_stream_on_draining_replica_ends_unavailable_and_async_session_reopens(fleet: Fleet):
    async def paced() -> AsyncIterator[pb.Observation]:
        for i in range(500):
            yield _observation(i)
            await asyncio.sleep(0.02)

    async def scenario() -> tuple[str, str, grpc.StatusCode, str, set[str], int]:
        async with AsyncVLAClient(fleet.targets) as client:
            for i in range(6):
                await client.predict_observation(_observation(i))
            async with client.control() as session:
                home = (await session.act(_observation(0))).model_name
                # A plain stream on the same replica, opened directly, to see how it ends.
                async with AsyncVLAClient(fleet.by_name(home).target) as direct:
                    raw = direct.stream(paced())
                    raw_home = (await raw.read()).model_name
                    fleet.by_name(home).signal(signal.SIGTERM)
                    code, details = grpc.StatusCode.OK, ""
                    try:
                        while await raw.read() is not grpc.aio.EOF:
                            pass
                    except VLAError as exc:
                        code, details = exc.code, exc.message
                later = {(await session.act(_observation(9 + i))).model_name for i in range(5)}
            return home, raw_home, code, details, later, session.reopens

    home, raw_home, code, details, later, reopens = asyncio.run(scenario())
    assert raw_home == home
    assert code == grpc.StatusCode.UNAVAILABLE, code
    assert "shutting down" in details and "reopen" in details
    assert reopens == 1
    assert len(later) == 1 and home not in later, (home, later)
    assert fleet.by_name(home).process.wait(timeout=10) == 0


def test_call_that_may_have_run_is_not_retried(fleet: Fleet):
    """Three calls hang, one on each replica; kill -9 one replica: its call fails UNAVAILABLE at
    once -- a retry would have hung on another replica until the deadline."""
    with VLAClient(fleet.targets) as client:
        _warm_up(client, 3)
        results: dict[int, tuple[grpc.StatusCode, float]] = {}

        def hang(index: int) -> None:
            try:
                client.predict(IMAGE, JOINTS, "hang", timeout=4, request_id=str(index))
                results[index] = (grpc.StatusCode.OK, time.monotonic())
            except VLAError as exc:
                results[index] = (exc.code, time.monotonic())

        threads = [threading.Thread(target=hang, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)  # round-robin: one call to each replica
        time.sleep(0.5)
        killed_at = time.monotonic()
        fleet.replicas[2].signal(signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=10)
    for replica in fleet.replicas:  # two model workers hang for 30 s: no use to a later test
        replica.signal(signal.SIGKILL)
    codes = collections.Counter(code for code, _ in results.values())
    assert codes == {grpc.StatusCode.UNAVAILABLE: 1, grpc.StatusCode.DEADLINE_EXCEEDED: 2}, codes
    unavailable_at = next(at for code, at in results.values() if code == grpc.StatusCode.UNAVAILABLE)
    assert unavailable_at - killed_at < 1.0
