"""Server assembly and lifecycle: gRPC server, health and reflection services, metrics endpoint,
the optional openpi websocket endpoint (VLA_OPENPI_PORT) and GR00T ZeroMQ endpoint (VLA_GROOT_PORT),
model loading, warm-up, signals and graceful drain.

States: LOADING (port open, health NOT_SERVING) -> SERVING -> DRAINING on SIGTERM/SIGINT
(health NOT_SERVING, new requests UNAVAILABLE, accepted ones answered within
VLA_SHUTDOWN_GRACE_S) -> stopped. While one forward pass hangs past VLA_STUCK_AFTER_S, health
reports NOT_SERVING until it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.config import Settings
from vla_inference.engine import InferenceEngine
from vla_inference.models.base import VLAModel
from vla_inference.models.registry import create_model
from vla_inference.telemetry.gpu import GpuMonitor
from vla_inference.telemetry.metrics import Metrics
from vla_inference.transport import codec, security, servicer
from vla_inference.transport.groot_zmq import GrootZmqEndpoint
from vla_inference.transport.groot_zmq import endpoint as groot_zmq
from vla_inference.transport.openpi import OpenpiEndpoint
from vla_inference.transport.openpi import endpoint as openpi
from vla_inference.transport.servicer import ServerState, VLAInferenceServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VLAInference"].full_name
HEALTH_POLL_S = 0.25


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel options shared by server and client: message sizes and keepalive."""
    size = settings.max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class VLAServer:
    """One model, one engine, one gRPC server. `model` may be injected (tests); otherwise the
    registry builds the class VLA_MODEL_TYPE names and loads VLA_MODEL_PATH."""

    def __init__(self, settings: Settings, model: VLAModel | None = None) -> None:
        self.settings = settings
        self.state = ServerState()
        self.model = model if model is not None else create_model(settings)
        self.gpu = GpuMonitor(settings.device)
        self.metrics = Metrics(model_id=self.model.model_id, gpu=self.gpu)
        self.engine: InferenceEngine | None = None
        self.health = health.aio.HealthServicer()
        self.openpi: OpenpiEndpoint | None = None
        self.groot_zmq: GrootZmqEndpoint | None = None
        self.port = 0
        self.metrics_port = 0
        self.openpi_port = 0
        self.groot_port = 0
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        """Open the port (health NOT_SERVING), load and warm the model, then turn SERVING."""
        s = self.settings
        # A taken port is found before anything binds (gRPC would log its own lines first) or loads
        # (the openpi endpoint opens only once the model serves); the binds below may still fail.
        _check_port_free("VLA_GRPC_PORT", s.host, s.grpc_port)
        if s.metrics_enabled:
            _check_port_free("VLA_METRICS_PORT", s.metrics_host, s.metrics_port)
        if s.openpi_port:
            _check_port_free("VLA_OPENPI_PORT", s.host, s.openpi_port)
        if s.groot_port:
            _check_port_free("VLA_GROOT_PORT", s.host, s.groot_port)
        server = grpc.aio.server(
            # Without SO_REUSEPORT (gRPC's default turns it on) a second server on the same port fails
            # to bind instead of silently sharing the port with the first.
            options=[*grpc_options(self.settings), ("grpc.so_reuseport", 0)],
            interceptors=security.interceptors(
                self.settings, lambda: self.metrics.count("UNAUTHENTICATED", servicer.PROTOCOL)
            ),
        )
        _add_service(VLAInferenceServicer(self.settings, self.state, lambda: self.engine, self.gpu), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{_bracket(self.settings.host)}:{self.settings.grpc_port}"
        credentials = security.server_credentials(self.settings)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise bind_error("VLA_GRPC_PORT", self.settings.host, self.settings.grpc_port)
        self._log_exposure()
        self.state.protocol_ports[servicer.PROTOCOL] = self.port
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        log.info("gRPC listening on %s:%d (model loading)", self.settings.host, self.port)
        if self.settings.metrics_enabled:
            try:
                self.metrics_port = self.metrics.serve_http(
                    self.settings.metrics_host, self.settings.metrics_port
                )
            except OSError as exc:
                raise bind_error(
                    "VLA_METRICS_PORT", self.settings.metrics_host, self.settings.metrics_port, exc
                ) from None
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics_host, self.metrics_port)

        _set_torch_threads(self.settings)
        t0 = time.monotonic()
        await asyncio.to_thread(self.model.load, self.settings.model_path or None, self.settings.device)
        info = self.model.model_info
        self.metrics.set_model(info.name, info.version, info.device, family=info.family, dtype=info.dtype)
        log.info(
            "loaded %s (%s, %s, %s) in %.1f s%s",
            info.name,
            info.family,
            info.device,
            info.dtype,
            time.monotonic() - t0,
            " -- DEMO MODEL: random weights, not a trained policy" if info.demo else "",
        )
        if info.description:
            log.info("model: %s", info.description)
        for embodiment in info.embodiments:
            state = info.state_layouts.get(embodiment)
            actions = info.action_layouts.get(embodiment)
            log.info(
                "embodiment %r: state %s; actions %s",
                embodiment,
                ", ".join(state) if state else f"{info.state_dims.get(embodiment, '?')} values",
                ", ".join(actions) if actions else f"{info.action_dim} values",
            )
        engine = InferenceEngine(self.model, self.settings, self.metrics)
        await engine.start()
        await engine.warmup(self.settings.warmup_batches)
        self.engine = engine
        self.state.phase = ServerState.SERVING
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watch = asyncio.create_task(self._watch_stuck())
        if self.settings.openpi_port is not None:
            # Opened once the model serves, as openpi's server does: its clients expect the metadata
            # message at once and an answer to every observation.
            self.openpi = OpenpiEndpoint(
                self.settings,
                lambda: self.engine,
                lambda: self.state.phase == ServerState.SERVING,
                on_denied=lambda: self.metrics.count("UNAUTHENTICATED", openpi.PROTOCOL),
            )
            self.openpi_port = await _open(self.openpi, "VLA_OPENPI_PORT", s.host, s.openpi_port)
            self.metrics.bind_openpi_connections(lambda: float(self.openpi.connections if self.openpi else 0))
            self.state.protocol_ports[openpi.PROTOCOL] = self.openpi_port
        if s.groot_port is not None:
            # Opened once the model serves, like the openpi endpoint: a ping then means SERVING.
            self.groot_zmq = GrootZmqEndpoint(
                s,
                lambda: self.engine,
                lambda: self.state.phase == ServerState.SERVING,
                on_denied=lambda: self.metrics.count("UNAUTHENTICATED", groot_zmq.PROTOCOL),
            )
            self.groot_port = await _open(self.groot_zmq, "VLA_GROOT_PORT", s.host, s.groot_port)
            self.state.protocol_ports[groot_zmq.PROTOCOL] = self.groot_port
        log.info("SERVING %s on port %d", info.name, self.port)

    def _log_exposure(self) -> None:
        """Say at start-up what the transport protects, loudly when it protects little."""
        s = self.settings
        tls = ("mutual TLS" if s.tls_client_ca_file else "TLS") if s.tls_enabled else "plaintext"
        tokens = len(s.auth_token_list())
        log.info(
            "gRPC transport: %s, %s",
            tls,
            f"{tokens} bearer token(s) required" if tokens else "no token check",
        )
        if not security.is_loopback(s.host) and (not s.tls_enabled or not tokens):
            log.warning(
                "gRPC bound to %s (not loopback) without %s: anyone who can reach this port can %s; "
                "see SECURITY.md",
                s.host,
                " and ".join(x for x, on in (("TLS", s.tls_enabled), ("token auth", bool(tokens))) if not on),
                "read observations and actions in transit" if tokens else "drive the policy",
            )

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_stuck(self) -> None:
        """Health follows the model worker: NOT_SERVING while a forward pass hangs."""
        assert self.engine is not None
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            if self.state.phase not in (ServerState.SERVING, ServerState.NOT_SERVING):
                continue
            stuck = self.engine.stuck
            if stuck and self.state.phase == ServerState.SERVING:
                log.error(
                    "model worker stuck for over %.1f s: health NOT_SERVING", self.settings.stuck_after_s
                )
                self.state.phase = ServerState.NOT_SERVING
                await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            elif not stuck and self.state.phase == ServerState.NOT_SERVING:
                log.info("model worker recovered: health SERVING")
                self.state.phase = ServerState.SERVING
                await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new requests, answer accepted ones within the grace period, then stop."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        # Health first, so balancing clients stop picking this replica before its streams end
        # and reopen; then refuse new calls (UNAVAILABLE) and end open streams (UNAVAILABLE).
        await self.health.enter_graceful_shutdown()
        self.state.begin_drain()
        # Stop the gRPC server first (GOAWAY: new calls are refused UNAVAILABLE at the HTTP/2 level,
        # accepted ones keep running for the grace period); stopping it only after the drain
        # cancelled the calls that arrived in that instant (clients saw CANCELLED).
        stopping = asyncio.create_task(self._server.stop(grace)) if self._server is not None else None
        if self.engine is not None:
            drained = await self.engine.drain(grace)
            if not drained:
                log.warning("grace period over with %d requests unanswered", self.engine.in_flight)
        if self._watch is not None:
            self._watch.cancel()
        if self.openpi is not None:
            await self.openpi.stop()
        if self.groot_zmq is not None:
            await self.groot_zmq.stop()
        if stopping is not None:
            await stopping
        if self.engine is not None:
            await self.engine.close()
        self.metrics.close()
        log.info("stopped")
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Run until SIGTERM / SIGINT, then drain and return."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        start = asyncio.create_task(self.start())
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            if start.exception() is not None:
                # Close the port and the metrics endpoint before the loop ends (else grpc's server
                # finalizer runs on a closed loop and prints a traceback after the error).
                waiter.cancel()
                await self.stop(0)
                start.result()  # raise the load error
            await waiter
        else:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start
        log.info("signal received: draining (grace %.1f s)", self.settings.shutdown_grace_s)
        await self.stop()


