"""The model-agnostic contract between the engine and every model family.

A request travels through a model in three stages, each testable alone:

  prepare(observation)      -> PreparedSample   (CPU, worker pool, thread-safe: validate, resize,
                                                   normalise, tokenise)
  forward(samples)          -> list[RawOutput]  (the model worker: one batched pass on the device)
  finish(raw, sample)       -> ActionPrediction (CPU: un-normalise, slice to the robot)

`predict(observation)` chains the three for one sample. The engine calls them separately so
that preprocessing overlaps with the model and requests from many robots share one forward pass.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

# Camera names robots use for the server's cameras ("base", "left_wrist", "right_wrist"), one table.
CAMERA_ALIASES = {"wrist": "left_wrist", "main": "base", "left": "left_wrist", "right": "right_wrist"}


def canonical_camera(name: str) -> str:
    """A camera name as the models know it: trimmed, lower-case, aliases resolved."""
    name = name.strip().lower()
    return CAMERA_ALIASES.get(name, name)


class InvalidObservation(ValueError):
    """The observation cannot be served; `field` names the offending proto field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelLoadError(RuntimeError):
    """The checkpoint cannot be loaded; the message says what is missing and where to put it."""


class NoValidAction(RuntimeError):
    """The model answered one observation with no valid action (an autoregressive decode that wrote
    none: pi0-FAST). Raised by `finish` for that sample only: the engine fails that request alone
    (INTERNAL, this message) and answers the other samples of its batch without running it again."""


@dataclass(frozen=True)
class Observation:
    """A decoded, transport-independent observation."""

    images: Mapping[str, np.ndarray]  # camera name -> (H, W, 3) uint8 RGB
    joint_positions: np.ndarray  # (J,) float32
    instruction: str
    embodiment: str = ""  # "" = the model's default embodiment
    joint_velocities: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (J,) or (0,)
    seed: int | None = None  # None = a fresh random seed (sample_seed)
    # Earlier steps, for models that read a history (ModelDescription.image_history /
    # state_history): offset (< 0, control steps) -> camera -> (H, W, 3) uint8 RGB, and offset ->
    # (J,) joint positions.
    past_images: Mapping[int, Mapping[str, np.ndarray]] = field(default_factory=dict)
    past_joint_positions: Mapping[int, np.ndarray] = field(default_factory=dict)


def sample_seed(observation: Observation) -> int:
    """The seed of a sample's noise: the observation's, or a fresh random one when it has none."""
    return int(observation.seed) if observation.seed is not None else secrets.randbits(63)


@dataclass(frozen=True)
class ModelSettings:
    """The settings a model needs (a subset of config.Settings: no ports, TLS or limits)."""

    model_type: str = "pi0"
    model_path: str = ""
    embedded_model: str = "metaworld"
    dtype: str = "auto"
    chunk_size: int = 16
    action_dim: int = 7
    action_dim_set: bool = False  # VLA_ACTION_DIM was given (a checkpoint that says otherwise is refused)
    image_width: int = 224
    image_height: int = 224
    tokenizer_path: str = ""
    norm_stats_key: str = ""
    groot_data_config: str = ""
    num_denoise_steps: int = 0
    pi05_prompt_state: str = "unpadded"  # VLA_PI05_PROMPT_STATE: pi0.5 prompt state, padded or not
    openvla_variant: str = "auto"  # VLA_OPENVLA_VARIANT: auto | openvla | oft
    oft_chunk_size: int = 0  # VLA_OFT_CHUNK_SIZE / _NUM_IMAGES / _NORMALIZATION: 0 / auto = the checkpoint's
    oft_num_images: int = 0
    oft_normalization: str = "auto"
    fast_max_tokens: int = 0  # VLA_FAST_MAX_TOKENS: pi0-FAST's decode budget; 0 = the checkpoint's
    fast_temperature: float | None = None  # VLA_FAST_TEMPERATURE; None = the checkpoint's
    fast_tokenizer_path: str = ""  # VLA_FAST_TOKENIZER_PATH: the FAST tokenizer directory
    compile: bool = False  # VLA_COMPILE: the static-shape compiled path (models/common/static.py)
    batch_size: int = 1  # VLA_BATCH_SIZE: the compiled path warms the buckets up to it
    compile_backend: str = "inductor"  # VLA_COMPILE_BACKEND (models/common/static.py)

    @classmethod
    def of(cls, settings: Any) -> ModelSettings:
        """From config.Settings (or any object with those fields)."""
        if isinstance(settings, ModelSettings):
            return settings
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        values["action_dim_set"] = bool(settings.explicitly_set("action_dim"))
        return cls(**values)

    def model_id(self, model_type: str | None = None) -> str:
        """A short stable id for metrics labels, known before loading: family/checkpoint name."""
        name = Path(self.model_path).name if self.model_path else f"embedded-{self.embedded_model}"
        return f"{model_type or self.model_type}/{name}"


