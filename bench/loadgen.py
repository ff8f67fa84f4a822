"""Server processes and the bounded load generators (loopback only).

Every generator is bounded three ways: a fixed number of clients, a wall-clock window, and a
per-call timeout. Targets are always 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import empty_pb2

from bench.common import LOOPBACK, ROOT, summary_ms
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.api.v1 import vla_inference_pb2_grpc as pb_grpc

MAX_CLIENTS = 64
CALL_TIMEOUT_S = 120.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


# --- server processes -----------------------------------------------------------------------------
class ServerProcess:
    """A child process that prints `READY <port>` when serving and stops when stdin closes."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str], log_path: Path, ready_timeout_s: float = 300.0
    ) -> None:
        self.args = list(args)
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.metrics_port = 0  # when the server prints it (bench.serve --metrics)
        self.started_s = 0.0

    def __enter__(self) -> ServerProcess:
        t0 = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self._read_ready()), daemon=True)
        reader.start()
        reader.join(self.ready_timeout_s)
        if not line or not line[0].startswith("READY "):
            self.__exit__(None, None, None)
            raise RuntimeError(
                f"server {' '.join(self.args)} did not become ready within {self.ready_timeout_s:.0f} s "
                f"(got {line[:1]!r}); log: {self.log_path}"
            )
        fields = line[0].split()
        self.port = int(fields[1])
        self.metrics_port = int(fields[2]) if len(fields) > 2 else 0
        self.started_s = time.monotonic() - t0
        return self

    def _read_ready(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            if raw.startswith("READY "):
                return raw.strip()
        return ""

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._log.close()
        self.proc = None


def _p50(values: list[float]) -> float | None:
    return round(float(np.percentile(values, 50)), 3) if values else None


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far (all its threads; /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def load_average() -> float | None:
    """The 1-minute load average (the cores are shared: a phase that starts above nproc was contended)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --- clients --------------------------------------------------------------------------------------
def channel(target: str) -> grpc.aio.Channel:
    assert target.startswith(LOOPBACK + ":"), "the benchmark only targets 127.0.0.1"
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


async def model_info(target: str, metadata: tuple[tuple[str, str], ...] = ()) -> pb.ModelInfo:
    async with channel(target) as ch:
        return await pb_grpc.VLAInferenceStub(ch).GetModelInfo(
            empty_pb2.Empty(), timeout=30, metadata=metadata
        )


async def wait_idle(target: str, limit_s: float = 60.0) -> None:
    """Wait until our server has no request in flight (leftovers of a previous phase)."""
    end = time.monotonic() + limit_s
    async with channel(target) as ch:
        stub = pb_grpc.VLAInferenceStub(ch)
        while time.monotonic() < end:
            health = await stub.HealthCheck(empty_pb2.Empty(), timeout=10)
            if health.requests_in_flight == 0:
                return
            await asyncio.sleep(0.05)


@dataclass
class UnaryResult:
    e2e_s: list[float]
    timings: list[pb.TimingBreakdown]
    errors: int
    load_1m: float | None = None


async def unary(
    target: str, request: pb.Observation, *, count: int, window_s: float, warmup: int = 2
) -> UnaryResult:
    """Sequential Predict calls on one channel: up to `count` calls or `window_s` seconds."""
    load_1m = load_average()
    e2e: list[float] = []
    timings: list[pb.TimingBreakdown] = []
    errors = 0
    async with channel(target) as ch:
        stub = pb_grpc.VLAInferenceStub(ch)
        for _ in range(warmup):
            await stub.Predict(request, timeout=CALL_TIMEOUT_S)
        end = time.monotonic() + window_s
        while len(e2e) < count and time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                reply = await stub.Predict(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            e2e.append(time.perf_counter() - t0)
            timings.append(reply.timing)
    return UnaryResult(e2e, timings, errors, load_1m)


def overhead_breakdown(result: UnaryResult, floor_s: float | None) -> dict[str, Any]:
    """End-to-end latency and where the time went (see docs/benchmarks.md, "Definitions")."""
    t = result.timings
    total = [x.total_ms / 1000 for x in t]
    out: dict[str, Any] = {
        "loadavg_1m_at_start": result.load_1m,
        "e2e": summary_ms(result.e2e_s),
        "errors": result.errors,
        "server_total": summary_ms(total),
        "transport": summary_ms([e - s for e, s in zip(result.e2e_s, total, strict=True)]),
        "decode": summary_ms([x.decode_ms / 1000 for x in t]),
        "preprocess": summary_ms([x.preprocess_ms / 1000 for x in t]),
        "queue": summary_ms([x.queue_ms / 1000 for x in t]),
        "model": summary_ms([x.model_ms / 1000 for x in t]),
        "postprocess": summary_ms([x.postprocess_ms / 1000 for x in t]),
        # Per request: everything that is not the batched forward pass the server timed.
        "non_model": summary_ms([e - x.model_ms / 1000 for e, x in zip(result.e2e_s, t, strict=True)]),
    }
    if floor_s is not None and result.e2e_s:
        out["floor_p50_ms"] = round(floor_s * 1000, 3)
        out["overhead_vs_floor"] = {
            "p50_ms": round(out["e2e"]["p50_ms"] - floor_s * 1000, 3),
            "p99_ms": round(out["e2e"]["p99_ms"] - floor_s * 1000, 3),
        }
    return out


async def stream(
    target: str,
    request: pb.Observation,
    *,
    period_s: float,
    steps: int,
    tail_s: float,
    keep_latencies: bool = False,
) -> dict[str, Any]:
    """One StreamControl session sending an observation every period_s, `steps` times.

    Latency per step = answer received - observation sent. A deadline is met when the answer
    for that observation arrives within one control period; skipped and failed steps miss it.
    keep_latencies: the answered steps' latencies (s) in `_latencies_s`, for pooling several streams.
    """
    load_1m = load_average()
    sent: dict[str, float] = {}
    latency: dict[str, float] = {}
    errors = 0
    skipped = 0

    async def observations() -> Any:
        start = time.perf_counter()
        for i in range(steps):
            wake = start + i * period_s
            delay = wake - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            msg = pb.Observation()
            msg.CopyFrom(request)
            msg.request_id = f"s{i}"
            sent[msg.request_id] = time.perf_counter()
            yield msg

    deadline = steps * period_s + tail_s
    async with channel(target) as ch:
        call = pb_grpc.VLAInferenceStub(ch).StreamControl(observations(), timeout=deadline)
        try:
            async for chunk in call:
                now = time.perf_counter()
                if chunk.HasField("error"):
                    errors += 1
                    continue
                skipped += len(chunk.skipped_request_ids)
                if chunk.request_id in sent:
                    latency[chunk.request_id] = now - sent[chunk.request_id]
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    met = sum(1 for v in latency.values() if v <= period_s)
    row = {
        "loadavg_1m_at_start": load_1m,
        "rate_hz": round(1 / period_s, 3),
        "period_ms": round(period_s * 1000, 3),
        "steps": steps,
        "answered": len(latency),
        "skipped": skipped,
        "errors": errors,
        "latency": summary_ms(list(latency.values())),
        "deadlines_met": met,
        "deadline_met_fraction": round(met / steps, 4) if steps else 0.0,
    }
    if keep_latencies:
        row["_latencies_s"] = list(latency.values())
    return row


@dataclass
class FleetLog:
    """What closed-loop robots record: (completion time, latency) of every answer after a robot's
    first, the time of each robot's first answer, and the status names of failed calls."""

    done: list[tuple[float, float]] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def robot(
        self, call: Callable[[], Awaitable[Any]], t_end: float, on_reply: Callable[[Any], None] | None = None
    ) -> None:
        """One robot until t_end: the next call when the previous answer arrives; a failed call
        is counted and retried after 10 ms. on_reply sees every answer recorded in `done`."""
        got_first = False
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            try:
                reply = await call()
            except grpc.RpcError as exc:
                self.errors.append(exc.code().name)
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if not got_first:
                got_first = True
                self.first.append(t1)
                continue
            self.done.append((t1, t1 - t0))
            if on_reply is not None:
                on_reply(reply)


async def fleet(
    target: str,
    request: pb.Observation,
    *,
    clients: int,
    window_s: float,
    metadata: tuple[tuple[str, str], ...] = (),
    keep_latencies: bool = False,
    cpu_pid: int | None = None,
) -> dict[str, Any]:
    """`clients` closed-loop robots (one channel each) for window_s seconds.

    Steady-state window: from the moment every robot has had its first answer to the end of the
    window; throughput = answers completed inside it / its length, latency = those answers.
    Calls still open at the end are cancelled and not counted.
    cpu_pid: the server's process; adds its CPU time (user + system) per answer over the steady
    window (`server_cpu_ms_per_request`).
    """
    if not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(f"clients must be 1..{MAX_CLIENTS}")
    load_1m = load_average()
    log = FleetLog()
    done, first, errors = log.done, log.first, log.errors
    batches: list[int] = []  # the server-reported batch size of each counted answer (ours only)
    server_parts: list[tuple[float, float]] = []  # (model_ms, queue_ms) as the server reported them
    t_start = time.perf_counter()
    t_end = t_start + window_s

    def server_timing(reply: pb.ActionChunk) -> None:
        if reply.timing.batch_size:
            batches.append(reply.timing.batch_size)
            server_parts.append((reply.timing.model_ms, reply.timing.queue_ms))

    async def robot(index: int) -> None:
        msg = pb.Observation()
        msg.CopyFrom(request)
        msg.seed = index
        async with channel(target) as ch:
            stub = pb_grpc.VLAInferenceStub(ch)
            await log.robot(
                lambda: stub.Predict(msg, timeout=CALL_TIMEOUT_S, metadata=metadata), t_end, server_timing
            )

    cpu: list[tuple[float, float | None]] = []  # (time, server CPU s) at the steady window's ends

    async def probe_cpu(pid: int) -> None:
        while len(first) < clients and time.perf_counter() < t_end:
            await asyncio.sleep(0.005)
        cpu.append((time.perf_counter(), process_cpu_s(pid)))
        await asyncio.sleep(max(0.0, t_end - 0.05 - time.perf_counter()))
        cpu.append((time.perf_counter(), process_cpu_s(pid)))

    tasks = [asyncio.create_task(robot(i)) for i in range(clients)]
    probe = asyncio.create_task(probe_cpu(cpu_pid)) if cpu_pid is not None else None
    await asyncio.wait(tasks, timeout=window_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if probe is not None:
        await probe
    steady_from = max(first) if len(first) == clients else t_start
    inside = [(t, lat) for t, lat in done if steady_from <= t <= t_end]
    span = t_end - steady_from
    steady = len(inside) > 0 and span > 0
    if not steady:  # no answers after every robot's first: fall back to the whole window
        inside = [(t, lat) for t, lat in done if t <= t_end] + [(t, t - t_start) for t in first if t <= t_end]
        span = window_s
    row = {
        "loadavg_1m_at_start": load_1m,
        "clients": clients,
        "window_s": round(window_s, 3),
        "steady_window_s": round(span, 3),
        "steady": steady,
        "completed": len(inside),
        "throughput_rps": round(len(inside) / span, 4) if span > 0 else 0.0,
        "latency": summary_ms([lat for _, lat in inside]),
        "errors": len(errors),
        "error_codes": sorted(set(errors)),
        "mean_batch_size": round(sum(batches) / len(batches), 2) if batches else None,
        "server_model_ms_p50": _p50([m for m, _ in server_parts]),
        "server_queue_ms_p50": _p50([q for _, q in server_parts]),
    }
    if keep_latencies:
        row["_latencies_s"] = [lat for _, lat in inside]
    if len(cpu) == 2 and cpu[0][1] is not None and cpu[1][1] is not None:
        (t0, c0), (t1, c1) = cpu
        answers = sum(1 for t, _ in done if t0 <= t <= t1)
        row["server_cpu_ms_per_request"] = round((c1 - c0) / answers * 1000, 4) if answers else None
        row["server_cpu_cores"] = round((c1 - c0) / (t1 - t0), 3) if t1 > t0 else None
    return row
