"""GPU benchmark: real-size model families with random weights built on the device, eager and
compiled (VLA_COMPILE's static-shape path).

    bench/gpu.sh            # on a GPU machine (bf16, real sizes); < 8 minutes on one H100/H200
    bench/gpu.sh --tiny     # anywhere, on CPU: the same code with tiny configurations

For each family: pi0 (1 and 3 cameras), pi0.5, OpenVLA 7B, OpenVLA-OFT 7B (LIBERO: 2 cameras, proprio,
an 8 x 7 chunk per pass), GR00T N1.5, GR00T N1.7 (2 images),
SmolVLA (1 and 3 cameras), pi0-FAST —
  - the network built from the family's named configuration directly on the device (no
    checkpoint files, nothing downloaded), random weights, bf16 on CUDA (float32 on CPU),
  - model latency p50/p99 at batch 1 and throughput at batch 8 (the model's own inference entry
    point: pi0 / GR00T / SmolVLA sample, OpenVLA generate, OpenVLA-OFT forward), synchronised
    timing; for OpenVLA and OpenVLA-OFT also the batch-1 time per action (OFT: a pass / its chunk of 8),
  - compiled (families with a latency goal, and SmolVLA, GR00T N1.7; --compile): the static-shape
    runner the policies use under VLA_COMPILE (Pi0Static, OpenVLAStatic, OFTStatic, GrootStatic,
    Groot17Static, SmolVLAStatic; torch.compile fullgraph, CUDA graphs via mode="reduce-overhead" on
    CUDA), its first-call time (compile + capture), latency p50/p99 at batch 1 (bucket 1), the
    speed-up over eager, and its agreement with eager; with --compile-batch also the batch bucket's
    throughput,
  - real-time chunking (pi0 families; --no-rtc skips it): batch-1 latency of hard, guided with the
    Jacobian (a backward pass per step) and guided with the velocity held constant, eager and
    compiled where the static path runs it, against the plain pass,
  - pi0-FAST (autoregressive; `bench/gpu.sh --only pi0-FAST` runs it alone): LeRobot's 3 cameras
    and 200-token prompt, a decode of a fixed 64 tokens (no stop: random weights never write "|"),
    eager and compiled (Pi0FastStatic, measured by default) at batch 1 and 8: time to first
    token (the prefill), total decode time = time to first action (a FAST chunk is a DCT: its
    first action needs every token), per-token time and tokens/s per robot,
  - peak device memory (torch.cuda.max_memory_allocated) and the weights' size,
  - end-to-end Predict through the real server (VLAServer, grpc.aio, 127.0.0.1) with a 224x224
    JPEG, using a thin bench adapter (SyntheticPolicy) around the same network: the families'
    own Policy classes load only from checkpoint files, so tokenisation is synthetic here (a fixed
    prompt of typical length) while decode, resize, batching and the forward pass are real.
  - with --scheduling (issue 28): after the families, the server's scheduling phases
    (bench/scheduling.py) against the real network on the GPU (`bench.serve --gpu-family`,
    --scheduling-family, in its own process) and against the simulated device whose T1 and K come
    from that family's measured floor (T1 = batch-1 p50, K = (batch-B p50 - T1) / (B - 1)), and the
    CPU per request; results under `scheduling` in the JSON.
A family whose model code is not importable is recorded as skipped with the reason; a failure
in one family does not stop the others. Results: JSON at --out (default $OUT/gpu-bench.json, or
bench/results/gpu-<stamp>.json).

Needs only torch and numpy for the model figures; the end-to-end part also needs the server's
own dependencies (grpcio, protobuf, pydantic-settings, simplejpeg) and the generated gRPC code,
and is skipped with the reason when they are missing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


# --- timing helpers ----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(samples_s: Sequence[float]) -> dict[str, Any]:
    if not samples_s:
        return {"n": 0}
    arr = np.asarray(samples_s) * 1000
    return {
        "n": int(arr.size),
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "mean_ms": round(float(arr.mean()), 3),
    }


def _time(fn: Callable[[], Any], device: torch.device, reps: int, budget_s: float) -> list[float]:
    out: list[float] = []
    end = time.perf_counter() + budget_s
    while len(out) < reps and (len(out) < 3 or time.perf_counter() < end):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Any:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(
    factory: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """Construct directly on the device in the target dtype (no host copy, no checkpoint)."""
    with torch.device(device), _default_dtype(dtype if dtype.is_floating_point else torch.float32):
        model = factory()
    model = model.to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # small random weights: finite activations in bf16
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                param.zero_()
    return model


# --- families ----------------------------------------------------------------------------------
@dataclass
class Family:
    """How to build one network and feed it a batch of synthetic inputs."""

    name: str
    module: str  # model code that must import
    config_name: str
    prompt_tokens: int
    cameras: int = 1

    goal_ms: float | None = None  # batch-1 latency goal on one H100/H200 in bf16 (issue 15)
    compile_always: bool = False  # measured compiled under --compile goals too (no goal of its own)
    actions_per_pass: int | None = None  # for a time per action: OpenVLA 1, OpenVLA-OFT its chunk

    # set by prepare()
    model: Any = None
    runner: Any = None  # the static-shape runner (build_static)
    cfg: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def image_size(self) -> int:
        raise NotImplementedError

    def sample_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, Any]:
        """Per-sample CPU inputs from one (S, S, 3) uint8 image (already at the model's size)."""
        raise NotImplementedError

    def build_static(self, backend: str) -> None:
        """The runner VLA_COMPILE serves with (its compiles happen on first use)."""
        raise NotImplementedError

    def run(self, samples: Sequence[dict[str, Any]], compiled: bool = False) -> np.ndarray:
        """One batched inference pass -> (B, T, D) float32 actions (or tokens) on the host;
        `compiled`: through the static-shape runner."""
        raise NotImplementedError

    def agreement(self, eager: np.ndarray, compiled: np.ndarray) -> dict[str, Any]:
        """How far the compiled answer is from the eager one (flow families: actions)."""
        return {"max_abs_diff_vs_eager": float(f"{float(np.abs(eager - compiled).max()):.3g}")}

    def synthetic_batch(self, batch: int) -> list[dict[str, Any]]:
        s = self.image_size()
        rng = np.random.default_rng(0)
        image = rng.integers(0, 255, (s, s, 3), dtype=np.uint8)
        return [self.sample_inputs(image, seed=i) for i in range(batch)]


def _normalise(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def _static_module(module: str) -> Any:
    """A family's static-shape runners: models/<family>/static.py next to its model.py."""
    return importlib.import_module(module.rsplit(".", 1)[0] + ".static")


class Pi0Family(Family):
    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        mod = importlib.import_module(self.module)
        self.cfg = mod.Pi0Config.named(self.config_name)
        self.model = _build(lambda: mod.Pi0Model(self.cfg), device, dtype)
        self.device, self.dtype = device, dtype

    def image_size(self) -> int:
        return int(self.cfg.vision.image_size)

    def build_static(self, backend: str) -> None:
        # The slots a deployment with this many cameras serves (eager drops absent slots too).
        slots = range(min(self.cameras, len(self.cfg.image_slots)))
        self.runner = _static_module(self.module).Pi0Static(self.model, slots=slots, backend=backend)

    def sample_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, Any]:
        cfg = self.cfg
        slots = len(cfg.image_slots)
        images = np.zeros((slots, 3, pixels.shape[0], pixels.shape[1]), np.float32)
        masks = np.zeros(slots, bool)
        for i in range(min(self.cameras, slots)):
            images[i] = _normalise(pixels)
            masks[i] = True
        n = min(self.prompt_tokens, cfg.max_token_len)
        rng = np.random.default_rng(seed)
        tokens = rng.integers(3, min(cfg.vocab_size, 256_000), n).astype(np.int64)
        tokens[0] = 2  # BOS
        noise = rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32)
        return {
            "images": images,
            "masks": masks,
            "tokens": tokens,
            "state": np.zeros(cfg.action_dim, np.float32),
            "noise": noise,
        }

    def run(
        self, samples: Sequence[dict[str, Any]], compiled: bool = False, prefix: Any = None
    ) -> np.ndarray:
        """`prefix`: a models.rtc.Chunking (real-time chunking rows), as the policy passes it."""
        dev = self.device
        mod = importlib.import_module(self.module)

        def stack(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.stack([s[key] for s in samples])).to(dev, dtype)

        tokens = stack("tokens", torch.long)
        batch = mod.Pi0Batch(
            images=stack("images", self.dtype),
            image_masks=stack("masks", torch.bool),
            tokens=tokens,
            token_masks=torch.ones_like(tokens, dtype=torch.bool),
            state=stack("state", torch.float32),
        )
        sampler = self.runner if compiled else self.model
        backward = prefix is not None and prefix.needs_backward  # the Jacobian: grad mode, no_grad
        with torch.no_grad() if backward else torch.inference_mode():
            actions, _ = sampler.sample(batch, stack("noise", torch.float32), self.cfg.num_steps, prefix)
        return actions.float().cpu().numpy()

    def rtc_prefixes(self, delay: int = 4) -> dict[str, Any]:
        """Batch-1 real-time chunking prefixes (previous chunk random, half of it executed, d =
        `delay`) for the methods and guidance variants the server runs."""
        from vla_inference.models import rtc

        H, A = self.cfg.action_horizon, self.cfg.action_dim
        previous = np.random.default_rng(0).standard_normal((H, A)).astype(np.float32)

        def batch(method: str, jacobian: bool = True) -> Any:
            one = rtc.build_prefix(previous, H // 2, delay, H, method, 5.0, jacobian=jacobian)
            return rtc.Chunking.stack([one], H, A, self.device)

        return {
            "hard": batch("hard"),
            "guided_jacobian": batch("guided"),
            "guided_constant_velocity": batch("guided", jacobian=False),
        }


class OpenVLAFamily(Family):
    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        mod = importlib.import_module(self.module)
        self.cfg = mod.OpenVLAConfig.named(self.config_name)
        self.model = _build(lambda: mod.OpenVLA(self.cfg), device, dtype)
        self.device, self.dtype = device, dtype

    def image_size(self) -> int:
        return int(self.cfg.dino.image_size)

    def build_static(self, backend: str) -> None:
        mod = importlib.import_module(self.module)
        self.runner = _static_module(self.module).OpenVLAStatic(
            self.model, mod.STATIC_PROMPT_TOKENS, 7, backend=backend
        )

    def agreement(self, eager: np.ndarray, compiled: np.ndarray) -> dict[str, Any]:
        return {"tokens_equal_eager": round(float((eager == compiled).mean()), 4)}

    def sample_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, Any]:
        img = _normalise(pixels)
        rng = np.random.default_rng(seed)
        ids = rng.integers(3, 32000, self.prompt_tokens).astype(np.int64)
        ids[0] = 1  # BOS
        return {"pixels": np.concatenate([img, img]), "ids": ids}

    def run(self, samples: Sequence[dict[str, Any]], compiled: bool = False) -> np.ndarray:
        pixels = torch.from_numpy(np.stack([s["pixels"] for s in samples])).to(self.device, self.dtype)
        prompts = [torch.from_numpy(s["ids"]).to(self.device) for s in samples]
        generate = self.runner.generate if compiled else self.model.generate
        with torch.inference_mode():
            out = generate(pixels, prompts, 7)  # 7 action tokens, as for a 7-DoF arm
        return out.tokens.float().cpu().numpy()[:, None, :]


