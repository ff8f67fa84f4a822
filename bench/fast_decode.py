"""pi0-FAST's autoregressive decoding on the CPU, tiny configuration: a phase of bench/run.py.

    python -m bench.run --phases pi0_fast --no-peer       # this phase alone

The checkpoint: tests/helpers/pi0_fast_checkpoints.py `write_demo_checkpoint` (LeRobot's format,
random weights, the LM-head rows taught so that greedy decoding of the demo observation writes
"Action: " + the FAST tokens of a 10 x 3 chunk + "|", and stops there). Every robot sends that
observation (a PNG frame, decoded exactly), so every row decodes the same number of tokens.

  in-process   forward (prefill, the decode loop, detokenising) of 1 and 8 copies: time per call,
               tokens/s per robot (its tokens / the call's time), chunks/s and tokens/s of the batch
  server       1 and 8 closed-loop robots through the server (bench.serve in its own process,
               VLA_BATCH_SIZE 8), with torch's default threads and with VLA_TORCH_THREADS=1:
               requests/s, latency, mean batch size, tokens/s per robot
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen
from bench.common import Target, _tests_helper, summary_ms

ROBOTS = (1, 8)
# The server's torch threads: 0 = torch's default (one per core), and 1. A decode is many small
# sequential ops; on a small machine shared with the load generator and gRPC, two OpenMP threads
# wait for each other at every op (docs/benchmarks.md).
SERVER_THREADS = (0, 1)


def _demo(path: Path) -> tuple[Any, bytes]:
    """The demo observation (as the model sees it) and its PNG frame (as a robot sends it)."""
    from PIL import Image

    from vla_inference.models.base import Observation

    demo = path / "demo"
    png = (demo / "frame.png").read_bytes()
    frame = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    state = np.asarray(json.loads((demo / "state.json").read_text()), np.float32)
    instruction = (demo / "instruction.txt").read_text().strip()
    return Observation({"base": frame}, state, instruction, seed=0), png


def in_process(path: Path, budget_s: float) -> dict[str, Any]:
    import torch

    from vla_inference.config import Settings
    from vla_inference.models.registry import create_model

    model = create_model(Settings(model_path=str(path), device="cpu"))
    model.load(str(path), "cpu")
    observation, _ = _demo(path)
    sample = model.prepare(observation)
    raw = model.forward([sample])[0]
    tokens = len(getattr(raw, "tokens", ()))
    if not hasattr(raw, "actions"):
        raise RuntimeError(f"the demo checkpoint wrote no action: {getattr(raw, 'reason', raw)}")
    out: dict[str, Any] = {
        "tokens_per_answer": tokens,
        "info": model.model_info.description,
        "torch_threads": torch.get_num_threads(),
        "batches": {},
    }
    for size in ROBOTS:
        batch = [sample] * size
        model.forward(batch)  # warm-up
        times: list[float] = []
        end = time.perf_counter() + budget_s / len(ROBOTS)
        while len(times) < 5 or (time.perf_counter() < end and len(times) < 200):
            t0 = time.perf_counter()
            model.forward(batch)
            times.append(time.perf_counter() - t0)
        stats = summary_ms(times)
        call_s = stats["p50_ms"] / 1000
        stats["tokens_per_s_per_robot"] = round(tokens / call_s, 1)
        stats["chunks_per_s"] = round(size / call_s, 2)
        stats["batch_tokens_per_s"] = round(size * tokens / call_s, 1)
        out["batches"][str(size)] = stats
        print(
            f"    in-process batch {size}: {stats['p50_ms']} ms a call, {stats['tokens_per_s_per_robot']} "
            f"tokens/s per robot, {stats['chunks_per_s']} chunks/s",
            flush=True,
        )
    return out


def through_server(
    png: bytes, observation: Any, env: dict[str, str], window_s: float, logs: Path
) -> list[dict[str, Any]]:
    from vla_inference.client import make_observation

    request = make_observation(png, observation.joint_positions.tolist(), observation.instruction)
    rows: list[dict[str, Any]] = []
    with loadgen.ServerProcess(["-m", "bench.serve"], env, logs / "pi0_fast_server.log") as srv:

        async def fleets() -> None:
            for robots in ROBOTS:
                await loadgen.wait_idle(srv.target)
                rows.append(await loadgen.fleet(srv.target, request, clients=robots, window_s=window_s))

        asyncio.run(fleets())
    return rows


def run(plan: Any, workdir: Path, logs: Path, server_env: Any) -> dict[str, Any]:
    """The phase: `server_env(target, batch_size, batch_timeout_ms)` gives the server's settings."""
    path = workdir / "pi0-fast-tiny"
    _tests_helper("pi0_fast_checkpoints", "write_demo_checkpoint")(path)
    result: dict[str, Any] = {
        "name": "pi0-FAST tiny (random weights, taught answer)",
        "checkpoint_writer": "tests/helpers/pi0_fast_checkpoints.py write_demo_checkpoint",
    }
    print(f"[{result['name']}] in-process decode at batch {list(ROBOTS)}", flush=True)
    result["in_process"] = floor = in_process(path, plan.floor_budget_s)
    observation, png = _demo(path)
    target = Target(result["name"], "pi0", checkpoint=str(path))
    result["fleet"] = []
    for threads in SERVER_THREADS:
        env = {**server_env(target, max(ROBOTS), plan.batch_timeout_ms), "VLA_TORCH_THREADS": str(threads)}
        print(f"[{result['name']}] server (VLA_TORCH_THREADS={threads}), robots {list(ROBOTS)}", flush=True)
        for row in through_server(png, observation, env, plan.fleet_cap_s, logs):
            rps = row["throughput_rps"]
            row["torch_threads"] = threads
            row["tokens_per_s_per_robot"] = round(floor["tokens_per_answer"] * rps / row["clients"], 1)
            print(
                f"    robots={row['clients']}: {rps:.2f} req/s, p50 {row['latency'].get('p50_ms')} ms, "
                f"mean batch {row.get('mean_batch_size')}, {row['tokens_per_s_per_robot']} tokens/s per "
                f"robot, errors {row['errors']}",
                flush=True,
            )
            result["fleet"].append(row)
    return result


def markdown(result: dict[str, Any]) -> list[str]:
    """The phase's tables for bench/report.py."""
    if not result:
        return []
    lines = ["", "## pi0-FAST: autoregressive decoding (tiny, CPU)", ""]
    if result.get("skipped"):
        return [*lines, f"Not run: {result['skipped']}.", ""]
    floor = result["in_process"]
    lines += [
        f"{result['name']}; {floor['tokens_per_answer']} tokens an answer (greedy, stops at '|').",
        "",
        "| where | torch threads | robots | p50 ms | p99 ms | tokens/s per robot | chunks/s | mean batch "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, s in floor["batches"].items():
        lines.append(
            f"| in-process forward | {floor.get('torch_threads')} | {size} | {s['p50_ms']} | {s['p99_ms']} "
            f"| {s['tokens_per_s_per_robot']} | {s['chunks_per_s']} | {size} | 0 |"
        )
    for r in result.get("fleet", []):
        lat = r["latency"]
        lines.append(
            f"| server, closed loop | {r['torch_threads'] or 'default'} | {r['clients']} "
            f"| {lat.get('p50_ms', '-')} | {lat.get('p99_ms', '-')} | {r['tokens_per_s_per_robot']} "
            f"| {r['throughput_rps']} | {r.get('mean_batch_size')} "
            f"| {r['errors']} |"
        )
    return [*lines, ""]
