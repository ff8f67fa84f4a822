"""openpi's websocket policy-server protocol, in front of the same engine as gRPC (VLA_OPENPI_PORT).

Scripts written against openpi's `openpi-client` (`WebsocketClientPolicy(host, port, api_key)`:
LIBERO, DROID and ALOHA examples) work against this server unchanged, and batch with gRPC robots.

The protocol (openpi's serving/websocket_policy_server.py):

  * a websocket on VLA_HOST:VLA_OPENPI_PORT (wss with the gRPC port's certificates when VLA_TLS_*
    are set); `GET /healthz` answers 200 "OK\\n" while the server is SERVING (503 otherwise);
  * when tokens are configured (VLA_AUTH_TOKENS / VLA_AUTH_TOKEN_FILE) the handshake needs
    `Authorization: Api-Key <token>` (what openpi-client sends; `Bearer` works too), else HTTP 401;
  * the server's first message is the metadata dict; then each binary message from the client is
    one observation dict (msgpack, codec.py; its layout, layouts.py) and gets one binary answer,
    in order:
        {"actions": (H, D) float32 array in the robot's units,
         "server_timing": {"infer_ms", "prev_total_ms" (from the 2nd answer)},
         "policy_timing": {"infer_ms", "queue_ms", "preprocess_ms", "batch_size"}};
    openpi's control messages ({"__ctrl__": ...}) are acknowledged with {"__ack__": ...};
  * a bad observation (or a full / draining server) gets one text message with the status and a
    one-line reason, never a traceback, then a close with code 1011; other clients go on.

Each observation goes through the engine's one entry (`submit`, protocol "openpi"): decoding, the
layout and the model's preprocessing run in its preprocessing pool, and the engine counts the outcome.
"""

from __future__ import annotations

import functools
import http
import itertools
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from vla_inference.config import Settings
from vla_inference.engine import (
    Answer,
    Decoded,
    Failed,
    InferenceEngine,
    Notices,
    NotServing,
    Outcome,
    ResourceExhausted,
)
from vla_inference.models.base import InvalidObservation, ModelDescription
from vla_inference.transport import security
from vla_inference.transport.frontdoor import FrontDoor
from vla_inference.transport.openpi import codec, layouts

log = logging.getLogger(__name__)

PROTOCOL = "openpi"
HEALTH_PATH = "/healthz"
# How long a closing connection (or a refused handshake: 401, /healthz) waits for the peer to close;
# bounds how long stop() can take with clients that linger.
CLOSE_TIMEOUT_S = 2.0
# A close reason travels in a control frame of at most 125 bytes.
_MAX_REASON = 120


