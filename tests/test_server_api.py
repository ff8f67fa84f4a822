"""The gRPC API over a real channel: each RPC, bad input, health, reflection, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.toy_model import ToyPolicy
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.client import AsyncVLAClient, VLAClient, VLAError, chunk_error, make_observation
from vla_inference.config import Settings
from vla_inference.models.base import Observation, PreparedSample
from vla_inference.preprocessing.images import encode_jpeg

IMAGE = (np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
JOINTS = [0.1, -0.2, 0.3, 0.0, 0.5, -0.5, 1.0]


@pytest.fixture
def toy(server_factory):
    return server_factory(ToyPolicy, chunk_size=5)


def test_predict_returns_chunk_with_echoes_and_timing(toy):
    with toy.client() as client:
        chunk = client.predict(IMAGE, JOINTS, "pick up the red cup", request_id="r-1", timestamp=12.5, seed=7)
    assert chunk.request_id == "r-1"
    assert chunk.observation_timestamp == 12.5
    assert chunk.model_name == "toy-policy"
    assert len(chunk.actions) == 5  # min(VLA_CHUNK_SIZE=5, horizon 8)
    assert all(len(a.joint_commands) == 7 for a in chunk.actions)
    assert chunk.confidence == pytest.approx(0.5)
    t = chunk.timing
    assert t.batch_size == 1
    assert t.total_ms > 0 and t.decode_ms > 0
    assert t.total_ms >= t.model_ms
    assert chunk.inference_time_ms == pytest.approx(t.total_ms)


def test_same_seed_same_answer_and_other_seed_differs(toy):
    with toy.client() as client:
        a = client.predict(IMAGE, JOINTS, "x", seed=1)
        b = client.predict(IMAGE, JOINTS, "x", seed=1)
        c = client.predict(IMAGE, JOINTS, "x", seed=2)
    assert a.actions == b.actions
    assert a.actions != c.actions


def test_png_raw_and_named_cameras_are_accepted(toy):
    with toy.client() as client:
        jpeg = client.predict(IMAGE, JOINTS, "x", seed=3)
        raw = make_observation(None, JOINTS, "x", seed=3)
        raw.camera_image = IMAGE.tobytes()
        raw.camera_image_encoding = pb.IMAGE_ENCODING_RAW_RGB
        raw.camera_image_width, raw.camera_image_height = 64, 48
        raw_chunk = client.predict_observation(raw)
        wrist = client.predict(IMAGE, JOINTS, "x", seed=3, cameras={"wrist": IMAGE})
        only_named = client.predict(None, JOINTS, "x", seed=3, cameras={"base": IMAGE})
    # JPEG is lossy; raw is exact: both close, same shape
    assert len(raw_chunk.actions) == len(jpeg.actions) == len(wrist.actions) == len(only_named.actions)
    assert np.allclose(
        [a.joint_commands for a in raw_chunk.actions], [a.joint_commands for a in jpeg.actions], atol=0.02
    )


def test_get_model_info(toy):
    with toy.client() as client:
        info = client.info()
    assert info.model_name == "toy-policy"
    assert info.action_dim == 7 and info.chunk_size == 5 and info.model_horizon == 8
    assert list(info.supported_embodiments) == ["arm7", "arm6"]
    assert info.state_dims["arm6"] == 6
    assert info.device == "cpu"
    assert list(info.camera_names) == ["base", "left_wrist"]


def test_health_check_rpc(toy):
    with toy.client() as client:
        status = client.health()
    assert status.ready and status.state == "SERVING"
    assert status.uptime_seconds > 0
    assert status.queue_depth == 0
    assert status.model_name == "toy-policy"


def _bad(client, **changes):
    observation = make_observation(IMAGE, JOINTS, "do it", seed=1)
    for key, value in changes.items():
        if key == "joints":
            del observation.joint_positions[:]
            observation.joint_positions.extend(value)
        elif key == "velocities":
            observation.joint_velocities.extend(value)
        elif key in ("cameras", "history"):
            getattr(observation, key).extend(value)
        else:
            setattr(observation, key, value)
    with pytest.raises(VLAError) as info:
        client.predict_observation(observation)
    return info.value


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"camera_image": b""}, "camera_image", "no image"),
        ({"camera_image": b"not a jpeg at all"}, "camera_image", "not a decodable JPEG"),
        ({"camera_image": encode_jpeg(IMAGE)[:200]}, "camera_image", "not a decodable JPEG"),
        ({"joints": [float("nan")] * 7}, "joint_positions", "value 0 is nan: every value must be finite"),
        ({"joints": [0.0, 1.0, 2.0, float("inf"), float("nan"), 0, 0]}, "joint_positions", "value 3 is inf"),
        ({"velocities": [0.0] * 6 + [float("-inf")]}, "joint_velocities", "value 6 is -inf"),
        ({"joints": [0.0] * 3}, "joint_positions", "expected 7"),
        ({"velocities": [0.0] * 2}, "joint_velocities", "expected 0 or 7"),
        ({"embodiment_tag": "unitree_h1"}, "embodiment_tag", "arm7, arm6"),
        ({"language_instruction": "x" * 5000}, "language_instruction", "over the limit"),
        (
            {"cameras": [pb.CameraImage(name="ceiling", data=encode_jpeg(IMAGE))]},
            "cameras[0].name",
            "unknown camera",
        ),
        (
            {
                "camera_image_encoding": pb.IMAGE_ENCODING_RAW_RGB,
                "camera_image_width": 10,
                "camera_image_height": 10,
            },
            "camera_image",
            "needs 300 bytes",
        ),
        ({"camera_image_encoding": 42}, "camera_image_encoding", "unknown image encoding"),
        ({"request_id": "r" * 500}, "request_id", "128"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(toy, changes, field, words):
    with toy.client() as client:
        error = _bad(client, **changes)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == field
        assert words in error.message and str(error) == f"INVALID_ARGUMENT: {error.message}"
        assert "Traceback" not in error.message
        assert "tjDecompress" not in error.message and "()" not in error.message  # no libjpeg internals
        assert isinstance(error.__cause__, grpc.RpcError)  # gRPC's own error stays reachable
        assert error.__cause__.code() == error.code
        assert len(client.predict(IMAGE, JOINTS, "still serving").actions) == 5


def test_errors_are_vla_errors_on_async_calls_and_streams(toy):
    """One exception type everywhere: async unary calls, streams, control sessions; a refused stream
    observation is an inline error that chunk_error turns into the same type."""
    bad = make_observation(IMAGE, [0.0] * 3, "x")
    with toy.client() as client, client.control() as session:
        answer = session.act(bad)
        assert len(answer.actions) == 0
        inline = chunk_error(answer)
        assert inline is not None and inline.field == "joint_positions" and "expected 7" in inline.message
        assert chunk_error(session.act(make_observation(IMAGE, JOINTS, "ok"))) is None
    nowhere = "127.0.0.1:1"  # nothing listens: every call fails UNAVAILABLE, at once
    with VLAClient(nowhere, timeout=5) as client, pytest.raises(VLAError) as info:
        list(client.stream(iter([make_observation(IMAGE, JOINTS, "ok")])))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and isinstance(info.value.__cause__, grpc.RpcError)

    async def scenario() -> tuple[VLAError, VLAError]:
        async with AsyncVLAClient(toy.target) as client:
            with pytest.raises(VLAError) as unary:
                await client.predict(IMAGE, JOINTS, "x", embodiment="nope")
        async with AsyncVLAClient(nowhere, timeout=5) as client:
            stream = client.stream()
            with pytest.raises(VLAError) as streamed:
                await stream.write(make_observation(IMAGE, JOINTS, "ok"))
                await stream.read()
            return unary.value, streamed.value

    unary, streamed = asyncio.run(scenario())
    assert unary.code == grpc.StatusCode.INVALID_ARGUMENT and unary.field == "embodiment_tag"
    assert streamed.code == grpc.StatusCode.UNAVAILABLE


def test_image_over_pixel_cap_is_refused(server_factory):
    running = server_factory(ToyPolicy, max_image_pixels=32 * 32)
    with running.client() as client:
        error = _bad(client)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "camera_image"
    assert "over the limit" in error.message and "VLA_MAX_IMAGE_PIXELS" in error.message


def test_message_size_limit_applies(server_factory):
    running = server_factory(ToyPolicy, max_message_size_mb=1)
    big = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    observation = make_observation(None, JOINTS, "x")
    observation.camera_image = big.tobytes()
    observation.camera_image_encoding = pb.IMAGE_ENCODING_RAW_RGB
    observation.camera_image_width = observation.camera_image_height = 1024
    with running.client(max_message_mb=8) as client:
        with pytest.raises(VLAError) as info:
            client.predict_observation(observation)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(client.predict(IMAGE, JOINTS, "x").actions) == 8


def test_client_refuses_an_image_over_the_message_limit_before_sending(toy):
    """gRPC's own refusal says "Sent message larger than max"; the client names the field and the setting."""
    big = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    observation = make_observation(None, JOINTS, "x", cameras={"wrist": big})
    observation.camera_image = encode_jpeg(IMAGE)
    before = toy.server.engine.in_flight
    with toy.client(max_message_mb=1) as client:
        for send in (
            lambda: client.predict_observation(observation),
            lambda: list(client.stream(iter([observation]))),
            lambda: client.control().act(observation),
        ):
            with pytest.raises(VLAError) as info:
                send()
            error = info.value
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.field == "cameras[0]"
            assert "VLA_MAX_MESSAGE_SIZE_MB" in error.message and "1 MiB" in error.message
            assert error.__cause__ is None  # refused here: nothing was sent
        assert len(client.predict(IMAGE, JOINTS, "small").actions) == 5
    assert toy.server.engine.in_flight == before


