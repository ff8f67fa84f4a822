"""Property-based fuzzing of a live server (ToyPolicy): random Observation messages and raw random
bytes as the serialized request, unary and streamed.

Every request must end with a gRPC status a client can act on (OK, INVALID_ARGUMENT or
RESOURCE_EXHAUSTED) -- never UNKNOWN, INTERNAL or a hang; the server must stay SERVING with bounded
memory and answer a normal request correctly afterwards.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, make_settings, start_server
from tests.support.toy_model import ToyPolicy, expected_actions
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.client import make_observation
from vla_inference.models.base import Observation
from vla_inference.preprocessing.images import encode_jpeg

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FAULT_HOOKS = {"fail", "hang", "oom"}  # ToyPolicy's test hooks, not inputs to fuzz
PREDICT = "/vla_inference.v1.VLAInference/Predict"
STREAM = "/vla_inference.v1.VLAInference/StreamControl"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
RSS_GROWTH_LIMIT_KB = 150 * 1024


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[RunningServer, ToyPolicy, grpc.Channel]]:
    config = make_settings(max_image_pixels=512 * 512, max_message_size_mb=1, max_stream_rate_hz=0)
    model = ToyPolicy(config)
    running = start_server(config, model)
    channel = grpc.insecure_channel(running.target)
    yield running, model, channel
    channel.close()
    running.stop(grace_s=1.0)


# --- strategies ---------------------------------------------------------------------------------
def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + bytes(width * 3) for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@st.composite
def images(draw: st.DrawFn) -> tuple[bytes, int, int, int]:
    """(data, encoding, width, height): valid, truncated, mislabelled, lying about size, or noise."""
    w = draw(st.integers(1, 48))
    h = draw(st.integers(1, 48))
    kind = draw(st.sampled_from(["jpeg", "png", "raw", "noise", "empty"]))
    if kind == "jpeg":
        data = encode_jpeg(np.full((h, w, 3), draw(st.integers(0, 255)), np.uint8))
    elif kind == "png":
        data = _png(w, h)
    elif kind == "raw":
        data = bytes(w * h * 3)
    elif kind == "noise":
        data = draw(st.binary(max_size=2048))
    else:
        data = b""
    if data and draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=16))
    encoding = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-3, 12)))
    width = draw(st.one_of(st.just(w), st.integers(0, 2**32 - 1)))
    height = draw(st.one_of(st.just(h), st.integers(0, 2**32 - 1)))
    return data, encoding, width, height


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "arm7", "arm6", "base", "wrist", "left_wrist"]))


@st.composite
def observations(draw: st.DrawFn) -> pb.Observation:
    observation = pb.Observation(
        joint_positions=draw(
            st.one_of(st.lists(floats, max_size=10), st.just([0.1] * 7), st.just([0.1] * 6))
        ),
        joint_velocities=draw(st.lists(floats, max_size=8)),
        language_instruction=draw(
            st.one_of(st.text(max_size=60), st.just("x" * 1500)).filter(lambda s: s not in FAULT_HOOKS)
        ),
        embodiment_tag=draw(texts),
        request_id=draw(st.one_of(st.text(max_size=20), st.text(min_size=120, max_size=140))),
        timestamp=draw(st.floats(allow_nan=True, allow_infinity=True)),
    )
    if draw(st.booleans()):
        data, encoding, width, height = draw(images())
        observation.camera_image = data
        observation.camera_image_encoding = encoding  # type: ignore[assignment]
        observation.camera_image_width, observation.camera_image_height = width, height
    for _ in range(draw(st.integers(0, 5))):
        data, encoding, width, height = draw(images())
        observation.cameras.append(
            pb.CameraImage(name=draw(texts), data=data, encoding=encoding, width=width, height=height)  # type: ignore[arg-type]
        )
    if draw(st.booleans()):
        observation.seed = draw(st.integers(0, 2**64 - 1))
    return observation


_VALID = make_observation(np.zeros((16, 16, 3), np.uint8), [0.1] * 7, "valid", seed=3).SerializeToString()


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode_jpeg(np.zeros((8, 8, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


BOMB_JPEG = _jpeg_claiming(65535, 65535)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid serialized request with bytes flipped, cut or spliced in."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=4096))
    data = bytearray(_VALID)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=32)) + bytes(data[cut:])


# --- properties ---------------------------------------------------------------------------------
def _unary_status(channel: grpc.Channel, data: bytes) -> tuple[grpc.StatusCode, bytes | None, str]:
    call = channel.unary_unary(PREDICT)  # identity serializers: bytes go out as they are
    try:
        return grpc.StatusCode.OK, call(data, timeout=10), ""
    except grpc.RpcError as exc:
        return exc.code(), None, exc.details() or ""


def _check_answer(
    observation: pb.Observation, code: grpc.StatusCode, reply: bytes | None, details: str
) -> None:
    assert code in ALLOWED, (code, details)
    assert "Traceback" not in details
    if code == grpc.StatusCode.OK:
        assert reply is not None
        chunk = pb.ActionChunk.FromString(reply)
        assert chunk.request_id == observation.request_id
        assert len(chunk.actions) == 8 and all(len(a.joint_commands) == 7 for a in chunk.actions)


@FUZZ
@given(observation=observations())
def test_random_observations_get_a_clean_status(live, observation):
    _, _, channel = live
    code, reply, details = _unary_status(channel, observation.SerializeToString())
    _check_answer(observation, code, reply, details)


@FUZZ
@given(data=raw_requests())
def test_random_bytes_as_the_request_get_a_clean_status(live, data):
    _, _, channel = live
    code, _, details = _unary_status(channel, data)
    assert code in ALLOWED, (code, details)
    assert "Traceback" not in details


@settings(FUZZ, max_examples=25)
@given(
    frames=st.lists(
        st.one_of(raw_requests(), observations().map(lambda o: o.SerializeToString())), max_size=6
    )
)
def test_random_stream_frames_each_get_an_answer_and_the_stream_ends_ok(live, frames):
    _, _, channel = live
    call = channel.stream_stream(STREAM)
    replies = [pb.ActionChunk.FromString(r) for r in call(iter(frames), timeout=15)]
    # The stream ends OK (no exception above); each answer is a chunk or an inline error with a
    # clean code (stale observations may be skipped, so there can be fewer answers than frames).
    assert len(replies) <= len(frames)
    for reply in replies:
        if reply.HasField("error"):
            assert reply.error.code in {code.value[0] for code in ALLOWED}, reply.error
            assert "Traceback" not in reply.error.message
        else:
            assert len(reply.actions) == 8


def test_after_fuzzing_server_serves_correctly_with_bounded_memory(live):
    running, model, channel = live
    before = rss_kb()
    # one more burst of abuse, measured: memory must not grow with the number of bad requests
    rng = np.random.default_rng(5)
    for i in range(300):
        _unary_status(channel, rng.bytes(int(rng.integers(0, 3000))))
        bomb = make_observation(None, [0.0] * 7, "bomb", request_id=str(i))
        bomb.camera_image = BOMB_JPEG
        code, _, _ = _unary_status(channel, bomb.SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    growth = rss_kb() - before
    assert growth < RSS_GROWTH_LIMIT_KB, f"RSS grew by {growth} kB"
    assert running.server.engine is not None
    assert running.server.engine.in_flight == 0 and running.server.engine.sessions == 0
    with running.client() as client:
        assert client.health().state == "SERVING"
        image = (np.arange(16 * 16 * 3) % 200).astype(np.uint8).reshape(16, 16, 3)
        request = make_observation(None, [0.1] * 7, "after the fuzz", request_id="final", seed=42)
        request.camera_image = image.tobytes()
        request.camera_image_encoding = pb.IMAGE_ENCODING_RAW_RGB
        request.camera_image_width = request.camera_image_height = 16
        chunk = client.predict_observation(request)
    expected = expected_actions(
        model.prepare(
            Observation(
                images={"base": image},
                joint_positions=np.asarray([0.1] * 7, np.float32),
                instruction="after the fuzz",
                embodiment="",
                seed=42,
            )
        )
    )
    assert chunk.request_id == "final"
    np.testing.assert_allclose([a.joint_commands for a in chunk.actions], expected, rtol=1e-5, atol=1e-5)
