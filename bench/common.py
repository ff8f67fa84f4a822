"""Shared helpers: benchmark targets, the test observation, statistics, machine facts."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
INSTRUCTION = "pick up the red cup and put it on the plate"
IMAGE_SIZE = 224
JPEG_QUALITY = 90


# --- targets ------------------------------------------------------------------------------------
@dataclass
class Target:
    """One model configuration to benchmark."""

    name: str
    model_type: str
    checkpoint: str = ""  # "" = the family's embedded default
    note: str = ""
    skipped: str = ""  # why it cannot run here ("" = runnable)
    extra_env: dict[str, str] = field(default_factory=dict)
    cameras: int = 1  # camera frames per request: the first `cameras` of the model's camera_names

    def env(self) -> dict[str, str]:
        env = {"VLA_MODEL_TYPE": self.model_type, "VLA_MODEL_PATH": self.checkpoint}
        env.update(self.extra_env)
        return env

    def request(self, info: Any, seed: int = 0) -> Any:
        """The benchmark's Predict request for this target's model (ModelInfo or ModelDescription)."""
        return make_request(info, seed=seed, cameras=self.cameras)


@dataclass(frozen=True)
class Tiny:
    """A backend's tiny configuration: the class that must import, the test checkpoint writer."""

    model_type: str
    module: str
    cls: str
    helper: str  # tests/helpers/<helper>.py
    writer: str
    writer_args: dict[str, Any] = field(default_factory=dict)
    cameras: int = 1


TINY = {
    "openvla": Tiny(
        "openvla",
        "vla_inference.models.openvla.policy",
        "OpenVLAPolicy",
        "openvla_checkpoints",
        "write_tiny_openvla_checkpoint",
    ),
    # OpenVLA-OFT: upstream's .pt files converted as `vla-inference convert oft` does; base + wrist.
    "openvla-oft": Tiny(
        "openvla",
        "vla_inference.models.openvla.policy",
        "OpenVLAOFTPolicy",
        "oft_checkpoints",
        "write_tiny_oft_checkpoint",
        {"convert": True},
        cameras=2,
    ),
    "groot": Tiny(
        "groot",
        "vla_inference.models.groot.policy",
        "GrootPolicy",
        "groot_checkpoints",
        "write_tiny_groot_checkpoint",
    ),
    # self-contained: the tiny SmolVLM backbone and its tokenizer inside the checkpoint directory
    "smolvla": Tiny(
        "smolvla",
        "vla_inference.models.smolvla.policy",
        "SmolVLAPolicy",
        "smolvla_checkpoints",
        "write_tiny_smolvla",
    ),
}


def _tests_helper(module: str, function: str) -> Any:
    """A checkpoint writer from tests/helpers (importable when run from the repository root)."""
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return getattr(importlib.import_module(f"tests.helpers.{module}"), function)


def _importable(module: str, name: str) -> str:
    """'' when module:name imports, else the reason."""
    try:
        getattr(importlib.import_module(module), name)
    except Exception as exc:
        return f"{module}.{name} not importable: {type(exc).__name__}: {exc}"
    return ""


def default_targets(
    workdir: Path, families: Sequence[str] = ("pi0", "openvla", "openvla-oft", "groot", "smolvla")
) -> list[Target]:
    """The embedded default model, then tiny configurations of each other backend that has landed."""
    targets: list[Target] = []
    if "pi0" in families:
        why = _importable("vla_inference.models.pi0.policy", "Pi0Policy")
        targets.append(Target("pi0-metaworld (embedded default)", "pi0", skipped=why))
    for family, spec in TINY.items():
        if family not in families:
            continue
        name = f"{family}-tiny (random weights, test size)"
        why = _importable(spec.module, spec.cls)
        if why:
            targets.append(Target(name, spec.model_type, skipped=why))
            continue
        try:
            path = workdir / f"{family}-tiny"
            _tests_helper(spec.helper, spec.writer)(path, **spec.writer_args)
            note = f"tests/helpers/{spec.helper}.py"
            targets.append(Target(name, spec.model_type, str(path), note, cameras=spec.cameras))
        except Exception as exc:
            why = f"tiny checkpoint writer failed: {type(exc).__name__}: {exc}"
            targets.append(Target(name, spec.model_type, skipped=why))
    return targets


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vla-bench-"))


# --- observation --------------------------------------------------------------------------------
def scene_image(size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """A deterministic camera-like frame: smooth shading, a few objects, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.stack([120 + 60 * x, 110 + 50 * y, 90 + 40 * (1 - x) * y], axis=-1)
    for _ in range(5):
        cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.04, 0.12)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        image[mask] = rng.uniform(20, 235, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(size: int = IMAGE_SIZE, seed: int = 0) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(scene_image(size, seed), quality=JPEG_QUALITY, colorspace="RGB")


def make_request(info: Any, seed: int = 0, request_id: str = "", cameras: int = 1) -> Any:
    """A Predict request for a model described by a ModelInfo message (or ModelDescription): the
    main camera, and the next `cameras - 1` of the model's cameras (other frames)."""
    from vla_inference.client import make_observation

    state_dims = dict(info.state_dims)
    embodiment = info.default_embodiment
    joints = np.linspace(-0.5, 0.5, int(state_dims.get(embodiment, 7)), dtype=np.float32)
    further = list(info.camera_names)[1:cameras]
    return make_observation(
        jpeg_bytes(seed=seed),
        joints.tolist(),
        INSTRUCTION,
        cameras={name: jpeg_bytes(seed=seed + i) for i, name in enumerate(further, 1)},
        seed=seed,
        request_id=request_id,
    )


# --- statistics ---------------------------------------------------------------------------------
def summary_ms(samples_s: Sequence[float]) -> dict[str, Any]:
    """p50 / p99 / mean / min / max in milliseconds and the sample count."""
    if not samples_s:
        return {"n": 0}
    arr = np.asarray(samples_s, dtype=np.float64) * 1000.0
    return {
        "n": int(arr.size),
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "mean_ms": round(float(arr.mean()), 3),
        "min_ms": round(float(arr.min()), 3),
        "max_ms": round(float(arr.max()), 3),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# --- machine --------------------------------------------------------------------------------------
def machine_facts() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu or platform.processor(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        facts["loadavg_at_start"] = list(os.getloadavg())
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_threads"] = torch.get_num_threads()
        facts["cuda"] = torch.cuda.is_available()
    except Exception as exc:
        facts["torch"] = f"unavailable: {exc}"
    for package in ("grpcio", "ray", "nvidia-pytriton"):
        facts[package] = package_version(package)
    try:
        facts["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        facts["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""
