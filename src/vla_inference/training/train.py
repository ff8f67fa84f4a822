"""Train the embedded default policy: pi0 with flow matching on MetaWorld MT10 demonstrations.

    python -m vla_inference.training.train --data data/metaworld-mt10 --run runs/metaworld \\
        --export src/vla_inference/models/pi0/assets/metaworld

`--init CHECKPOINT` starts from an exported checkpoint's weights and normalisation statistics
instead of random weights (fine-tuning). `make train-default` runs two stages: 7000 steps on
MetaWorld's scripted experts as they ship, then 2500 steps from that export on demonstrations whose
expert commands are rate-limited (smooth; see sim/tasks.py SMOOTH_EXPERT_MAX_STEP). It records
the demonstrations first when they are missing.

The network is the server's own (models/pi0/model.py, SIZES["pi0_metaworld"]) and the
loss is its `flow_matching_loss`. Everything is seeded: the same command on the same data gives
the same weights on the same machine kind. The run directory keeps a resumable state every
`--save-every` steps (safetensors + JSON, nothing pickled); rerunning the command continues from
it. The export is an openpi-format checkpoint with the data's normalisation statistics, the
tokenizer and a description, loaded by the normal loader.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall for whole time slices when other processes share the
# two cores (a 2-thread step went from 0.8 s to 3.9 s here); yield instead. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_inference.models.common.init import init_random_weights
from vla_inference.models.common.weights import load_weights, read_json
from vla_inference.models.pi0 import checkpoint as ckpt
from vla_inference.models.pi0.demo import tokenizer_bytes
from vla_inference.models.pi0.model import Pi0Config, Pi0Model, build, sample_flow_time
from vla_inference.sim import tasks as mt
from vla_inference.training.dataset import DemoDataset

log = logging.getLogger("vla_inference.training")
CONFIG_NAME = "pi0_metaworld"


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class TrainState:
    """Model, EMA weights, optimiser and random streams: everything a resumed run needs."""

    def __init__(self, cfg: Pi0Config, seed: int, lr: float, weight_decay: float) -> None:
        self.model: Pi0Model = build(cfg)
        init_random_weights(self.model, seed)
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.step = 0

    def start_from(self, checkpoint: ckpt.Checkpoint) -> None:
        """Weights (and EMA) from an exported checkpoint of the same configuration."""
        if checkpoint.config != self.model.cfg:
            raise SystemExit(f"{checkpoint.path}: {checkpoint.describe()} is not the {CONFIG_NAME} model")
        loaded = load_weights(
            build(checkpoint.config, device="meta"),
            checkpoint.weight_files,
            checkpoint.names,
            device="cpu",
            dtype=torch.float32,
            where=str(checkpoint.path),
            what=checkpoint.describe(),
        )
        self.model.load_state_dict(loaded.state_dict())
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def update_ema(self, decay: float) -> None:
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                if value.dtype.is_floating_point:
                    self.ema[name].mul_(decay).add_(value, alpha=1.0 - decay)

    def save(self, run: Path) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        tensors.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
        tensors["generator"] = self.generator.get_state()
        tmp = run / "state.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        meta = {"step": self.step, "rng": self.rng.bit_generator.state}
        (run / "state.json.tmp").write_text(json.dumps(meta))
        tmp.replace(run / "state.safetensors")
        (run / "state.json.tmp").replace(run / "state.json")

    def load(self, run: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(run / "state.safetensors"))
        meta = json.loads((run / "state.json").read_text())
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                optimizer_state.setdefault(int(index), {})[key] = value
        state_dict = self.optimizer.state_dict()
        state_dict["state"] = optimizer_state
        self.optimizer.load_state_dict(state_dict)
        self.generator.set_state(tensors["generator"])
        self.rng.bit_generator.state = meta["rng"]
        self.step = int(meta["step"])


def train_step(state: TrainState, data: DemoDataset, batch_size: int) -> float:
    """One optimiser step on a fresh random batch; returns the loss."""
    model = state.model
    batch = data.batch(state.rng.integers(0, len(data), batch_size))
    actions = torch.from_numpy(batch.actions)
    noise = torch.randn(actions.shape, generator=state.generator)
    t = sample_flow_time(batch_size, state.generator)
    errors = model.flow_matching_loss(batch.inputs(), actions, noise, t)
    loss = errors[..., : model.cfg.flow_dims or None].mean()  # the padding's target is 0 and learnt
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    state.optimizer.step()
    return loss.item()


def describe(data: DemoDataset, init: ckpt.Checkpoint | None, steps: int) -> dict[str, Any]:
    """What the exported checkpoint says about itself (config.json "vla_inference" section)."""
    episodes = data.manifest["episodes"]
    assert isinstance(episodes, list)
    seeds = sorted({int(e["seed"]) for e in episodes})
    max_step = float(data.manifest.get("expert_max_step", 0.0))  # type: ignore[arg-type]
    demonstrators = "MetaWorld's scripted experts" + (
        f" with their xyz command rate-limited to {max_step} per step" if max_step else ""
    )
    stages: list[Any] = []
    if init is not None:
        stages = read_json(init.path / "config.json").get("vla_inference", {}).get("training", [])
        stages = stages if isinstance(stages, list) else [stages]
    stages.append(
        {
            "demonstrators": demonstrators,
            "tasks": sorted({str(e["task"]) for e in episodes}),
            "episodes": len(episodes),
            "samples": len(data),
            "seeds": f"{seeds[0]}-{seeds[-1]} (evaluation uses {mt.EVAL_SEEDS.start} and up)",
            "steps": steps,
        }
    )
    return {
        "description": (
            "pi0 trained by behaviour cloning (flow matching) on MetaWorld MT10 demonstrations by "
            + ", then fine-tuned on demonstrations by ".join(
                f"{stage.get('demonstrators', 'scripted experts')} ({stage.get('steps', '?')} steps)"
                for stage in stages
            )
            + "; a simulated Sawyer arm, not a real-robot policy. It sees "
            "the corner camera (96 px), the instruction and a 21-number state that includes the "
            "simulator's object and goal coordinates. Actions: end-effector delta xyz + gripper "
            "effort in [-1, 1], MetaWorld's action space."
        ),
        "embodiments": {mt.EMBODIMENT: {"state": list(mt.STATE_LAYOUT), "actions": list(mt.ACTION_LAYOUT)}},
        "cameras": ["base"],
        "training": stages,
    }


def init_stats(init: ckpt.Checkpoint) -> dict[str, Any]:
    """The normalisation statistics an exported checkpoint was trained with (openpi layout)."""
    stats = json.loads((init.path / "assets" / mt.EMBODIMENT / "norm_stats.json").read_text())
    return dict(stats["norm_stats"])


def export(
    state: TrainState, data: DemoDataset, out: Path, cfg: Pi0Config, init: ckpt.Checkpoint | None = None
) -> Path:
    """Write the EMA weights as an openpi-format checkpoint."""
    ckpt.write_openpi(
        out,
        cfg,
        state.ema,
        {mt.EMBODIMENT: data.stats},
        tokenizer=tokenizer_bytes(),
        extra_config={"vla_inference": describe(data, init, state.step)},
        expert_lm_head=False,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="demonstrations (sim.demos output)")
    parser.add_argument("--run", type=Path, required=True, help="run directory (resumable state)")
    parser.add_argument("--export", type=Path, required=True, help="where to write the checkpoint")
    parser.add_argument("--init", type=Path, help="fine-tune: start from this exported checkpoint")
    parser.add_argument("--steps", type=int, default=7_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import sentencepiece

    cfg = Pi0Config.named(CONFIG_NAME)
    tokenizer = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_bytes())
    init = ckpt.load(args.init) if args.init else None
    data = DemoDataset(args.data, cfg, tokenizer, stats=init_stats(init) if init else None)
    log.info("%d samples from %d episodes", len(data), data.episode_count)
    args.run.mkdir(parents=True, exist_ok=True)
    state = TrainState(cfg, args.seed, args.lr, args.weight_decay)
    if (args.run / "state.json").is_file():
        state.load(args.run)
        log.info("resumed at step %d", state.step)
    elif init is not None:
        state.start_from(init)
        log.info("starting from %s", init.path)
    state.model.train()
    started, losses = time.monotonic(), []
    while state.step < args.steps:
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(state.step, args.steps, args.lr, args.warmup)
        losses.append(train_step(state, data, args.batch_size))
        state.update_ema(args.ema if state.step >= args.warmup else 0.0)
        state.step += 1
        if state.step % 100 == 0:
            rate = len(losses) / (time.monotonic() - started)
            log.info("step %d loss %.4f (%.1f steps/s)", state.step, float(np.mean(losses[-100:])), rate)
        if state.step % args.save_every == 0 or state.step == args.steps:
            state.save(args.run)
    export(state, data, args.export, cfg, init)
    digest = hashlib.sha256((args.export / "model.safetensors").read_bytes()).hexdigest()
    log.info("exported %s; weights sha256 %s (models/pi0/demo.py METAWORLD_SHA256)", args.export, digest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
