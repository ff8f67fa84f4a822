"""Isaac-GR00T's ZeroMQ inference-service protocol, in front of the same engine as gRPC (VLA_GROOT_PORT).

Robots running NVIDIA's client (N1.5's RobotInferenceClient / ExternalRobotInferenceClient,
N1.6 / N1.7's PolicyClient) point it at VLA_HOST:VLA_GROOT_PORT and get this server's batching,
deadlines, metrics and tokens without changing a line.

The protocol (Isaac-GR00T gr00t/eval/service.py, gr00t/policy/server_client.py):

  * the client's REQ socket sends one msgpack map {"endpoint": str (default "get_action"),
    "data": ..., "api_token"?: str} and waits for one msgpack answer; arrays in either of the
    release's encodings (codec.py), answered in the one the request used;
  * endpoints: "ping" -> {"status": "ok", "message": "Server is running"} while SERVING;
    "get_modality_config" -> {modality: ModalityConfig} of the served embodiment; "reset" -> {};
    "get_action" with data = {"observation", "options"?} (N1.6 / N1.7) -> [action map, info],
    or data = the observation itself (N1.5) -> the action map; the observation flat or nested,
    batched or not (layouts.py). "kill" is refused: a client must not stop a shared server;
  * when tokens are configured (VLA_AUTH_TOKENS / VLA_AUTH_TOKEN_FILE) every request needs one as
    its "api_token" (compared in constant time), else {"error": "Unauthorized: Invalid API token"};
  * every failure is {"error": "<STATUS>: <one line>"}, never a traceback; a malformed request
    touches no other client.

Concurrency: a ROUTER socket (the REP semantics for REQ clients: each answer goes back to the
envelope that asked) receives every client's requests on the event loop; each message is then
served by its own task, so several robots are served at once and batch together (and with gRPC and
openpi robots). Decoding msgpack runs in a worker thread; each sample of a get_action goes through
the engine's one entry (`submit`, protocol "groot_zmq": its decode step in the preprocessing pool,
its own deadline VLA_TIMEOUT_MS, counted once), and a batched message's answers are re-collated
as upstream's policy does. A client that goes away before its answer is not waited for: its
answer is dropped. A message larger than VLA_MAX_MESSAGE_SIZE_MB drops that client's connection
(ZeroMQ's limit; the client's own timeout tells it).

Extensions: options (N1.6 / N1.7) or the flat observation may carry "seed" (an integer: sample i
of a batch draws its noise from seed + i, like Observation.seed); options may name the
"embodiment_tag" (else VLA_GROOT_EMBODIMENT, else the first embodiment whose state keys the
observation carries). The info of an N1.6 / N1.7 answer holds the embodiment and per-sample timing.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from vla_inference.engine import Answer, Decoded, Failed, InferenceEngine, Notices
from vla_inference.engine.errors import NotServing, QueueFull
from vla_inference.engine.outcome import Outcome
from vla_inference.models.base import InvalidObservation
from vla_inference.transport import security
from vla_inference.transport.frontdoor import FrontDoor
from vla_inference.transport.groot_zmq import codec, layouts

log = logging.getLogger(__name__)

PROTOCOL = "groot_zmq"
UNAUTHORIZED = "Unauthorized: Invalid API token"  # upstream's text, which clients may match
ENDPOINTS = ("ping", "get_action", "get_modality_config", "reset")
PING = {"status": "ok", "message": "Server is running"}
# How long stop() lets queued answers flush, and waits for messages still being served.
LINGER_MS = 1000
STOP_WAIT_S = 2.0


class Refused(Exception):
    """A request answered with an error before (or instead of) reaching the engine."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


def _line(outcome: Outcome) -> str:
    return f"{outcome.status}: {outcome.message}".replace("\n", " ")


@dataclass
class _Open:
    """The endpoint while it is open: the socket, its receiver, the messages being served."""

    context: zmq.asyncio.Context
    socket: zmq.asyncio.Socket
    receiver: asyncio.Task[None] | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    notices: Notices = field(default_factory=lambda: Notices("GR00T ZeroMQ endpoint"))


