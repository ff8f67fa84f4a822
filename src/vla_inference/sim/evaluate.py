"""`make eval` / `make eval-rtc`: the embedded default policy driving the simulated robot.

    python -m vla_inference.sim.evaluate policy   # make eval: lockstep success + two baselines
    python -m vla_inference.sim.evaluate rtc      # make eval-rtc: real-time chunking matrix

Starts the default server (`vla-inference serve`, nothing set but an ephemeral port) unless
`--target` names a running one. Seeds start at 1000 (demonstrations used 0-999).

- policy: over MT10, the scripted expert on the same seeds without the server (upper bound), the
  policy in lockstep, and the policy given another task's instruction (tasks.CONFUSED_WITH).
- rtc: realtime mode with the inference delay fixed to d control steps (--control-hz 0
  --delay-steps d, so d is exactly what is compared) for d in {0, 2, 4, 8} and methods none, hard
  and guided, executing 8 actions per chunk; and one run at MetaWorld's own rate (80 Hz) where d
  comes from the measured latency.

Each part writes its JSON reports into docs/evaluation/ and docs/evaluation.md is rendered from
all the reports found there, with the goals checked against them and docs/evaluation/notes.md (the
hand-written reading of the figures) appended. Figures are measured, not asserted.
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
RTC_DELAYS = (0, 2, 4, 8)
RTC_METHODS = ("none", "hard", "guided")
RTC_EXECUTE_STEPS = 8


def expert_baseline(
    task_names: Sequence[str], seeds: Sequence[int], max_steps: int, expert_max_step: float = 0.0
) -> dict[str, Any]:
    """The scripted expert on the same seeds (no rendering, no server); rate-limited with
    `expert_max_step` (the smooth demonstrator)."""
    per_task: dict[str, Any] = {}
    all_steps: list[int] = []
    for name in task_names:
        with mt.MetaWorldEpisode(name, max_steps=max_steps, expert_max_step=expert_max_step) as episode:
            steps = []
            for seed in seeds:
                episode.reset(seed)
                while not episode.done:
                    episode.step(episode.expert_action())
                if episode.success:
                    steps.append(episode.steps)
        per_task[name] = _success(steps, len(seeds))
        all_steps += steps
    return {"tasks": per_task, "overall": _success(all_steps, len(seeds) * len(task_names))}


def _success(steps: list[int], episodes: int) -> dict[str, Any]:
    return {
        "success_rate": round(len(steps) / episodes, 4),
        "episodes": episodes,
        "mean_steps_to_success": round(float(np.mean(steps)), 2) if steps else None,
    }


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
        [sys.executable, "-m", "vla_inference", "serve"], env=environ, stderr=subprocess.DEVNULL
    )
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        with VLAClient(target, timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited with status {process.returncode}")
                with contextlib.suppress(Exception):
                    if client.health().state == "SERVING":
                        break
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


def _model(target: str) -> dict[str, Any]:
    from google.protobuf import json_format

    from vla_inference.client import VLAClient

    with VLAClient(target) as client:
        info = json_format.MessageToDict(client.info())
    return {k: info.get(k) for k in ("modelName", "modelFamily", "modelVersion")}


def configurations(
    args: argparse.Namespace, target: str, names: tuple[str, ...]
) -> list[tuple[str, robot.SimConfig]]:
    """The simulated runs of one part, by label."""
    base = robot.SimConfig(
        target=target,
        tasks=names,
        episodes=args.episodes,
        seed=args.seed,
        execute_steps=args.execute_steps,
        max_steps=args.max_steps,
        parallel=args.parallel,
    )
    if args.part == "policy":
        return [("policy", base), ("wrong_instruction", replace(base, instruction_from="other"))]
    fixed = replace(base, execute_steps=RTC_EXECUTE_STEPS, mode="realtime", control_hz=0.0)
    configs = [(f"d{d}-{m}", replace(fixed, delay_steps=d, rtc=m)) for d in RTC_DELAYS for m in RTC_METHODS]
    return configs + [
        (f"80hz-{m}", replace(fixed, control_hz=robot.SIM_CONTROL_HZ, rtc=m)) for m in RTC_METHODS
    ]


def run(args: argparse.Namespace, target: str, names: tuple[str, ...]) -> None:
    """Run one part and write its JSON (docs/evaluation/<part>.json)."""
    started = time.monotonic()
    model = _model(target)
    runs: dict[str, Any] = {}
    if args.part == "policy":
        seeds = range(args.seed, args.seed + args.episodes)
        runs["expert"] = expert_baseline(names, seeds, args.max_steps)
        runs["smooth_expert"] = expert_baseline(names, seeds, args.max_steps, mt.SMOOTH_EXPERT_MAX_STEP)
    for label, cfg in configurations(args, target, names):
        runs[label] = robot.report(cfg, robot.run(cfg), model)
        log.info("%s:\n%s", label, robot.format_table(runs[label]))
    runs["meta"] = {"command": args.command, "minutes": round((time.monotonic() - started) / 60, 1)}
    (args.json_dir / f"{args.part}.json").write_text(json.dumps(runs, indent=2))


# ---- the report -----------------------------------------------------------------------------


def _pct(value: Any) -> str:
    """97.5% stays 97.5% (200 episodes), 98% stays 98%."""
    return "-" if value is None else f"{100 * value:.1f}".removesuffix(".0") + "%"


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _policy_section(runs: dict[str, Any]) -> list[str]:
    policy, wrong, expert, smooth = (
        runs[k] for k in ("policy", "wrong_instruction", "expert", "smooth_expert")
    )
    cfg, model = policy["config"], policy["model"]
    lines = [
        "## Policy quality (lockstep)",
        "",
        f"- Command: `{runs['meta']['command']}` ({runs['meta']['minutes']} min on this 2-core machine)",
        f"- Model: {model.get('modelName')} (version {model.get('modelVersion')})",
        f"- Seeds {cfg['seeds']} for every task (the demonstrations used seeds 0-999); "
        f"{cfg['execute_steps']} actions executed per chunk; at most {cfg['max_steps']} steps per episode",
        "- Wrong instruction: each task is given the instruction of another: "
        + ", ".join(
            f"{a.removesuffix('-v3')} -> {b.removesuffix('-v3')}" for a, b in mt.CONFUSED_WITH.items()
        ),
        f"- Experts: MetaWorld's scripted experts as they ship, and rate-limited to "
        f"{mt.SMOOTH_EXPERT_MAX_STEP} per step (the smooth demonstrator of the policy's second "
        "training stage), on the same seeds without the server",
        "",
        "| task | expert | smooth expert | policy | wrong instruction | policy steps | smooth expert steps | "
        "latency p50 / p99 ms | boundary jump p99 | within-chunk jump p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [*policy["tasks"], "overall"]:

        def pick(run: dict[str, Any], name: str = name) -> dict[str, Any]:
            return dict(run["overall"] if name == "overall" else run["tasks"][name])

        p, w, e, se = pick(policy), pick(wrong), pick(expert), pick(smooth)
        label = "**overall**" if name == "overall" else name
        lines.append(
            f"| {label} | {_pct(e['success_rate'])} | {_pct(se['success_rate'])} | "
            f"{_pct(p['success_rate'])} | "
            f"{_pct(w['success_rate'])} | {_num(p['mean_steps_to_success'])} | "
            f"{_num(se['mean_steps_to_success'])} | "
            f"{_num(p['latency_p50_ms'])} / {_num(p['latency_p99_ms'])} | "
            f"{_num(p['boundary_jump_p99'], 3)} | {_num(p['within_chunk_jump_p99'], 3)} |"
        )
    return lines


def _rtc_section(runs: dict[str, Any]) -> list[str]:
    first = next(v for k, v in runs.items() if k != "meta")
    cfg = first["config"]
    lines = [
        "## Real-time chunking (realtime mode)",
        "",
        f"- Command: `{runs['meta']['command']}` ({runs['meta']['minutes']} min on this 2-core machine)",
        f"- Seeds {cfg['seeds']} per task, {cfg['execute_steps']} actions executed per chunk (s), model "
        "horizon 16. Rows `d=..`: the robot's clock advances exactly d control steps per request "
        "(`--control-hz 0 --delay-steps d`); rows `80 Hz`: d comes from the measured request latency at "
        "MetaWorld's own control rate.",
        "- Jumps: |a_t - a_(t-1)| over the end-effector motion (xyz), p99; boundary = the first action of "
        "a new chunk.",
        "",
        "| delay | method | success | boundary jump p99 | within-chunk jump p99 | boundary / within | "
        "stalls | mean d | latency p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        if label == "meta":
            continue
        o = run["overall"]
        delay, method = label.split("-")
        ratio = (
            o["boundary_jump_p99"] / o["within_chunk_jump_p99"]
            if o["boundary_jump_p99"] is not None and o["within_chunk_jump_p99"]
            else None
        )
        lines.append(
            f"| {delay.replace('d', 'd=') if delay.startswith('d') else '80 Hz'} | {method} | "
            f"{_pct(o['success_rate'])} | {_num(o['boundary_jump_p99'], 3)} | "
            f"{_num(o['within_chunk_jump_p99'], 3)} | "
            f"{_num(ratio, 2)} | {o['stalls']} | {_num(o['mean_delay_steps'], 2)} | "
            f"{_num(o['latency_p50_ms'])} / {_num(o['latency_p99_ms'])} |"
        )
    return lines


def _goals_section(policy: dict[str, Any] | None, rtc: dict[str, Any] | None) -> list[str]:
    """The issues' goals, checked against the reports (measured, not asserted anywhere else)."""
    rows: list[str] = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    if policy is not None:
        rate = policy["policy"]["overall"]["success_rate"]
        rows.append(
            f"| lockstep success over MT10, held-out seeds >= 80% | {_pct(rate)} | {verdict(rate >= 0.8)} |"
        )
    if rtc is not None and {"d4-none", "d4-guided"} <= rtc.keys():
        none, guided = rtc["d4-none"]["overall"], rtc["d4-guided"]["overall"]
        b, w, bn = guided["boundary_jump_p99"], guided["within_chunk_jump_p99"], none["boundary_jump_p99"]
        if None not in (b, w, bn):
            rows.append(
                f"| d=4 guided: boundary jump p99 <= 1.5 x within-chunk | {b:.3f} vs 1.5 x {w:.3f} = "
                f"{1.5 * w:.3f} ({b / w:.2f}x) | {verdict(b <= 1.5 * w)} |"
            )
            rows.append(
                f"| d=4 guided: boundary jump p99 <= half of none's | {b:.3f} vs {bn:.3f} / 2 = "
                f"{bn / 2:.3f} ({b / bn:.2f}x) | {verdict(b <= bn / 2)} |"
            )
        sg, sn = guided["success_rate"], none["success_rate"]
        rows.append(
            f"| d=4 guided: success >= none's - 5 points | {_pct(sg)} vs {_pct(sn)} | "
            f"{verdict(sg >= sn - 0.05 - 1e-9)} |"
        )
    if not rows:
        return []
    return ["## Against the goals", "", "| goal | measured | |", "|---|---|---|", *rows]


