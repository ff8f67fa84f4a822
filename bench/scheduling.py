"""Keeping the accelerator busy (issue 28): the server's scheduling against a simulated device, and
the CPU each request costs.

    python -m bench.scheduling                      # both parts, the embedded default model
    python -m bench.scheduling --quick              # shorter windows (a smoke test)
    python -m bench.scheduling --simulated-device 20,1.5 --robots 1,8,32,64 --batch-limits 8,32
    make bench                                      # runs them too, after the default model's phases

1. Simulated device (`bench.serve --simulated-device T1,K`: the real server, decode, preprocessing,
   batching, queue, postprocessing and gRPC around a forward pass that sleeps t(b) = T1 + K x (b - 1)
   ms): closed-loop robots at 1, 8, 32, 64 against batch limits 8 and 32 (throughput, p50/p99,
   mean batch, device efficiency = throughput / (b / t(b)), b = min(robots, limit)); a streaming
   fleet (64 robots at 10 Hz on StreamControl: deadline misses, skips), and the largest fleet at
   that rate the device has the capacity for.
2. CPU per request: the server's CPU time (user + system, /proc) per answer over a steady window,
   stubbed forward, 224 px JPEG, one camera, batching on, 8 robots; the transport floor server's
   from the same run; the in-process decode + preprocess; the ingest ceiling (robots added until
   throughput stops rising, stubbed forward, batching on) with the load generator on the same cores.

Goals (reported beside the figures, never asserted): GOALS below. Results: the `scheduling`
section of `make bench`'s JSON, or bench/results/scheduling-<stamp>.json / .md when run alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.common import ROOT, Target, default_targets, machine_facts, make_request, scratch_dir, summary_ms
from bench.serve import DeviceTime

RESULTS = ROOT / "bench" / "results"

GOALS = {
    "device_efficiency": 0.90,  # at GOAL_ROBOTS, every batch limit
    "p99_at_8_over_t8": 2.2,  # p99 latency at 8 robots <= 2.2 x t(8)
    "stream_deadline_misses": 0,  # where the device has the capacity for the streaming fleet
    "server_cpu_ms_per_request": 1.0,  # stubbed forward, 224 px JPEG, 1 camera, batching on, 8 robots
    "ingest_ceiling_rps": 800.0,  # stubbed forward, batching on, load generator on the same cores
}
GOAL_ROBOTS = (8, 32, 64)
CPU_ROBOTS = 8
CEILING_ROBOTS = (8, 16, 32, 64)


@dataclass
class Plan:
    """What to run; --quick shrinks the windows."""

    quick: bool = False
    device: DeviceTime = field(default_factory=DeviceTime)
    robots: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    batch_limits: list[int] = field(default_factory=lambda: [8, 32])
    batch_timeout_ms: float = 2.0
    stream_robots: int = 64
    stream_hz: float = 10.0

    @property
    def fleet_window_s(self) -> float:
        return 2.5 if self.quick else 5.0

    @property
    def stream_window_s(self) -> float:
        return 4.0 if self.quick else 10.0

    @property
    def cpu_window_s(self) -> float:
        return 3.0 if self.quick else 6.0


def server_env(target: Target, batch_size: int, batch_timeout_ms: float) -> dict[str, str]:
    from bench.run import server_env as env

    return env(target, batch_size, batch_timeout_ms)


# --- 1. the simulated device -------------------------------------------------------------------
def device_phases(target: Target, plan: Plan, logs: Path, serve_args: Sequence[str] = ()) -> dict[str, Any]:
    """Closed-loop fleets and streaming fleets against the simulated device, per batch limit.
    serve_args: another server to drive the same way (bench/gpu.py: the real model on the GPU,
    whose efficiency is then counted against plan.device, the t(b) measured in-process)."""
    device = plan.device
    out: dict[str, Any] = {
        "device": {"t1_ms": device.t1_ms, "k_ms": device.k_ms, "formula": "t(b) = T1 + K x (b - 1) ms"},
        "fleet": [],
        "stream": [],
    }
    for limit in plan.batch_limits:
        env = server_env(target, limit, plan.batch_timeout_ms)
        args = list(serve_args) or ["-m", "bench.serve", "--simulated-device", str(device)]
        print(f"[{' '.join(args[2:])}] batch limit {limit}", flush=True)
        with loadgen.ServerProcess(args, env, logs / "server.log") as srv:
            assert srv.proc is not None
            pid = srv.proc.pid

            async def run(limit: int = limit, target: str = srv.target, pid: int = pid) -> None:
                request = make_request(await loadgen.model_info(target))
                await loadgen.fleet(target, request, clients=min(8, max(plan.robots)), window_s=1.0)  # warm
                for robots in plan.robots:
                    await loadgen.wait_idle(target)
                    row = await loadgen.fleet(
                        target, request, clients=robots, window_s=plan.fleet_window_s, cpu_pid=pid
                    )
                    out["fleet"].append(_device_row(row, device, limit, robots))
                    _print_fleet(out["fleet"][-1])
                for robots, hz in _stream_fleets(plan, limit):
                    await loadgen.wait_idle(target)
                    row = await stream_fleet(target, request, robots, hz, plan.stream_window_s)
                    out["stream"].append(_stream_row(row, device, limit))
                    _print_stream(out["stream"][-1])

            asyncio.run(run())
    return out


def deadline_capacity(device: DeviceTime, limit: int, period_s: float) -> tuple[float, int]:
    """(samples/s, b): what the device sustains with answers within one control period: batches of
    the largest b <= limit for which an observation that just missed a batch still makes the
    next one (2 t(b) <= period); 0 when not even a batch of 1 does."""
    fitting = [b for b in range(1, limit + 1) if 2 * device.seconds(b) <= period_s]
    if not fitting:
        return 0.0, 0
    return device.capacity(fitting[-1]), fitting[-1]


def _stream_fleets(plan: Plan, limit: int) -> list[tuple[int, float]]:
    """The streaming fleet asked for, and (when the device lacks the capacity for it at this batch
    limit) the largest fleet at the same rate that uses at most 3/4 of that capacity."""
    fleets = [(plan.stream_robots, plan.stream_hz)]
    capacity, _ = deadline_capacity(plan.device, limit, 1.0 / plan.stream_hz)
    if plan.stream_robots * plan.stream_hz > capacity:
        fitting = int(0.75 * capacity / plan.stream_hz)
        if fitting >= 1:
            fleets.append((fitting, plan.stream_hz))
    return fleets


def _device_row(row: dict[str, Any], device: DeviceTime, limit: int, robots: int) -> dict[str, Any]:
    b = min(robots, limit)
    ideal = device.capacity(b)
    row.update(
        batch_limit=limit,
        robots=robots,
        b=b,
        t_b_ms=round(device.seconds(b) * 1000, 3),
        ideal_rps=round(ideal, 3),
        device_efficiency=round(row["throughput_rps"] / ideal, 4),
    )
    return row


async def stream_fleet(
    target: str, request: Any, robots: int, rate_hz: float, window_s: float
) -> dict[str, Any]:
    """`robots` StreamControl sessions at rate_hz each, their phases spread over one period."""
    period = 1.0 / rate_hz
    steps = max(5, int(window_s * rate_hz))

    async def one(index: int) -> dict[str, Any]:
        await asyncio.sleep(period * index / robots)
        msg = type(request)()
        msg.CopyFrom(request)
        msg.seed = index
        return await loadgen.stream(
            target, msg, period_s=period, steps=steps, tail_s=max(5.0, 20 * period), keep_latencies=True
        )

    load_1m = loadgen.load_average()
    rows = await asyncio.gather(*(one(i) for i in range(robots)))
    latencies = [x for r in rows for x in r.pop("_latencies_s")]
    total = robots * steps
    met = sum(r["deadlines_met"] for r in rows)
    return {
        "loadavg_1m_at_start": load_1m,
        "robots": robots,
        "rate_hz": rate_hz,
        "period_ms": round(period * 1000, 3),
        "steps": total,
        "answered": sum(r["answered"] for r in rows),
        "skipped": sum(r["skipped"] for r in rows),
        "errors": sum(r["errors"] for r in rows),
        "deadlines_met": met,
        "deadline_misses": total - met,
        "latency": summary_ms(latencies),
    }


def _stream_row(row: dict[str, Any], device: DeviceTime, limit: int) -> dict[str, Any]:
    demand = row["robots"] * row["rate_hz"]
    capacity, b = deadline_capacity(device, limit, 1.0 / row["rate_hz"])
    row.update(
        batch_limit=limit,
        demand_rps=round(demand, 3),
        capacity_at_limit_rps=round(device.capacity(limit), 3),  # b / t(b) at the batch limit
        capacity_rps=round(capacity, 3),  # within the deadline
        capacity_batch=b,
        has_capacity=demand <= capacity,
    )
    return row


# --- 2. CPU per request -------------------------------------------------------------------------
def cpu_phases(target: Target, plan: Plan, logs: Path) -> dict[str, Any]:
    """Server CPU per request (stubbed forward, batching on), the transport floor's from the same
    run, the in-process decode + preprocess, and the ingest ceiling."""
    env = server_env(target, 8, plan.batch_timeout_ms)
    out: dict[str, Any] = {"robots": CPU_ROBOTS, "batching": "on (batch 8, 2 ms)", "ceiling": []}
    print("[cpu per request] stubbed forward, batching on", flush=True)
    with loadgen.ServerProcess(["-m", "bench.serve", "--stub-forward"], env, logs / "server.log") as srv:
        info = asyncio.run(loadgen.model_info(srv.target))
        floor_args = ["-m", "bench.transport_floor", "--actions", str(info.chunk_size)]
        floor_args += ["--dims", str(info.action_dim)]
        with loadgen.ServerProcess(floor_args, {}, logs / "floor.log") as floor_srv:
            assert srv.proc is not None and floor_srv.proc is not None

            async def run() -> None:
                request = make_request(info)
                await loadgen.fleet(srv.target, request, clients=CPU_ROBOTS, window_s=1.0)  # warm
                await loadgen.fleet(floor_srv.target, request, clients=CPU_ROBOTS, window_s=1.0)
                servers = {
                    "server": (srv.target, srv.proc.pid),
                    "floor": (floor_srv.target, floor_srv.proc.pid),
                }
                rounds: dict[str, list[dict[str, Any]]] = {"server": [], "floor": []}
                for _ in range(2):  # alternated, so that bursts of load from other tenants hit both
                    for name, (addr, pid) in servers.items():
                        if name == "server":
                            await loadgen.wait_idle(addr)
                        rounds[name].append(
                            await loadgen.fleet(
                                addr, request, clients=CPU_ROBOTS, window_s=plan.cpu_window_s, cpu_pid=pid
                            )
                        )
                out["server"] = _cpu_summary(rounds["server"])
                out["transport_floor"] = _cpu_summary(rounds["floor"])
                for robots in CEILING_ROBOTS:
                    await loadgen.wait_idle(srv.target)
                    row = await loadgen.fleet(
                        srv.target, request, clients=robots, window_s=plan.cpu_window_s, cpu_pid=srv.proc.pid
                    )
                    out["ceiling"].append(row)
                    print(
                        f"    ceiling: {robots} robots {row['throughput_rps']:.1f} req/s, "
                        f"cpu {row.get('server_cpu_ms_per_request')} ms/request",
                        flush=True,
                    )

            asyncio.run(run())
    best = max(out["ceiling"], key=lambda r: r["throughput_rps"])
    out["ingest_ceiling_rps"] = best["throughput_rps"]
    out["ingest_ceiling_robots"] = best["clients"]
    out["in_process"] = decode_preprocess(target)
    s, f = out["server"], out["transport_floor"]
    print(
        f"    server {s['cpu_ms_per_request']} ms/request, transport floor {f['cpu_ms_per_request']} ms, "
        f"in-process decode + preprocess {out['in_process']['cpu_ms_mean']} ms; ingest ceiling "
        f"{out['ingest_ceiling_rps']:.1f} req/s at {out['ingest_ceiling_robots']} robots",
        flush=True,
    )
    return out


def _cpu_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one server: the median CPU per request, each round's figures kept."""
    cpu = [r["server_cpu_ms_per_request"] for r in rows if r.get("server_cpu_ms_per_request")]
    return {
        "cpu_ms_per_request": round(statistics.median(cpu), 4) if cpu else None,
        "throughput_rps": round(statistics.median(r["throughput_rps"] for r in rows), 3),
        "rounds": [
            {
                k: r.get(k)
                for k in (
                    "throughput_rps",
                    "server_cpu_ms_per_request",
                    "server_cpu_cores",
                    "mean_batch_size",
                    "loadavg_1m_at_start",
                )
            }
            | {"p50_ms": r["latency"].get("p50_ms"), "p99_ms": r["latency"].get("p99_ms")}
            for r in rows
        ],
    }