class OpenVLAOFTFamily(Family):
    """OpenVLA-OFT (models/openvla/oft.py): `cameras` images per robot, the proprio token, one pass."""

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        mod = importlib.import_module(self.module)
        self.cfg = mod.OFTConfig.named(self.config_name, num_images=self.cameras)
        self.model = _build(lambda: mod.OpenVLAOFT(self.cfg), device, dtype)
        self.device, self.dtype = device, dtype
        self.actions_per_pass = self.cfg.chunk_size

    def image_size(self) -> int:
        return int(self.cfg.vla.dino.image_size)

    def build_static(self, backend: str) -> None:
        model_mod = importlib.import_module("vla_inference.models.openvla.model")
        self.runner = _static_module(self.module).OFTStatic(
            self.model, model_mod.STATIC_PROMPT_TOKENS, backend=backend
        )

    def sample_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, Any]:
        img = _normalise(pixels)
        rng = np.random.default_rng(seed)
        ids = rng.integers(3, 32000, self.prompt_tokens).astype(np.int64)
        ids[0] = 1  # BOS
        return {
            "pixels": np.stack([np.concatenate([img, img])] * self.cameras),  # (I, 6, S, S)
            "proprio": rng.uniform(-1, 1, self.cfg.proprio_dim).astype(np.float32),
            "ids": ids,
        }

    def run(self, samples: Sequence[dict[str, Any]], compiled: bool = False) -> np.ndarray:
        mod = importlib.import_module(self.module)
        pixels = torch.from_numpy(np.stack([s["pixels"] for s in samples])).to(self.device, self.dtype)
        proprio = torch.from_numpy(np.stack([s["proprio"] for s in samples])).to(self.device, self.dtype)
        prompts = [torch.from_numpy(s["ids"]) for s in samples]
        with torch.inference_mode():
            if compiled:
                actions = self.runner.predict(pixels, proprio, prompts)
            else:
                actions = self.model(mod.OFTBatch(self.model.layout(pixels, prompts), proprio))
        return actions.float().cpu().numpy()