def test_model_failure_is_internal_without_traceback(toy):
    with toy.client() as client:
        error = _bad(client, language_instruction="fail")
        assert error.code == grpc.StatusCode.INTERNAL and error.field is None
        assert "see server log" in error.message
        assert "Traceback" not in error.message and "simulated" not in error.message
        assert client.health().ready


def test_standard_health_service_and_reflection(toy):
    channel = grpc.insecure_channel(toy.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "vla_inference.v1.VLAInference"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"vla_inference.v1.VLAInference", "grpc.health.v1.Health"} <= names
    channel.close()


def test_health_not_serving_while_loading(server_factory):
    import threading

    gate = threading.Event()

    class SlowLoading(ToyPolicy):
        def load(self, checkpoint_path, device):
            gate.wait(20)
            super().load(checkpoint_path, device)

    running = server_factory(SlowLoading, wait=False)
    import time

    for _ in range(200):
        if running.server.port:
            break
        time.sleep(0.02)
    channel = grpc.insecure_channel(running.target)
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with running.client() as client:
        with pytest.raises(VLAError) as info:
            client.predict(IMAGE, JOINTS, "x")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert client.health().state == "LOADING"
    gate.set()
    for _ in range(300):
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            break
        time.sleep(0.02)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


# Every metric the server exports, with its Prometheus type: the scrape must have exactly these.
METRICS = {
    "vla_inference_latency_seconds": "histogram",
    "vla_inference_requests": "counter",
    "vla_batch_size": "histogram",
    "vla_gpu_utilization_percent": "gauge",
    "vla_gpu_memory_used_bytes": "gauge",
    "vla_gpu_memory_total_bytes": "gauge",
    "vla_queue_depth": "gauge",
    "vla_uptime_seconds": "gauge",
    "vla_model_info": "gauge",  # an Info, exposed as a gauge of value 1 with the labels
    "vla_queue_duration_seconds": "histogram",
    "vla_model_duration_seconds": "histogram",
    "vla_preprocess_duration_seconds": "histogram",
    "vla_stream_observations_skipped": "counter",
    "vla_active_streams": "gauge",
    "vla_requests_in_flight": "gauge",
    "vla_openpi_connections": "gauge",  # 0 unless VLA_OPENPI_PORT serves openpi clients
}