def _add_service(servicer: VLAInferenceServicer, server: grpc.aio.Server) -> None:
    """Register VLAInference like the generated add_VLAInferenceServicer_to_server, but with request
    deserializers that never raise: a malformed request is answered INVALID_ARGUMENT by the servicer
    instead of UNKNOWN with the parser's exception text."""
    handlers = {
        "Predict": grpc.unary_unary_rpc_method_handler(
            servicer.Predict,
            request_deserializer=codec.parse_observation,
            response_serializer=pb.ActionChunk.SerializeToString,
        ),
        "StreamControl": grpc.stream_stream_rpc_method_handler(
            servicer.StreamControl,
            request_deserializer=codec.parse_observation,
            response_serializer=pb.ActionChunk.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=codec.parse_ignored,
            response_serializer=pb.ModelInfo.SerializeToString,
        ),
        "HealthCheck": grpc.unary_unary_rpc_method_handler(
            servicer.HealthCheck,
            request_deserializer=codec.parse_ignored,
            response_serializer=pb.HealthStatus.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def _open(door: OpenpiEndpoint | GrootZmqEndpoint, setting: str, host: str, port: int | None) -> int:
    """Start an extra front door; a port that cannot be bound is named with its setting."""
    try:
        return await door.start()
    except (OSError, RuntimeError) as exc:
        if _port_problem(host, port or 0) is None:
            raise
        raise bind_error(setting, host, port or 0, exc) from None


def _set_torch_threads(settings: Settings) -> None:
    """Apply VLA_TORCH_THREADS (0 keeps torch's default of one thread per core)."""
    import torch

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    log.info("torch uses %d CPU threads", torch.get_num_threads())


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# --- ports: a bind that fails names the port and the setting that chose it ----------------------------
_HOST_SETTING = {"VLA_METRICS_PORT": "VLA_METRICS_HOST"}
_PORT_NOTES = {
    ("VLA_METRICS_PORT", 9090): " (9090 is also Prometheus's own default port: a host that runs Prometheus "
    "needs another one here)",
    ("VLA_GRPC_PORT", 50051): " (another `vla-inference serve` or `make run`?)",
}


def bind_error(setting: str, host: str, port: int, cause: BaseException | None = None) -> OSError:
    """The one-line error for a port that could not be bound: in use, privileged, or a host that is
    not this machine's, as a test bind of the same address tells."""
    problem = _port_problem(host, port, cause)
    host_setting = _HOST_SETTING.get(setting, "VLA_HOST")
    if problem == errno.EADDRINUSE:
        note = _PORT_NOTES.get((setting, port), "")
        message = (
            f"{setting}={port} is in use on {host}{note}: stop what listens there or set {setting} to a "
            "free port (0 = any free port)"
        )
    elif problem == errno.EACCES:
        message = f"{setting}={port}: binding a port below 1024 needs privileges; use a port above 1023"
    elif problem == errno.EADDRNOTAVAIL:
        message = f"{host_setting}={host} is not an address of this machine (cannot bind {setting}={port})"
    else:
        detail = f": {cause}" if cause else ""
        message = f"cannot bind {setting}={port} on {host_setting}={host}{detail}"
    return OSError(message)  # str() is the message alone


def _port_problem(host: str, port: int | None, cause: BaseException | None = None) -> int | None:
    """The errno a bind of host:port meets now (None: it binds)."""
    if isinstance(cause, OSError) and cause.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
        return cause.errno
    if not port:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return errno.EADDRNOTAVAIL
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.errno
    return None


def _check_port_free(setting: str, host: str, port: int) -> None:
    if _port_problem(host, port) is not None:
        raise bind_error(setting, host, port)
