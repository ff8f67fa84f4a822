"""Python client for the VLAInference service, sync (`VLAClient`) and asyncio (`AsyncVLAClient`).

    from vla_inference.client import VLAClient
    with VLAClient("localhost:50051") as client:
        chunk = client.predict(image, joints=[0.0] * 7, instruction="pick up the red cup")
        for action in chunk.actions: ...

Images may be numpy arrays (H, W, 3) uint8 RGB, PIL images, or already-encoded JPEG/PNG bytes;
arrays and PIL images are JPEG-encoded here.

Errors: every failure of a call (unary, stream, control session), and an observation too large to
send, raises one exception type, `VLAError`, with `code` (a grpc.StatusCode), `message` (the
server's one line) and `field` (the observation field the server named, or None); the gRPC error it
came from is its `__cause__`. A stream answer for a refused observation carries `error` instead of
actions and the stream goes on: `chunk_error(chunk)` turns it into a VLAError.

A fleet of replicas: give several targets (`VLAClient(["10.0.0.1:50051", "10.0.0.2:50051"])`) or
one DNS name that resolves to all of them (`dns:///vla-inference-headless:50051`). Calls are
spread round-robin over the healthy replicas and refused calls retried elsewhere
(vla_inference.channels). A control stream stays on one replica; `client.control()` gives a
session that reopens it on another replica when that one drains or dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import empty_pb2

from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.api.v1 import vla_inference_pb2_grpc as pb_grpc
from vla_inference.channels import NO_RETRY, RetryPolicy, channel_options, resolve_target
from vla_inference.preprocessing.images import encode_jpeg

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_MESSAGE_MB = 16  # the server's default VLA_MAX_MESSAGE_SIZE_MB
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- errors -----------------------------------------------------------------------------------------
# The server's message for a refused observation: "invalid observation: <field>: <why>".
_FIELD = re.compile(r"^invalid observation: ([A-Za-z_][\w./\[\]]*): ")


class VLAError(Exception):
    """A call failed: `code` (grpc.StatusCode), `message` (the server's one-line reason), `field` (the
    Observation field the server named, e.g. "joint_positions" or "cameras[0].name"; None when it
    named none). `str(error)` is "CODE: message". The gRPC error is `__cause__` (None for the
    client's own checks, such as an observation over the message size limit)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field

    @property
    def code_name(self) -> str:
        """The status name, e.g. "INVALID_ARGUMENT"."""
        return str(self.code.name)

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> VLAError:
        """The VLAError for a gRPC error (raise it `from exc` to keep the cause)."""
        code = exc.code() if callable(getattr(exc, "code", None)) else None  # type: ignore[attr-defined]
        details = exc.details() if callable(getattr(exc, "details", None)) else None  # type: ignore[attr-defined]
        message = str(details or "") or str(exc)
        return cls(code or grpc.StatusCode.UNKNOWN, message, field_named_in(message))


def field_named_in(message: str) -> str | None:
    """The Observation field a server message names ("invalid observation: <field>: ..."), or None."""
    match = _FIELD.match(message)
    return match.group(1) if match else None


def chunk_error(chunk: pb.ActionChunk) -> VLAError | None:
    """A stream answer for a refused observation carries `error` (the stream goes on): that failure as
    a VLAError, or None for an answer with actions."""
    if not chunk.HasField("error") or chunk.error.code == grpc.StatusCode.OK.value[0]:
        return None
    code = next((c for c in grpc.StatusCode if c.value[0] == chunk.error.code), grpc.StatusCode.UNKNOWN)
    return VLAError(code, chunk.error.message, field_named_in(chunk.error.message))


@contextlib.contextmanager
def _raising_vla_errors() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise VLAError.from_rpc_error(exc) from exc


def check_size(observation: pb.Observation, max_message_mb: int) -> None:
    """Refuse, before sending, an observation larger than the message limit, naming its largest field."""
    limit = max_message_mb * 1024 * 1024
    size = observation.ByteSize()
    if size <= limit:
        return
    fields = [("camera_image", len(observation.camera_image))]
    fields += [(f"cameras[{i}] ({c.name})", len(c.data)) for i, c in enumerate(observation.cameras)]
    field, largest = max(fields, key=lambda item: item[1])
    raise VLAError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{field}: the observation is {size / 2**20:.1f} MiB ({field} {largest / 2**20:.1f} MiB), over the "
        f"message limit of {max_message_mb} MiB (VLA_MAX_MESSAGE_SIZE_MB on the server, max_message_mb "
        "of the client): send a smaller or JPEG-encoded frame, or raise both limits",
        field.split(" ")[0],
    )


