"""Flow-matching sampling shared by the flow families (pi0 / pi0.5, GR00T): the Euler integrator
with real-time chunking, and the confidence each chunk reports.

Convention (models/rtc.py's): tau = 0 is noise, tau = 1 the action chunk, and the velocity points
toward the data. A family whose network runs the other way (openpi: t = 1 - tau, v_t = -v) wraps
its network call accordingly.
"""

from __future__ import annotations

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
    x, v = noise, torch.zeros_like(noise)
    for step in range(steps):
        tau = torch.full((x.shape[0],), step / steps, dtype=x.dtype, device=x.device)
        if prefix is not None and prefix.hard:
            x = rtc.inpaint_hard(x, tau, noise, prefix)
        if prefix is not None and prefix.guided:

            def at_step(x_in: Tensor, step: int = step) -> Tensor:
                return velocity(x_in, step)

            v = rtc.guided_velocity(x, tau, at_step, prefix)
        else:
            v = velocity(x, step)
        x = x + dt * v
    if prefix is not None and prefix.hard:
        x = torch.where(prefix.hard_mask[:, :, None], prefix.actions.to(x.dtype), x)
    return x, v


def confidence(last_velocity: np.ndarray, dt: float, rows: int, dims: int) -> float:
    """CONFIDENCE_DEFINITION for one sample: last_velocity (H, A) of the final Euler step."""
    step = last_velocity[:rows, :dims].astype(np.float64) * dt
    rms = float(np.sqrt(np.mean(step**2))) if step.size else 0.0
    return float(min(1.0, max(0.0, 1.0 / (1.0 + rms)))) if np.isfinite(rms) else 0.0
