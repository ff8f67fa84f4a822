"""A fleet of robots against 1, 2, 3 replicas (client-side round_robin): `python -m bench.replicas`.

    python -m bench.replicas [--robots 16] [--replicas 1,2,3] [--window 10] [--torch-threads 1]

Each replica is its own `python -m bench.serve --metrics` process on 127.0.0.1 serving the
embedded random-weight pi0 demo (VLA_EMBEDDED_MODEL=random, batching on). Each robot is its own
AsyncVLAClient given every replica's address (round_robin with health checks, as in production)
and calls Predict in a closed loop. Per replica count: throughput and latency in the steady
window (after every robot's first answer), errors, and each replica's share of the answers
(from its own vla_inference_requests_total). Writes bench/results/replicas-<UTC stamp>.json and
prints a Markdown table.

On a machine with fewer cores than replicas x torch threads the replicas share cores: the table
then shows that the distribution works, not how throughput scales with GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.common import ROOT, machine_facts, make_request, summary_ms
from vla_inference.client import AsyncVLAClient

RESULTS = ROOT / "bench" / "results"
_OK = re.compile(r'^vla_inference_requests_total\{[^}]*status="OK"[^}]*\} ([0-9.e+]+)$', re.M)


def server_env(torch_threads: int, batch_size: int) -> dict[str, str]:
    return {
        "VLA_MODEL_TYPE": "pi0",
        "VLA_MODEL_PATH": "",
        "VLA_EMBEDDED_MODEL": "random",
        "VLA_DEVICE": "cpu",
        "VLA_TORCH_THREADS": str(torch_threads),
        "VLA_BATCH_SIZE": str(batch_size),
        "VLA_BATCH_TIMEOUT_MS": "2",
        "VLA_TIMEOUT_MS": "120000",
        "VLA_MAX_QUEUE_SIZE": "512",
        "VLA_WARMUP_BATCHES": "2",
        "VLA_LOG_LEVEL": "WARNING",
    }


def answered(metrics_port: int) -> float:
    """OK answers this replica has counted so far."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(float(v) for v in _OK.findall(text))


async def fleet(targets: list[str], robots: int, window_s: float) -> dict[str, Any]:
    """`robots` closed-loop robots, one balanced client each, for window_s seconds."""
    info = await loadgen.model_info(targets[0])
    log = loadgen.FleetLog()
    done, first, errors = log.done, log.first, log.errors
    t_end = time.perf_counter() + window_s

    async def robot(index: int) -> None:
        request = make_request(info, seed=index)
        async with AsyncVLAClient(targets, timeout=loadgen.CALL_TIMEOUT_S) as client:
            await log.robot(lambda: client.predict_observation(request), t_end)

    tasks = [asyncio.create_task(robot(i)) for i in range(robots)]
    await asyncio.wait(tasks, timeout=window_s + 5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    steady_from = max(first) if len(first) == robots else t_end - window_s
    inside = [lat for t, lat in done if steady_from <= t <= t_end]
    span = t_end - steady_from
    return {
        "steady_window_s": round(span, 3),
        "completed": len(inside),
        "throughput_rps": round(len(inside) / span, 3) if span > 0 else 0.0,
        "latency": summary_ms(inside),
        "errors": len(errors),
        "error_codes": sorted(set(errors)),
    }


def run(replicas: int, robots: int, window_s: float, torch_threads: int, batch_size: int, logs: Path) -> dict:
    env = server_env(torch_threads, batch_size)
    with contextlib.ExitStack() as stack:
        servers = [
            loadgen.ServerProcess(
                ["-m", "bench.serve", "--metrics"], env, logs / f"replicas{replicas}-{i}.log"
            )
            for i in range(replicas)
        ]
        with ThreadPoolExecutor(replicas) as pool:  # start them side by side
            list(pool.map(stack.enter_context, servers))
        targets = [s.target for s in servers]
        before = [answered(s.metrics_port) for s in servers]
        load_1m = loadgen.load_average()
        row = asyncio.run(fleet(targets, robots, window_s))
        after = [answered(s.metrics_port) for s in servers]
    shares = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(shares) or 1.0
    row.update(
        replicas=replicas,
        robots=robots,
        loadavg_1m_at_start=load_1m,
        answers_per_replica=[int(s) for s in shares],
        share_per_replica=[round(s / total, 3) for s in shares],
    )
    return row


def markdown(result: dict[str, Any]) -> str:
    base = next((r["throughput_rps"] for r in result["rows"] if r["replicas"] == 1), None)
    lines = [
        f"`{result['command']}` — {result['machine']['nproc']} cores, torch threads per replica "
        f"{result['torch_threads']}, batch {result['batch_size']}, window {result['window_s']} s",
        "",
        "| replicas | robots | req/s | vs 1 replica | p50 ms | p99 ms | answers per replica | errors "
        "| load 1m |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = f"{r['throughput_rps'] / base:.2f}x" if base else "-"
        latency = r["latency"]
        lines.append(
            f"| {r['replicas']} | {r['robots']} | {r['throughput_rps']:.1f} | {ratio} | "
            f"{latency.get('p50_ms', float('nan')):.0f} | {latency.get('p99_ms', float('nan')):.0f} | "
            f"{' / '.join(map(str, r['answers_per_replica']))} | {r['errors']} | {r['loadavg_1m_at_start']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=16)
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to run")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of load per replica count")
    parser.add_argument("--torch-threads", type=int, default=1, help="VLA_TORCH_THREADS of each replica")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not 1 <= args.robots <= loadgen.MAX_CLIENTS:
        parser.error(f"--robots must be 1..{loadgen.MAX_CLIENTS}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    logs = args.out_dir / f"replicas-{stamp}-logs"
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.replicas", *(argv if argv is not None else sys.argv[1:])]),
        "started_utc": stamp,
        "machine": machine_facts(),
        "torch_threads": args.torch_threads,
        "batch_size": args.batch_size,
        "window_s": args.window,
        "rows": [],
    }
    for count in [int(c) for c in args.replicas.split(",") if c.strip()]:
        row = run(count, args.robots, args.window, args.torch_threads, args.batch_size, logs)
        print(
            f"  {count} replica(s), {args.robots} robots: {row['throughput_rps']:.1f} req/s, "
            f"p99 {row['latency'].get('p99_ms', float('nan')):.0f} ms, answers {row['answers_per_replica']}, "
            f"errors {row['errors']}",
            flush=True,
        )
        result["rows"].append(row)
    path = args.out_dir / f"replicas-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown(result))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
