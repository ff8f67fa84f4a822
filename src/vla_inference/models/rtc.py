"""Real-time chunking (Black, Galliker, Levine 2025) for any flow-matching policy, at inference.

While a robot executes chunk A_prev, the server samples the next chunk; by the time it arrives the
robot has executed `d` more actions (the inference delay). The new chunk is made to continue the
committed actions by inpainting toward the still-to-be-executed part of A_prev:

    Y     the previous chunk shifted so that Y[i] is the action planned for the same instant as the
          new chunk's i-th action (Y[i] = A_prev[executed + i]), zero past its end; model units
          (normalised, padded), as the authors' code requires.
    W     soft mask over the new chunk's rows (prefix_weights): 1 for i < d (will be executed from
          A_prev anyway), exponentially decaying for d <= i < end, 0 from end on, where
          end = len(A_prev) - executed is the overlap (the authors' H - s).

Methods, per batch row:
    none     the chunk is sampled as without real-time chunking.
    guided   the paper: at every Euler step, with tau the fraction of data (0 = noise, 1 = data),
             A1 = x + (1 - tau) v (the denoiser's estimate of the clean chunk), err = (Y - A1) W,
             g = err^T dA1/dx, a true vector-Jacobian product through the network (the prefix /
             VLM context is a constant), and v <- v + min(beta, c / r^2) g with c = (1 - tau) / tau,
             1/r^2 = (tau^2 + (1 - tau)^2) / (1 - tau)^2 (c = inf at tau = 0, so the weight is beta).
             This is the authors' variant (v is differentiated), not LeRobot's (v held constant).
    hard     no guidance: at every step the first d rows of x are overwritten with the previous
             chunk noised to the current time, x[:d] = (1 - tau) noise[:d] + tau Y[:d], and the
             final chunk's first d rows are Y[:d] exactly. No backward pass; weaker continuity past d.

Velocities here point toward the data (the authors' convention). A family whose sampler runs the
other way (openpi: t = 1 noise -> 0 data, v_t = noise - data) passes tau = 1 - t and -v_t.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

NONE = "none"
GUIDED = "guided"
HARD = "hard"
METHODS = (NONE, GUIDED, HARD)
FLOW_METHODS = METHODS  # what flow-matching families support


def prefix_weights(start: int, end: int, total: int, schedule: str = "exp") -> np.ndarray:
    """The authors' get_prefix_weights: (total,) float64 soft mask.

    start = d (rows < start weigh 1), end = the overlap (rows >= end weigh 0). Schedules: "exp"
    (default), "linear", "ones" (1 up to end), "zeros" (hard mask: 1 for rows < start only).
    """
    start = min(start, end)
    i = np.arange(total, dtype=np.float64)
    if schedule == "ones":
        w = np.ones(total)
    elif schedule == "zeros":
        w = (i < start).astype(np.float64)
    elif schedule in ("linear", "exp"):
        w = np.clip((start - 1 - i) / (end - start + 1) + 1, 0.0, 1.0)
        if schedule == "exp":
            w = w * np.expm1(w) / (math.e - 1)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return np.where(i >= end, 0.0, w)


def guidance_weight(tau: Tensor, beta: Tensor) -> Tensor:
    """min(beta, c / r^2) per row; tau (B,) fraction of data in [0, 1), beta (B,) the cap."""
    tau = tau.double()
    inv_r2 = (tau**2 + (1 - tau) ** 2) / (1 - tau) ** 2
    c = torch.where(tau > 0, (1 - tau) / tau.clamp_min(1e-12), torch.full_like(tau, math.inf))
    return torch.minimum(c * inv_r2, beta.double()).to(beta.dtype)


@dataclass(frozen=True)
class Prefix:
    """One row's real-time chunking inputs, in model units (built by build_prefix)."""

    method: str
    actions: np.ndarray  # (H, A) Y: the previous chunk aligned to the new one, zero past the overlap
    weights: np.ndarray  # (H,) W (guided) or the hard mask (hard)
    delay: int  # d, after clamping to the overlap
    overlap: int  # rows of the new chunk the previous one covers
    max_guidance: float  # beta