@dataclass(frozen=True)
class ActionPrediction:
    """A chunk of actions in the robot's units."""

    actions: np.ndarray  # (T, D) float32
    confidence: float  # in [0, 1]; meaning: ModelDescription.confidence_definition
    # The whole chunk at the model's horizon in its own normalised units (flow-matching families):
    # what a stream remembers for real-time chunking. None for models without chunks.
    model_actions: np.ndarray | None = None


@dataclass(frozen=True)
class ModelDescription:
    """What GetModelInfo reports and what the transport validates against."""

    name: str
    version: str
    family: str
    action_dim: int  # dimensions returned per action
    chunk_size: int  # actions returned per chunk = min(settings.chunk_size, horizon)
    horizon: int  # the model's own horizon
    embodiments: tuple[str, ...]
    default_embodiment: str
    state_dims: Mapping[str, int]  # embodiment -> expected len(joint_positions)
    camera_names: tuple[str, ...]
    image_size: tuple[int, int]  # (width, height)
    device: str
    dtype: str
    confidence_definition: str
    demo: bool = False  # the random-weight demo
    description: str = ""  # what the model is, trained on what, what it sees
    # embodiment -> names of the joint_positions / action values, in order (when the checkpoint says)
    state_layouts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    action_layouts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rtc_methods: tuple[str, ...] = ()  # real-time chunking methods supported (models/rtc.py)
    # (width, height) every camera frame is resized to first, when that is one size for all: a JPEG
    # at least twice as large may then be decoded at reduced scale (preprocessing/images.py).
    decode_size: tuple[int, int] | None = None
    # The model reads the instruction: an empty one is refused unless VLA_ALLOW_EMPTY_INSTRUCTION.
    takes_language: bool = True
    # embodiment -> the earlier steps (offsets < 0) whose frames / joint positions the model reads
    # besides the current ones (Observation.past_images / past_joint_positions); absent: none.
    image_history: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    state_history: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # embodiment -> {server camera name: the checkpoint's own name of that camera} in the model's
    # camera order (GR00T's video keys, e.g. {"base": "ego_view"}): what a transport speaking the
    # checkpoint's own format (transport/groot_zmq) calls each camera; absent: the server's names.
    camera_keys: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass
class PreparedSample:
    """One observation ready for the network. `inputs` is family-specific."""

    inputs: Any
    embodiment: str
    seed: int
    batch_key: Hashable = None  # samples share a batch only when their keys are equal
    rtc: Any = None  # models.rtc.Prefix when this sample continues a previous chunk


