"""Expert demonstrations: MetaWorld's scripted experts rolled out and stored for training.

    python -m vla_inference.sim.demos --out data/metaworld-mt10 --episodes 100 [--smooth]

On-disk format (version 1), one directory:

    manifest.json      {"format": "vla-inference-metaworld-demos", "version": 1, "image_size": S,
                        "state_layout": [...21 names], "action_layout": [...4 names],
                        "chunk_tail": K, "expert_max_step": M (0: the experts as they ship),
                        "episodes": [{"file", "task", "seed", "instruction", "steps", "success",
                        "noise_std"}, ...]}
    <task>/<seed>.npz  one episode, plain arrays only (np.load(allow_pickle=False)):
        jpeg          uint8 (total bytes,)   the camera frames, JPEG (quality 90) back to back
        jpeg_offsets  int64 (T + 1,)         frame t is jpeg[jpeg_offsets[t]:jpeg_offsets[t + 1]]
        state         float32 (T, 21)        the robot state before step t (tasks.STATE_LAYOUT)
        action        float32 (T + K, 4)     the expert's action at step t, clipped to [-1, 1]
        executed      float32 (T, 4)         the action applied (the expert's plus injected noise)

T counts the steps up to and including the first success; the expert then runs K more steps
(`chunk_tail`) whose actions are stored without frames, so that every step's chunk of future
actions is complete. Only successful episodes are kept; their seeds are recorded. Frames are
what the simulated robot sends the server: the same camera, size and JPEG quality.

Noise injection (DART-style): some episodes apply the expert's action plus Gaussian noise while
recording the clean action, so that the policy also sees how the expert recovers from small
mistakes. The noise scale of each episode is recorded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vla_inference.sim import tasks as mt

FORMAT = "vla-inference-metaworld-demos"
VERSION = 1
JPEG_QUALITY = 90
NOISE_LEVELS = (0.0, 0.1, 0.3)  # episode i uses NOISE_LEVELS[i % 3]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeRecord:
    file: str
    task: str
    seed: int
    instruction: str
    steps: int
    success: bool
    noise_std: float


def record_episode(
    episode: mt.MetaWorldEpisode, seed: int, noise_std: float, chunk_tail: int
) -> dict[str, np.ndarray] | None:
    """Roll out the expert for one seed; the episode's arrays, or None when the expert failed."""
    from vla_inference.preprocessing.images import encode_jpeg

    rng = np.random.default_rng(seed + 7919)
    episode.reset(seed)
    frames: list[bytes] = []
    states: list[np.ndarray] = []
    actions: list[np.ndarray] = []
    executed: list[np.ndarray] = []
    while not episode.done:
        frames.append(encode_jpeg(episode.render(), quality=JPEG_QUALITY))
        states.append(episode.state)
        action = episode.expert_action()
        applied = action.copy()
        if noise_std > 0:
            applied[:3] = np.clip(applied[:3] + rng.normal(0.0, noise_std, 3), -1.0, 1.0)
        actions.append(action)
        executed.append(applied)
        episode.step(applied)
    if not episode.success:
        return None
    for _ in range(chunk_tail):  # the chunk tail: what the expert does next, without frames
        action = episode.expert_action()
        actions.append(action)
        episode.env.step(action.astype(np.float64))
    offsets = np.cumsum([0] + [len(f) for f in frames]).astype(np.int64)
    return {
        "jpeg": np.frombuffer(b"".join(frames), np.uint8),
        "jpeg_offsets": offsets,
        "state": np.stack(states).astype(np.float32),
        "action": np.stack(actions).astype(np.float32),
        "executed": np.stack(executed).astype(np.float32),
    }