class GrootZmqEndpoint(FrontDoor):
    """The ZeroMQ endpoint. `start()` binds VLA_HOST:VLA_GROOT_PORT once the engine serves."""

    _open: _Open | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> int:
        s = self.settings
        assert s.groot_port is not None
        context = zmq.asyncio.Context()
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an answer to a client that left raises: dropped
        sock.setsockopt(zmq.MAXMSGSIZE, s.max_message_bytes)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        host = s.host
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
            host = f"[{host.strip('[]')}]"
        try:
            sock.bind(f"tcp://{host}:{s.groot_port or '*'}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            context.term()
            raise RuntimeError(
                f"cannot bind the GR00T endpoint to {s.host}:{s.groot_port} (VLA_GROOT_PORT): {exc}"
            ) from None
        address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(address.rsplit(":", 1)[1])
        self._open = _Open(context, sock)
        self._open.receiver = asyncio.create_task(self._receive(self._open), name="groot-zmq-receive")
        log.info(
            "GR00T ZeroMQ endpoint on %s (%s)",
            address,
            "api_token required" if self._tokens else "no token check",
        )
        if not security.is_loopback(s.host):
            log.warning(
                "GR00T endpoint bound to %s (not loopback): ZeroMQ here is plaintext (no TLS)%s; keep it "
                "on a private network or behind a tunnel, see SECURITY.md",
                s.host,
                ", api tokens travel in the clear" if self._tokens else " and without token check",
            )
        return self.port

    async def stop(self) -> None:
        """Stop receiving, let the messages being served answer (up to STOP_WAIT_S), close."""
        opened, self._open = self._open, None
        if opened is None:
            return
        if opened.receiver is not None:
            opened.receiver.cancel()
            await asyncio.gather(opened.receiver, return_exceptions=True)
        if opened.tasks:
            _, pending = await asyncio.wait(set(opened.tasks), timeout=STOP_WAIT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        opened.socket.close(linger=LINGER_MS)
        await asyncio.to_thread(opened.context.term)  # waits up to the linger for queued answers

    @property
    def address(self) -> str:
        """The bound address (tcp://host:port), "" when closed."""
        return self._open.socket.getsockopt_string(zmq.LAST_ENDPOINT) if self._open else ""

    # --- receiving and answering -----------------------------------------------------------------
    async def _receive(self, opened: _Open) -> None:
        while True:
            frames = await opened.socket.recv_multipart()
            arrival = time.monotonic()
            if len(frames) < 2:
                continue  # a ROUTER message always carries the sender's identity first
            task = asyncio.create_task(self._serve(opened, frames[:-1], frames[-1], arrival))
            opened.tasks.add(task)
            task.add_done_callback(opened.tasks.discard)

    async def _serve(self, opened: _Open, route: list[bytes], payload: bytes, arrival: float) -> None:
        """One message: decoded off the event loop, answered, the answer sent back to its envelope."""
        form: codec.Form = codec.NPY
        try:
            if len(opened.tasks) > self.settings.max_queue_size:
                raise self._refuse(
                    QueueFull(
                        f"server is at capacity ({len(opened.tasks)} GR00T messages in flight, "
                        f"VLA_MAX_QUEUE_SIZE={self.settings.max_queue_size}); retry shortly"
                    )
                )
            try:
                message = await asyncio.to_thread(codec.unpack, payload)
            except codec.DecodeError as exc:
                raise self._refuse(InvalidObservation("message", str(exc))) from None
            form = message.form or form
            answer = await self._answer(opened, message.content, arrival)
        except Refused as refused:
            answer = {"error": refused.line}
        except Exception as exc:  # a bug: logged with its traceback (engine.refused), one line out
            answer = {"error": self._refuse(exc).line}
        try:
            reply = codec.pack(answer, form)
        except (TypeError, ValueError) as exc:  # an answer this codec cannot write: a bug
            log.error("cannot encode a GR00T answer: %s", exc)
            reply = codec.pack({"error": f"INTERNAL: cannot encode the answer ({type(exc).__name__})"}, form)
        try:
            await opened.socket.send_multipart([*route, reply], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the client left; EAGAIN: it stopped reading
            log.debug("GR00T client gone before its answer (%s); answer dropped", exc)

    def _refuse(self, exc: BaseException) -> Refused:
        """A request refused before the engine had it, counted; what to raise."""
        engine = self._engine_ref()
        if engine is None:
            return Refused(f"UNAVAILABLE: {exc}")
        return Refused(_line(engine.refused(PROTOCOL, exc)))

    async def _answer(self, opened: _Open, request: Any, arrival: float) -> Any:
        if not isinstance(request, Mapping):
            kind = type(request).__name__
            raise self._refuse(
                InvalidObservation("message", f"expected a map {{endpoint, data, api_token}}, got {kind}")
            )
        if self._tokens is not None:
            token = request.get("api_token")
            if not self._tokens.check(token if isinstance(token, str | bytes) else None):
                self._denied()
                raise Refused(UNAUTHORIZED)
        endpoint = request.get("endpoint", "get_action")
        if endpoint == "kill":
            opened.notices.warn_once("kill", "a GR00T client asked to kill the server: refused (logged once)")
            raise Refused(
                "PERMISSION_DENIED: kill is refused: this server is shared; stop it with SIGTERM (it drains)"
            )
        if endpoint not in ENDPOINTS:
            raise Refused(
                f"INVALID_ARGUMENT: unknown endpoint {endpoint!r}; this server answers {', '.join(ENDPOINTS)}"
            )
        engine = self._engine_ref()
        if engine is None or not self._serving():
            raise self._refuse(NotServing("the server is not serving; retry when ping answers ok"))
        data = request.get("data")
        if endpoint == "ping":
            return PING
        if endpoint == "reset":
            return {}  # no per-client state: history comes with each observation
        info = engine.model_info
        if endpoint == "get_modality_config":
            tag = self.settings.groot_embodiment or info.default_embodiment
            n15 = layouts.n15_client(info)
            entries = layouts.modality_entries(layouts.vocabulary(info, tag), n15)
            return {name: codec.modality_config(steps, keys, n15) for name, (steps, keys) in entries.items()}
        return await self._get_action(opened, engine, data, arrival)

    async def _get_action(self, opened: _Open, engine: InferenceEngine, data: Any, arrival: float) -> Any:
        modern = isinstance(data, Mapping) and "observation" in data  # N1.6 / N1.7: {observation, options}
        obs = data["observation"] if modern else data
        options = data.get("options") if modern else None
        options = options if isinstance(options, Mapping) else {}
        try:
            batch = layouts.split(obs, self.settings.max_queue_size)
            requested = options.get("embodiment_tag") or self.settings.groot_embodiment
            if not isinstance(requested, str):
                raise InvalidObservation("embodiment_tag", "expected a string")
            tag = layouts.choose_embodiment(engine.model_info, requested, batch.state_keys)
            seed = _seed(options.get("seed", obs.get("seed") if isinstance(obs, Mapping) else None))
        except InvalidObservation as exc:
            raise self._refuse(exc) from None
        keys = layouts.vocabulary(engine.model_info, tag)
        number = next(opened.ids)
        deadline = arrival + self.settings.timeout_ms / 1000
        results = await asyncio.gather(
            *(
                engine.submit(
                    functools.partial(self._decode, sample, keys, None if seed is None else seed + i),
                    deadline,
                    protocol=PROTOCOL,
                    request_id=f"groot-{number}-{i}",
                    notices=opened.notices,
                )
                for i, sample in enumerate(batch.samples)
            ),
            return_exceptions=True,
        )
        answers: list[Answer] = []
        for i, result in enumerate(results):
            if isinstance(result, Failed):
                where = f"sample {i}: " if len(results) > 1 else ""
                raise Refused(where + _line(result.outcome))
            if isinstance(result, BaseException):
                raise result
            answers.append(result)
        action = layouts.actions([a.prediction.actions for a in answers], keys, batch)
        if not modern:
            return action  # N1.5's service answers the action map alone
        return [
            action,
            {
                "embodiment": tag,
                "total_ms": [a.timing.total_s * 1000 for a in answers],
                "model_ms": [a.timing.model_s * 1000 for a in answers],
                "batch_size": [a.timing.batch_size for a in answers],
            },
        ]

    def _decode(self, sample: layouts.Sample, keys: layouts.Keys, seed: int | None) -> Decoded:
        """One sample's decode step (in the engine's preprocessing pool)."""
        observation = layouts.observation(sample, keys, self.settings, seed)
        return Decoded(observation, instruction_field=sample.language_key)


def _seed(value: Any) -> int | None:
    """Our extension: a whole number in [0, 2**63) fixes the sampling noise."""
    if value is None:
        return None
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise InvalidObservation("seed", "expected a whole number in [0, 2**63)")
    return value
