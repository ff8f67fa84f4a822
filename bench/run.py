"""The CPU benchmark: `make bench` or `python -m bench.run [--no-peer] [--quick]`.

For the embedded default model (full set) and tiny configurations of the other backends that
have landed (reduced set):
  1. floor      the model's batched forward pass in-process (prepare once; forward + finish)
  2. unary      Predict over loopback with a 224x224 JPEG: p50/p99 and where the time went
  3. overhead   the same with the forward pass stubbed out (server path only, many samples)
  4. stream     StreamControl at a fixed control rate: per-step latency, deadlines met
  5. fleet      1..16 closed-loop robots, batching on and off: requests/s, p99, efficiency
  6. peer       the same model under Ray Serve (@serve.batch, gRPC ingress) at 8 robots
  +  pi0_fast     autoregressive decoding of a tiny pi0-FAST: tokens/s per robot and chunks/s at
                 1 and 8 robots, in-process and through the server (bench/fast_decode.py)

  +  scheduling   the default model's server against a simulated device, and its CPU per request
                 (bench/scheduling.py, issue 28)

`--phases` picks what runs: "targets" (1-6), "pi0_fast" and "scheduling", all by default.

Writes bench/results/<UTC timestamp>.json and .md, copies them to latest.json / latest.md and
prints the tables. Servers run in child processes on 127.0.0.1; every load is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import fast_decode, loadgen, report, scheduling
from bench.common import (
    ROOT,
    Target,
    default_targets,
    machine_facts,
    package_version,
    scratch_dir,
    summary_ms,
)
from bench.floor import Floor

RESULTS = ROOT / "bench" / "results"
RAY_METADATA = (("application", "vla"),)

GOALS = {
    "overhead_p50_ms": 2.0,  # absolute, quiet machine: stubbed Predict e2e
    # The overhead ratio (stubbed Predict e2e / transport floor e2e) is still reported; its goal is
    # replaced by issue 28's server CPU per request and ingest ceiling (scheduling.GOALS).
    "efficiency_at_8": 0.8,
}


class Plan:
    """Sizes of every phase; --quick shrinks them."""

    def __init__(self, quick: bool, batch_size: int, batch_timeout_ms: float, clients: list[int]) -> None:
        self.quick = quick
        self.batch_size = batch_size
        self.batch_timeout_ms = batch_timeout_ms
        self.clients = clients
        self.floor_reps = 15 if quick else 40  # per batch size, within floor_budget_s
        self.floor_budget_s = 6.0 if quick else 10.0  # tiny backends: 6 s
        self.unary_count = 20 if quick else 60
        self.unary_window_s = 5.0 if quick else 10.0
        self.stub_count = 150 if quick else 500
        self.stub_window_s = 3.0 if quick else 6.0
        self.fleet_base_s = 2.5 if quick else 4.0
        self.fleet_cap_s = 6.0 if quick else 10.0
        self.stream_window_s = 5.0 if quick else 10.0
        self.peer_rounds = 1 if quick else 2

    def fleet_window(self, floor: dict[str, Any], clients: int, batch: int) -> float:
        """One round to fill the pipeline plus max(base, two rounds) of steady state, capped.

        A round is estimated from the floor scaled by `speed` (see bench_target): a floor taken
        during a burst of load from other tenants must not stretch every window to the cap.
        """
        per = min(clients, batch)
        round_s = floor_s(floor, per) * floor.get("speed", 1.0) * math.ceil(clients / batch)
        return min(self.fleet_cap_s, round_s + max(self.fleet_base_s, 2 * round_s))


def floor_s(floor: dict[str, Any], batch: int) -> float:
    """Floor p50 (s) at `batch`, interpolated linearly from the measured sizes when not measured."""
    measured = {int(k): v["p50_ms"] / 1000 for k, v in floor["batches"].items()}
    if batch in measured:
        return measured[batch]
    sizes = sorted(measured)
    lower = max([s for s in sizes if s <= batch], default=sizes[0])
    upper = min([s for s in sizes if s >= batch], default=sizes[-1])
    if lower == upper:
        return measured[lower] * batch / lower
    w = (batch - lower) / (upper - lower)
    return measured[lower] * (1 - w) + measured[upper] * w


def server_env(target: Target, batch_size: int, batch_timeout_ms: float) -> dict[str, str]:
    return {
        **target.env(),
        "VLA_DEVICE": "cpu",
        "VLA_BATCH_SIZE": str(batch_size),
        "VLA_BATCH_TIMEOUT_MS": str(batch_timeout_ms),
        "VLA_TIMEOUT_MS": "120000",
        "VLA_MAX_QUEUE_SIZE": "512",
        "VLA_WARMUP_BATCHES": "2",
        "VLA_MAX_STREAM_RATE_HZ": "0",
        "VLA_LOG_LEVEL": "WARNING",
    }


def pick_stream_period(floor_b1_s: float) -> float:
    """10 Hz when the model allows it, else the first of 5/2/1/0.5/0.2 Hz with 1.5x headroom."""
    for period in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0):
        if floor_b1_s * 1.5 <= period:
            return period
    return 10.0


async def _fleet_series(
    target_addr: str, request: Any, floor: dict[str, Any], plan: Plan, batch: int, clients: list[int]
) -> list[dict[str, Any]]:
    rows = []
    for n in clients:
        await loadgen.wait_idle(target_addr)
        window = plan.fleet_window(floor, n, batch)
        row = await loadgen.fleet(target_addr, request, clients=n, window_s=window)
        per = min(n, batch)
        ideal = per / floor_s(floor, per)
        row["ideal_rps"] = round(ideal, 4)
        row["efficiency"] = round(row["throughput_rps"] / ideal, 4) if ideal > 0 else None
        print(
            f"    fleet batch={batch} clients={n}: {row['throughput_rps']:.3f} req/s, "
            f"p99 {row['latency'].get('p99_ms', float('nan')):.1f} ms, eff {row['efficiency']}",
            flush=True,
        )
        rows.append(row)
    await loadgen.wait_idle(target_addr)
    return rows


def bench_target(target: Target, plan: Plan, full: bool, logs: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"name": target.name, "model_type": target.model_type, "full": full}
    if target.note:
        res["checkpoint_writer"] = target.note
    sizes = sorted({1, 2, 4, plan.batch_size}) if full else [1, plan.batch_size]
    print(f"[{target.name}] floor at batch {sizes}", flush=True)
    floor_budget = plan.floor_budget_s if full else 6.0
    bench_floor = Floor(target)
    try:
        floor = bench_floor.measure(sizes, plan.floor_reps, floor_budget)
        res["floor"] = floor
        _serve_phases(target, plan, full, logs, res, floor)
        print(f"[{target.name}] floor again (the lower p50 of the two is kept)", flush=True)
        bench_floor.measure(sizes, plan.floor_reps, floor_budget)
    finally:
        bench_floor.close()
    _derive(res, plan, floor)
    return res


def transport_floor(floors: list[loadgen.UnaryResult], stub_e2e: dict[str, Any]) -> dict[str, Any]:
    """The floor's e2e (the lower of its runs, per percentile) and our stubbed path over it."""
    runs = [summary_ms(f.e2e_s) for f in floors if f.e2e_s]
    out: dict[str, Any] = {"runs": runs, "errors": sum(f.errors for f in floors)}
    for q in ("p50_ms", "p99_ms"):
        out[q] = min(r[q] for r in runs)
        out[f"overhead_ratio_{q[:3]}"] = round(stub_e2e[q] / out[q], 3) if out[q] else None
    return out