class OpenpiEndpoint(FrontDoor):
    """The websocket server. `start()` binds VLA_HOST:VLA_OPENPI_PORT once the engine serves."""

    _server: Server | None = None
    _ids: Iterator[int]  # connection numbers, from start()
    connections = 0

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> int:
        s = self.settings
        assert s.openpi_port is not None
        self._ids = itertools.count(1)
        tls = _ssl_context(s)
        try:
            self._server = await serve(
                self._handle,
                s.host,
                s.openpi_port,
                compression=None,
                max_size=s.max_message_bytes,
                max_queue=4,
                close_timeout=CLOSE_TIMEOUT_S,
                process_request=self._process_request,
                ssl=tls,
                logger=logging.getLogger("vla_inference.transport.openpi.websockets"),
            )
        except OSError as exc:
            raise RuntimeError(
                f"cannot bind the openpi endpoint to {s.host}:{s.openpi_port} (VLA_OPENPI_PORT): {exc}"
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        scheme = "wss" if tls else "ws"
        auth = "Api-Key token required" if self._tokens else "no token check"
        log.info(
            "openpi websocket endpoint on %s://%s:%d (layout %s, %s)",
            scheme,
            s.host,
            self.port,
            s.openpi_layout,
            auth,
        )
        missing = [name for name, on in (("TLS", tls is not None), ("tokens", self._tokens)) if not on]
        if not security.is_loopback(s.host) and missing:
            log.warning(
                "openpi endpoint bound to %s (not loopback) without %s; see SECURITY.md",
                s.host,
                " and ".join(missing),
            )
        return self.port

    async def stop(self) -> None:
        """Close every connection (1001 going away) and the listening socket."""
        if self._server is not None:
            self._server.close(close_connections=True, reason="server shutting down")
            await self._server.wait_closed()
            self._server = None

    # --- handshake: health and authentication -----------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.partition("?")[0] == HEALTH_PATH:
            if self._serving():
                return connection.respond(http.HTTPStatus.OK, "OK\n")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "not serving\n")
        if self._tokens is not None and not self._tokens.check(api_key(request.headers)):
            self._denied()
            return connection.respond(
                http.HTTPStatus.UNAUTHORIZED,
                "missing or invalid API key (send the header 'Authorization: Api-Key <token>')\n",
            )
        return None

    # --- one connection ---------------------------------------------------------------------------
    async def _handle(self, connection: ServerConnection) -> None:
        self.connections += 1
        connection_id = next(self._ids)
        notices = Notices("openpi connection")
        log.debug("openpi connection %d from %s opened", connection_id, connection.remote_address)
        try:
            engine = self._engine_ref()
            if engine is None:
                return
            await connection.send(codec.pack(self._metadata(engine.model_info)))
            previous_total_ms: float | None = None
            for number in itertools.count(1):
                try:
                    message = await connection.recv()
                except ConnectionClosed as closed:
                    if closed.sent is not None and closed.sent.code == CloseCode.MESSAGE_TOO_BIG:
                        # websockets refused a message over VLA_MAX_MESSAGE_SIZE_MB (close 1009).
                        engine.refused(PROTOCOL, ResourceExhausted("message over VLA_MAX_MESSAGE_SIZE_MB"))
                    return
                arrival = time.monotonic()
                control = codec.control_kind(message) if isinstance(message, bytes) else None
                if control is not None:
                    await connection.send(codec.pack({"__ack__": control}))
                    continue
                try:
                    answer = await self._serve(
                        engine, message, f"openpi-{connection_id}-{number}", arrival, notices
                    )
                except Failed as failed:
                    await _fail(connection, failed.outcome)
                    return
                await connection.send(codec.pack(_result(answer, previous_total_ms)))
                previous_total_ms = (time.monotonic() - arrival) * 1000
        except ConnectionClosed:
            return
        finally:
            self.connections -= 1
            log.debug("openpi connection %d closed", connection_id)

    def _metadata(self, info: ModelDescription) -> dict[str, Any]:
        embodiment = self.settings.openpi_embodiment or info.default_embodiment
        return {
            "server": "vla-inference",
            "model_name": info.name,
            "model_family": info.family,
            "action_dim": info.action_dim,
            "action_horizon": info.chunk_size,
            "embodiment": embodiment,
            "state_dim": info.state_dims.get(embodiment, 0),
            "layout": self.settings.openpi_layout,
        }

    async def _serve(
        self, engine: InferenceEngine, message: str | bytes, request_id: str, arrival: float, notices: Notices
    ) -> Answer:
        """One observation through the engine; Failed carries the outcome of a failure."""
        if not self._serving():
            unavailable = NotServing("the server is not serving; retry when /healthz answers OK")
            raise Failed(engine.refused(PROTOCOL, unavailable))
        return await engine.submit(
            functools.partial(self._decode, engine.model_info, message),
            arrival + self.settings.timeout_ms / 1000,
            protocol=PROTOCOL,
            request_id=request_id,
            notices=notices,
        )

    def _decode(self, info: ModelDescription, message: str | bytes) -> Decoded:
        """The openpi decode step (in the engine's preprocessing pool): msgpack, then the layout."""
        if isinstance(message, str):
            raise InvalidObservation("message", "send msgpack bytes (binary frames), not text")
        try:
            obs = codec.unpack(message)
        except codec.DecodeError as exc:
            raise InvalidObservation("message", str(exc)) from None
        observation = layouts.observation_from_openpi(obs, self.settings, info, self.settings.openpi_layout)
        return Decoded(observation, instruction_field="prompt")


def _result(answer: Answer, previous_total_ms: float | None) -> dict[str, Any]:
    t = answer.timing
    server_timing = {"infer_ms": t.total_s * 1000}
    if previous_total_ms is not None:
        server_timing["prev_total_ms"] = previous_total_ms
    return {
        "actions": np.ascontiguousarray(answer.prediction.actions, dtype=np.float32),
        "server_timing": server_timing,
        "policy_timing": {
            "infer_ms": t.model_s * 1000,
            "queue_ms": t.queue_s * 1000,
            "preprocess_ms": (t.decode_s + t.preprocess_s) * 1000,
            "batch_size": t.batch_size,
        },
    }


async def _fail(connection: ServerConnection, outcome: Outcome) -> None:
    """openpi's error path: one text message (here one line, no traceback), then close 1011."""
    line = f"{outcome.status}: {outcome.message}".replace("\n", " ")
    try:
        await connection.send(line)
        await connection.close(CloseCode.INTERNAL_ERROR, outcome.status[:_MAX_REASON])
    except ConnectionClosed:
        pass


def api_key(headers: Headers) -> str | None:
    """The token of `Authorization: Api-Key <token>` (openpi-client) or `Bearer <token>`."""
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() in ("api-key", "bearer") and token.strip():
        return token.strip()
    return None


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """wss with the gRPC port's certificate (and client CA: mutual TLS) when TLS is configured."""
    if not settings.tls_enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        context.load_verify_locations(cafile=str(Path(settings.tls_client_ca_file)))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
