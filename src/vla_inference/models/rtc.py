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
             This is the authors' variant (v is differentiated). With `jacobian` off for a row
             (VLA_RTC_GUIDANCE_JACOBIAN=false) it is LeRobot's instead: v is held constant, so
             dA1/dx is the identity, g = err, and no backward pass runs.
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
from typing import NamedTuple

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
            # w (e^w - 1) / (e - 1) is 1 at w = 1 in exact arithmetic; numpy's SIMD expm1 can round
            # it to 1 + 2e-16 (AVX-512), so clip: a weight never exceeds 1.
            w = np.clip(w * np.expm1(w) / (math.e - 1), 0.0, 1.0)
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
    jacobian: bool = True  # guided: differentiate through the network (False: v held constant)


def build_prefix(
    previous: np.ndarray,
    executed: int,
    delay: int,
    horizon: int,
    method: str,
    max_guidance: float,
    schedule: str = "exp",
    jacobian: bool = True,
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
    beta = float(max_guidance) if method == GUIDED else 0.0
    return Prefix(method, aligned, weights, delay, overlap, beta, jacobian)


class Chunking(NamedTuple):
    """A batch's real-time chunking as tensors, one row per sample; rows without it are all zero
    (no hard rows, no guidance), so one compiled graph serves batches with and without it.

    The samplers take it as it is (models/common/flow.py `euler_step`): the eager path may pass
    None for a batch that asks for none; the static-shape path always passes one (`zeros`).
    The properties read the tensors on the host: call them outside compiled code."""

    actions: Tensor  # (B, H, A) Y, the previous chunk aligned to the new one
    hard_mask: Tensor  # (B, H) bool: rows overwritten at every step (hard rows, i < d)
    guide_weights: Tensor  # (B, H) W of guided rows, 0 elsewhere
    max_guidance: Tensor  # (B,) beta of guided rows, 0 elsewhere
    jacobian: Tensor  # (B,) bool: guided rows whose guidance differentiates through the network

    @property
    def guided(self) -> bool:
        return bool((self.max_guidance > 0).any() and (self.guide_weights > 0).any())

    @property
    def needs_backward(self) -> bool:
        """Some guided row takes the vector-Jacobian product (a backward pass per step): such a
        batch runs eagerly, with gradients allowed (models/policy.py `FlowPolicy` sees to it)."""
        return self.guided and bool((self.jacobian & (self.max_guidance > 0)).any())

    @property
    def hard(self) -> bool:
        return bool(self.hard_mask.any())

    @staticmethod
    def zeros(noise: Tensor) -> Chunking:
        """No row chunks: the inputs a static sampler runs a plain batch with."""
        B, H = noise.shape[:2]
        no_rows = torch.zeros(B, H, dtype=torch.bool, device=noise.device)
        return Chunking(
            torch.zeros_like(noise),
            no_rows,
            noise.new_zeros(B, H),
            noise.new_zeros(B),
            torch.zeros(B, dtype=torch.bool, device=noise.device),
        )

    def like(self, noise: Tensor) -> Chunking:
        """The float tensors in the noise's dtype (one dtype per compiled graph)."""
        dtype = noise.dtype
        return self._replace(
            actions=self.actions.to(dtype),
            guide_weights=self.guide_weights.to(dtype),
            max_guidance=self.max_guidance.to(dtype),
        )

    @staticmethod
    def for_static(chunking: Chunking | None, noise: Tensor) -> Chunking:
        """The chunking a static sampler runs: the batch's in the noise's dtype, or zeros. A row
        guided with the Jacobian is refused (ValueError): it needs the eager sampler."""
        if chunking is None:
            return Chunking.zeros(noise)
        if chunking.needs_backward:
            raise ValueError("guided real-time chunking with the Jacobian runs eagerly")
        return chunking.like(noise)

    @staticmethod
    def stack(
        prefixes: Sequence[Prefix | None], horizon: int, width: int, device: torch.device
    ) -> Chunking | None:
        """The rows' prefixes as one Chunking; None when no row asks for real-time chunking."""
        if all(p is None or p.method == NONE for p in prefixes):
            return None
        B = len(prefixes)
        actions = np.zeros((B, horizon, width), np.float32)
        guide = np.zeros((B, horizon), np.float32)
        beta = np.zeros(B, np.float32)
        hard = np.zeros((B, horizon), bool)
        jacobian = np.zeros(B, bool)
        for row, p in enumerate(prefixes):
            if p is None or p.method == NONE:
                continue
            actions[row, :, : p.actions.shape[1]] = p.actions[:horizon]
            if p.method == GUIDED:
                guide[row], beta[row], jacobian[row] = p.weights[:horizon], p.max_guidance, p.jacobian
            else:
                hard[row] = p.weights[:horizon] > 0
        return Chunking(
            torch.from_numpy(actions).to(device),
            torch.from_numpy(hard).to(device),
            torch.from_numpy(guide).to(device),
            torch.from_numpy(beta).to(device),
            torch.from_numpy(jacobian).to(device),
        )


def guide(
    x: Tensor,
    tau: Tensor,
    velocity: Callable[[Tensor], Tensor],
    chunking: Chunking,
    differentiate: bool = False,
) -> Tensor:
    """The guided velocity toward the data at x (B, H, A), time tau (B,): v + w g (module docstring).

    `differentiate` (a Python bool, fixed per call site): take the vector-Jacobian product through
    `velocity` for the rows that ask for it (chunking.jacobian); the other rows get g = err. Without
    it every row gets g = err (the velocity held constant): no backward pass and no host
    synchronisation, so the compiled steps run it. Rows with zero weights come back as plain v."""
    if not differentiate:
        v = velocity(x)
        return guide_constant(x, tau, v, chunking.actions, chunking.guide_weights, chunking.max_guidance)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x)
        estimate, err = _estimate_and_error(x, tau, v, chunking.actions, chunking.guide_weights)
        (g,) = torch.autograd.grad(estimate, x, grad_outputs=err.detach())
    g = torch.where(chunking.jacobian[:, None, None], g, err.detach())
    w = guidance_weight(tau, chunking.max_guidance).to(v.dtype)
    return (v + w[:, None, None] * g).detach()