class GrootFamily(Family):
    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        mod = importlib.import_module(self.module)
        self.cfg = mod.GrootConfig.named(self.config_name)
        self.model = _build(lambda: mod.GR00TN15(self.cfg), device, dtype)
        self.device, self.dtype = device, dtype

    def image_size(self) -> int:
        return int(self.cfg.image_size)

    def build_static(self, backend: str) -> None:
        mod = importlib.import_module(self.module)
        # As GrootPolicy: the prompt (here the synthetic one) + the instruction budget, to 16.
        ids = self.cfg.backbone.num_image_tokens * self.cameras + self.prompt_tokens
        length = -(-(ids + mod.STATIC_INSTRUCTION_TOKENS) // 16) * 16
        self.runner = _static_module(self.module).GrootStatic(
            self.model, length, self.cameras, backend=backend
        )

    def sample_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, Any]:
        cfg, eagle = self.cfg, self.cfg.backbone
        rng = np.random.default_rng(seed)
        text = rng.integers(3, min(eagle.vocab_size - 2, 150_000), self.prompt_tokens).astype(np.int64)
        image_tokens = np.full(eagle.num_image_tokens * self.cameras, eagle.image_token_id, np.int64)
        ids = np.concatenate([text[:2], image_tokens, text[2:]])
        return {
            "pixels": np.stack([_normalise(pixels)] * self.cameras),
            "ids": ids,
            "state": np.zeros((1, cfg.max_state_dim), np.float32),
            "noise": rng.standard_normal((cfg.action_horizon, cfg.action_dim)).astype(np.float32),
        }

    def stack(self, samples: Sequence[dict[str, Any]], key: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack([s[key] for s in samples])).to(self.device, dtype)

    def batch(self, samples: Sequence[dict[str, Any]]) -> Any:
        ids = self.stack(samples, "ids", torch.long)
        return importlib.import_module(self.module).GrootBatch(
            pixels=self.stack(samples, "pixels", self.dtype),  # (B, cameras, 3, S, S)
            input_ids=ids,
            attention_mask=torch.ones_like(ids, dtype=torch.bool),
            state=self.stack(samples, "state", torch.float32),
            embodiment_ids=torch.zeros(len(samples), dtype=torch.long, device=self.device),
        )

    def run(self, samples: Sequence[dict[str, Any]], compiled: bool = False) -> np.ndarray:
        sampler = self.runner if compiled else self.model
        steps = self.cfg.head.num_inference_timesteps
        with torch.inference_mode():
            actions, _ = sampler.sample(
                self.batch(samples), self.stack(samples, "noise", torch.float32), steps
            )
        return actions.float().cpu().numpy()


class Groot17Family(GrootFamily):
    """GR00T N1.7: the Cosmos-Reason2 backbone, the 32-layer DiT; `cameras` images per sample
    (LIBERO: 2 cameras, DROID: 1 camera x 2 frames), each of image_size^2 / 32^2 tokens."""

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        mod = importlib.import_module(self.module)
        self.cfg = mod.Groot17Config.named(self.config_name)
        self.model = _build(lambda: mod.Groot17(self.cfg), device, dtype)
        self.device, self.dtype = device, dtype

    def build_static(self, backend: str) -> None:
        from vla_inference.models.groot.model import STATIC_INSTRUCTION_TOKENS

        ids = self.cfg.tokens_per_image * self.cameras + self.prompt_tokens
        length = -(-(ids + STATIC_INSTRUCTION_TOKENS) // 16) * 16
        self.runner = _static_module(self.module).Groot17Static(
            self.model, length, self.cameras, backend=backend
        )

    def sample_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, Any]:
        from vla_inference.models.groot.cosmos import mrope_positions

        cfg, bb = self.cfg, self.cfg.backbone
        rng = np.random.default_rng(seed)
        text = rng.integers(3, min(bb.image_token_id, 150_000), self.prompt_tokens).astype(np.int64)
        image_tokens = np.full(cfg.tokens_per_image * self.cameras, bb.image_token_id, np.int64)
        ids = np.concatenate([text[:2], image_tokens, text[2:]])
        tensor = torch.from_numpy(ids)[None]
        positions = mrope_positions(
            tensor, torch.ones_like(tensor, dtype=torch.bool), cfg.grid, bb.image_token_id
        )
        return {
            "pixels": np.stack([_normalise(pixels)] * self.cameras),
            "ids": ids,
            "positions": positions[:, 0].numpy(),
            "state": np.zeros((cfg.head.state_history, cfg.head.max_state_dim), np.float32),
            "noise": rng.standard_normal((cfg.head.action_horizon, cfg.head.action_dim)).astype(np.float32),
        }

    def batch(self, samples: Sequence[dict[str, Any]]) -> Any:
        ids = self.stack(samples, "ids", torch.long)
        return importlib.import_module(self.module).Groot17Batch(
            pixels=self.stack(samples, "pixels", self.dtype),  # (B, images, 3, S, S)
            input_ids=ids,
            attention_mask=torch.ones_like(ids, dtype=torch.bool),
            positions=self.stack(samples, "positions", torch.long),
            state=self.stack(samples, "state", torch.float32),
            embodiment_ids=torch.zeros(len(samples), dtype=torch.long, device=self.device),
        )


