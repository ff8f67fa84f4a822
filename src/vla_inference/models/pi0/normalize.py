"""pi0 / pi0.5 state and action normalisation, as openpi and LeRobot define it.

openpi (shared/normalize.py): z-score for pi0, quantiles for pi0.5, statistics in
assets/<asset id>/norm_stats.json; LeRobot (processor/normalize_processor.py): MEAN_STD,
QUANTILES or MIN_MAX with its own epsilon, statistics in normalizer safetensors. Dimensions past
the statistics (padding) pass through.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common.weights import read_json

OPENPI = "openpi"
LEROBOT = "lerobot"


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """One feature's statistics (float64 vectors)."""

    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None
    min: np.ndarray | None = None
    max: np.ndarray | None = None

    @property
    def size(self) -> int:
        for value in (self.mean, self.q01, self.std, self.q99, self.min, self.max):
            if value is not None:
                return int(value.shape[-1])
        return 0


@dataclass(frozen=True)
class Normalizer:
    """Normalise / un-normalise the first `stats.size` dimensions; the rest pass through.

    openpi (shared/normalize.py, transforms.py):
        zscore   (x - mean) / (std + 1e-6)              inverse x * (std + 1e-6) + mean
        quantile (x - q01) / (q99 - q01 + 1e-6) * 2 - 1  inverse (x + 1) / 2 * (q99 - q01 + 1e-6) + q01
    LeRobot (processor/normalize_processor.py, eps 1e-8):
        MEAN_STD (x - mean) / (std + eps)               inverse x * std + mean
        QUANTILES 2 (x - q01) / d - 1, d = q99 - q01 (eps where 0)   inverse (x + 1) d / 2 + q01
        MIN_MAX  same with min / max
    """

    mode: str  # "zscore" | "quantile" | "minmax" | "identity"
    stats: Stats = field(default_factory=Stats)
    flavour: str = OPENPI
    eps: float = 1e-6

    @functools.cached_property
    def _size(self) -> int:
        return self.stats.size

    def _parts(self) -> tuple[np.ndarray, np.ndarray]:
        return self._offset_scale

    @functools.cached_property
    def _offset_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """(offset, scale) so that normalised = (x - offset) / scale * k + c for each mode."""
        s = self.stats
        if self.mode == "zscore":
            assert s.mean is not None and s.std is not None
            return s.mean, s.std + self.eps
        lo, hi = (s.q01, s.q99) if self.mode == "quantile" else (s.min, s.max)
        assert lo is not None and hi is not None
        if self.flavour == OPENPI:
            return lo, hi - lo + self.eps
        d = hi - lo
        return lo, np.where(d == 0, self.eps, d)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "identity" or self._size == 0:
            return x.astype(np.float32)
        n = min(self._size, x.shape[-1])
        out = x.astype(np.float64).copy()
        offset, scale = self._parts()
        y = (out[..., :n] - offset[:n]) / scale[:n]
        out[..., :n] = y if self.mode == "zscore" else 2.0 * y - 1.0
        return out.astype(np.float32)

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "identity" or self._size == 0:
            return x.astype(np.float32)
        n = min(self._size, x.shape[-1])
        out = x.astype(np.float64).copy()
        offset, scale = self._parts()
        s = self.stats
        if self.mode == "zscore":
            assert s.std is not None
            std = scale[:n] if self.flavour == OPENPI else s.std[:n]
            out[..., :n] = out[..., :n] * std + offset[:n]
        else:
            out[..., :n] = (out[..., :n] + 1.0) / 2.0 * scale[:n] + offset[:n]
        return out.astype(np.float32)


@dataclass(frozen=True)
class EmbodimentNorm:
    state: Normalizer
    actions: Normalizer


def _vector(value: Any, where: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{where}: not a list of numbers") from None
    if not np.all(np.isfinite(arr)):
        raise ModelLoadError(f"{where}: contains NaN or inf")
    return arr


def _stats_from_json(obj: Any, where: str) -> Stats:
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{where}: expected an object with mean/std/q01/q99")
    return Stats(**{k: _vector(obj.get(k), f"{where}.{k}") for k in ("mean", "std", "q01", "q99")})


def read_openpi_norm_stats(path: Path) -> dict[str, Stats]:
    data = read_json(path)
    stats = data.get("norm_stats", data)
    if not isinstance(stats, dict):
        raise ModelLoadError(f"{path}: missing 'norm_stats'")
    return {
        key: _stats_from_json(stats[key], f"{path}:{key}") for key in ("state", "actions") if key in stats
    }


def check_stats(stats: Stats, mode: str, where: str) -> None:
    needed = {"zscore": ("mean", "std"), "quantile": ("q01", "q99"), "minmax": ("min", "max")}.get(mode, ())
    missing = [name for name in needed if getattr(stats, name) is None]
    if missing:
        raise ModelLoadError(f"{where}: {mode} normalisation needs {', '.join(missing)}")
    sizes = {getattr(stats, name).size for name in needed}
    if len(sizes) > 1:
        raise ModelLoadError(f"{where}: statistics of different lengths {sorted(sizes)}")
