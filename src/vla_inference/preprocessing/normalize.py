"""One normaliser for every family: robot units <-> model units, dimension by dimension.

`Stats` holds one feature's statistics (float64 vectors, each optional) and `Normalizer` applies
one mode of them under one upstream's conventions. Every mode except sin/cos and binary is the
same affine map, so each family's numbers come from one formula:

    normalise    y = (x - offset) / scale_in * k + c        (then clipped, for the clipping modes)
    inverse      x = (y - c) / k * scale_out + offset       (never clipped)

    mode        offset  k  c    range
    mean_std    mean    1  0    std
    quantile    q01     2  -1   q99 - q01
    min_max     min     2  -1   max - min

What each upstream does with an epsilon, a zero range and clipping (the conventions):

    openpi    scale_in = scale_out = range + 1e-6                     (shared/normalize.py)
    lerobot   mean_std: scale_in = std + eps, scale_out = std;         (processor/normalize_processor.py,
              quantile / min_max: scale = range, eps where 0           eps from the processor, 1e-8)
    groot     scale = range; where the range is 0: min_max gives 0,   (GR00T StateActionTransform)
              quantile and mean_std pass x through; quantile clipped
    groot_n1.7  scale = range; quantile / min_max: 0 where np.isclose(   (GR00T N1.7 StateActionProcessor,
              high, low) (1e-8 absolute, 1e-5 relative), clipped       gr00t/data/utils.py)
              (clip_outliers), and the model side clipped to [-1, 1]
              before the inverse; mean_std: x passed through where
              std is 0 (both ways), clipped only when `clip` says so
    bounds    q01 / q99 with a mask: scale = range + eps (OpenVLA's      (OpenVLA / OpenVLA-OFT)
              un-normalisation: eps 0; OFT's: 1e-8); dims whose mask is False pass through, then
              the normalised side is clipped (OFT's proprio)

`clip` overrides the convention's clipping of the normalised side (None: the convention's).
Other modes: sin_cos (n values -> n sines then n cosines; one way only), binary (x > 0.5), identity.
Dimensions past the statistics (padding) pass through unchanged. Values are computed in float64,
except under LeRobot's convention: float32, as its torch normaliser (`dtype` overrides).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

MEAN_STD = "mean_std"
QUANTILE = "quantile"
MIN_MAX = "min_max"
SIN_COS = "sin_cos"
BINARY = "binary"
IDENTITY = "identity"
MODES = (MEAN_STD, QUANTILE, MIN_MAX, SIN_COS, BINARY, IDENTITY)

OPENPI = "openpi"
LEROBOT = "lerobot"
GROOT = "groot"
GROOT17 = "groot_n1.7"
BOUNDS = "bounds"
CONVENTIONS = (OPENPI, LEROBOT, GROOT, GROOT17, BOUNDS)

DEFAULT_EPS = {OPENPI: 1e-6, LEROBOT: 1e-8, GROOT: 0.0, GROOT17: 0.0, BOUNDS: 1e-8}
# The statistics each mode reads.
NEEDED: dict[str, tuple[str, ...]] = {
    MEAN_STD: ("mean", "std"),
    QUANTILE: ("q01", "q99"),
    MIN_MAX: ("min", "max"),
    SIN_COS: (),
    BINARY: (),
    IDENTITY: (),
}
_AFFINE = {
    MEAN_STD: ("mean", "std", 1.0, 0.0),
    QUANTILE: ("q01", "q99", 2.0, -1.0),
    MIN_MAX: ("min", "max", 2.0, -1.0),
}


class StatsError(ValueError):
    """Statistics that cannot serve a mode (missing, of different lengths, not finite)."""


@dataclass(frozen=True)
class Stats:
    """One feature's statistics: float64 vectors of one length, each optional. `mask` (bool):
    False = that dimension is not normalised (OpenVLA's gripper)."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    mask: np.ndarray | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any], where: str = "statistics") -> Stats:
        """From a mapping of names to lists / arrays (other keys are ignored); StatsError when a
        value is not a vector of finite numbers."""
        out: dict[str, np.ndarray] = {}
        for item in fields(cls):
            value = values.get(item.name)
            if value is None:
                continue
            try:
                dtype = bool if item.name == "mask" else np.float64
                array = np.asarray(value, dtype=dtype).reshape(-1)
            except (TypeError, ValueError):
                raise StatsError(f"{where}.{item.name}: not a list of numbers") from None
            if array.dtype != bool and not np.all(np.isfinite(array)):
                raise StatsError(f"{where}.{item.name}: contains NaN or inf")
            out[item.name] = array
        return cls(**out)

    @property
    def size(self) -> int:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None:
                return int(value.shape[-1])
        return 0

    def present(self) -> tuple[str, ...]:
        return tuple(item.name for item in fields(self) if getattr(self, item.name) is not None)


@dataclass(frozen=True)
class Normalizer:
    """`mode` of `stats` under one upstream's `convention` (module docstring). `eps` None = the
    convention's default; LeRobot checkpoints carry their own."""

    mode: str
    stats: Stats = Stats()
    convention: str = OPENPI
    eps: float | None = None
    # The arithmetic's precision: LeRobot normalises torch float32 tensors (a value on a pi0.5 / FAST
    # state bin's edge lands in its bin only in float32); the others compute in float64 (numpy).
    dtype: str = ""  # "" = the convention's: float32 for lerobot, float64 otherwise
    clip: bool | None = None  # clip the normalised side to [-1, 1]; None = the convention's rule

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise StatsError(f"unknown normalisation mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.convention not in CONVENTIONS:
            raise StatsError(f"unknown convention {self.convention!r}")
        check(self.stats, self.mode, "statistics")

    @property
    def size(self) -> int:
        """Dimensions the statistics cover (0: every value passes through)."""
        return self.stats.size

    @property
    def precision(self) -> type[np.floating]:
        name = self.dtype or ("float32" if self.convention == LEROBOT else "float64")
        return np.float32 if name == "float32" else np.float64

    @functools.cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
        """(offset, scale_in, scale_out, k, c) over the statistics' dimensions."""
        low_name, high_name, k, c = _AFFINE[self.mode]
        eps = self.precision(DEFAULT_EPS[self.convention] if self.eps is None else self.eps)
        offset = getattr(self.stats, low_name).astype(self.precision)
        width = getattr(self.stats, high_name).astype(self.precision)
        if self.mode != MEAN_STD:
            width = width - offset
        if self.convention == OPENPI:
            return offset, width + eps, width + eps, k, c
        if self.convention == LEROBOT:
            if self.mode == MEAN_STD:
                return offset, width + eps, width, k, c
            safe = np.where(width == 0, eps, width)
            return offset, safe, safe, k, c
        if self.convention in (GROOT, GROOT17):
            return offset, np.where(self._degenerate(width), self.precision(1.0), width), width, k, c
        return offset, width + eps, width + eps, k, c  # BOUNDS

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Robot units (..., >= size) -> model units, in the normaliser's precision."""
        x = np.asarray(x, dtype=self.precision)
        if self.mode == SIN_COS:
            return np.concatenate([np.sin(x), np.cos(x)], axis=-1)
        if self.mode == BINARY:
            return (x > 0.5).astype(self.precision)
        if self.mode == IDENTITY or self.size == 0:
            return x.copy()
        n = min(self.size, x.shape[-1])
        offset, scale_in, _, k, c = self._affine
        y = (x[..., :n] - offset[:n]) / scale_in[:n] * self.precision(k) + self.precision(c)
        if self.convention in (GROOT, GROOT17):  # a zero range: 0, or x passed (_passes_degenerate)
            y = np.where(self._zero_range[:n], x[..., :n] if self._passes_degenerate else 0.0, y)
        if self.stats.mask is not None:
            y = np.where(self.stats.mask[:n], y, x[..., :n])
        if self._clips:
            y = np.clip(y, -1.0, 1.0)
        return self._rest(x, y, n)

    def unnormalize(self, y: np.ndarray) -> np.ndarray:
        """Model units (..., >= size) -> robot units, in the normaliser's precision; never clipped."""
        y = np.asarray(y, dtype=self.precision)
        if self.mode == SIN_COS:
            raise StatsError("sin/cos encodes a state; it has no inverse for actions")
        if self.mode == BINARY:
            return (y > 0.5).astype(self.precision)
        if self.mode == IDENTITY or self.size == 0:
            return y.copy()
        n = min(self.size, y.shape[-1])
        offset, _, scale_out, k, c = self._affine
        part = y[..., :n]
        if self.convention == GROOT17 and self.mode != MEAN_STD:
            part = np.clip(part, -1.0, 1.0)  # upstream's unnormalize_values_minmax
        x = (part - self.precision(c)) / self.precision(k) * scale_out[:n] + offset[:n]
        if self.convention == GROOT17 and self.mode == MEAN_STD:  # std 0: upstream passes y back
            x = np.where(self._zero_range[:n], y[..., :n], x)
        if self.stats.mask is not None:
            x = np.where(self.stats.mask[:n], x, y[..., :n])
        return self._rest(y, x, n)

    @property
    def _clips(self) -> bool:
        if self.clip is not None:
            return self.clip
        if self.convention == GROOT17:
            return self.mode != MEAN_STD  # clip_outliers, upstream's default
        return self.convention == BOUNDS or (self.convention == GROOT and self.mode == QUANTILE)

    @property
    def _passes_degenerate(self) -> bool:
        """Whether a degenerate dimension passes x through (else it normalises to 0)."""
        if self.convention == GROOT17:
            return self.mode == MEAN_STD
        return self.mode != MIN_MAX

    def _degenerate(self, width: np.ndarray) -> np.ndarray:
        """Dimensions whose range cannot scale: 0, or for N1.7's min / max np.isclose(high, low)."""
        if self.convention == GROOT17 and self.mode != MEAN_STD:
            low_name, high_name, _, _ = _AFFINE[self.mode]
            return np.isclose(getattr(self.stats, high_name), getattr(self.stats, low_name))
        return np.asarray(width == 0)

    @functools.cached_property
    def _zero_range(self) -> np.ndarray:
        return self._degenerate(self._affine[2])

    def _rest(self, original: np.ndarray, part: np.ndarray, n: int) -> np.ndarray:
        """`part` over the first n dims, then the rest of `original` (the padding) as it is."""
        if n == original.shape[-1]:
            return part
        return np.concatenate([part, original[..., n:]], axis=-1)


def check(stats: Stats, mode: str, where: str) -> None:
    """StatsError unless `stats` has what `mode` reads, all of one length."""
    missing = [name for name in NEEDED.get(mode, ()) if getattr(stats, name) is None]
    if missing:
        raise StatsError(f"{where}: {mode} normalisation needs {', '.join(missing)}")
    sizes = {int(getattr(stats, name).size) for name in stats.present()}
    if len(sizes) > 1:
        raise StatsError(f"{where}: statistics of different lengths {sorted(sizes)}")