def test_metrics_scrape_has_every_metric_live(toy):
    with toy.client() as client:
        client.predict(IMAGE, JOINTS, "x")
        _bad(client, joints=[1.0])
    text = urllib.request.urlopen(toy.metrics_url, timeout=5).read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    exported = {f.name: f.type for f in text_string_to_metric_families(text)}
    exported = {k: v for k, v in exported.items() if k.startswith("vla_") and not k.endswith("_created")}
    assert exported == METRICS
    # the `model` label is a short stable id (family / checkpoint), not the display name
    requests = 'vla_inference_requests_total{model="toy/embedded-random",protocol="grpc",status='
    assert requests + '"OK"} 1.0' in text
    assert requests + '"INVALID_ARGUMENT"} 1.0' in text
    latency = '{embodiment="arm7",model="toy/embedded-random",protocol="grpc"}'
    assert f"vla_inference_latency_seconds_count{latency} 1.0" in text
    assert (
        'vla_model_info{device="cpu",dtype="float32",family="toy",id="toy/embedded-random",'
        'name="toy-policy",version="1"} 1.0' in text
    )
    # warm-up (1 batch) + 1 request
    assert "vla_batch_size_count 1.0" in text
    assert "vla_preprocess_duration_seconds_count 1.0" in text  # the bad one failed in preprocessing
    uptime = [line for line in text.splitlines() if line.startswith("vla_uptime_seconds ")]
    assert float(uptime[0].split()[1]) > 0