class SmolVLAFamily(Family):
    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        mod = importlib.import_module(self.module)
        self.cfg = mod.SmolVLAConfig.named(self.config_name)
        self.model = _build(lambda: mod.SmolVLAModel(self.cfg), device, dtype)
        self.device, self.dtype = device, dtype

    def image_size(self) -> int:
        return int(self.cfg.vision.image_size)

    def build_static(self, backend: str) -> None:
        # As SmolVLAPolicy: every camera slot of the checkpoint, the prompt padded to 48 tokens.
        self.runner = _static_module(self.module).SmolVLAStatic(
            self.model, slots=range(self.cameras), backend=backend
        )

    def sample_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, Any]:
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        n = min(self.prompt_tokens, cfg.tokenizer_max_length)
        return {
            "images": np.stack([_normalise(pixels)] * self.cameras),
            "tokens": rng.integers(3, cfg.vocab_size, n).astype(np.int64),
            "state": np.zeros(cfg.max_state_dim, np.float32),
            "noise": rng.standard_normal((cfg.chunk_size, cfg.max_action_dim)).astype(np.float32),
        }

    def run(self, samples: Sequence[dict[str, Any]], compiled: bool = False) -> np.ndarray:
        dev = self.device
        mod = importlib.import_module(self.module)

        def stack(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.stack([s[key] for s in samples])).to(dev, dtype)

        images, tokens = stack("images", self.dtype), stack("tokens", torch.long)
        batch = mod.SmolVLABatch(
            images=images,
            image_masks=torch.ones(images.shape[:2], dtype=torch.bool, device=dev),
            tokens=tokens,
            token_masks=torch.ones_like(tokens, dtype=torch.bool),
            state=stack("state", torch.float32),
        )
        sampler = self.runner if compiled else self.model
        with torch.inference_mode():
            actions, _ = sampler.sample(batch, stack("noise", torch.float32), self.cfg.num_steps)
        return actions.float().cpu().numpy()


class Pi0FastFamily(Family):
    """pi0-FAST: `run` decodes DECODE_TOKENS tokens a row (stop token -1: never stops early)."""

    DECODE_TOKENS = 64  # a typical FAST answer (LeRobot's budget is 256)

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        mod = importlib.import_module(self.module)
        self.cfg = mod.Pi0FastConfig.named(self.config_name)
        self.model = _build(lambda: mod.Pi0FastModel(self.cfg), device, dtype)
        self.device, self.dtype = device, dtype
        self.rules = mod.Rules(stop_token=-1, pad_token=0)

    def image_size(self) -> int:
        return int(self.cfg.vision.image_size)

    def build_static(self, backend: str) -> None:
        self.runner = _static_module(self.module).Pi0FastStatic(
            self.model, self.cameras, self.prompt_tokens, self.DECODE_TOKENS, backend=backend
        )

    def agreement(self, eager: np.ndarray, compiled: np.ndarray) -> dict[str, Any]:
        return {"tokens_equal_eager": round(float((eager == compiled).mean()), 4)}

    def sample_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, Any]:
        """LeRobot's layout: the prompt (60 valid tokens) right-padded to 200, then the decode BOS."""
        rng = np.random.default_rng(seed)
        tokens = np.zeros(self.prompt_tokens, np.int64)
        tokens[:60] = rng.integers(3, min(self.cfg.vocab_size, 256_000), 60)
        tokens[0] = tokens[-1] = 2  # BOS, and the decode-time BOS
        mask = np.zeros(self.prompt_tokens, bool)
        mask[:60] = mask[-1] = True
        return {"images": np.stack([_normalise(pixels)] * self.cameras), "tokens": tokens, "mask": mask}

    def batch(self, samples: Sequence[dict[str, Any]]) -> Any:
        mod = importlib.import_module(self.module)

        def stack(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.stack([s[key] for s in samples])).to(self.device, dtype)

        images = stack("images", self.dtype)
        return mod.Pi0FastBatch(
            images=images,
            image_masks=torch.ones(images.shape[:2], dtype=torch.bool, device=self.device),
            tokens=stack("tokens", torch.long),
            token_masks=stack("mask", torch.bool),
            seeds=torch.arange(len(samples), device=self.device),
        )

    def run(self, samples: Sequence[dict[str, Any]], compiled: bool = False, tokens: int = 0) -> np.ndarray:
        """Decode `tokens` (default DECODE_TOKENS) tokens a row -> (B, 1, tokens) token ids."""
        batch, n = self.batch(samples), tokens or self.DECODE_TOKENS
        if compiled:
            out = self.runner.generate(batch, self.rules, limit=n)
        else:
            out = self.model.generate(batch, self.rules, n)
        return out.tokens[:, :n].float().cpu().numpy()[:, None, :]


