"""SmolVLA at real size (random weights) on this CPU, in-process: where one chunk's time goes.

    .venv/bin/python -m bench.smolvla_cpu [--threads 1] [--runs 2]

Builds SmolVLAConfig.named("smolvla_base") in float32 and times, for batch 1 and 4 with 1 and 3
cameras (512 px, a 48-token prompt of which 20 are real), the pieces one request runs: the prefix
embeddings (the SigLIP tower and connector per camera, the language and state tokens), the prefill
through the 16 kept VLM layers, and the 10 Euler steps through the action expert (the serving
step function, `euler_step`). The minimum of `--runs` runs after one warm-up; the load average is
printed with each row (the cores may be shared).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from vla_inference.models.smolvla.model import SmolVLABatch, SmolVLAConfig, SmolVLAModel, build

CASES = ((1, 1), (1, 3), (4, 1), (4, 3))  # (batch, cameras)
PROMPT_TOKENS = 20


def inputs(cfg: SmolVLAConfig, batch: int, cameras: int) -> SmolVLABatch:
    size, length = cfg.vision.image_size, cfg.tokenizer_max_length
    return SmolVLABatch(
        images=torch.rand(batch, cameras, 3, size, size) * 2 - 1,
        image_masks=torch.ones(batch, cameras, dtype=torch.bool),
        tokens=torch.randint(0, cfg.vocab_size, (batch, length)),
        token_masks=torch.arange(length)[None].expand(batch, length) < PROMPT_TOKENS,
        state=torch.randn(batch, cfg.max_state_dim),
    )


def once(model: SmolVLAModel, batch: SmolVLABatch) -> tuple[float, float, float]:
    """(prefix embeddings, VLM prefill, 10 Euler steps) in seconds."""
    cfg = model.cfg
    rows, slots = batch.tokens.shape[0], tuple(range(batch.images.shape[1]))
    noise = torch.randn(rows, cfg.chunk_size, cfg.max_action_dim)
    with torch.inference_mode():
        t0 = time.perf_counter()
        embs, pad, ar = model.embed_prefix(batch, slots)
        t1 = time.perf_counter()
        cache = model.prefill(embs, pad, ar)
        context = model.suffix_context(pad)
        t2 = time.perf_counter()
        x = noise
        for step_time in model.times(rows, cfg.num_steps, torch.float32, noise.device):
            x, _ = model.euler_step(cache, context, batch, x, step_time, noise, None, 1.0 / cfg.num_steps)
        t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smolvla_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SmolVLAConfig.named("smolvla_base")
    model = build(cfg).eval()
    once(model, inputs(cfg, 1, 1))  # warm-up
    print(f"SmolVLA smolvla_base, float32, {args.threads} thread(s), {os.cpu_count()} cores")
    print("| batch | cameras | total s | vision + embeddings | prefix VLM | 10 steps | load avg |")
    print("|---|---|---|---|---|---|---|")
    for rows, cameras in CASES:
        batch = inputs(cfg, rows, cameras)
        runs = [once(model, batch) for _ in range(args.runs)]
        embed, prefill, steps = (min(run[i] for run in runs) for i in range(3))
        load = os.getloadavg()[0]
        print(
            f"| {rows} | {cameras} | {embed + prefill + steps:.2f} | {embed:.2f} | {prefill:.2f} | "
            f"{steps:.2f} | {load:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