def _record_task(
    task_name: str,
    out: str,
    episodes: int,
    seed_start: int,
    image_size: int,
    max_steps: int,
    chunk_tail: int,
    expert_max_step: float,
) -> list[EpisodeRecord]:
    """All episodes of one task (runs in a worker process). Seeds whose expert fails are skipped
    and replaced by the next seed, so each task gets `episodes` successful demonstrations."""
    task = mt.task(task_name)
    folder = Path(out) / task.name
    folder.mkdir(parents=True, exist_ok=True)
    records: list[EpisodeRecord] = []
    seed = seed_start
    with mt.MetaWorldEpisode(
        task.name, image_size=image_size, max_steps=max_steps, expert_max_step=expert_max_step
    ) as episode:
        while len(records) < episodes:
            if seed not in mt.TRAIN_SEEDS:
                raise ValueError(f"{task.name}: ran out of training seeds at {seed}")
            index = len(records)
            noise = NOISE_LEVELS[index % len(NOISE_LEVELS)]
            name = f"{task.name}/{seed:06d}.npz"
            arrays = record_episode(episode, seed, noise, chunk_tail)
            if arrays is not None:
                np.savez_compressed(Path(out) / name, **arrays)  # type: ignore[arg-type]
                instruction = task.instructions[index % len(task.instructions)]
                records.append(
                    EpisodeRecord(name, task.name, seed, instruction, len(arrays["state"]), True, noise)
                )
            seed += 1
    return records


def record(
    out: Path,
    task_names: Sequence[str],
    episodes: int,
    *,
    seed_start: int = 0,
    image_size: int = mt.DEFAULT_IMAGE_SIZE,
    max_steps: int = mt.DEFAULT_MAX_STEPS,
    chunk_tail: int = 16,
    expert_max_step: float = 0.0,
    processes: int = 2,
) -> dict[str, object]:
    """Record demonstrations for every task into `out`; returns the manifest (also written)."""
    out.mkdir(parents=True, exist_ok=True)
    args = (str(out), episodes, seed_start, image_size, max_steps, chunk_tail, expert_max_step)
    records: list[EpisodeRecord] = []
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        futures = {name: pool.submit(_record_task, name, *args) for name in task_names}
        for name, future in futures.items():
            done = future.result()
            log.info("%s: %d episodes", name, len(done))
            records += done
    manifest: dict[str, object] = {
        "format": FORMAT,
        "version": VERSION,
        "image_size": image_size,
        "jpeg_quality": JPEG_QUALITY,
        "max_steps": max_steps,
        "chunk_tail": chunk_tail,
        "expert_max_step": expert_max_step,
        "state_layout": list(mt.STATE_LAYOUT),
        "action_layout": list(mt.ACTION_LAYOUT),
        "episodes": [asdict(r) for r in records],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: Path) -> dict[str, object]:
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{folder}: not a version {VERSION} {FORMAT} directory")
    return manifest


def load_episode(folder: Path, record: dict[str, object]) -> dict[str, np.ndarray]:
    with np.load(folder / str(record["file"]), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--tasks", default="mt10", help="comma-separated task names, or mt10")
    parser.add_argument("--episodes", type=int, default=100, help="successful episodes per task")
    parser.add_argument("--seed-start", type=int, default=0, help="first seed (training seeds: 0-999)")
    parser.add_argument("--image-size", type=int, default=mt.DEFAULT_IMAGE_SIZE)
    parser.add_argument(
        "--smooth",
        action="store_true",
        help=f"rate-limit the expert's xyz command to {mt.SMOOTH_EXPERT_MAX_STEP} per step (the default "
        "policy's second training stage); without it, MetaWorld's experts as they ship",
    )
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.monotonic()
    names = [t.name for t in mt.parse_tasks(args.tasks)]
    manifest = record(
        args.out,
        names,
        args.episodes,
        seed_start=args.seed_start,
        image_size=args.image_size,
        expert_max_step=mt.SMOOTH_EXPERT_MAX_STEP if args.smooth else 0.0,
        processes=args.processes,
    )
    episodes = manifest["episodes"]
    assert isinstance(episodes, list)
    steps = sum(int(e["steps"]) for e in episodes)
    log.info(
        "%d episodes, %d steps in %.0f s -> %s", len(episodes), steps, time.monotonic() - started, args.out
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