def _serve_phases(
    target: Target, plan: Plan, full: bool, logs: Path, res: dict[str, Any], floor: dict[str, Any]
) -> None:
    b1 = floor_s(floor, 1)

    # --- batching off: unary, stream, fleet ---------------------------------------------------
    env_off = server_env(target, 1, 0.0)
    print(f"[{target.name}] server, batching off", flush=True)
    with loadgen.ServerProcess(["-m", "bench.serve"], env_off, logs / "server.log") as srv:
        res["server_start_s"] = round(srv.started_s, 2)

        async def off() -> None:
            info = await loadgen.model_info(srv.target)
            request = target.request(info)
            res["request_bytes"] = request.ByteSize()
            unary = await loadgen.unary(
                srv.target, request, count=plan.unary_count, window_s=plan.unary_window_s
            )
            res["unary"] = loadgen.overhead_breakdown(unary, b1)
            model_p50 = res["unary"]["model"].get("p50_ms", b1 * 1000) / 1000
            # The server's own forward time vs the floor: < 1 when the floor was taken in a burst.
            floor["speed"] = round(min(1.0, model_p50 / b1), 4) if b1 > 0 else 1.0
            print(
                f"    unary: e2e p50 {res['unary']['e2e'].get('p50_ms')} ms (floor {b1 * 1000:.1f} ms)",
                flush=True,
            )
            if full:
                period = pick_stream_period(min(b1, model_p50))
                steps = max(5, min(100, int(plan.stream_window_s / period)))
                await loadgen.wait_idle(srv.target)
                res["stream"] = await loadgen.stream(
                    srv.target, request, period_s=period, steps=steps, tail_s=max(5.0, 4 * b1)
                )
                print(
                    f"    stream {res['stream']['rate_hz']} Hz: met {res['stream']['deadline_met_fraction']}",
                    flush=True,
                )
            clients = plan.clients if full else [plan.batch_size]
            res["fleet_off"] = await _fleet_series(srv.target, request, floor, plan, 1, clients)

        asyncio.run(off())

    # --- batching on ---------------------------------------------------------------------------
    env_on = server_env(target, plan.batch_size, plan.batch_timeout_ms)
    print(
        f"[{target.name}] server, batching on (VLA_BATCH_SIZE={plan.batch_size}, "
        f"VLA_BATCH_TIMEOUT_MS={plan.batch_timeout_ms})",
        flush=True,
    )
    with loadgen.ServerProcess(["-m", "bench.serve"], env_on, logs / "server.log") as srv:

        async def on() -> None:
            info = await loadgen.model_info(srv.target)
            request = target.request(info)
            clients = plan.clients if full else [plan.batch_size]
            res["fleet_on"] = await _fleet_series(srv.target, request, floor, plan, plan.batch_size, clients)

        asyncio.run(on())

    # --- server overhead with the forward pass stubbed ---------------------------------------
    if full:
        print(f"[{target.name}] server, forward stubbed (overhead)", flush=True)
        with loadgen.ServerProcess(
            ["-m", "bench.serve", "--stub-forward"], env_off, logs / "server.log"
        ) as srv:
            info = asyncio.run(loadgen.model_info(srv.target))
            floor_args = ["-m", "bench.transport_floor", "--actions", str(info.chunk_size)]
            floor_args += ["--dims", str(info.action_dim)]
            with (
                loadgen.ServerProcess(floor_args, {}, logs / "floor.log") as floor_srv,
                loadgen.ServerProcess([*floor_args, "--sync"], {}, logs / "floor.log") as sync_srv,
            ):

                async def stub() -> None:
                    request = target.request(info)
                    calls = {"count": plan.stub_count, "window_s": plan.stub_window_s, "warmup": 20}
                    # floor, ours, floor: the same client and bytes; the lower floor is kept. Then
                    # the floor served by grpc's synchronous server, for the framework question.
                    floors = [await loadgen.unary(floor_srv.target, request, **calls)]
                    unary = await loadgen.unary(srv.target, request, **calls)
                    floors.append(await loadgen.unary(floor_srv.target, request, **calls))
                    sync_floor = await loadgen.unary(sync_srv.target, request, **calls)
                    res["overhead_stub"] = loadgen.overhead_breakdown(unary, None)
                    res["transport_floor"] = transport_floor(floors, res["overhead_stub"]["e2e"])
                    res["transport_floor"]["sync_server"] = summary_ms(sync_floor.e2e_s)

                asyncio.run(stub())

            async def stub_stream() -> None:
                request = target.request(info)
                res["stream_stub"] = await loadgen.stream(
                    srv.target, request, period_s=0.1, steps=int(plan.stream_window_s / 0.1 / 3), tail_s=5.0
                )

            asyncio.run(stub_stream())