def test_empty_request_types(toy):
    channel = grpc.insecure_channel(toy.target)
    from vla_inference.api.v1 import vla_inference_pb2_grpc as pb_grpc

    stub = pb_grpc.VLAInferenceStub(channel)
    assert stub.GetModelInfo(empty_pb2.Empty(), timeout=5).model_name == "toy-policy"
    channel.close()


def test_a_missing_instruction_is_invalid_argument_unless_allowed(server_factory, caplog):
    strict = server_factory(ToyPolicy)
    with strict.client() as client:
        for text in ("", "   "):
            error = _bad(client, language_instruction=text)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "language_instruction"
            assert error.message.startswith(
                "invalid observation: language_instruction: the model needs a language instruction"
            )
            assert "VLA_ALLOW_EMPTY_INSTRUCTION=true" in error.message
        with client.control() as session:
            inline = session.act(make_observation(IMAGE, JOINTS, "", request_id="s-1"))
        assert inline.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "language_instruction: the model needs a language instruction" in inline.error.message
    assert "" not in strict.server.model.seen_instructions

    caplog.set_level(logging.WARNING, logger="vla_inference.engine")
    lenient = server_factory(ToyPolicy, allow_empty_instruction=True)
    with lenient.client() as client:
        for _ in range(2):
            assert len(client.predict(IMAGE, JOINTS, "").actions) == 8
        for stream in range(2):
            with client.control() as session:
                for step in range(2):
                    chunk = session.act(make_observation(IMAGE, JOINTS, " ", request_id=f"{stream}-{step}"))
                    assert not chunk.HasField("error") and len(chunk.actions) == 8
    assert lenient.server.model.seen_instructions.count("") == 2  # as sent: nothing invented
    assert lenient.server.model.seen_instructions.count(" ") == 4
    warnings = [r.getMessage() for r in caplog.records if "without a language instruction" in r.getMessage()]
    # once for unary calls (per process), once per stream
    assert len(warnings) == 3, warnings
    assert sum("once per stream" in w for w in warnings) == 2


class HistoryToy(ToyPolicy):
    """A toy that reads the frame and the state 3 steps earlier (as GR00T N1.7's DROID embodiment
    reads video [-15, 0])."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.past: list[tuple[dict[int, tuple[str, ...]], dict[int, list[float]]]] = []

    def load(self, checkpoint_path: str | None, device: str) -> None:
        super().load(checkpoint_path, device)
        assert self._info is not None
        self._info = dataclasses.replace(
            self._info, image_history={"arm7": (-3,)}, state_history={"arm7": (-3,)}
        )

    def prepare(self, observation: Observation) -> PreparedSample:
        self.past.append(
            (
                {k: tuple(sorted(v)) for k, v in observation.past_images.items()},
                {k: v.tolist() for k, v in observation.past_joint_positions.items()},
            )
        )
        return super().prepare(observation)


def test_history_reaches_a_model_that_reads_one_and_is_refused_by_others(server_factory, toy) -> None:
    server = server_factory(HistoryToy)
    with server.client() as client:
        info = client.info()
        assert list(info.image_history["arm7"].offsets) == [-3]
        assert list(info.state_history["arm7"].offsets) == [-3]
        observation = make_observation(IMAGE, JOINTS, "do it", seed=1)
        past = observation.history.add(offset=-3, joint_positions=[0.5] * 7)
        past.cameras.append(pb.CameraImage(name="base", data=encode_jpeg(IMAGE)))
        client.predict_observation(observation)
    assert server.server.model.past[-1] == ({-3: ("base",)}, {-3: [0.5] * 7})
    with toy.client() as plain:
        error = _bad(plain, history=[pb.PastStep(offset=-3)])
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field == "history"
    assert "reads no history" in error.message