@dataclass(frozen=True)
class ChannelSecurity:
    """TLS and token settings for a channel. All empty = plaintext, no token."""

    token: str = ""
    root_certificates: bytes | None = None  # CA that signed the server certificate
    certificate_chain: bytes | None = None  # client certificate (mutual TLS)
    private_key: bytes | None = None
    tls: bool = False
    # Host name the server certificates carry, when it differs from the target (e.g. IP addresses).
    server_name: str = ""

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


Targets = str | Sequence[str]


def _open_channel(
    module: Any,
    target: Targets,
    security: ChannelSecurity,
    max_message_mb: int,
    *,
    balanced: bool = True,
    retry: RetryPolicy | None = None,
) -> Any:
    """A channel from `module` (grpc or grpc.aio) to one server or a fleet (see vla_inference.channels),
    with TLS when the security settings ask for it."""
    resolved = resolve_target(target)
    server_name = (security.server_name or resolved.server_name) if security.secure else ""
    options = channel_options(
        max_message_mb, balanced=balanced, retry=retry or RetryPolicy(), server_name=server_name
    )
    if security.secure:
        return module.secure_channel(resolved.uri, security.credentials(), options)
    return module.insecure_channel(resolved.uri, options)


def encode_image(image: Any) -> tuple[bytes, Any]:
    """Return (bytes, ImageEncoding) for an array, a PIL image, or encoded bytes."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        return data, (pb.IMAGE_ENCODING_PNG if data.startswith(_PNG_SIGNATURE) else pb.IMAGE_ENCODING_JPEG)
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {array.dtype}")
    return encode_jpeg(array), pb.IMAGE_ENCODING_JPEG


def make_observation(
    image: Any = None,
    joints: Sequence[float] = (),
    instruction: str = "",
    *,
    cameras: Mapping[str, Any] | None = None,
    velocities: Sequence[float] = (),
    embodiment: str = "",
    request_id: str = "",
    timestamp: float = 0.0,
    seed: int | None = None,
    history: Mapping[int, Mapping[str, Any]] | None = None,
    past_joints: Mapping[int, Sequence[float]] | None = None,
) -> pb.Observation:
    """Build an Observation; `image` is the main camera, `cameras` further named cameras; `history`
    the frames of earlier steps by offset (< 0, e.g. -15) and camera name, `past_joints` their
    joint positions (for models that read them: ModelInfo.image_history / state_history)."""
    observation = pb.Observation(
        joint_positions=list(joints),
        joint_velocities=list(velocities),
        language_instruction=instruction,
        embodiment_tag=embodiment,
        request_id=request_id,
        timestamp=timestamp,
    )
    if image is not None:
        observation.camera_image, observation.camera_image_encoding = encode_image(image)
    for name, frame in (cameras or {}).items():
        data, encoding = encode_image(frame)
        observation.cameras.append(pb.CameraImage(name=name, data=data, encoding=encoding))
    if seed is not None:
        observation.seed = seed
    history, past_joints = history or {}, past_joints or {}
    for offset in sorted(set(history) | set(past_joints)):
        step = pb.PastStep(offset=offset, joint_positions=list(past_joints.get(offset, ())))
        for name, frame in history.get(offset, {}).items():
            data, encoding = encode_image(frame)
            step.cameras.append(pb.CameraImage(name=name, data=data, encoding=encoding))
        observation.history.append(step)
    return observation


class VLAClient:
    """Blocking client. Use as a context manager or call close().

    `target`: one `host:port`, a gRPC URI, or several addresses (a list or one comma-separated
    string). `load_balancing=False` talks to the first reachable target only, whatever its health
    (diagnostics); `retry` bounds the retries of refused calls (see vla_inference.channels)."""

    def __init__(
        self,
        target: Targets = "localhost:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        security: ChannelSecurity | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        load_balancing: bool = True,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.security = security or ChannelSecurity()
        self.max_message_mb = max_message_mb
        self.load_balancing = load_balancing
        self._channel = _open_channel(
            grpc, target, self.security, max_message_mb, balanced=load_balancing, retry=retry
        )
        self._stub = pb_grpc.VLAInferenceStub(self._channel)
        self._metadata = self.security.metadata()
        self._direct: Any = None  # channel for health(): reaches a replica whatever its health

    def predict(
        self, image: Any = None, joints: Sequence[float] = (), instruction: str = "", **kw: Any
    ) -> pb.ActionChunk:
        """Predict one chunk. Keyword arguments go to make_observation (cameras, seed, ...)."""
        timeout = kw.pop("timeout", self.timeout)
        return self.predict_observation(make_observation(image, joints, instruction, **kw), timeout=timeout)

    def predict_observation(
        self, observation: pb.Observation, *, timeout: float | None = None
    ) -> pb.ActionChunk:
        check_size(observation, self.max_message_mb)
        with _raising_vla_errors():
            return self._stub.Predict(observation, timeout=timeout or self.timeout, metadata=self._metadata)

    def stream(self, observations: Iterable[pb.Observation], *, timeout: float | None = None) -> Stream:
        """A StreamControl session: yields one ActionChunk per observation the server acts on (a
        refused observation's answer carries `error`: see chunk_error). It ends with a VLAError
        UNAVAILABLE when its replica drains; control() reopens it for you."""
        limit = self.max_message_mb
        refused: list[VLAError] = []

        def checked() -> Iterator[pb.Observation]:
            # An exception raised here would reach gRPC's request thread (logged, the call failed
            # UNKNOWN): an observation too large to send ends the requests, and the stream raises it
            # once the answers to the observations before it are read.
            for observation in observations:
                try:
                    check_size(observation, limit)
                except VLAError as exc:
                    refused.append(exc)
                    return
                yield observation

        call = self._stub.StreamControl(checked(), timeout=timeout, metadata=self._metadata)
        return Stream(call, refused)

    def control(self, *, reopen_attempts: int = 3) -> ControlSession:
        """A control session that moves to another replica when its replica drains or dies."""
        return ControlSession(self, reopen_attempts=reopen_attempts)

    def info(self) -> pb.ModelInfo:
        with _raising_vla_errors():
            return self._stub.GetModelInfo(empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata)

    def health(self) -> pb.HealthStatus:
        """The state of one replica (the first reachable target), also while it loads or drains."""
        stub = pb_grpc.VLAInferenceStub(self.direct_channel())
        with _raising_vla_errors():
            return stub.HealthCheck(empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata)

    def direct_channel(self) -> grpc.Channel:
        """A channel without health checking (pick_first, no retries), for probes and diagnostics:
        the load-balanced channel only ever reaches replicas that report SERVING."""
        if not self.load_balancing:
            return self._channel
        if self._direct is None:
            self._direct = _open_channel(
                grpc, self.target, self.security, self.max_message_mb, balanced=False, retry=NO_RETRY
            )
        return self._direct

    def close(self) -> None:
        self._channel.close()
        if self._direct is not None:
            self._direct.close()

    def __enter__(self) -> VLAClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVLAClient:
    """asyncio client with the same methods as VLAClient."""

    def __init__(
        self,
        target: Targets = "localhost:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        security: ChannelSecurity | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        load_balancing: bool = True,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.security = security or ChannelSecurity()
        self.max_message_mb = max_message_mb
        self.load_balancing = load_balancing
        self._channel = _open_channel(
            grpc.aio, target, self.security, max_message_mb, balanced=load_balancing, retry=retry
        )
        self._stub = pb_grpc.VLAInferenceStub(self._channel)
        self._metadata = self.security.metadata()
        self._direct: Any = None

    async def predict(
        self, image: Any = None, joints: Sequence[float] = (), instruction: str = "", **kw: Any
    ) -> pb.ActionChunk:
        timeout = kw.pop("timeout", self.timeout)
        return await self.predict_observation(
            make_observation(image, joints, instruction, **kw), timeout=timeout
        )

    async def predict_observation(
        self, observation: pb.Observation, *, timeout: float | None = None
    ) -> pb.ActionChunk:
        check_size(observation, self.max_message_mb)
        with _raising_vla_errors():
            return await self._stub.Predict(
                observation, timeout=timeout or self.timeout, metadata=self._metadata
            )

    def stream(self, observations: Any = None, *, timeout: float | None = None) -> AsyncStream:
        """observations: an iterable or async iterable of Observation, or None to `write` them on
        the returned stream. Failures raise VLAError, as in VLAClient.stream."""
        requests = None if observations is None else _checked_async(observations, self.max_message_mb)
        return AsyncStream(
            self._stub.StreamControl(requests, timeout=timeout, metadata=self._metadata), self.max_message_mb
        )

    def control(self, *, reopen_attempts: int = 3) -> AsyncControlSession:
        """A control session that moves to another replica when its replica drains or dies."""
        return AsyncControlSession(self, reopen_attempts=reopen_attempts)

    async def info(self) -> pb.ModelInfo:
        with _raising_vla_errors():
            return await self._stub.GetModelInfo(
                empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata
            )

    async def health(self) -> pb.HealthStatus:
        """The state of one replica (the first reachable target), also while it loads or drains."""
        stub = pb_grpc.VLAInferenceStub(self.direct_channel())
        with _raising_vla_errors():
            return await stub.HealthCheck(empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata)

    def direct_channel(self) -> grpc.aio.Channel:
        """See VLAClient.direct_channel."""
        if not self.load_balancing:
            return self._channel
        if self._direct is None:
            self._direct = _open_channel(
                grpc.aio, self.target, self.security, self.max_message_mb, balanced=False, retry=NO_RETRY
            )
        return self._direct

    async def close(self) -> None:
        await self._channel.close()
        if self._direct is not None:
            await self._direct.close()

    async def __aenter__(self) -> AsyncVLAClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --- streams whose failures raise VLAError -------------------------------------------------------------
class Stream:
    """A StreamControl call (VLAClient.stream): iterate it for the answers. gRPC's call methods
    (cancel, code, details, ...) pass through; a failure of the stream raises VLAError."""

    def __init__(self, call: Any, refused: list[VLAError] | None = None) -> None:
        self._call = call
        self._refused = refused if refused is not None else []

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> pb.ActionChunk:
        try:
            return next(self._call)
        except StopIteration:
            if self._refused:
                raise self._refused[0] from None
            raise
        except grpc.RpcError as exc:
            if self._refused:
                raise self._refused[0] from None
            raise VLAError.from_rpc_error(exc) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


async def _checked_async(observations: Any, max_message_mb: int) -> AsyncIterator[pb.Observation]:
    if hasattr(observations, "__aiter__"):
        async for observation in observations:
            check_size(observation, max_message_mb)
            yield observation
    else:
        for observation in observations:
            check_size(observation, max_message_mb)
            yield observation


class AsyncStream:
    """A StreamControl call (AsyncVLAClient.stream): `async for chunk in stream`, or `write` /
    `read` / `done_writing` when it was opened without observations. gRPC's call methods (cancel,
    code, ...) pass through; a failure of the stream raises VLAError."""

    def __init__(self, call: Any, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> None:
        self._call = call
        self._max_message_mb = max_message_mb

    def __aiter__(self) -> AsyncIterator[pb.ActionChunk]:
        return self._answers()

    async def _answers(self) -> AsyncIterator[pb.ActionChunk]:
        iterator = self._call.__aiter__()
        while True:
            try:
                with _raising_vla_errors():
                    chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            yield chunk

    async def read(self) -> Any:
        """The next answer, or grpc.aio.EOF when the stream ended cleanly."""
        with _raising_vla_errors():
            return await self._call.read()

    async def write(self, observation: pb.Observation) -> None:
        check_size(observation, self._max_message_mb)
        with _raising_vla_errors():
            await self._call.write(observation)

    async def done_writing(self) -> None:
        with _raising_vla_errors():
            await self._call.done_writing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


# --- control sessions that survive a replica going away ---------------------------------------------
REOPEN_BACKOFF_S = 0.05
_END = object()


def _reopenable(exc: grpc.RpcError) -> bool:
    """The stream's replica drained or died (UNAVAILABLE): another replica can take over."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE


