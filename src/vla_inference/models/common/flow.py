"""Flow-matching sampling shared by the flow families (pi0 / pi0.5, GR00T): the Euler integrator
with real-time chunking, and the confidence each chunk reports. `euler_step` is one step without a
host synchronisation: the static-shape paths (models/common/static.py) compile it.

Convention (models/rtc.py's): tau = 0 is noise, tau = 1 the action chunk, and the velocity points
toward the data. A family whose network runs the other way (openpi: t = 1 - tau, v_t = -v) wraps
its network call accordingly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from vla_inference.models import rtc

CONFIDENCE_DEFINITION = (
    "1 / (1 + r), r = RMS over the returned actions and the robot's action dimensions of the last "
    "Euler step's displacement dt * v (normalised action units, dt = 1 / steps). Near 1 when the "
    "flow has settled; a cheap convergence signal, not a calibrated probability."
)


def euler(
    velocity: Callable[[Tensor, int], Tensor],
    noise: Tensor,
    steps: int,
    prefix: rtc.BatchPrefix | None = None,
) -> tuple[Tensor, Tensor]:
    """Integrate x from noise (tau = 0) to actions (tau = 1) in `steps` steps of dt = 1 / steps.

    velocity(x, step) -> v toward the data at tau = step / steps; x, noise (B, H, A).
    `prefix` asks for real-time chunking on some rows (a guided batch needs gradients enabled).
    Returns the actions and the last step's velocity, both (B, H, A).
    """
    dt = 1.0 / steps
    hard = prefix is not None and prefix.hard  # one host sync each, not one per step
    guided = prefix is not None and prefix.guided
    hard_actions = prefix.actions if prefix is not None and hard else None
    hard_mask = prefix.hard_mask if prefix is not None and hard else None
    x, v = noise, torch.zeros_like(noise)
    for step in range(steps):
        tau = step_time(x, step, steps)

        def at_step(x_in: Tensor, step: int = step) -> Tensor:
            return velocity(x_in, step)

        step_velocity: Callable[[Tensor], Tensor] = at_step
        if guided and prefix is not None:
            step_velocity = functools.partial(rtc.guided_velocity, tau=tau, velocity=at_step, prefix=prefix)
        x, v = euler_step(step_velocity, x, tau, dt, noise, hard_actions, hard_mask)
    return finish(x, hard_actions, hard_mask), v


def step_time(x: Tensor, step: int, steps: int) -> Tensor:
    """tau (B,) = step / steps in x's dtype: the fraction of data at the start of `step`."""
    return torch.full((x.shape[0],), step / steps, dtype=x.dtype, device=x.device)


def euler_step(
    velocity: Callable[[Tensor], Tensor],
    x: Tensor,
    tau: Tensor,
    dt: float,
    noise: Tensor,
    hard_actions: Tensor | None = None,
    hard_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of `euler`: hard real-time chunking (rows of hard_mask (B, H) set to the previous
    chunk hard_actions (B, H, A) noised to tau), then x + dt v. No host synchronisation, so
    torch.compile(fullgraph=True) captures it. Returns (x after the step, v)."""
    if hard_actions is not None and hard_mask is not None:
        x = rtc.inpaint_hard(x, tau, noise, hard_actions, hard_mask)
    v = velocity(x)
    return x + dt * v, v


def static_step(
    velocity: Callable[[Tensor], Tensor],
    x: Tensor,
    tau: Tensor,
    dt: float,
    noise: Tensor,
    prefix: rtc.StaticPrefix,
) -> tuple[Tensor, Tensor]:
    """`euler_step` for the compiled samplers: every row through hard inpainting and guidance with
    the velocity held constant, whose all-False mask and zero weights leave rows without real-time
    chunking unchanged, so one graph serves every batch."""

    def guided(x_in: Tensor) -> Tensor:
        v = velocity(x_in)
        return rtc.guide_constant(x_in, tau, v, prefix.actions, prefix.guide_weights, prefix.max_guidance)

    return euler_step(guided, x, tau, dt, noise, prefix.actions, prefix.hard_mask)


def finish(x: Tensor, hard_actions: Tensor | None, hard_mask: Tensor | None) -> Tensor:
    """The final chunk: hard-masked rows are the previous chunk exactly."""
    if hard_actions is None or hard_mask is None:
        return x
    return torch.where(hard_mask[:, :, None], hard_actions.to(x.dtype), x)


def confidence(last_velocity: np.ndarray, dt: float, rows: int, dims: int) -> float:
    """CONFIDENCE_DEFINITION for one sample: last_velocity (H, A) of the final Euler step."""
    step = last_velocity[:rows, :dims].astype(np.float64) * dt
    rms = float(np.sqrt(np.mean(step**2))) if step.size else 0.0
    return float(min(1.0, max(0.0, 1.0 / (1.0 + rms)))) if np.isfinite(rms) else 0.0