def guide_constant(
    x: Tensor, tau: Tensor, v: Tensor, actions: Tensor, guide_weights: Tensor, max_guidance: Tensor
) -> Tensor:
    """Guidance with the velocity held constant: v + w (Y - A1) W. No backward pass and no host
    synchronisation (the static steps compile it); rows with beta = 0 or W = 0 come back as v."""
    _, err = _estimate_and_error(x, tau, v, actions, guide_weights)
    w = guidance_weight(tau, max_guidance).to(v.dtype)
    return v + w[:, None, None] * err


def _estimate_and_error(
    x: Tensor, tau: Tensor, v: Tensor, actions: Tensor, guide_weights: Tensor
) -> tuple[Tensor, Tensor]:
    """A1 = x + (1 - tau) v, the denoiser's estimate of the clean chunk, and err = (Y - A1) W."""
    estimate = x + (1.0 - tau)[:, None, None] * v
    return estimate, (actions.to(v.dtype) - estimate) * guide_weights[:, :, None].to(v.dtype)


def inpaint_hard(x: Tensor, tau: Tensor, noise: Tensor, actions: Tensor, hard_mask: Tensor) -> Tensor:
    """x with its hard-masked rows (hard_mask (B, H)) replaced by the previous chunk `actions`
    (B, H, A) noised to time tau (B,)."""
    target = (1.0 - tau)[:, None, None] * noise + tau[:, None, None] * actions.to(x.dtype)
    return torch.where(hard_mask[:, :, None], target.to(x.dtype), x)
