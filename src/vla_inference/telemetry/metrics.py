"""Prometheus metrics: names, types and labels in one place, and the HTTP endpoint.

Each server owns its own CollectorRegistry, so several servers (tests) can live in one process.
Gauges that describe the present (queue depth, uptime, GPU) are read at scrape time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from vla_inference.telemetry.gpu import GpuMonitor

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class Metrics:
    """Every metric the server exports."""

    def __init__(self, model_id: str, gpu: GpuMonitor | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # The `model` label: a short id known before the model loads (family/checkpoint name), the
        # same for the whole life of the server; vla_model_info carries the display name.
        self.model_id = model_id
        self._start = time.monotonic()
        self._gpu = gpu
        r = self.registry
        # --- names from the original design -------------------------------------------------
        self.inference_latency = Histogram(
            "vla_inference_latency_seconds",
            "Server time per answered request, arrival to answer",
            ["model", "protocol", "embodiment"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "vla_inference_requests",
            "Requests by outcome (gRPC status name; skipped = stale stream observation) and protocol "
            "(grpc, openpi, groot_zmq)",
            ["model", "protocol", "status"],
            registry=r,
        )
        self.batch_size = Histogram(
            "vla_batch_size", "Requests per executed forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.gpu_utilization = Gauge("vla_gpu_utilization_percent", "GPU utilisation (NVML)", registry=r)
        self.gpu_memory_used = Gauge("vla_gpu_memory_used_bytes", "GPU memory in use (NVML)", registry=r)
        self.gpu_memory_total = Gauge("vla_gpu_memory_total_bytes", "GPU memory in all (NVML)", registry=r)
        self.queue_depth = Gauge("vla_queue_depth", "Requests admitted and waiting for the model", registry=r)
        self.uptime = Gauge("vla_uptime_seconds", "Seconds since the server started", registry=r)
        self.model = Info("vla_model", "The served model", registry=r)
        # --- additions ----------------------------------------------------------------------
        self.queue_time = Histogram(
            "vla_queue_duration_seconds",
            "Time from admission to the start of the forward pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_time = Histogram(
            "vla_model_duration_seconds",
            "Time of one batched forward pass",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_time = Histogram(
            "vla_preprocess_duration_seconds",
            "Image decoding and model preprocessing per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_skipped = Counter(
            "vla_stream_observations_skipped", "Stale stream observations skipped for a newer one", registry=r
        )
        self.active_streams = Gauge("vla_active_streams", "Open StreamControl sessions", registry=r)
        self.in_flight = Gauge("vla_requests_in_flight", "Requests admitted and not yet answered", registry=r)
        self.openpi_connections = Gauge(
            "vla_openpi_connections", "Open connections to the openpi websocket endpoint", registry=r
        )
        self.uptime.set_function(lambda: time.monotonic() - self._start)
        if gpu is not None and gpu.available:
            self.gpu_utilization.set_function(lambda: self._gpu_field("utilization_percent"))
            self.gpu_memory_used.set_function(lambda: self._gpu_field("memory_used_bytes"))
            self.gpu_memory_total.set_function(lambda: self._gpu_field("memory_total_bytes"))
        self._http: Any = None

    def _gpu_field(self, name: str) -> float:
        reading = self._gpu.read() if self._gpu else None
        return float(getattr(reading, name)) if reading else 0.0

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self._start

    def set_model(self, name: str, version: str, device: str, **extra: str) -> None:
        self.model.info({"id": self.model_id, "name": name, "version": version, "device": device, **extra})

    def bind_queue_depth(self, read: Callable[[], float]) -> None:
        self.queue_depth.set_function(read)

    def bind_openpi_connections(self, read: Callable[[], float]) -> None:
        self.openpi_connections.set_function(read)

    def count(self, status: str, protocol: str, n: int = 1) -> None:
        """One request's outcome (engine/outcome.py counts them; UNAUTHENTICATED the transports)."""
        self.requests.labels(model=self.model_id, protocol=protocol, status=status).inc(n)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint in a daemon thread; return the bound port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            if isinstance(thread, threading.Thread):
                thread.join(timeout=2)
            self._http = None