class VLAModel(abc.ABC):
    """Base class of every model family. Adding a model = one subclass + one registry line."""

    #: The VLA_MODEL_TYPE value this class serves.
    model_type: ClassVar[str]

    def __init__(self, settings: ModelSettings | Any) -> None:
        self.settings = ModelSettings.of(settings)

    @property
    def model_id(self) -> str:
        """Metrics label: a short id that does not change when the model loads."""
        return self.settings.model_id(self.model_type)

    @abc.abstractmethod
    def load(self, checkpoint_path: str | None, device: str) -> None:
        """Load weights from `checkpoint_path` (None/"" = the family's embedded default, if any)."""

    @property
    @abc.abstractmethod
    def model_info(self) -> ModelDescription:
        """Describe the loaded model."""

    @abc.abstractmethod
    def prepare(self, observation: Observation) -> PreparedSample:
        """Validate and preprocess one observation (thread-safe, no device work required).

        Raises InvalidObservation naming the field when the observation cannot be served.
        """

    @abc.abstractmethod
    def forward(self, samples: Sequence[PreparedSample]) -> list[Any]:
        """Run one batched pass over samples that share a batch_key; one raw output per sample.

        Each sample's sampling noise comes from its own seed, so a sample's output does not
        depend on the other samples in the batch.
        """

    @abc.abstractmethod
    def finish(self, raw: Any, sample: PreparedSample) -> ActionPrediction:
        """Turn one raw output into actions in the robot's units."""

    def warm_up(self, max_batch: int) -> None:  # noqa: B027 (an optional hook)
        """Prepare for batches of up to `max_batch` rows before the first request (VLA_COMPILE:
        compile and capture every batch bucket). The engine calls it once, on the model thread,
        after `load` and before health turns SERVING. Default: nothing to do."""

    def normalize_actions(self, actions: np.ndarray, embodiment: str) -> np.ndarray:
        """Actions in the robot's units (N, action_dim) -> the model's own units (N, model width).

        Families with real-time chunking implement it (Predict sends the previous chunk this way)."""
        raise InvalidObservation("rtc", f"{self.model_info.family} does not support real-time chunking")

    def predict_batch(self, samples: Sequence[PreparedSample]) -> list[ActionPrediction]:
        return [self.finish(raw, s) for raw, s in zip(self.forward(samples), samples, strict=True)]

    def predict(self, observation: Observation) -> ActionPrediction:
        """Convenience for scripts and tests: prepare -> forward -> finish for one observation."""
        return self.predict_batch([self.prepare(observation)])[0]

    def warmup_observation(self) -> Observation:
        """A valid dummy observation for warm-up batches."""
        info = self.model_info
        width, height = info.image_size
        images = {name: np.zeros((height, width, 3), np.uint8) for name in info.camera_names[:1]}
        joints = np.zeros(info.state_dims.get(info.default_embodiment, 0), np.float32)
        return Observation(images=images, joint_positions=joints, instruction="warm up", seed=0)

    def resolve_embodiment(self, tag: str) -> str:
        """Map an Observation.embodiment_tag to a known embodiment, or raise InvalidObservation."""
        info = self.model_info
        tag = tag.strip()
        if not tag:
            return info.default_embodiment
        if tag in info.embodiments:
            return tag
        raise InvalidObservation(
            "embodiment_tag",
            f"unknown embodiment {tag!r}; this model supports: {', '.join(info.embodiments)}",
        )

    def check_joints(self, observation: Observation, embodiment: str) -> None:
        """Shared joint checks: count for the embodiment, finite values, velocities shape."""
        expected = self.model_info.state_dims.get(embodiment)
        joints = observation.joint_positions
        if expected is not None and joints.shape != (expected,):
            raise InvalidObservation(
                "joint_positions",
                f"expected {expected} values for embodiment {embodiment!r}, got {joints.size}",
            )
        if not np.all(np.isfinite(joints)):
            raise InvalidObservation("joint_positions", "values must be finite (found NaN or inf)")
        velocities = observation.joint_velocities
        if velocities.size:
            if velocities.shape != joints.shape:
                raise InvalidObservation(
                    "joint_velocities",
                    f"expected 0 or {joints.size} values (one per joint position), got {velocities.size}",
                )
            if not np.all(np.isfinite(velocities)):
                raise InvalidObservation("joint_velocities", "values must be finite (found NaN or inf)")


def checkpoint_dir(checkpoint_path: str | None, family: str, contents: str) -> Path:
    """VLA_MODEL_PATH as a directory, or ModelLoadError saying what the family needs there."""
    if not checkpoint_path:
        raise ModelLoadError(
            f"{family} has no embedded model: set VLA_MODEL_PATH to a {family} checkpoint "
            f"directory ({contents})"
        )
    path = Path(checkpoint_path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"{family} checkpoint directory {path} does not exist ({contents} expected there)"
        )
    return path


def seeded_generator(seed: int) -> Any:
    """A CPU torch.Generator for one sample's noise, so batching never changes a sample's draw
    (and the draw is the same on every device: move the noise, not the generator)."""
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return generator
