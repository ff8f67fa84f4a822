"""The server under test, in its own process (so the load generator never shares its GIL).

    python -m bench.serve [--stub-forward] [--metrics]

Settings come from VLA_* variables as for `vla-inference serve`; the port is picked here on
127.0.0.1 and printed as `READY <port>` on stdout once health is SERVING (`READY <port>
<metrics port>` with --metrics, which serves Prometheus metrics on another free port). Closing
stdin (or SIGTERM) drains and stops it.

--stub-forward serves the real model's prepare() and finish() around a forward() that returns
a cached output: the whole server path (gRPC, decode, preprocessing, queue, batching,
postprocessing, encoding) with the network's compute taken out, to measure the server's own
overhead with many samples in a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import sys
from collections.abc import Sequence
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


async def _main(stub: bool, metrics: bool = False) -> None:
    from vla_inference.transport.server import VLAServer

    settings = Settings.from_env(
        host="127.0.0.1", grpc_port=0, metrics_enabled=metrics, metrics_host="127.0.0.1", metrics_port=0
    )
    model = create_model(settings)
    server = VLAServer(settings, StubForward(model) if stub else model)
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
    parser.add_argument("--metrics", action="store_true", help="serve metrics on a free port")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("VLA_LOG_LEVEL", "WARNING"),
        format="[server] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(_main(args.stub_forward, args.metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
