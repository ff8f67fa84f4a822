"""Flow-matching sampling shared by the flow families (pi0 / pi0.5, GR00T): one Euler step with real-
time chunking, the loop over the steps, and the confidence each chunk reports.

A family writes one step function on top of `euler_step` (its network's velocity at one time) and
runs it two ways with the same `integrate` loop: eagerly (dynamic shapes; `integrate_network`)
and, with VLA_COMPILE, compiled once per batch bucket (models/common/static.py). `euler_step` never
synchronises with the host, so torch.compile(fullgraph=True) captures it.

Convention (models/rtc.py's): tau = 0 is noise, tau = 1 the action chunk, and the velocity points
toward the data. A family whose network runs the other way (openpi: t = 1 - tau, v_t = -v) says so
in its StepTime's `t` and wraps its network call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from vla_inference.models import rtc

CONFIDENCE_DEFINITION = (
    "1 / (1 + r), r = RMS over the returned actions and the robot's action dimensions of the last "
    "Euler step's displacement dt * v (normalised action units, dt = 1 / steps). Near 1 when the "
    "flow has settled; a cheap convergence signal, not a calibrated probability."
)


class StepTime(NamedTuple):
    """One Euler step's time, both as tensors so a compiled step replays for every step."""

    tau: Tensor  # (B,) the fraction of data at the start of the step: step / steps
    t: Tensor  # (B,) the same time as the family's network reads it (openpi: 1 - tau; GR00T: a bucket)


def euler_step(
    velocity: Callable[[Tensor], Tensor],
    x: Tensor,
    tau: Tensor,
    dt: float,
    noise: Tensor,
    chunking: rtc.Chunking | None = None,
    differentiate: bool = False,
) -> tuple[Tensor, Tensor]:
    """One Euler step x (B, H, A) at time tau (B,) -> (x + dt v, v), v = velocity(x) toward the data.

    With `chunking`: hard real-time chunking first (hard rows of x set to the previous chunk
    noised to tau), then guidance (models/rtc.py `guide`; `differentiate` takes the Jacobian for
    the rows that ask for it: eager only). Rows without real-time chunking come out as without it.
    """
    if chunking is None:
        v = velocity(x)
    else:
        x = rtc.inpaint_hard(x, tau, noise, chunking.actions, chunking.hard_mask)
        v = rtc.guide(x, tau, velocity, chunking, differentiate)
    return x + dt * v, v


def integrate(
    step: Callable[[Tensor, StepTime], tuple[Tensor, Tensor]],
    times: Sequence[StepTime],
    noise: Tensor,
    chunking: rtc.Chunking | None = None,
) -> tuple[Tensor, Tensor]:
    """The Euler loop: x, v = step(x, time) from the noise for each time; returns (the final chunk
    with hard-masked rows exactly the previous chunk, the last step's velocity)."""
    x, v = noise.clone(), torch.zeros_like(noise)  # x aliasing noise would be a second CUDA graph
    for time in times:
        x, v = step(x, time)
    return finish(x, chunking), v


def integrate_network(
    network: Any,
    cache: Any,
    context: Any,
    batch: Any,
    noise: Tensor,
    steps: int,
    chunking: rtc.Chunking | None = None,
) -> tuple[Tensor, Tensor]:
    """A flow network's eager loop after its prefix: `integrate` over its own `times` and
    `euler_step(cache, context, batch, x, time, noise, chunking, dt, differentiate)` from `noise`
    (the network's initial noise), differentiating for rows guided with the Jacobian."""
    differentiate = chunking is not None and chunking.needs_backward

    def step(x: Tensor, time: StepTime) -> tuple[Tensor, Tensor]:
        return network.euler_step(  # type: ignore[no-any-return]
            cache, context, batch, x, time, noise, chunking, 1.0 / steps, differentiate
        )

    return integrate(step, network.times(noise.shape[0], steps, noise.dtype, noise.device), noise, chunking)


def finish(x: Tensor, chunking: rtc.Chunking | None) -> Tensor:
    """The final chunk: hard-masked rows are the previous chunk exactly."""
    if chunking is None:
        return x
    return torch.where(chunking.hard_mask[:, :, None], chunking.actions.to(x.dtype), x)


def confidence(last_velocity: np.ndarray, dt: float, rows: int, dims: int) -> float:
    """CONFIDENCE_DEFINITION for one sample: last_velocity (H, A) of the final Euler step."""
    step = last_velocity[:rows, :dims].astype(np.float64) * dt
    rms = float(np.sqrt(np.mean(step**2))) if step.size else 0.0
    return float(min(1.0, max(0.0, 1.0 / (1.0 + rms)))) if np.isfinite(rms) else 0.0
