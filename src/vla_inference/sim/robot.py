"""The simulated robot: MetaWorld episodes driven by any VLA server over StreamControl.

Each control request sends the rendered camera frame (JPEG), the 21-number state, the task's
instruction and the embodiment tag, exactly as a robot would, through the public gRPC API. The
server answers a chunk of actions; the robot executes them.

Modes (how the robot lives in time):

- lockstep: the simulation waits for each answer, then executes the first K actions of the chunk
  (`--execute-steps K`). Time stands still during inference: this measures the policy itself.
- realtime: the robot keeps moving while the next chunk is computed. Every K executed actions it
  captures an observation and asks for the next chunk; the answer takes d control steps to arrive,
  during which the robot executes what is left of the current chunk (or holds still, counted as a
  stall, when that runs out); then it switches to the new chunk at index d. The simulation clock
  is virtual: d = ceil(measured request latency x control rate) + `--delay-steps`, so a run is as
  if the robot had moved in real time at `--control-hz` (MetaWorld's own step is 12.5 ms, 80 Hz).
  `--control-hz 0` leaves the measured latency out: d = `--delay-steps` exactly, for controlled
  comparisons on a fast model.

The JSON report (`--json`) holds per task and `overall`: success_rate, episodes,
mean_steps_to_success, latency_p50_ms, latency_p99_ms, stalls, boundary_jump_p99 and
within_chunk_jump_p99. Jumps are |a_t - a_(t-1)| (Euclidean, over the end-effector motion
dims xyz) between consecutive executed actions of the policy: "boundary" at the first action of
each new chunk, "within chunk" everywhere else; steps from or to a hold (a stall, e.g. while the
first chunk of an episode is computed in realtime mode) are counted as stalls, not as jumps.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_inference.client import ChannelSecurity, ControlSession, VLAClient, make_observation
from vla_inference.control import ChunkQueue, delay_for
from vla_inference.sim import tasks as mt

log = logging.getLogger(__name__)
SIM_CONTROL_HZ = 80.0  # MetaWorld: frame_skip 5 x 2.5 ms
MOTION_DIMS = slice(0, 3)


@dataclass(frozen=True)
class SimConfig:
    target: str
    tasks: tuple[str, ...]
    episodes: int = 20
    seed: int = mt.EVAL_SEEDS.start
    execute_steps: int = 4
    mode: str = "lockstep"  # lockstep | realtime
    control_hz: float = SIM_CONTROL_HZ
    delay_steps: int = 0
    max_steps: int = mt.DEFAULT_MAX_STEPS
    image_size: int = mt.DEFAULT_IMAGE_SIZE
    instruction_from: str = "task"  # task | other (the CONFUSED_WITH baseline)
    rtc: str = ""  # real-time chunking: "" = send no rtc fields; none | guided | hard
    parallel: int = 1
    timeout_s: float = 30.0
    token: str = ""
    video_dir: str = ""
    video_episodes: int = 1  # with video_dir: the first N episodes of each task keep their frames


@dataclass
class EpisodeResult:
    task: str
    seed: int
    success: bool
    steps: int
    latencies_ms: list[float] = field(default_factory=list)
    stalls: int = 0
    boundary_jumps: list[float] = field(default_factory=list)
    within_jumps: list[float] = field(default_factory=list)
    delays: list[int] = field(default_factory=list)
    actions: list[list[float]] = field(default_factory=list)  # executed, for the plot
    chunk_starts: list[int] = field(default_factory=list)  # step index of each chunk switch
    frames: list[np.ndarray] = field(default_factory=list)  # the frames sent, for the video


def instruction_for(task: mt.Task, how: str) -> str:
    if how == "other":
        return mt.TASKS[mt.CONFUSED_WITH[task.name]].instruction
    return task.instruction


def request_seed(episode_seed: int, index: int) -> int:
    """A fixed sampling seed per request, so that an episode replays exactly."""
    return zlib.crc32(f"{episode_seed}:{index}".encode()) & 0x7FFF_FFFF


class _Robot:
    """One simulated robot running episodes of one task."""

    def __init__(self, cfg: SimConfig, task: mt.Task, client: Any) -> None:
        self.cfg = cfg
        self.task = task
        self.client = client
        self.instruction = instruction_for(task, cfg.instruction_from)
        self._boundary_next = False
        self._held_last = False

    def observation(self, episode: mt.MetaWorldEpisode, seed: int, index: int, result: EpisodeResult) -> Any:
        frame = episode.render()
        if self.cfg.video_dir:
            result.frames.append(frame)
        return make_observation(
            frame,
            episode.state.tolist(),
            self.instruction,
            embodiment=mt.EMBODIMENT,
            request_id=f"{self.task.name}:{seed}:{index}",
            seed=request_seed(seed, index),
        )

    def run(self, episode: mt.MetaWorldEpisode, seed: int) -> EpisodeResult:
        result = EpisodeResult(self.task.name, seed, False, 0)
        episode.reset(seed)
        self._boundary_next = self._held_last = False
        with self.client.control() as stream:
            self._control(episode, seed, stream, result)
        result.success, result.steps = episode.success, episode.steps
        return result

    def _ask(
        self, stream: ControlSession, observation: Any, result: EpisodeResult
    ) -> tuple[np.ndarray, float]:
        started = time.monotonic()
        answer = stream.act(observation)
        if answer.HasField("error"):
            raise RuntimeError(f"the server refused an observation: {answer.error.message}")
        latency = time.monotonic() - started
        result.latencies_ms.append(latency * 1000)
        chunk = np.array([a.joint_commands for a in answer.actions], np.float32)
        if chunk.ndim != 2 or chunk.shape[1] != mt.ACTION_DIM:
            raise RuntimeError(f"expected chunks of {mt.ACTION_DIM}-dim actions, got shape {chunk.shape}")
        return chunk, latency

    def _tick(self, episode: mt.MetaWorldEpisode, action: np.ndarray | None, result: EpisodeResult) -> None:
        """One control step: the queue's action, or hold still (zero motion, same gripper) on a stall.

        Jumps are measured between consecutive actions of the policy: a step from or to a hold is
        a stall (counted in `stalls`), not a chunk boundary."""
        held = action is None
        boundary = self._boundary_next and not held
        if action is None:
            action = np.zeros(mt.ACTION_DIM, np.float32)
            action[3] = result.actions[-1][3] if result.actions else 0.0
        if boundary:
            result.chunk_starts.append(episode.steps)
            self._boundary_next = False
        if result.actions and not held and not self._held_last:
            jump = float(np.linalg.norm(action[MOTION_DIMS] - np.asarray(result.actions[-1])[MOTION_DIMS]))
            (result.boundary_jumps if boundary else result.within_jumps).append(jump)
        self._held_last = held
        result.actions.append([float(v) for v in action])
        episode.step(action)

    def _control(
        self, episode: mt.MetaWorldEpisode, seed: int, stream: ControlSession, result: EpisodeResult
    ) -> None:
        """Both modes; lockstep is this loop with no time passing during inference."""
        cfg = self.cfg
        realtime = cfg.mode == "realtime"
        queue = ChunkQueue(cfg.execute_steps, method=cfg.rtc, control_hz=cfg.control_hz if realtime else 0.0)
        index = 0
        while not episode.done:
            observation = self.observation(episode, seed, index, result)
            if cfg.rtc:
                observation.rtc.CopyFrom(queue.rtc_fields())
            chunk, latency = self._ask(stream, observation, result)
            index += 1
            delay = delay_for(latency, cfg.control_hz) + cfg.delay_steps if realtime else 0
            result.delays.append(delay)
            for _ in range(delay):  # the robot moves on while the server computes
                if episode.done:
                    break
                self._tick(episode, queue.next_action(), result)
            queue.on_chunk(chunk, observation.request_id, delay)
            self._boundary_next = True  # the next action executed comes from the new chunk
            while not episode.done and not queue.needs_chunk():
                self._tick(episode, queue.next_action(), result)
        result.stalls = queue.stalls


def _run_task(cfg: SimConfig, task_name: str, seeds: Sequence[int]) -> list[EpisodeResult]:
    task = mt.task(task_name)
    results = []
    with (
        VLAClient(cfg.target, timeout=cfg.timeout_s, security=ChannelSecurity(token=cfg.token)) as client,
        mt.MetaWorldEpisode(task.name, image_size=cfg.image_size, max_steps=cfg.max_steps) as episode,
    ):
        robot = _Robot(cfg, task, client)
        for seed in seeds:
            result = robot.run(episode, seed)
            if not (cfg.video_dir and seed < cfg.seed + cfg.video_episodes):  # videos: the first N episodes
                result.frames = []
            results.append(result)
            log.info(
                "%s seed %d: %s in %d steps",
                task.name,
                seed,
                "success" if result.success else "fail",
                result.steps,
            )
    return results


def _log_to_stderr(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(message)s")


def run(cfg: SimConfig) -> list[EpisodeResult]:
    """All episodes of every task; tasks are split over `cfg.parallel` worker processes."""
    seeds = list(range(cfg.seed, cfg.seed + cfg.episodes))
    jobs = [(name, seeds) for name in cfg.tasks]
    if cfg.parallel <= 1:
        return [r for name, s in jobs for r in _run_task(cfg, name, s)]
    # Split each task's seeds in halves too, so two workers never idle behind one long task.
    parts = max(1, min(cfg.parallel, len(seeds)))
    split = [(name, s[i::parts]) for name, s in jobs for i in range(parts)]
    # Spawned, not forked: a child forked from a process that has used gRPC (the caller's ModelInfo
    # request) can hang on gRPC's inherited locks.
    spawn = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()  # the workers log each episode as the parent would
    with concurrent.futures.ProcessPoolExecutor(
        cfg.parallel, mp_context=spawn, initializer=_log_to_stderr, initargs=(level,)
    ) as pool:
        futures = [pool.submit(_run_task, cfg, name, s) for name, s in split]
        results = [r for f in futures for r in f.result()]
    return sorted(results, key=lambda r: (cfg.tasks.index(r.task), r.seed))


def _p(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if len(values) else None


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """The report's metrics for a group of episodes."""
    successes = [r for r in results if r.success]
    latencies = [x for r in results for x in r.latencies_ms]
    delays = [d for r in results for d in r.delays]
    return {
        "success_rate": round(len(successes) / len(results), 4) if results else None,
        "episodes": len(results),
        "mean_steps_to_success": round(float(np.mean([r.steps for r in successes])), 2)
        if successes
        else None,
        "latency_p50_ms": _p(latencies, 50),
        "latency_p99_ms": _p(latencies, 99),
        "stalls": sum(r.stalls for r in results),
        "boundary_jump_p99": _p([x for r in results for x in r.boundary_jumps], 99),
        "within_chunk_jump_p99": _p([x for r in results for x in r.within_jumps], 99),
        "mean_delay_steps": round(float(np.mean(delays)), 3) if delays else 0.0,
    }