def _derive(res: dict[str, Any], plan: Plan, floor: dict[str, Any]) -> None:
    """Ideal rates, efficiency and the batching gain from the final (lowest) floor figures."""
    bn = floor_s(floor, plan.batch_size)
    if "unary" in res:
        b1 = floor_s(floor, 1)
        u = res["unary"]
        u["floor_p50_ms"] = round(b1 * 1000, 3)
        if u["e2e"].get("n"):
            u["overhead_vs_floor"] = {
                "p50_ms": round(u["e2e"]["p50_ms"] - b1 * 1000, 3),
                "p99_ms": round(u["e2e"]["p99_ms"] - b1 * 1000, 3),
            }
    for key, batch in (("fleet_off", 1), ("fleet_on", plan.batch_size)):
        for row in res.get(key, []):
            per = min(row["clients"], batch)
            ideal = per / floor_s(floor, per)
            row["ideal_rps"] = round(ideal, 4)
            row["efficiency"] = round(row["throughput_rps"] / ideal, 4) if ideal > 0 else None

    def at(rows: list[dict[str, Any]], n: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["clients"] == n), None)

    on8, off8 = at(res["fleet_on"], plan.batch_size), at(res["fleet_off"], plan.batch_size)
    if on8 and off8 and off8["throughput_rps"] > 0:
        res["batching_gain_at_8"] = round(on8["throughput_rps"] / off8["throughput_rps"], 3)
    if on8:
        res["efficiency_at_8"] = on8["efficiency"]
        res["ideal_rps_at_8"] = round(plan.batch_size / bn, 4)


