"""Python client for the VLAInference service, sync (`VLAClient`) and asyncio (`AsyncVLAClient`).

    from vla_inference.client import VLAClient
    with VLAClient("localhost:50051") as client:
        chunk = client.predict(image, joints=[0.0] * 7, instruction="pick up the red cup")
        for action in chunk.actions: ...

Images may be numpy arrays (H, W, 3) uint8 RGB, PIL images, or already-encoded JPEG/PNG bytes;
arrays and PIL images are JPEG-encoded here.

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
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
) -> pb.Observation:
    """Build an Observation; `image` is the main camera, `cameras` further named cameras."""
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
        max_message_mb: int = 16,
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
        return self._stub.Predict(observation, timeout=timeout or self.timeout, metadata=self._metadata)

    def stream(
        self, observations: Iterable[pb.Observation], *, timeout: float | None = None
    ) -> Iterator[pb.ActionChunk]:
        """A StreamControl session: yields one ActionChunk per observation the server acts on.
        It ends with UNAVAILABLE when its replica drains; control() reopens it for you."""
        return self._stub.StreamControl(iter(observations), timeout=timeout, metadata=self._metadata)

    def control(self, *, reopen_attempts: int = 3) -> ControlSession:
        """A control session that moves to another replica when its replica drains or dies."""
        return ControlSession(self, reopen_attempts=reopen_attempts)

    def info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata)

    def health(self) -> pb.HealthStatus:
        """The state of one replica (the first reachable target), also while it loads or drains."""
        stub = pb_grpc.VLAInferenceStub(self.direct_channel())
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
        max_message_mb: int = 16,
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
        return await self._stub.Predict(observation, timeout=timeout or self.timeout, metadata=self._metadata)

    def stream(self, observations: Any, *, timeout: float | None = None) -> AsyncIterator[pb.ActionChunk]:
        """observations: an iterable or async iterable of Observation."""
        return self._stub.StreamControl(observations, timeout=timeout, metadata=self._metadata)

    def control(self, *, reopen_attempts: int = 3) -> AsyncControlSession:
        """A control session that moves to another replica when its replica drains or dies."""
        return AsyncControlSession(self, reopen_attempts=reopen_attempts)

    async def info(self) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata)

    async def health(self) -> pb.HealthStatus:
        """The state of one replica (the first reachable target), also while it loads or drains."""
        stub = pb_grpc.VLAInferenceStub(self.direct_channel())
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
    failed opens in a row the UNAVAILABLE error is raised. Other errors are raised at once;
    per-observation errors come back inline in ActionChunk.error, as on any stream."""

    def __init__(self, client: VLAClient, *, reopen_attempts: int = 3) -> None:
        self._client = client
        self.reopen_attempts = reopen_attempts
        self.reopens = 0
        self._requests: queue.Queue[Any] | None = None
        self._answers: Any = None

    def act(self, observation: pb.Observation) -> pb.ActionChunk:
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
                    raise
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
                    raise
                failures += 1
                self.reopens += 1
                log.info("control stream ended (%s: %s); reopening", exc.code().name, exc.details())
                await asyncio.sleep(REOPEN_BACKOFF_S * failures)
                continue
            if chunk is grpc.aio.EOF:  # ended without a status: should not happen; reopen
                self._call = None
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="the control stream ended without an answer",
                )
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
