"""The policy skeleton every family subclasses, so that a family's policy file holds only its own.

    Policy       the VLAModel contract (models/base.py) done once: device and dtype, loading into
                 one typed `Loaded` state (one accessor, one "not loaded" error), the compiled
                 static runner (VLA_COMPILE) built after loading and compiled by the explicit
                 `warm_up` hook the engine calls, and `finish` (postprocess: un-normalise, slice).
    FlowPolicy   + `forward` for the flow-matching families (pi0 / pi0.5, GR00T, SmolVLA): each
                 sample's noise from its own seed, the real-time-chunking rows, the choice between
                 the static runner and the eager sampler, and the raw output.

A family provides:

    load_checkpoint(path) -> its Loaded      read the checkpoint, build the network (on `meta`,
                                             streamed weights), the pre/postprocessing steps and
                                             the ModelDescription
    prepare(observation) -> PreparedSample   compose the steps (preprocessing/steps.py)
    postprocess(actions, sample)             the inverse chain for one sample's chunk
    static_runner(loaded)                    VLA_COMPILE's runner, or None when it has none
    FlowPolicy: collate(samples) -> its batch (a NamedTuple of device tensors), noise_shape

Guided real-time chunking with the Jacobian differentiates through the network at every step:
such a batch runs eagerly under torch.no_grad (inference_mode tensors cannot be differentiated);
every other batch runs under torch.inference_mode. `grad_mode` is that rule, in one place.

Threads: the engine's model thread owns the network (engine/model_thread.py): `forward` and
`warm_up` are never called concurrently, so the families take no locks. `prepare` runs in the
preprocessing pool and must only read the loaded state.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from vla_inference.models import rtc
from vla_inference.models.base import (
    ActionPrediction,
    ModelDescription,
    PreparedSample,
    VLAModel,
    seeded_generator,
)
from vla_inference.models.common import flow, static
from vla_inference.models.common.weights import resolve_dtype

log = logging.getLogger(__name__)

N = TypeVar("N", bound=nn.Module)


@dataclass
class Loaded(Generic[N]):
    """What `load` produced: the network and the description; families add their own fields."""

    network: N
    description: ModelDescription


L = TypeVar("L", bound=Loaded[Any])
B = TypeVar("B", bound=tuple[Any, ...])
B_contra = TypeVar("B_contra", bound=tuple[Any, ...], contravariant=True)


@dataclass(frozen=True)
class Raw:
    """One sample's output of `forward`: the chunk in the model's own units and its confidence."""

    actions: np.ndarray  # (H, A) float32: normalised, padded to the model's width
    confidence: float  # in [0, 1]; ModelDescription.confidence_definition


class NotLoaded(RuntimeError):
    """A policy was used before `load`."""


class Policy(VLAModel, Generic[L]):
    """Loading, device, dtype, the static runner and `finish`, once for every family."""

    #: What the warm-up log calls the compiled path ("pi0 sampler", "OpenVLA decoder", ...).
    compiled_name: ClassVar[str] = "sampler"

    def __init__(self, settings: object) -> None:
        super().__init__(settings)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._loaded: L | None = None
        self.static: Any = None  # VLA_COMPILE: the family's static runner, built by `load`

    # ---- loading ----------------------------------------------------------------------------

    def load(self, checkpoint_path: str | None, device: str) -> None:
        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.settings.dtype, self.device)
        loaded = self.load_checkpoint(checkpoint_path or None)
        self._loaded = loaded
        self.static = self.static_runner(loaded) if self.settings.compile else None

    @abc.abstractmethod
    def load_checkpoint(self, path: str | None) -> L:
        """Read the checkpoint at `path` (None: the family's embedded model, if any) onto
        self.device in self.dtype; ModelLoadError naming what is missing and where it comes from."""

    def static_runner(self, loaded: L) -> Any:
        """VLA_COMPILE's static-shape runner over `loaded.network` (None: the family has none)."""
        return None

    @property
    def loaded(self) -> L:
        if self._loaded is None:
            raise NotLoaded(f"{type(self).__name__}.load() has not been called")
        return self._loaded

    @property
    def model_info(self) -> ModelDescription:
        return self.loaded.description

    # ---- the compile warm-up ----------------------------------------------------------------

    def warm_up(self, max_batch: int) -> None:
        """Compile and capture the static runner for every bucket up to `max_batch`, with copies
        of the warm-up observation, so that no request waits for a compile."""
        if self.static is None:
            return
        sample = self.prepare(self.warmup_observation())
        buckets = static.buckets_up_to(max_batch)
        static.warm_up(
            f"{self.model_info.family} {self.compiled_name}", buckets, lambda b: self.forward([sample] * b)
        )

    # ---- finish -------------------------------------------------------------------------------

    def finish(self, raw: Any, sample: PreparedSample) -> ActionPrediction:
        assert isinstance(raw, Raw)
        return ActionPrediction(
            self.postprocess(raw.actions, sample), raw.confidence, model_actions=raw.actions
        )

    @abc.abstractmethod
    def postprocess(self, actions: np.ndarray, sample: PreparedSample) -> np.ndarray:
        """One sample's chunk (H, A) in model units -> (chunk_size, action_dim) float32 robot units."""


class Sampler(Protocol[B_contra]):
    """A flow family's sampler: the eager network and its static runner both have it."""

    def sample(
        self, batch: B_contra, noise: Tensor, steps: int, chunking: rtc.Chunking | None = None
    ) -> tuple[Tensor, Tensor]:
        """Actions (B, H, A) in model units and the last Euler step's velocity (B, H, A)."""
        ...


@contextlib.contextmanager
def grad_mode(chunking: rtc.Chunking | None) -> Iterator[None]:
    """no_grad for a batch whose guidance takes the Jacobian (it differentiates through the
    network), inference_mode for every other batch: the one place this rule lives."""
    if chunking is not None and chunking.needs_backward:
        with torch.no_grad():
            yield
    else:
        with torch.inference_mode():
            yield


class FlowPolicy(Policy[L], Generic[L, B]):
    """`forward` of the flow-matching families."""

    @abc.abstractmethod
    def num_steps(self) -> int:
        """Euler steps: VLA_NUM_DENOISE_STEPS, else the checkpoint's, else the model's default."""

    @abc.abstractmethod
    def collate(self, samples: Sequence[PreparedSample]) -> B:
        """The samples' inputs as one batch (a NamedTuple of tensors on self.device)."""

    @abc.abstractmethod
    def noise_shape(self) -> tuple[int, int]:
        """(horizon, width) of one sample's noise: the model's chunk in its own units."""

    def action_width(self, sample: PreparedSample) -> int:
        """The robot's action dimensions of this sample (the confidence reads those)."""
        return self.model_info.action_dim

    def rtc_prefix(self, sample: PreparedSample) -> rtc.Prefix | None:
        """The sample's real-time chunking prefix in its own model units. A family whose units
        depend on the observation (GR00T N1.7's actions relative to the state) re-expresses it here."""
        prefix: rtc.Prefix | None = sample.rtc
        return prefix

    def eager_sampler(self) -> Sampler[B]:
        return self.loaded.network  # type: ignore[no-any-return]

    def fits_static(self, batch: B) -> bool:
        """Whether the static runner takes this batch (e.g. a prompt within its padded length)."""
        return True

    def noise(self, seed: int) -> Tensor:
        """One sample's noise, drawn on the CPU from its own seed: batching never changes it."""
        return torch.randn(self.noise_shape(), generator=seeded_generator(seed), dtype=torch.float32)

    def forward(self, samples: Sequence[PreparedSample]) -> list[Any]:
        if not samples:
            return []
        batch = self.collate(samples)
        noise = torch.stack([self.noise(s.seed) for s in samples]).to(self.device)
        horizon, width = self.noise_shape()
        chunking = rtc.Chunking.stack([self.rtc_prefix(s) for s in samples], horizon, width, self.device)
        steps = self.num_steps()
        eager = chunking is not None and chunking.needs_backward  # the Jacobian runs eagerly
        if self.static is not None and not eager and self.fits_static(batch):
            actions, velocity = self.static.sample(batch, noise, steps, chunking)
        else:
            with grad_mode(chunking):
                actions, velocity = self.eager_sampler().sample(batch, noise, steps, chunking)
        actions_np = actions.float().cpu().numpy()
        velocity_np = velocity.float().cpu().numpy()
        rows, dt = self.model_info.chunk_size, 1.0 / steps
        return [
            Raw(actions_np[i], flow.confidence(velocity_np[i], dt, rows, self.action_width(sample)))
            for i, sample in enumerate(samples)
        ]
