"""GPU readings through NVML (nvidia-ml-py). On a machine without a GPU every reading is None."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int


class GpuMonitor:
    """Reads the GPU that `device` ("cuda", "cuda:N") names; inert for "cpu" or without NVML."""

    def __init__(self, device: str) -> None:
        self._handle = None
        if not device.startswith("cuda"):
            return
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # NVML missing or no driver: the server runs without GPU figures
            log.warning("GPU metrics unavailable: %s", exc)

    @property
    def available(self) -> bool:
        return self._handle is not None

    def read(self) -> GpuReading | None:
        if self._handle is None:
            return None
        try:
            import pynvml

            util = pynvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
            return GpuReading(float(util.gpu), int(mem.used), int(mem.total))
        except Exception as exc:
            log.debug("NVML read failed: %s", exc)
            return None