def _pooled(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Several fleet windows as one: total answers / total steady time, latency over all answers."""
    span = sum(r["steady_window_s"] for r in rows)
    completed = sum(r["completed"] for r in rows)
    lat = [x for r in rows for x in r.pop("_latencies_s", [])]
    return {
        "rounds": len(rows),
        "completed": completed,
        "steady_window_s": round(span, 3),
        "throughput_rps": round(completed / span, 4) if span > 0 else 0.0,
        "latency": summary_ms(lat),
        "errors": sum(r["errors"] for r in rows),
        "per_round_rps": [r["throughput_rps"] for r in rows],
        "loadavg_1m_per_round": [r.get("loadavg_1m_at_start") for r in rows],
        "round_rows": rows,
    }


def run_peer(target: Target, ours: dict[str, Any], plan: Plan, logs: Path) -> dict[str, Any]:
    """Ray Serve vs our server, same model, `batch_size` robots, rounds alternated.

    Both servers are started and left idle; then the same fleet load runs against ours, Ray,
    ours, Ray ... so that bursts of load from other tenants of the shared cores hit both alike.
    """
    n = plan.batch_size
    peer: dict[str, Any] = {
        "system": "Ray Serve",
        "ingress": "gRPC (Ray Serve gRPC proxy serving our VLAInference proto; same client as ours)",
        "batching": f"@serve.batch(max_batch_size={plan.batch_size}, "
        f"batch_wait_timeout_s={plan.batch_timeout_ms / 1000})",
        "ray": package_version("ray"),
        "clients": n,
        "method": f"{plan.peer_rounds} alternating rounds each (ours, Ray, ours, Ray, ...), pooled",
    }
    if not peer["ray"]:
        peer["skipped"] = "ray is not installed (pip install -e '.[bench]')"
        return peer
    env = server_env(target, plan.batch_size, plan.batch_timeout_ms)
    args = [
        "-m",
        "bench.peer_ray",
        "--batch-size",
        str(plan.batch_size),
        "--batch-wait-ms",
        str(plan.batch_timeout_ms),
    ]
    print(f"[peer] our server (batching on) and Ray Serve {peer['ray']} starting", flush=True)
    window = plan.fleet_window(ours["floor"], n, plan.batch_size)
    rounds: dict[str, list[dict[str, Any]]] = {"ours": [], "ray": []}
    try:
        with (
            loadgen.ServerProcess(["-m", "bench.serve"], env, logs / "server.log") as mine,
            loadgen.ServerProcess(args, env, logs / "ray.log", ready_timeout_s=240) as ray,
        ):
            peer["start_s"] = round(ray.started_s, 2)

            async def go() -> None:
                request = target.request(await loadgen.model_info(mine.target))
                servers = {"ours": (mine.target, ()), "ray": (ray.target, RAY_METADATA)}
                for addr, meta in servers.values():  # warm both the same way
                    await loadgen.fleet(addr, request, clients=n, window_s=1.5, metadata=meta)
                for _ in range(plan.peer_rounds):
                    for name, (addr, meta) in servers.items():
                        if name == "ours":
                            await loadgen.wait_idle(addr)
                        else:
                            await asyncio.sleep(0.5)
                        row = await loadgen.fleet(
                            addr, request, clients=n, window_s=window, metadata=meta, keep_latencies=True
                        )
                        print(
                            f"    {name}: {row['throughput_rps']:.3f} req/s, "
                            f"p99 {row['latency'].get('p99_ms', float('nan')):.1f} ms",
                            flush=True,
                        )
                        rounds[name].append(row)

            asyncio.run(go())
    except Exception as exc:
        traceback.print_exc()
        peer["skipped"] = f"Ray Serve did not run: {type(exc).__name__}: {exc}"
        return peer
    peer["ours"] = _pooled(rounds["ours"])
    peer["theirs"] = _pooled(rounds["ray"])
    a, b = peer["ours"], peer["theirs"]
    if b["throughput_rps"] > 0 and b["latency"].get("n") and a["latency"].get("n"):
        peer["throughput_ratio_ours_over_theirs"] = round(a["throughput_rps"] / b["throughput_rps"], 3)
        peer["p99_ratio_ours_over_theirs"] = round(a["latency"]["p99_ms"] / b["latency"]["p99_ms"], 3)
    print(
        f"[peer] ours/theirs throughput {peer.get('throughput_ratio_ours_over_theirs')}x, "
        f"p99 {peer.get('p99_ratio_ours_over_theirs')}x",
        flush=True,
    )
    return peer


def pytriton_status() -> dict[str, Any]:
    """PyTriton is only recorded: see docs/benchmarks.md for why it is not run."""
    version = package_version("nvidia-pytriton")
    if not version:
        return {
            "skipped": "not run: nvidia-pytriton 0.7.0 requires numpy<2 and protobuf<7, which conflict "
            "with this project's pins (numpy 2.4.6, protobuf 7.36.2); in a separate environment under "
            "Python 3.11.7 its model stub failed to start (AttributeError: '_thread.RLock' object has "
            "no attribute '_recursion_count'); see docs/benchmarks.md"
        }
    return {"installed": version, "skipped": "installed but not wired into the benchmark"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-peer", action="store_true", help="skip the Ray Serve comparison")
    parser.add_argument("--quick", action="store_true", help="shorter phases (smoke test)")
    parser.add_argument(
        "--families",
        default="pi0,openvla,openvla-oft,groot,smolvla",
        help="comma list of model types (and openvla-oft)",
    )
    parser.add_argument("--clients", default="1,2,4,8,16", help="fleet sizes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "--phases",
        default="targets,pi0_fast,scheduling",
        help="comma list: targets (phases 1-6), pi0_fast, scheduling",
    )
    parser.add_argument(
        "--simulated-device", default="20,1.5", metavar="T1,K", help="t(b) = T1 + K (b - 1) ms (scheduling)"
    )
    args = parser.parse_args(argv)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}

    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    if args.batch_size not in clients:
        clients = sorted({*clients, args.batch_size})
    if max(clients) > loadgen.MAX_CLIENTS:
        parser.error(f"at most {loadgen.MAX_CLIENTS} clients")
    plan = Plan(args.quick, args.batch_size, args.batch_timeout_ms, clients)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    logs = args.out_dir / f"{stamp}-logs"
    work = scratch_dir()

    result: dict[str, Any] = {
        "schema": 1,
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "started_utc": stamp,
        "machine": machine_facts(),
        "plan": {k: v for k, v in vars(plan).items()},
        "goals": GOALS,
        "targets": [],
    }
    print(
        f"vla-inference bench {stamp}: {result['machine']['nproc']} cores, "
        f"{result['machine']['cpu_model']}, torch {result['machine'].get('torch')}",
        flush=True,
    )
    try:
        families = [f.strip() for f in args.families.split(",") if f.strip()]
        targets = default_targets(work, families) if "targets" in phases else []
        for target in targets:
            if target.skipped:
                print(f"[{target.name}] skipped: {target.skipped}", flush=True)
                result["targets"].append(
                    {"name": target.name, "model_type": target.model_type, "skipped": target.skipped}
                )
                continue
            try:
                result["targets"].append(bench_target(target, plan, full=not target.checkpoint, logs=logs))
            except Exception as exc:
                traceback.print_exc()
                result["targets"].append(
                    {
                        "name": target.name,
                        "model_type": target.model_type,
                        "skipped": f"failed: {type(exc).__name__}: {exc}",
                    }
                )
        first = result["targets"][0] if result["targets"] else {}
        if args.no_peer:
            result["peer"] = {"skipped": "--no-peer"}
        elif "fleet_on" not in first:
            result["peer"] = {"skipped": "the default model did not run"}
        else:
            result["peer"] = run_peer(targets[0], first, plan, logs)
        result["pytriton"] = pytriton_status()
        if "pi0_fast" in phases:
            try:
                result["pi0_fast"] = fast_decode.run(plan, work, logs, server_env)
            except Exception as exc:
                traceback.print_exc()
                result["pi0_fast"] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
        if "scheduling" in phases:
            try:
                sched_plan = scheduling.Plan(
                    quick=args.quick,
                    device=scheduling.DeviceTime.parse(args.simulated_device),
                    batch_timeout_ms=args.batch_timeout_ms,
                )
                default = default_targets(work, ["pi0"])[0]
                result["scheduling"] = (
                    {"skipped": default.skipped}
                    if default.skipped
                    else scheduling.run_phases(default, sched_plan, logs)
                )
            except Exception as exc:
                traceback.print_exc()
                result["scheduling"] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        result["duration_s"] = round(time.monotonic() - started, 1)
        result["goal_status"] = report.goal_status(result)
        text = report.markdown(result)
        json_path = args.out_dir / f"{stamp}.json"
        md_path = args.out_dir / f"{stamp}.md"
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        md_path.write_text(text)
        shutil.copyfile(json_path, args.out_dir / "latest.json")
        shutil.copyfile(md_path, args.out_dir / "latest.md")
        print()
        print(text)
        print(f"results: {json_path} (also latest.json), {md_path} (also latest.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
