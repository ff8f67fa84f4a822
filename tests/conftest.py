"""Shared fixtures: a real server on an ephemeral port, in a background thread with its own loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from vla_inference.client import VLAClient
from vla_inference.config import Settings
from vla_inference.models.base import VLAModel
from vla_inference.transport.server import VLAServer


@dataclass
class RunningServer:
    server: VLAServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, **kw: Any) -> VLAClient:
        return VLAClient(self.target, **kw)

    def stop(self, grace_s: float = 5.0) -> None:
        if self.thread.is_alive():
            self.call(self.server.stop(grace_s), timeout=grace_s + 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)


def start_server(settings: Settings, model: VLAModel | None = None, wait: bool = True) -> RunningServer:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="test-server")
    thread.start()
    server = asyncio.run_coroutine_threadsafe(_make(settings, model), loop).result(30)
    running = RunningServer(server, loop, thread)
    future = asyncio.run_coroutine_threadsafe(server.start(), loop)
    if wait:
        future.result(120)
    return running


async def _make(settings: Settings, model: VLAModel | None) -> VLAServer:
    return VLAServer(settings, model)


def make_settings(**overrides: Any) -> Settings:
    # One torch thread: tests check behaviour, not speed, and stay steady on a loaded 2-core machine.
    # The random-weight demo (7 joints, 7 action dims) unless a test asks for another model; the
    # trained default is tested in test_sim.py (test_the_shipped_default_policy and the closed loop).
    base: dict[str, Any] = {
        "embedded_model": "random",
        "grpc_port": 0,
        "metrics_port": 0,
        "warmup_batches": 1,
        "shutdown_grace_s": 5.0,
        "torch_threads": 1,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and shared CI cores make two threads spin; restored after.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., RunningServer]]:
    """Start servers with given settings/model; all are stopped at the end of the test."""
    started: list[RunningServer] = []

    def factory(
        model_factory: Callable[[Settings], VLAModel] | None = None, wait: bool = True, **overrides: Any
    ) -> RunningServer:
        settings = make_settings(**overrides)
        running = start_server(settings, model_factory(settings) if model_factory else None, wait=wait)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop(grace_s=1.0)