class ControlSession:
    """One StreamControl session, one observation at a time, pinned to one replica.

        with client.control() as session:
            while robot.running:
                chunk = session.act(robot.observation())

    When the replica drains (the stream ends UNAVAILABLE) or dies, `act` opens a new stream --
    on another replica, the balancer skips the one that left -- and sends the observation there;
    per-stream server state starts afresh. `reopens` counts the moves. After `reopen_attempts`
    failed opens in a row the UNAVAILABLE error is raised (a VLAError). Other errors are raised at
    once; per-observation errors come back inline in ActionChunk.error, as on any stream (see
    chunk_error)."""

    def __init__(self, client: VLAClient, *, reopen_attempts: int = 3) -> None:
        self._client = client
        self.reopen_attempts = reopen_attempts
        self.reopens = 0
        self._requests: queue.Queue[Any] | None = None
        self._answers: Any = None

    def act(self, observation: pb.Observation) -> pb.ActionChunk:
        check_size(observation, self._client.max_message_mb)
        failures = 0
        while True:
            if self._answers is None:
                self._open()
            assert self._requests is not None
            self._requests.put(observation)
            try:
                return next(self._answers)
            except grpc.RpcError as exc:
                self._end()
                if not _reopenable(exc) or failures >= self.reopen_attempts:
                    raise VLAError.from_rpc_error(exc) from exc
                failures += 1
                self.reopens += 1
                log.info("control stream ended (%s: %s); reopening", exc.code().name, exc.details())
                time.sleep(REOPEN_BACKOFF_S * failures)

    def _open(self) -> None:
        requests: queue.Queue[Any] = queue.Queue()
        self._requests = requests
        self._answers = self._client._stub.StreamControl(
            iter(requests.get, _END), metadata=self._client._metadata
        )

    def _end(self) -> None:
        if self._requests is not None:
            self._requests.put(_END)  # half-close; also frees gRPC's request-reading thread
        self._requests = None
        self._answers = None

    def close(self) -> None:
        answers = self._answers
        self._end()
        if answers is not None:
            with contextlib.suppress(grpc.RpcError):  # a stream that already ended is closed too
                for _ in answers:  # the server ends the stream once it has read our half-close
                    pass

    def __enter__(self) -> ControlSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncControlSession:
    """ControlSession for AsyncVLAClient: `await session.act(observation)`."""

    def __init__(self, client: AsyncVLAClient, *, reopen_attempts: int = 3) -> None:
        self._client = client
        self.reopen_attempts = reopen_attempts
        self.reopens = 0
        self._call: Any = None

    async def act(self, observation: pb.Observation) -> pb.ActionChunk:
        check_size(observation, self._client.max_message_mb)
        failures = 0
        while True:
            if self._call is None:
                self._call = self._client._stub.StreamControl(metadata=self._client._metadata)
            try:
                with contextlib.suppress(asyncio.InvalidStateError):  # ended: read() raises its status
                    await self._call.write(observation)
                chunk = await self._call.read()
            except grpc.RpcError as exc:
                self._call = None
                if not _reopenable(exc) or failures >= self.reopen_attempts:
                    raise VLAError.from_rpc_error(exc) from exc
                failures += 1
                self.reopens += 1
                log.info("control stream ended (%s: %s); reopening", exc.code().name, exc.details())
                await asyncio.sleep(REOPEN_BACKOFF_S * failures)
                continue
            if chunk is grpc.aio.EOF:  # ended without a status: should not happen; reopen
                self._call = None
                raise VLAError(grpc.StatusCode.UNAVAILABLE, "the control stream ended without an answer")
            return chunk

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:  # ends once the server read our half-close
                    pass

    async def __aenter__(self) -> AsyncControlSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