def report(cfg: SimConfig, results: Sequence[EpisodeResult], model: dict[str, Any]) -> dict[str, Any]:
    by_task = {name: summarize([r for r in results if r.task == name]) for name in cfg.tasks}
    return {
        "config": {
            "target": cfg.target,
            "mode": cfg.mode,
            "execute_steps": cfg.execute_steps,
            "control_hz": cfg.control_hz,
            "delay_steps": cfg.delay_steps,
            "rtc": cfg.rtc or "not sent",
            "seeds": f"{cfg.seed}-{cfg.seed + cfg.episodes - 1}",
            "max_steps": cfg.max_steps,
            "instruction_from": cfg.instruction_from,
        },
        "model": model,
        "tasks": by_task,
        "overall": summarize(results),
        "episodes": [
            {"task": r.task, "seed": r.seed, "success": r.success, "steps": r.steps, "stalls": r.stalls}
            for r in results
        ],
    }


def check_model(info: Any) -> str:
    """Why the served model cannot drive this robot, or "" when it can."""
    if mt.EMBODIMENT not in info.supported_embodiments:
        return (
            f"the server's model ({info.model_name}) has no {mt.EMBODIMENT!r} embodiment "
            f"(it has: {', '.join(info.supported_embodiments)}); serve a MetaWorld policy"
        )
    if info.action_dim != mt.ACTION_DIM or info.state_dims.get(mt.EMBODIMENT) != mt.STATE_DIM:
        return (
            f"the robot sends {mt.STATE_DIM} state values and executes {mt.ACTION_DIM}-dim actions; "
            f"the model takes {info.state_dims.get(mt.EMBODIMENT)} and answers {info.action_dim}"
        )
    return ""


def format_table(summary: dict[str, Any]) -> str:
    """The report as a plain-text table for the terminal."""
    columns = (
        ("success_rate", "success"),
        ("mean_steps_to_success", "steps"),
        ("latency_p50_ms", "p50 ms"),
        ("latency_p99_ms", "p99 ms"),
        ("stalls", "stalls"),
        ("boundary_jump_p99", "boundary"),
        ("within_chunk_jump_p99", "within"),
    )
    rows = [("task", *(title for _, title in columns))]
    groups = [*summary["tasks"].items(), ("overall", summary["overall"])]
    for name, metrics in groups:
        rows.append((name, *("-" if metrics[key] is None else f"{metrics[key]:g}" for key, _ in columns)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