def decode_preprocess(target: Target, reps: int = 300) -> dict[str, Any]:
    """The server's decode step (codec.decode) and model.prepare of the bench request, in a loop in
    this process: thread CPU time and wall time per request."""
    from vla_inference.config import Settings
    from vla_inference.models.registry import create_model
    from vla_inference.transport import codec

    settings = Settings(model_type=target.model_type, model_path=target.checkpoint, device="cpu")
    model = create_model(settings)
    model.load(target.checkpoint or None, "cpu")
    info = model.model_info
    request = codec.parse_observation(make_request(info).SerializeToString())

    def once() -> None:
        model.prepare(codec.decode(request, settings, info).observation)

    for _ in range(20):
        once()
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(reps):
        c, w = time.thread_time(), time.perf_counter()
        once()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    return {
        "reps": reps,
        "cpu_ms_mean": round(statistics.fmean(cpu) * 1000, 4),
        "wall": summary_ms(wall),
        "decode_size": list(info.decode_size) if info.decode_size else None,
        "image_size": list(info.image_size),
    }


# --- goals and tables ---------------------------------------------------------------------------
def goal_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal beside its figure (met: True / False; None where it does not apply)."""
    rows: list[dict[str, Any]] = []
    device = result.get("simulated_device", {})
    for r in device.get("fleet", []):
        if r["robots"] in GOAL_ROBOTS:
            rows.append(
                {
                    "goal": f"device efficiency at {r['robots']} robots, batch limit {r['batch_limit']} "
                    f">= {GOALS['device_efficiency']}",
                    "value": r["device_efficiency"],
                    "met": r["device_efficiency"] >= GOALS["device_efficiency"],
                }
            )
        if r["robots"] == 8 and r["latency"].get("n"):
            ratio = r["latency"]["p99_ms"] / r["t_b_ms"]
            rows.append(
                {
                    "goal": f"p99 at 8 robots, batch limit {r['batch_limit']} <= "
                    f"{GOALS['p99_at_8_over_t8']} x t(8) = {GOALS['p99_at_8_over_t8'] * r['t_b_ms']:.1f} ms",
                    "value": f"{r['latency']['p99_ms']:.1f} ms ({ratio:.2f} x t(8))",
                    "met": ratio <= GOALS["p99_at_8_over_t8"],
                }
            )
    for s in device.get("stream", []):
        applies = s["has_capacity"]
        rows.append(
            {
                "goal": f"0 deadline misses, {s['robots']} robots at {s['rate_hz']:g} Hz, batch limit "
                f"{s['batch_limit']} (demand {s['demand_rps']:.0f}/s; capacity within the deadline "
                f"{s['capacity_rps']:.0f}/s, b / t(b) at the limit {s['capacity_at_limit_rps']:.0f}/s)",
                "value": f"{s['deadline_misses']} of {s['steps']} missed, {s['skipped']} skipped",
                "met": (s["deadline_misses"] == 0) if applies else None,
                "note": "" if applies else "the device lacks the capacity: the goal does not apply",
            }
        )
    cpu = result.get("cpu", {})
    if cpu.get("server"):
        value = cpu["server"]["cpu_ms_per_request"]
        rows.append(
            {
                "goal": f"server CPU per request <= {GOALS['server_cpu_ms_per_request']} ms "
                "(224 px JPEG, 1 camera, stubbed forward, batching on, 8 robots)",
                "value": f"{value} ms (transport floor {cpu['transport_floor']['cpu_ms_per_request']} ms)",
                "met": value is not None and value <= GOALS["server_cpu_ms_per_request"],
            }
        )
    if "ingest_ceiling_rps" in cpu:
        rows.append(
            {
                "goal": f"ingest ceiling >= {GOALS['ingest_ceiling_rps']:.0f} requests/s",
                "value": f"{cpu['ingest_ceiling_rps']:.1f} req/s at {cpu['ingest_ceiling_robots']} robots",
                "met": cpu["ingest_ceiling_rps"] >= GOALS["ingest_ceiling_rps"],
            }
        )
    return rows


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(result: dict[str, Any]) -> str:
    lines: list[str] = []
    device = result.get("simulated_device", {})
    if device:
        d = device["device"]
        lines += [
            f"### Simulated device: t(b) = {d['t1_ms']:g} + {d['k_ms']:g} x (b - 1) ms",
            "",
            "| batch limit | robots | b | t(b) ms | req/s | ideal b/t(b) | device efficiency "
            "| p50 ms | p99 ms "
            "| mean batch | server model p50 | server CPU ms/req | load 1m |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in device["fleet"]:
            lines.append(
                f"| {r['batch_limit']} | {r['robots']} | {r['b']} | {_f(r['t_b_ms'], 1)} "
                f"| {_f(r['throughput_rps'], 1)} | {_f(r['ideal_rps'], 1)} | {_f(r['device_efficiency'], 3)} "
                f"| {_f(r['latency'].get('p50_ms'), 1)} | {_f(r['latency'].get('p99_ms'), 1)} "
                f"| {_f(r.get('mean_batch_size'), 2)} | {_f(r.get('server_model_ms_p50'), 1)} "
                f"| {_f(r.get('server_cpu_ms_per_request'), 3)} | {_f(r.get('loadavg_1m_at_start'))} |"
            )
        lines += [
            "",
            "| batch limit | robots | rate Hz | demand /s | capacity b/t(b) /s at the limit "
            "| within the deadline "
            "| steps | answered | skipped | deadline misses | p50 ms | p99 ms | load 1m |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in device["stream"]:
            lines.append(
                f"| {s['batch_limit']} | {s['robots']} | {s['rate_hz']:g} | {s['demand_rps']:.0f} "
                f"| {s['capacity_at_limit_rps']:.0f} | {s['capacity_rps']:.0f} (b = {s['capacity_batch']}) "
                f"| {s['steps']} | {s['answered']} | {s['skipped']} "
                f"| {s['deadline_misses']} | {_f(s['latency'].get('p50_ms'), 1)} "
                f"| {_f(s['latency'].get('p99_ms'), 1)} | {_f(s.get('loadavg_1m_at_start'))} |"
            )
    cpu = result.get("cpu", {})
    if cpu.get("server"):
        s, f, p = cpu["server"], cpu["transport_floor"], cpu["in_process"]
        lines += [
            "",
            f"### CPU per request ({cpu['robots']} robots, {cpu['batching']}, stubbed forward, "
            "224 px JPEG, 1 camera)",
            "",
            "| what | CPU ms per request | req/s | rounds (CPU ms/req) |",
            "|---|---|---|---|",
            f"| server (bench.serve --stub-forward) | {_f(s['cpu_ms_per_request'], 3)} | "
            f"{_f(s['throughput_rps'], 1)} | "
            + ", ".join(_f(r["server_cpu_ms_per_request"], 3) for r in s["rounds"])
            + " |",
            f"| transport floor (bench.transport_floor) | {_f(f['cpu_ms_per_request'], 3)} | "
            f"{_f(f['throughput_rps'], 1)} | "
            + ", ".join(_f(r["server_cpu_ms_per_request"], 3) for r in f["rounds"])
            + " |",
            f"| in-process decode + preprocess ({p['reps']} reps; "
            f"wall p50 {_f(p['wall'].get('p50_ms'), 3)} ms) "
            f"| {_f(p['cpu_ms_mean'], 3)} | - | - |",
            "",
            "| ingest ceiling: robots | req/s | p50 ms | p99 ms | mean batch | server CPU ms/req | load 1m |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in cpu["ceiling"]:
            lines.append(
                f"| {r['clients']} | {_f(r['throughput_rps'], 1)} | {_f(r['latency'].get('p50_ms'), 2)} "
                f"| {_f(r['latency'].get('p99_ms'), 2)} | {_f(r.get('mean_batch_size'), 2)} "
                f"| {_f(r.get('server_cpu_ms_per_request'), 3)} | {_f(r.get('loadavg_1m_at_start'))} |"
            )
    goals = result.get("goals", [])
    if goals:
        lines += [
            "",
            "### Goals (issue 28; reported, not asserted)",
            "",
            "| goal | figure | met |",
            "|---|---|---|",
        ]
        for g in goals:
            met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
            note = f" ({g['note']})" if g.get("note") else ""
            lines.append(f"| {g['goal']} | {g['value']}{note} | {met} |")
    return "\n".join(lines) + "\n"


def _print_fleet(r: dict[str, Any]) -> None:
    print(
        f"    limit {r['batch_limit']}, {r['robots']} robots: {r['throughput_rps']:.1f} req/s, efficiency "
        f"{r['device_efficiency']:.3f}, p50 {r['latency'].get('p50_ms')} "
        f"p99 {r['latency'].get('p99_ms')} ms, "
        f"mean batch {r.get('mean_batch_size')}, server cpu {r.get('server_cpu_ms_per_request')} ms/req",
        flush=True,
    )


def _print_stream(s: dict[str, Any]) -> None:
    print(
        f"    limit {s['batch_limit']}, stream {s['robots']} x {s['rate_hz']:g} Hz: "
        f"{s['deadline_misses']} of "
        f"{s['steps']} deadlines missed, {s['skipped']} skipped, p99 {s['latency'].get('p99_ms')} ms",
        flush=True,
    )


# --- entry points ---------------------------------------------------------------------------------
def run_phases(
    target: Target, plan: Plan, logs: Path, parts: Sequence[str] = ("device", "cpu")
) -> dict[str, Any]:
    """Both parts for one target (bench/run.py calls this for the default model)."""
    result: dict[str, Any] = {"plan": {"quick": plan.quick, "device": str(plan.device)}, "goals_spec": GOALS}
    started = time.monotonic()
    if "device" in parts:
        result["simulated_device"] = device_phases(target, plan, logs)
    if "cpu" in parts:
        result["cpu"] = cpu_phases(target, plan, logs)
    result["goals"] = goal_rows(result)
    result["duration_s"] = round(time.monotonic() - started, 1)
    return result


def _ints(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows (smoke test)")
    parser.add_argument(
        "--simulated-device", default=str(DeviceTime()), metavar="T1,K", help="ms (default %(default)s)"
    )
    parser.add_argument("--robots", default="1,8,32,64", help="closed-loop fleet sizes")
    parser.add_argument("--batch-limits", default="8,32", help="VLA_BATCH_SIZE values")
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--stream", default="64@10", metavar="ROBOTS@HZ", help="the streaming fleet")
    parser.add_argument("--parts", default="device,cpu", help="device, cpu or both")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    robots, _, hz = args.stream.partition("@")
    try:
        plan = Plan(
            quick=args.quick,
            device=DeviceTime.parse(args.simulated_device),
            robots=_ints(args.robots),
            batch_limits=_ints(args.batch_limits),
            batch_timeout_ms=args.batch_timeout_ms,
            stream_robots=int(robots),
            stream_hz=float(hz or 10),
        )
    except ValueError as exc:
        parser.error(str(exc))
    if max([*plan.robots, plan.stream_robots]) > loadgen.MAX_CLIENTS:
        parser.error(f"at most {loadgen.MAX_CLIENTS} robots")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = scratch_dir()
    try:
        target = default_targets(work, ["pi0"])[0]
        if target.skipped:
            print(f"skipped: {target.skipped}")
            return 1
        result = {
            "command": " ".join(
                ["python -m bench.scheduling", *(argv if argv is not None else sys.argv[1:])]
            ),
            "started_utc": stamp,
            "machine": machine_facts(),
            "model": target.name,
        }
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        result.update(run_phases(target, plan, args.out_dir / f"{stamp}-logs", parts))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = " / ".join(f"{x:.2f}" for x in result["machine"].get("loadavg_at_start", []))
    text = (
        f"# Scheduling and CPU per request {stamp}\n\n`{result['command']}`, load average at start {load}\n\n"
    )
    text += markdown(result)
    base = args.out_dir / f"scheduling-{stamp}"
    for suffix, content in ((".json", json.dumps(result, indent=2) + "\n"), (".md", text)):
        base.with_suffix(suffix).write_text(content)
    print(f"\n{text}\nresults: {base}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
