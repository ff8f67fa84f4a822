"""The server under test, in its own process (so the load generator never shares its GIL).

    python -m bench.serve [--stub-forward | --simulated-device [T1,K] | --gpu-family NAME] [--metrics]

Settings come from VLA_* variables as for `vla-inference serve`; the port is picked here on
127.0.0.1 and printed as `READY <port>` on stdout once health is SERVING (`READY <port>
<metrics port>` with --metrics, which serves Prometheus metrics on another free port). Closing
stdin (or SIGTERM) drains and stops it.

--stub-forward serves the real model's prepare() and finish() around a forward() that returns
a cached output: the whole server path (gRPC, decode, preprocessing, queue, batching,
postprocessing, encoding) with the network's compute taken out, to measure the server's own
overhead with many samples in a few seconds.

--simulated-device T1,K serves the same stubbed model on a simulated accelerator: a batch of b
samples "runs" for t(b) = T1 + K x (b - 1) milliseconds in a sleep (the model thread holds neither
a core nor the GIL, as while a CUDA kernel launch is synchronised), then the cached output is
returned. The defaults, T1 = 20 ms and K = 1.5 ms, stand for pi0 at its real size on one H100-class
GPU (docs/benchmarks.md, "Simulated device": where they come from). A bench-only option: the
product has no setting for it.

--gpu-family NAME serves one of bench/gpu.py's families (e.g. "pi0 (1 camera)") built at real
size with random weights on the GPU, through bench/gpu.py's adapter (`bench/gpu.sh --scheduling`
runs the scheduling phases against it); --tiny builds its tiny configuration (on the CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vla_inference.config import Settings
from vla_inference.models.base import (
    ActionPrediction,
    ModelDescription,
    Observation,
    PreparedSample,
    VLAModel,
)
from vla_inference.models.registry import create_model


class StubForward(VLAModel):
    """A real model with forward() replaced by a copy of one cached output."""

    model_type = "stub"

    def __init__(self, inner: VLAModel) -> None:
        super().__init__(inner.settings)
        self.inner = inner
        self._raw: Any = None

    def load(self, checkpoint_path: str | None, device: str) -> None:
        self.inner.load(checkpoint_path, device)
        sample = self.inner.prepare(self.inner.warmup_observation())
        self._raw = self.inner.forward([sample])[0]

    @property
    def model_info(self) -> ModelDescription:
        return self.inner.model_info

    def prepare(self, observation: Observation) -> PreparedSample:
        return self.inner.prepare(observation)

    def forward(self, samples: Sequence[PreparedSample]) -> list[Any]:
        return [copy.copy(self._raw) for _ in samples]

    def finish(self, raw: Any, sample: PreparedSample) -> ActionPrediction:
        return self.inner.finish(raw, sample)

    def warmup_observation(self) -> Observation:
        return self.inner.warmup_observation()


@dataclass(frozen=True)
class DeviceTime:
    """t(b) = T1 + K x (b - 1) milliseconds: a batch's time on the simulated device."""

    t1_ms: float = 20.0
    k_ms: float = 1.5

    @classmethod
    def parse(cls, text: str) -> DeviceTime:
        """'T1,K' in milliseconds, e.g. '20,1.5'."""
        try:
            t1, k = (float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"expected T1,K in milliseconds (e.g. 20,1.5), got {text!r}") from None
        if t1 <= 0 or k < 0:
            raise ValueError(f"T1 must be > 0 and K >= 0 (ms), got {text!r}")
        return cls(t1, k)

    def seconds(self, batch: int) -> float:
        return (self.t1_ms + self.k_ms * (batch - 1)) / 1000

    def capacity(self, batch: int) -> float:
        """Samples per second with full batches of `batch` back to back: b / t(b)."""
        return batch / self.seconds(batch)

    def __str__(self) -> str:
        return f"{self.t1_ms:g},{self.k_ms:g}"


class SimulatedDevice(StubForward):
    """StubForward whose forward() waits t(b) without holding a core or the GIL (a sleep)."""

    def __init__(self, inner: VLAModel, device_time: DeviceTime) -> None:
        super().__init__(inner)
        self.device_time = device_time

    def forward(self, samples: Sequence[PreparedSample]) -> list[Any]:
        time.sleep(self.device_time.seconds(len(samples)))
        return super().forward(samples)


def serving_model(model: VLAModel, stub: bool, device: DeviceTime | None) -> VLAModel:
    """The model the bench server serves: the real one, stubbed, or on the simulated device."""
    if device is not None:
        return SimulatedDevice(model, device)
    return StubForward(model) if stub else model


async def _main(
    stub: bool,
    metrics: bool = False,
    device: DeviceTime | None = None,
    gpu_family: str = "",
    tiny: bool = False,
) -> None:
    from vla_inference.transport.server import VLAServer

    settings = Settings.from_env(
        host="127.0.0.1", grpc_port=0, metrics_enabled=metrics, metrics_host="127.0.0.1", metrics_port=0
    )
    if gpu_family:
        from bench.gpu import serving_policy

        served = serving_policy(gpu_family, settings, tiny)
    else:
        served = serving_model(create_model(settings), stub, device)
    server = VLAServer(settings, served)
    await server.start()
    print(f"READY {server.port}" + (f" {server.metrics_port}" if metrics else ""), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.readline() else None)
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--stub-forward", action="store_true")
    parser.add_argument(
        "--simulated-device",
        nargs="?",
        const=str(DeviceTime()),
        default=None,
        metavar="T1,K",
        help="stubbed forward on a simulated device: a batch of b waits T1 + K x (b - 1) ms "
        f"(default {DeviceTime()})",
    )
    parser.add_argument("--gpu-family", default="", help="a bench/gpu.py family at real size on the GPU")
    parser.add_argument("--tiny", action="store_true", help="with --gpu-family: its tiny configuration")
    parser.add_argument("--metrics", action="store_true", help="serve metrics on a free port")
    args = parser.parse_args(argv)
    try:
        device = DeviceTime.parse(args.simulated_device) if args.simulated_device else None
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=os.environ.get("VLA_LOG_LEVEL", "WARNING"),
        format="[server] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(_main(args.stub_forward, args.metrics, device, args.gpu_family, args.tiny))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
