"""`make eval`: the embedded default policy against the simulated robot, with two baselines.

    python -m vla_inference.sim.evaluate --out docs/evaluation.md

Starts the default server (`vla-inference serve`, nothing set but an ephemeral port) unless
`--target` names a running one, then over MT10 on held-out seeds (1000 and up):
- the scripted expert on the same seeds, without the server (the upper bound);
- the policy, lockstep, executing `--execute-steps` actions per chunk;
- the policy given another task's instruction (tasks.CONFUSED_WITH): how much it uses language.
The report (markdown) and the raw JSON reports are written; figures are measured, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vla_inference.sim import robot
from vla_inference.sim import tasks as mt

log = logging.getLogger(__name__)


def expert_baseline(task_names: Sequence[str], seeds: Sequence[int], max_steps: int) -> dict[str, Any]:
    """The scripted expert on the same seeds (no rendering, no server)."""
    per_task: dict[str, Any] = {}
    total, wins = 0, 0
    steps_all: list[int] = []
    for name in task_names:
        with mt.MetaWorldEpisode(name, max_steps=max_steps) as episode:
            steps = []
            for seed in seeds:
                episode.reset(seed)
                while not episode.done:
                    episode.step(episode.expert_action())
                if episode.success:
                    steps.append(episode.steps)
        per_task[name] = {
            "success_rate": round(len(steps) / len(seeds), 4),
            "episodes": len(seeds),
            "mean_steps_to_success": round(float(np.mean(steps)), 2) if steps else None,
        }
        total, wins, steps_all = total + len(seeds), wins + len(steps), steps_all + steps
    overall = {
        "success_rate": round(wins / total, 4),
        "episodes": total,
        "mean_steps_to_success": round(float(np.mean(steps_all)), 2) if steps_all else None,
    }
    return {"tasks": per_task, "overall": overall}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def default_server(env: dict[str, str] | None = None, timeout_s: float = 120.0) -> Iterator[str]:
    """`vla-inference serve` with the default model on a free loopback port, until SERVING."""
    from vla_inference.client import VLAClient

    port = free_port()
    environ = {**os.environ, "VLA_GRPC_PORT": str(port), "VLA_METRICS_ENABLED": "false", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "vla_inference", "serve"], env=environ, stderr=subprocess.PIPE, text=True
    )
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        with VLAClient(target, timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the server exited: {process.stderr.read() if process.stderr else ''}"
                    )
                try:
                    if client.health().state == "SERVING":
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not reach SERVING in time")
                time.sleep(0.5)
        yield target
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(runs: dict[str, Any], expert: dict[str, Any], command: str, seconds: float) -> str:
    policy, wrong = runs["policy"], runs["wrong_instruction"]
    model = policy["model"]
    cfg = policy["config"]
    lines = [
        "# Closed-loop evaluation",
        "",
        "The embedded default policy (`make run` with nothing set) driving the simulated robot",
        "(`vla-inference sim`: MetaWorld through the public gRPC API, StreamControl), beside the scripted",
        "expert (upper bound) and the same policy given another task's instruction.",
        "",
        f"- Command: `{command}` ({seconds / 60:.1f} min on this 2-core machine)",
        f"- Model: {model.get('modelName')} (version {model.get('modelVersion')})",
        f"- Seeds {cfg['seeds']} per task (demonstrations used seeds 0-999), mode {cfg['mode']}, "
        f"{cfg['execute_steps']} actions executed per chunk, at most {cfg['max_steps']} steps per episode",
        "- Wrong instruction: each task gets the instruction of "
        + ", ".join(
            f"{a.removesuffix('-v3')} -> {b.removesuffix('-v3')}" for a, b in mt.CONFUSED_WITH.items()
        ),
        "",
        "| task | expert | policy | wrong instruction | policy steps to success | expert steps | "
        "latency p50 / p99 ms | boundary jump p99 | within-chunk jump p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = [*policy["tasks"], "overall"]
    for name in names:
        p = policy["overall"] if name == "overall" else policy["tasks"][name]
        w = wrong["overall"] if name == "overall" else wrong["tasks"][name]
        e = expert["overall"] if name == "overall" else expert["tasks"][name]
        label = "**overall**" if name == "overall" else name
        lines.append(
            f"| {label} | {_pct(e['success_rate'])} | {_pct(p['success_rate'])} | "
            f"{_pct(w['success_rate'])} | "
            f"{_num(p['mean_steps_to_success'])} | {_num(e['mean_steps_to_success'])} | "
            f"{_num(p['latency_p50_ms'])} / {_num(p['latency_p99_ms'])} | "
            f"{_num(p['boundary_jump_p99'], 3)} | {_num(p['within_chunk_jump_p99'], 3)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/evaluation.md"))
    parser.add_argument("--json-dir", type=Path, default=Path("docs/evaluation"))
    parser.add_argument("--target", default="", help="a running server (default: start the default one)")
    parser.add_argument("--tasks", default="mt10")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=mt.EVAL_SEEDS.start)
    parser.add_argument("--execute-steps", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=mt.DEFAULT_MAX_STEPS)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.monotonic()
    names = tuple(t.name for t in mt.parse_tasks(args.tasks))
    seeds = list(range(args.seed, args.seed + args.episodes))
    args.json_dir.mkdir(parents=True, exist_ok=True)
    expert = expert_baseline(names, seeds, args.max_steps)
    (args.json_dir / "expert.json").write_text(json.dumps(expert, indent=2))
    with contextlib.ExitStack() as stack:
        target = args.target or stack.enter_context(default_server({"VLA_BATCH_SIZE": str(args.parallel)}))
        from google.protobuf import json_format

        from vla_inference.client import VLAClient

        with VLAClient(target) as client:
            info = json_format.MessageToDict(client.info())
        model = {k: info.get(k) for k in ("modelName", "modelFamily", "modelVersion")}
        base = robot.SimConfig(
            target=target,
            tasks=names,
            episodes=args.episodes,
            seed=args.seed,
            execute_steps=args.execute_steps,
            max_steps=args.max_steps,
            parallel=args.parallel,
        )
        runs = {}
        for label, cfg in (("policy", base), ("wrong_instruction", replace(base, instruction_from="other"))):
            results = robot.run(cfg)
            runs[label] = robot.report(cfg, results, model)
            (args.json_dir / f"{label}.json").write_text(json.dumps(runs[label], indent=2))
            log.info("%s:\n%s", label, robot.format_table(runs[label]))
    command = "make eval" if not argv else "python -m vla_inference.sim.evaluate " + " ".join(argv)
    args.out.write_text(markdown(runs, expert, command, time.monotonic() - started))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
