"""A tiny LeRobot-format SmolVLA checkpoint through the real gRPC server on an ephemeral port: the
family told from config.json, ModelInfo, Predict (the same numbers as the policy in-process),
StreamControl with real-time chunking, and errors naming their field."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningServer
from tests.helpers.smolvla_checkpoints import write_tiny_smolvla
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.client import VLAError, make_observation
from vla_inference.config import Settings
from vla_inference.models.base import Observation
from vla_inference.models.smolvla.policy import SmolVLAPolicy

JOINTS = [0.1, -0.2, 0.3, 0.0, 0.5, -0.4]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_smolvla(tmp_path_factory.mktemp("smolvla-server") / "tiny", seed=2)


def _image(seed: int, height: int = 48, width: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _actions(chunk: pb.ActionChunk) -> np.ndarray:
    return np.array([a.joint_commands for a in chunk.actions])


def test_predict_and_model_info(server_factory: Callable[..., RunningServer], ckpt: Path) -> None:
    running = server_factory(model_path=str(ckpt), batch_size=2, chunk_size=50)  # no VLA_MODEL_TYPE
    base, wrist = _image(0), _image(1, 96, 128)
    with running.client() as client:
        info = client.info()
        assert info.model_family == "smolvla" and info.model_name == "smolvla tiny"
        assert list(info.camera_names) == ["base", "camera2"]
        assert dict(info.state_dims) == {"default": 6} and info.action_dim == 5
        assert (info.chunk_size, info.model_horizon) == (6, 6)
        assert list(info.rtc_methods) == ["none", "guided", "hard"]
        assert "observation.images.camera2" in info.description
        chunk = client.predict(
            _png(base), JOINTS, "pick up the red cube", cameras={"camera2": _png(wrist)}, seed=3
        )
        with pytest.raises(VLAError) as err:
            client.predict(_png(base), JOINTS, "go", cameras={"top": _png(wrist)})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field.startswith("cameras")
        assert "base, camera2" in err.value.message
        with pytest.raises(VLAError) as err:
            client.predict(_png(base), JOINTS[:5], "go")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "joint_positions"
    served = _actions(chunk)
    assert served.shape == (6, 5) and 0.0 < chunk.confidence <= 1.0

    policy = SmolVLAPolicy(Settings(chunk_size=50))  # the same request in-process (PNG is lossless)
    policy.load(str(ckpt), "cpu")
    images = {"base": base, "camera2": wrist}
    expected = policy.predict(Observation(images, np.float32(JOINTS), "pick up the red cube", seed=3))
    np.testing.assert_allclose(served, expected.actions, atol=1e-5, rtol=0)


def test_stream_control_with_real_time_chunking(
    server_factory: Callable[..., RunningServer], ckpt: Path
) -> None:
    running = server_factory(model_path=str(ckpt), model_type="smolvla", chunk_size=50)
    image = _png(_image(4))

    def observation(request_id: str, seed: int, **rtc: object) -> pb.Observation:
        obs = make_observation(image, JOINTS, "stack the blocks", request_id=request_id, seed=seed)
        if rtc:
            obs.rtc.CopyFrom(pb.RealTimeChunking(**rtc))  # type: ignore[arg-type]
        return obs

    with running.client() as client, client.control() as session:
        first = session.act(observation("a", 1))
        hard = session.act(
            observation("b", 2, method=pb.RTC_METHOD_HARD, executed_actions=1, delay_actions=3)
        )
        guided = session.act(
            observation(
                "c",
                3,
                method=pb.RTC_METHOD_GUIDED,
                executed_actions=1,
                delay_actions=2,
                previous_request_id="a",
            )
        )
        plain = session.act(observation("d", 3))
    a, b, c, d = (_actions(x) for x in (first, hard, guided, plain))
    assert hard.rtc.method == pb.RTC_METHOD_HARD and hard.rtc.delay_actions == 3
    assert hard.rtc.overlap_actions == 5  # the horizon (6) less the executed action
    np.testing.assert_allclose(b[:3], a[1:4], atol=1e-4)  # the committed actions, kept
    assert guided.rtc.method == pb.RTC_METHOD_GUIDED and guided.rtc.delay_actions == 2
    assert np.abs(c[:2] - a[1:3]).mean() < 0.5 * np.abs(d[:2] - a[1:3]).mean()  # pulled toward "a"
