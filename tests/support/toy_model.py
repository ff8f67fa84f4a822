"""A small deterministic model for server-layer tests. Never registered in the product.

Its actions depend on everything a real policy's would (image, joints, instruction, embodiment,
seed), so a test can tell whether an answer belongs to its request. Fault hooks: an instruction
of "fail" raises, "hang" blocks until released, "oom" raises a simulated out-of-memory error
whenever it is in a batch of more than one.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_inference.config import Settings
from vla_inference.models.base import (
    ActionPrediction,
    ModelDescription,
    Observation,
    PreparedSample,
    VLAModel,
)

HORIZON = 8
EMBODIMENTS = {"arm7": 7, "arm6": 6}


class SimulatedOutOfMemory(RuntimeError):
    def __init__(self) -> None:
        super().__init__("CUDA out of memory (simulated)")


class ToyPolicy(VLAModel):
    model_type = "toy"

    def __init__(
        self,
        settings: Settings,
        *,
        batch_cost_s: float = 0.0,
        sample_cost_s: float = 0.0,
        name: str = "toy-policy",
    ) -> None:
        super().__init__(settings)
        self.name = name
        self.batch_cost_s = batch_cost_s
        self.sample_cost_s = sample_cost_s
        self.batches: list[int] = []  # sizes of executed forward passes
        self.seen_instructions: list[str] = []
        self.release_hang = threading.Event()
        self._info: ModelDescription | None = None

    def load(self, checkpoint_path: str | None, device: str) -> None:
        self._info = ModelDescription(
            name=self.name,
            version="1",
            family="toy",
            action_dim=7,
            chunk_size=min(self.settings.chunk_size, HORIZON),
            horizon=HORIZON,
            embodiments=tuple(EMBODIMENTS),
            default_embodiment="arm7",
            state_dims=dict(EMBODIMENTS),
            camera_names=("base", "left_wrist"),
            image_size=(self.settings.image_width, self.settings.image_height),
            device=device,
            dtype="float32",
            confidence_definition="toy: always 0.5",
        )

    @property
    def model_info(self) -> ModelDescription:
        assert self._info is not None
        return self._info

    def prepare(self, observation: Observation) -> PreparedSample:
        embodiment = self.resolve_embodiment(observation.embodiment)
        self.check_joints(observation, embodiment)
        base = observation.images.get("base")
        image_mean = float(base.mean()) / 255.0 if base is not None else 0.0
        text = zlib.crc32(observation.instruction.encode()) / 2**32
        features = np.concatenate([[image_mean, text], observation.joint_positions]).astype(np.float64)
        return PreparedSample(
            inputs=(features, observation.instruction),
            embodiment=embodiment,
            seed=int(observation.seed or 0),
            batch_key=embodiment,
        )

    def forward(self, samples: Sequence[PreparedSample]) -> list[Any]:
        self.batches.append(len(samples))
        instructions = [s.inputs[1] for s in samples]
        self.seen_instructions.extend(instructions)
        if "fail" in instructions:
            raise ValueError("simulated model failure")
        if "oom" in instructions and len(samples) > 1:
            raise SimulatedOutOfMemory()
        if "hang" in instructions:
            self.release_hang.wait(timeout=30)
        time.sleep(self.batch_cost_s + self.sample_cost_s * len(samples))
        return [expected_actions(s) for s in samples]

    def finish(self, raw: Any, sample: PreparedSample) -> ActionPrediction:
        return ActionPrediction(actions=raw[: self.model_info.chunk_size].astype(np.float32), confidence=0.5)


def expected_actions(sample: PreparedSample) -> np.ndarray:
    """(HORIZON, 7): what the toy model answers for a prepared sample, independent of batching."""
    features, _ = sample.inputs
    noise = np.random.default_rng(sample.seed).standard_normal((HORIZON, 7))
    base = np.zeros(7)
    joints = features[2:]
    base[: joints.size] = joints
    return noise * 0.01 + base + features[0] + features[1]