def render(json_dir: Path) -> str:
    lines = [
        "# Closed-loop evaluation",
        "",
        "The embedded default policy (`make run` with nothing set: pi0 trained on MetaWorld MT10 expert",
        "demonstrations, then fine-tuned on rate-limited ones) driving the simulated robot,",
        "`vla-inference sim`: MetaWorld through the public gRPC API (StreamControl), camera frame +",
        "21-number state (hand, gripper, object and goal coordinates) + instruction in, 4-dim",
        "end-effector actions out. Reports: `docs/evaluation/*.json`.",
        "",
    ]
    reports = {
        name: json.loads((json_dir / f"{name}.json").read_text())
        for name in ("policy", "rtc")
        if (json_dir / f"{name}.json").is_file()
    }
    lines += [*_goals_section(reports.get("policy"), reports.get("rtc")), ""]
    if "policy" in reports:
        lines += [*_policy_section(reports["policy"]), ""]
    if "rtc" in reports:
        lines += [*_rtc_section(reports["rtc"]), ""]
    notes = json_dir / "notes.md"  # hand-written reading of the figures, kept across re-renders
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("policy", "rtc", "render"))
    parser.add_argument("--out", type=Path, default=Path("docs/evaluation.md"))
    parser.add_argument("--json-dir", type=Path, default=Path("docs/evaluation"))
    parser.add_argument("--target", default="", help="a running server (default: start the default one)")
    parser.add_argument("--tasks", default="mt10")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task (and per configuration)")
    parser.add_argument("--seed", type=int, default=mt.EVAL_SEEDS.start)
    parser.add_argument("--execute-steps", type=int, default=4, help="policy part: actions per chunk")
    parser.add_argument("--max-steps", type=int, default=mt.DEFAULT_MAX_STEPS)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args(argv)
    args.command = "python -m vla_inference.sim.evaluate " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    names = tuple(t.name for t in mt.parse_tasks(args.tasks))
    args.json_dir.mkdir(parents=True, exist_ok=True)
    if args.part != "render":
        with contextlib.ExitStack() as stack:
            target = args.target or stack.enter_context(
                default_server({"VLA_BATCH_SIZE": str(args.parallel)})
            )
            run(args, target, names)
    args.out.write_text(render(args.json_dir))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