def decode_figures(fam: Pi0FastFamily, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Eager and compiled (when the runner was built), batch 1 and --batch: time to first token,
    the whole decode (= time to first action), per-token time, tokens/s per robot."""
    out: dict[str, Any] = {"decode_tokens": fam.DECODE_TOKENS}
    for rows in (1, args.batch):
        samples = fam.synthetic_batch(rows)
        for where in ("eager", "compiled") if fam.runner is not None else ("eager",):
            compiled = where == "compiled"
            for _ in range(2):  # warm-up (and a compiled bucket's first calls)
                fam.run(samples, compiled)
            first_token = functools.partial(fam.run, samples, compiled, 1)
            whole = functools.partial(fam.run, samples, compiled)
            first = _stats(_time(first_token, device, args.reps, args.budget_s))
            total = _stats(_time(whole, device, args.reps, args.budget_s))
            row = {"first_token": first, "time_to_first_action": total}
            if first.get("p50_ms") and total.get("p50_ms"):
                row["per_token_ms"] = round((total["p50_ms"] - first["p50_ms"]) / (fam.DECODE_TOKENS - 1), 3)
                row["tokens_per_s_per_robot"] = round(fam.DECODE_TOKENS * 1000 / total["p50_ms"], 1)
            out[f"batch{rows}_{where}"] = row
    return out


def families(tiny: bool) -> list[Family]:
    """The families and their batch-1 goals (bf16, one H100/H200; issue 15): pi0 with 3 cameras
    and 10 steps <= 20 ms, pi0.5 similar, OpenVLA 7B <= 60 ms per action, GR00T N1.5 <= 20 ms.
    SmolVLA (issue 24, no goal) with 1 and 3 cameras, eager and compiled."""
    pi0, pi05 = ("pi0_dummy", "pi05_dummy") if tiny else ("pi0", "pi05")
    pi0_mod = "vla_inference.models.pi0.model"
    smol, smol_mod = ("tiny" if tiny else "smolvla_base"), "vla_inference.models.smolvla.model"
    return [
        Pi0Family("pi0 (1 camera)", pi0_mod, pi0, prompt_tokens=20, cameras=1),
        Pi0Family("pi0 (3 cameras)", pi0_mod, pi0, prompt_tokens=20, cameras=3, goal_ms=20),
        Pi0Family("pi0.5 (1 camera)", pi0_mod, pi05, prompt_tokens=60, cameras=1, goal_ms=20),
        OpenVLAFamily(
            "OpenVLA 7B",
            "vla_inference.models.openvla.model",
            "tiny" if tiny else "7b",
            24,
            goal_ms=60,
            actions_per_pass=1,
        ),
        # LIBERO's layout: third-person + wrist camera, proprio 8, 8 x 7 actions per pass.
        OpenVLAOFTFamily(
            "OpenVLA-OFT 7B", "vla_inference.models.openvla.oft", "tiny" if tiny else "libero", 24, cameras=2
        ),
        GrootFamily(
            "GR00T N1.5", "vla_inference.models.groot.model", "tiny" if tiny else "n1.5-3b", 16, goal_ms=20
        ),
        # GR00T N1.7 (issue 25, no goal): two images per sample, eager and compiled.
        Groot17Family(
            "GR00T N1.7 (2 images)",
            "vla_inference.models.groot.n17",
            "tiny" if tiny else "n1.7-3b",
            20,
            cameras=2,
            compile_always=True,
        ),
        SmolVLAFamily("SmolVLA (1 camera)", smol_mod, smol, prompt_tokens=20, cameras=1, compile_always=True),
        SmolVLAFamily(
            "SmolVLA (3 cameras)", smol_mod, smol, prompt_tokens=20, cameras=3, compile_always=True
        ),
        Pi0FastFamily(
            "pi0-FAST",
            "vla_inference.models.pi0_fast.model",
            "tiny" if tiny else "pi0fast_base",
            prompt_tokens=201,
            cameras=3,
            compile_always=True,
        ),
    ]


# --- end to end through the server ----------------------------------------------------------------
def _synthetic_policy(family: Family, settings: Any) -> Any:
    """A VLAModel around a built Family: real decode/resize/batching/forward, synthetic tokens."""
    from vla_inference.models.base import ActionPrediction, ModelDescription, PreparedSample, VLAModel

    size = family.image_size()

    class SyntheticPolicy(VLAModel):
        model_type = "bench-synthetic"

        def load(self, checkpoint_path: str | None, device: str) -> None:
            self._info = ModelDescription(
                name=f"{family.name} random weights (bench)",
                version="0",
                family=family.name,
                action_dim=7,
                chunk_size=16,
                horizon=16,
                embodiments=("default",),
                default_embodiment="default",
                state_dims={"default": 7},
                camera_names=("base",),
                image_size=(size, size),
                device=str(family.device),
                dtype=str(family.dtype).removeprefix("torch."),
                confidence_definition="bench: always 1",
            )

        @property
        def model_info(self) -> ModelDescription:
            return self._info

        def prepare(self, observation: Any) -> PreparedSample:
            image = observation.images["base"]
            ys = np.linspace(0, image.shape[0] - 1, size).astype(np.int64)
            xs = np.linspace(0, image.shape[1] - 1, size).astype(np.int64)
            resized = image[ys][:, xs]
            seed = int(observation.seed or 0)
            return PreparedSample(family.sample_inputs(resized, seed), "default", seed, batch_key="x")

        def forward(self, samples: Sequence[PreparedSample]) -> list[Any]:
            out = family.run([s.inputs for s in samples], compiled=family.runner is not None)
            return list(out)

        def finish(self, raw: Any, sample: PreparedSample) -> ActionPrediction:
            actions = np.zeros((16, 7), np.float32)
            flat = np.asarray(raw, np.float32).reshape(-1)[: actions.size]
            actions.reshape(-1)[: flat.size] = flat
            return ActionPrediction(actions=actions, confidence=1.0)

    return SyntheticPolicy(settings)


def end_to_end(family: Family, requests: int, budget_s: float, warmup_batches: int = 2) -> dict[str, Any]:
    """Sequential Predict calls over 127.0.0.1 through an in-process VLAServer (batch size 8), the
    compiled runner when the family has one (sequential requests: batches of 1)."""
    import asyncio
    import threading

    from bench.common import jpeg_bytes
    from vla_inference.client import VLAClient
    from vla_inference.config import Settings
    from vla_inference.transport.server import VLAServer

    device = "cpu" if family.device.type == "cpu" else str(family.device)
    settings = Settings(
        host="127.0.0.1",
        grpc_port=0,
        metrics_enabled=False,
        device=device,
        batch_size=8,
        batch_timeout_ms=2.0,
        warmup_batches=warmup_batches,
        timeout_ms=120_000,
        max_stream_rate_hz=0,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="bench-gpu-server")
    thread.start()

    async def make() -> VLAServer:
        return VLAServer(settings, _synthetic_policy(family, settings))

    server = asyncio.run_coroutine_threadsafe(make(), loop).result(60)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(300)
        image = jpeg_bytes()
        e2e: list[float] = []
        timings = []
        with VLAClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            for i in range(3):
                client.predict(image, [0.0] * 7, "pick up the red cup", seed=i)
            end = time.perf_counter() + budget_s
            while len(e2e) < requests and (len(e2e) < 3 or time.perf_counter() < end):
                t0 = time.perf_counter()
                reply = client.predict(image, [0.0] * 7, "pick up the red cup", seed=len(e2e))
                e2e.append(time.perf_counter() - t0)
                timings.append(reply.timing)
        server_total = [t.total_ms / 1000 for t in timings]
        return {
            "adapter": "bench SyntheticPolicy (synthetic tokens; real decode, resize, batching, forward)",
            "path": "compiled" if family.runner is not None else "eager",
            "e2e": _stats(e2e),
            "server_total": _stats(server_total),
            "model": _stats([t.model_ms / 1000 for t in timings]),
            "transport": _stats([e - s for e, s in zip(e2e, server_total, strict=True)]),
            "non_model": _stats([e - t.model_ms / 1000 for e, t in zip(e2e, timings, strict=True)]),
        }
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def serving_policy(name: str, settings: Any, tiny: bool = False) -> Any:
    """The family `name` (a prefix of its name) built at real size on the GPU (tiny: its tiny
    configuration, on the CPU), as a VLAModel for `bench.serve --gpu-family`."""
    fam = next((f for f in families(tiny) if f.name.lower().startswith(name.lower())), None)
    if fam is None:
        raise SystemExit(f"no bench/gpu.py family named {name!r}")
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    fam.build(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    return _synthetic_policy(fam, settings)


def measured_device(row: dict[str, Any], batch: int) -> Any:
    """The simulated device that stands for a family's measured floor: T1 = batch-1 p50, K from the
    batch-B p50 (the compiled figures when there are both), or None when they are missing."""
    from bench.serve import DeviceTime

    compiled = row.get("compiled", {})
    source = compiled if compiled.get("latency_b1", {}).get("n") and compiled.get(f"batch{batch}") else row
    b1 = source.get("latency_b1", {}).get("p50_ms")
    bn = source.get(f"batch{batch}", {}).get("p50_ms")
    if not b1 or not bn or batch < 2:
        return None
    return DeviceTime(round(b1, 3), round(max(0.0, (bn - b1) / (batch - 1)), 3))


def scheduling_figures(row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Issue 28's phases on this host: the real network served on the GPU, the simulated device with
    its measured T1 / K, and the CPU per request (the embedded default model's server path)."""
    import tempfile

    from bench import scheduling
    from bench.common import Target

    device = measured_device(row, args.batch)
    if device is None:
        return {"skipped": f"no batch-1 and batch-{args.batch} figures for {row.get('name')}"}
    plan = scheduling.Plan(quick=True, device=device)
    logs = Path(tempfile.mkdtemp(prefix="vla-gpu-sched-"))
    default = Target("pi0-metaworld (embedded default)", "pi0")
    serve = ["-m", "bench.serve", "--gpu-family", row["name"], *(["--tiny"] if args.tiny else [])]
    out: dict[str, Any] = {"family": row["name"], "device_from_floor": str(device), "logs": str(logs)}
    for key, run in (
        ("real_model", lambda: scheduling.device_phases(default, plan, logs, serve)),
        ("simulated_device", lambda: scheduling.device_phases(default, plan, logs)),
        ("cpu", lambda: scheduling.cpu_phases(default, plan, logs)),
    ):
        try:
            out[key] = run()
        except Exception as exc:
            traceback.print_exc()
            out[key] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
    out["goals"] = scheduling.goal_rows(out)
    if isinstance(out.get("real_model"), dict) and "fleet" in out["real_model"]:
        out["goals_real_model"] = scheduling.goal_rows({"simulated_device": out["real_model"]})
    return out


def e2e_unavailable() -> str:
    """'' when the server stack imports, else why not."""
    for module in ("grpc", "vla_inference.transport.server", "vla_inference.client", "simplejpeg"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            return f"{module} not importable ({type(exc).__name__}: {exc})"
    return ""


# --- main ------------------------------------------------------------------------------------------
def compiled_figures(
    fam: Family,
    device: torch.device,
    args: argparse.Namespace,
    b1: list[dict[str, Any]],
    bn: list[dict[str, Any]],
    eager_b1: dict[str, Any],
) -> dict[str, Any]:
    """The static-shape runner: first-call time per bucket (compile + CUDA-graph capture: two
    calls), batch-1 latency, speed-up over eager, agreement with eager; optionally the batch bucket."""
    from torch._dynamo.utils import counters

    out: dict[str, Any] = {"backend": args.compile_backend}
    skips = counters["inductor"]["cudagraph_skips"]
    t0 = time.perf_counter()
    fam.build_static(args.compile_backend)
    first = fam.run(b1, compiled=True)
    fam.run(b1, compiled=True)
    _sync(device)
    out["first_calls_b1_s"] = round(time.perf_counter() - t0, 2)
    if device.type == "cuda":  # 0: every compiled piece runs as a CUDA graph (reasons in the log)
        out["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    out.update(fam.agreement(fam.run(b1), first))
    lat = _time(lambda: fam.run(b1, compiled=True), device, args.reps, args.budget_s)
    out["latency_b1"] = _stats(lat)
    if eager_b1.get("p50_ms") and out["latency_b1"].get("p50_ms"):
        out["speedup_b1_p50"] = round(eager_b1["p50_ms"] / out["latency_b1"]["p50_ms"], 3)
    if args.compile_batch:
        t0 = time.perf_counter()
        fam.run(bn, compiled=True)
        fam.run(bn, compiled=True)
        _sync(device)
        out[f"first_calls_batch{args.batch}_s"] = round(time.perf_counter() - t0, 2)
        thr = _time(lambda: fam.run(bn, compiled=True), device, max(3, args.reps // 4), args.budget_s)
        stats = _stats(thr)
        stats["samples_per_s"] = round(args.batch * 1000 / stats["p50_ms"], 3)
        out[f"batch{args.batch}"] = stats
    return out


def rtc_figures(fam: Pi0Family, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 latency of real-time chunking (d = 4, half the previous chunk executed): hard, guided
    with the Jacobian (a backward pass per step, eager) and guided with the velocity held constant,
    eager and, when the static runner was built, compiled; ratios to the plain eager pass."""
    b1 = fam.synthetic_batch(1)

    def timed(compiled: bool, prefix: Any) -> dict[str, Any]:
        for _ in range(2):  # warm-up (and a compiled bucket's first calls)
            fam.run(b1, compiled, prefix)
        return _stats(_time(lambda: fam.run(b1, compiled, prefix), device, args.reps, args.budget_s))

    out: dict[str, Any] = {"delay": 4, "executed": fam.cfg.action_horizon // 2}
    plain = out["none_eager"] = timed(False, None)
    for name, prefix in fam.rtc_prefixes().items():
        compiled_too = fam.runner is not None and not prefix.needs_backward
        for where in ("eager", "compiled") if compiled_too else ("eager",):
            stats = timed(where == "compiled", prefix)
            if plain.get("p50_ms") and stats.get("p50_ms"):
                stats["vs_none_eager_p50"] = round(stats["p50_ms"] / plain["p50_ms"], 3)
            out[f"{name}_{where}"] = stats
    return out


def bench_family(
    fam: Family, device: torch.device, dtype: torch.dtype, args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": fam.name, "config": fam.config_name, "cameras": fam.cameras}
    if fam.goal_ms is not None:
        out["goal_b1_ms"] = fam.goal_ms
    try:
        importlib.import_module(fam.module)
    except Exception as exc:
        out["skipped"] = f"{fam.module} not importable: {type(exc).__name__}: {exc}"
        return out
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fam.build(device, dtype)
    _sync(device)
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["parameters"] = int(sum(p.numel() for p in fam.model.parameters()))
    out["weights_gib"] = round(sum(p.numel() * p.element_size() for p in fam.model.parameters()) / 2**30, 3)
    out["dtype"] = str(dtype).removeprefix("torch.")
    b1 = fam.synthetic_batch(1)
    bn = fam.synthetic_batch(args.batch)
    for _ in range(args.warmup):
        fam.run(b1)
    fam.run(bn)
    lat = _time(lambda: fam.run(b1), device, args.reps, args.budget_s)
    out["latency_b1"] = _stats(lat)
    thr = _time(lambda: fam.run(bn), device, max(3, args.reps // 4), args.budget_s)
    stats = _stats(thr)
    stats["samples_per_s"] = round(args.batch * 1000 / stats["p50_ms"], 3)
    out[f"batch{args.batch}"] = stats
    if fam.actions_per_pass:
        out["actions_per_pass"] = fam.actions_per_pass
        out["per_action_b1_ms"] = round(out["latency_b1"]["p50_ms"] / fam.actions_per_pass, 3)
        out[f"per_action_batch{args.batch}_ms"] = round(stats["p50_ms"] / fam.actions_per_pass, 3)
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if args.compile == "none" or (args.compile == "goals" and fam.goal_ms is None and not fam.compile_always):
        out["compiled"] = {"skipped": f"--compile {args.compile}"}
    elif deadline - time.monotonic() < args.compile_min_s:
        out["compiled"] = {"skipped": f"less than {args.compile_min_s:.0f} s of the time budget left"}
    else:
        try:
            out["compiled"] = compiled_figures(fam, device, args, b1, bn, out["latency_b1"])
            compiled_b1 = out["compiled"]["latency_b1"].get("p50_ms")
            if fam.actions_per_pass and compiled_b1:
                out["compiled"]["per_action_b1_ms"] = round(compiled_b1 / fam.actions_per_pass, 3)
        except Exception as exc:
            traceback.print_exc()
            fam.runner = None
            out["compiled"] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
        if cuda:
            out["peak_memory_gib_incl_compiled"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if isinstance(fam, Pi0FastFamily):
        try:
            out["decode"] = decode_figures(fam, device, args)
        except Exception as exc:
            traceback.print_exc()
            out["decode"] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
    if isinstance(fam, Pi0Family) and not args.no_rtc:
        try:
            out["rtc"] = rtc_figures(fam, device, args)
        except Exception as exc:
            traceback.print_exc()
            out["rtc"] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
    if args.no_e2e:
        out["e2e"] = {"skipped": "--no-e2e"}
    else:
        why = e2e_unavailable()
        if why:
            out["e2e"] = {"skipped": why}
        else:
            try:
                warm = 2 if fam.runner is None or args.compile_batch else 1  # no new bucket
                out["e2e"] = end_to_end(fam, args.e2e_requests, args.budget_s, warm)
            except Exception as exc:
                traceback.print_exc()
                out["e2e"] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
    if cuda:
        out["peak_memory_gib_incl_e2e"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configurations (runs on CPU)")
    parser.add_argument("--device", default="", help="default: cuda when available and not --tiny, else cpu")
    parser.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--only", default="", help="comma list of name prefixes, e.g. 'pi0,OpenVLA'")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions at batch 1")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=20.0, help="time cap per measurement")
    parser.add_argument("--e2e-requests", type=int, default=30)
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--no-rtc", action="store_true", help="skip the real-time chunking latencies (pi0)")
    parser.add_argument("--deadline-s", type=float, default=450.0, help="skip families started after this")
    parser.add_argument(
        "--compile",
        choices=("goals", "all", "none"),
        default="goals",
        help="families measured compiled too: those with a latency goal (default), all, none",
    )
    parser.add_argument(
        "--compile-backend",
        default="",
        help="torch.compile backend; default inductor on CUDA (CUDA graphs), aot_eager on CPU "
        "(checks the capture; CPU inductor compiles take minutes)",
    )
    parser.add_argument(
        "--compile-batch", action="store_true", help="also compile and time the --batch bucket"
    )
    parser.add_argument(
        "--compile-min-s", type=float, default=150.0, help="skip compiling with less budget left than this"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--scheduling", action="store_true", help="then issue 28's scheduling phases (bench/scheduling.py)"
    )
    parser.add_argument(
        "--scheduling-family", default="pi0 (1 camera)", help="the family served for --scheduling"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    args.compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out
    if out_path is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
        out_path = base / (f"gpu-{stamp}.json" if not os.environ.get("OUT") else "gpu-bench.json")
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.gpu", *(argv if argv is not None else sys.argv[1:])]),
        "started_utc": stamp,
        "tiny": args.tiny,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nproc": os.cpu_count(),
        "batch": args.batch,
        "compile": args.compile,
        "compile_backend": args.compile_backend,
        "families": [],
    }
    only = [x.strip().lower() for x in args.only.split(",") if x.strip()]
    for fam in families(args.tiny):
        if only and not any(fam.name.lower().startswith(p) for p in only):
            continue
        if time.monotonic() - started > args.deadline_s:
            result["families"].append(
                {"name": fam.name, "skipped": f"time budget ({args.deadline_s:.0f} s) spent"}
            )
            continue
        print(f"[gpu-bench] {fam.name} ({fam.config_name}) on {device} {dtype}", flush=True)
        try:
            row = bench_family(fam, device, dtype, args, started + args.deadline_s)
        except Exception as exc:
            traceback.print_exc()
            row = {
                "name": fam.name,
                "config": fam.config_name,
                "skipped": f"failed: {type(exc).__name__}: {exc}",
            }
            if "out of memory" in str(exc).lower():
                row["skipped"] = f"out of memory: {exc}"
        fam.model = fam.runner = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[gpu-bench] {json.dumps(row)}", flush=True)
        result["families"].append(row)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a timeout
    if args.scheduling:
        row = next((r for r in result["families"] if r.get("name") == args.scheduling_family), None)
        if row is None or "skipped" in row:
            result["scheduling"] = {"skipped": f"{args.scheduling_family!r} was not measured (see --only)"}
        else:
            print(f"[gpu-bench] scheduling phases: {args.scheduling_family}", flush=True)
            result["scheduling"] = scheduling_figures(row, args)
    result["duration_s"] = round(time.monotonic() - started, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))
    if isinstance(result.get("scheduling"), dict) and "goals" in result["scheduling"]:
        from bench.scheduling import markdown as scheduling_markdown

        sched = result["scheduling"]
        if "goals_real_model" in sched:
            print(
                f"The real network ({sched['family']}) on this device, efficiency against its measured floor:"
            )
            print(
                scheduling_markdown(
                    {"simulated_device": sched["real_model"], "goals": sched["goals_real_model"]}
                )
            )
        print(
            f"The simulated device with the measured T1,K = {sched['device_from_floor']} ms, "
            "and CPU per request:"
        )
        print(
            scheduling_markdown({k: v for k, v in sched.items() if k in ("simulated_device", "cpu", "goals")})
        )
    print(f"results: {out_path}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['device']} ({result['device_name']}), {result['dtype']}, torch {result['torch']}, "
        f"compiled with {result['compile_backend']}",
        "| family | config | params (M) | eager b1 p50 / p99 ms | compiled b1 p50 / p99 ms | speed-up "
        "| goal ms | first calls s | eager b8 samples/s | b1 ms per action (eager / compiled) | peak GiB "
        "| e2e p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    batch_key = f"batch{result['batch']}"
    for r in result["families"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | {r.get('config', '')} | skipped: {r['skipped']} ||||||||||")
            continue
        e2e = r.get("e2e", {}).get("e2e", {})
        comp = r.get("compiled", {})
        lat = comp.get("latency_b1", {})
        compiled = f"{lat['p50_ms']} / {lat['p99_ms']}" if lat.get("n") else comp.get("skipped", "-")
        lines.append(
            f"| {r['name']} | {r['config']} | {r['parameters'] / 1e6:.1f} "
            f"| {r['latency_b1'].get('p50_ms')} / {r['latency_b1'].get('p99_ms')} | {compiled} "
            f"| {comp.get('speedup_b1_p50', '-')} | {r.get('goal_b1_ms', '-')} "
            f"| {comp.get('first_calls_b1_s', '-')} "
            f"| {r[batch_key].get('samples_per_s')} "
            f"| {r.get('per_action_b1_ms', '-')} / {comp.get('per_action_b1_ms', '-')} "
            f"| {r.get('peak_memory_gib', '-')} "
            f"| {e2e.get('p50_ms', '-')} / {e2e.get('p99_ms', '-')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
