"""Python client for the VLAInference service, sync (`VLAClient`) and asyncio (`AsyncVLAClient`).

    from vla_inference.client import VLAClient
    with VLAClient("localhost:50051") as client:
        chunk = client.predict(image, joints=[0.0] * 7, instruction="pick up the red cup")
        for action in chunk.actions: ...

Images may be numpy arrays (H, W, 3) uint8 RGB, PIL images, or already-encoded JPEG/PNG bytes;
arrays and PIL images are JPEG-encoded here.
"""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import empty_pb2

from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.api.v1 import vla_inference_pb2_grpc as pb_grpc
from vla_inference.preprocessing.images import encode_jpeg

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

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


def _open_channel(module: Any, target: str, security: ChannelSecurity, max_message_mb: int) -> Any:
    """A channel from `module` (grpc or grpc.aio), with TLS when the security settings ask for it."""
    options = _channel_options(max_message_mb)
    if security.secure:
        return module.secure_channel(target, security.credentials(), options)
    return module.insecure_channel(target, options)


def _channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    size = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


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
    """Blocking client. Use as a context manager or call close()."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        security: ChannelSecurity | None = None,
        max_message_mb: int = 16,
    ) -> None:
        self.timeout = timeout
        self.security = security or ChannelSecurity()
        self._channel = _open_channel(grpc, target, self.security, max_message_mb)
        self._stub = pb_grpc.VLAInferenceStub(self._channel)
        self._metadata = self.security.metadata()

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
        """A StreamControl session: yields one ActionChunk per observation the server acts on."""
        return self._stub.StreamControl(iter(observations), timeout=timeout, metadata=self._metadata)

    def session(self, *, timeout: float | None = None) -> StreamSession:
        """A StreamControl session used call-and-answer (see StreamSession)."""
        return StreamSession(self.stream, timeout)

    def info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata)

    def health(self) -> pb.HealthStatus:
        return self._stub.HealthCheck(empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VLAClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamSession:
    """One StreamControl call where each observation waits for its answer: `ask(observation)`
    returns the chunk answering it. The way a control loop uses a stream, and what real-time
    chunking needs (the server continues the chunk it last sent, so that chunk must be known).
    A per-observation failure is raised as StreamObservationError; the session goes on."""

    def __init__(self, open_stream: Any, timeout: float | None) -> None:
        self._requests: queue.Queue[pb.Observation | None] = queue.Queue()
        self._answers: Iterator[pb.ActionChunk] = open_stream(self._outgoing(), timeout=timeout)
        self._closed = False

    def _outgoing(self) -> Iterator[pb.Observation]:
        while (item := self._requests.get()) is not None:
            yield item

    def ask(self, observation: pb.Observation) -> pb.ActionChunk:
        if self._closed:
            raise RuntimeError("the session is closed")
        self._requests.put(observation)
        answer = next(self._answers)
        if answer.HasField("error"):
            raise StreamObservationError(answer)
        return answer

    def close(self) -> None:
        """End the call (half-close) and wait for the server to finish it."""
        if not self._closed:
            self._closed = True
            self._requests.put(None)
            for _ in self._answers:
                pass

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamObservationError(RuntimeError):
    """One observation of a stream failed (ActionChunk.error); `code` is a grpc.StatusCode."""

    def __init__(self, answer: pb.ActionChunk) -> None:
        self.answer = answer
        self.code = next(
            (c for c in grpc.StatusCode if c.value[0] == answer.error.code), grpc.StatusCode.UNKNOWN
        )
        super().__init__(f"{self.code.name}: {answer.error.message}")


class AsyncVLAClient:
    """asyncio client with the same methods as VLAClient."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        security: ChannelSecurity | None = None,
        max_message_mb: int = 16,
    ) -> None:
        self.timeout = timeout
        self.security = security or ChannelSecurity()
        self._channel = _open_channel(grpc.aio, target, self.security, max_message_mb)
        self._stub = pb_grpc.VLAInferenceStub(self._channel)
        self._metadata = self.security.metadata()

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

    async def info(self) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata)

    async def health(self) -> pb.HealthStatus:
        return await self._stub.HealthCheck(empty_pb2.Empty(), timeout=self.timeout, metadata=self._metadata)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncVLAClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