def build_prefix(
    previous: np.ndarray,
    executed: int,
    delay: int,
    horizon: int,
    method: str,
    max_guidance: float,
    schedule: str = "exp",
) -> Prefix:
    """previous (Hp, A) in model units -> the prefix a new chunk of `horizon` rows is inpainted toward."""
    if method not in METHODS:
        raise ValueError(f"unknown real-time chunking method {method!r}; known: {', '.join(METHODS)}")
    width = previous.shape[-1]
    overlap = max(0, min(horizon, previous.shape[0] - executed))
    delay = max(0, min(delay, overlap))
    aligned = np.zeros((horizon, width), np.float32)
    aligned[:overlap] = previous[executed : executed + overlap]
    if method == HARD:
        weights = (np.arange(horizon) < delay).astype(np.float32)
    elif method == GUIDED:
        weights = prefix_weights(delay, overlap, horizon, schedule).astype(np.float32)
    else:
        weights = np.zeros(horizon, np.float32)
    return Prefix(method, aligned, weights, delay, overlap, float(max_guidance) if method == GUIDED else 0.0)


@dataclass
class BatchPrefix:
    """The prefixes of a batch as tensors; rows without real-time chunking are all zero."""

    actions: Tensor  # (B, H, A) Y
    guide_weights: Tensor  # (B, H) W for guided rows, 0 elsewhere
    max_guidance: Tensor  # (B,) beta for guided rows, 0 elsewhere
    hard_mask: Tensor  # (B, H) bool: rows overwritten at every step (hard rows, i < d)

    @property
    def guided(self) -> bool:
        return bool((self.max_guidance > 0).any() and (self.guide_weights > 0).any())

    @property
    def hard(self) -> bool:
        return bool(self.hard_mask.any())

    @staticmethod
    def hard_inputs(prefix: BatchPrefix | None, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(actions (B, H, A), mask (B, H)) for a static sampler's hard inpainting, in the noise's
        dtype: the prefix's, or zeros and an all-False mask without one (one dtype and shape either
        way, so a compiled graph serves both)."""
        if prefix is not None:
            return prefix.actions.to(noise.dtype), prefix.hard_mask
        B, H = noise.shape[:2]
        return torch.zeros_like(noise), torch.zeros(B, H, dtype=torch.bool, device=noise.device)

    @staticmethod
    def stack(
        prefixes: Sequence[Prefix | None], horizon: int, width: int, device: torch.device
    ) -> BatchPrefix | None:
        """None when no row asks for real-time chunking (the plain sampler runs)."""
        if all(p is None or p.method == NONE for p in prefixes):
            return None
        B = len(prefixes)
        actions = np.zeros((B, horizon, width), np.float32)
        guide = np.zeros((B, horizon), np.float32)
        beta = np.zeros(B, np.float32)
        hard = np.zeros((B, horizon), bool)
        for row, p in enumerate(prefixes):
            if p is None or p.method == NONE:
                continue
            actions[row, :, : p.actions.shape[1]] = p.actions[:horizon]
            if p.method == GUIDED:
                guide[row], beta[row] = p.weights[:horizon], p.max_guidance
            else:
                hard[row] = p.weights[:horizon] > 0
        return BatchPrefix(
            torch.from_numpy(actions).to(device),
            torch.from_numpy(guide).to(device),
            torch.from_numpy(beta).to(device),
            torch.from_numpy(hard).to(device),
        )


def guided_velocity(
    x: Tensor, tau: Tensor, velocity: Callable[[Tensor], Tensor], prefix: BatchPrefix
) -> Tensor:
    """The guided velocity toward the data at x (B, H, A), time tau (B,): v + w g (module docstring).

    `velocity(x)` must be differentiable in x; rows with zero weights come back as plain v.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x)
        estimate = x + (1.0 - tau)[:, None, None] * v  # A1
        err = (prefix.actions.to(v.dtype) - estimate) * prefix.guide_weights[:, :, None].to(v.dtype)
        (g,) = torch.autograd.grad(estimate, x, grad_outputs=err.detach())
    w = guidance_weight(tau, prefix.max_guidance).to(v.dtype)
    return (v + w[:, None, None] * g).detach()


def inpaint_hard(x: Tensor, tau: Tensor, noise: Tensor, actions: Tensor, hard_mask: Tensor) -> Tensor:
    """x with its hard-masked rows (hard_mask (B, H)) replaced by the previous chunk `actions`
    (B, H, A) noised to time tau (B,)."""
    target = (1.0 - tau)[:, None, None] * noise + tau[:, None, None] * actions.to(x.dtype)
    return torch.where(hard_mask[:, :, None], target.to(x.dtype), x)
