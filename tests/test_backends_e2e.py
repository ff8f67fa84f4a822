"""Every registered backend served end to end: a tiny random checkpoint in the real on-disk format,
loaded through VLA_MODEL_PATH by the registry, answering Predict and StreamControl over gRPC.
The embedded demo model is served the way `make run` serves it (no VLA_MODEL_PATH)."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from vla_inference.client import VLAError, make_observation
from vla_inference.models.registry import available_model_types

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 255, (180, 240, 3), dtype=np.uint8)  # not the model's size: resized by the model


def _predict_and_stream(running, joints, *, embodiment="", cameras=None):
    with running.client(timeout=60) as client:
        info = client.info()
        first = client.predict(
            IMAGE, joints, "pick up the red cup", seed=5, embodiment=embodiment, cameras=cameras
        )
        again = client.predict(
            IMAGE, joints, "pick up the red cup", seed=5, embodiment=embodiment, cameras=cameras
        )
        frames = [
            make_observation(
                IMAGE,
                joints,
                "pick up the red cup",
                request_id=f"f{i}",
                seed=5,
                embodiment=embodiment,
                cameras=cameras,
            )
            for i in range(3)
        ]

        def paced():
            for frame in frames:
                yield frame
                time.sleep(0.01)

        streamed = list(client.stream(paced(), timeout=120))
    assert len(first.actions) == info.chunk_size
    assert first.actions == again.actions  # same seed, same answer
    values = np.array([a.joint_commands for a in first.actions])
    assert np.all(np.isfinite(values))
    assert streamed and streamed[-1].request_id == "f2"
    assert all(not c.HasField("error") for c in streamed)
    return info, first


def test_registry_lists_only_real_backends():
    assert available_model_types() == ["groot", "openvla", "pi0", "smolvla"]


def test_random_demo_model_serves_when_asked(server_factory):
    running = server_factory(chunk_size=10, embedded_model="random")
    info, chunk = _predict_and_stream(running, [0.0] * 7, cameras={"wrist": IMAGE})
    assert info.demo and "not a trained policy" in info.model_name
    assert info.model_family == "pi0"
    assert info.action_dim == 7 and info.chunk_size == 10
    assert len(chunk.actions[0].joint_commands) == 7
    assert chunk.model_name == info.model_name


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_pi0_openpi_checkpoint(server_factory, tmp_path, variant):
    from tests.helpers.pi0_checkpoints import write_tiny_openpi_checkpoint

    path = write_tiny_openpi_checkpoint(tmp_path / variant, variant=variant, state_dim=8, action_dim=6)
    running = server_factory(model_type="pi0", model_path=str(path))
    info, chunk = _predict_and_stream(running, [0.1] * 8)
    assert not info.demo and info.model_family == ("pi05" if variant == "pi05" else "pi0")
    assert info.action_dim == 6 and dict(info.state_dims) == {"demo": 8}
    assert len(chunk.actions[0].joint_commands) == 6
    with running.client() as client, pytest.raises(VLAError) as error:
        client.predict(IMAGE, [0.1] * 7, "x")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.field == "joint_positions"
    assert "expected 8" in error.value.message


def test_pi0_lerobot_checkpoint(server_factory, tmp_path):
    from tests.helpers.pi0_checkpoints import write_tiny_lerobot_checkpoint

    path = tmp_path / "lerobot"
    write_tiny_lerobot_checkpoint(path, variant="pi0", with_tokenizer=True)
    running = server_factory(model_type="pi0", model_path=str(path))
    _predict_and_stream(running, [0.0] * 7)


def test_openvla_checkpoint(server_factory, tmp_path):
    from tests.helpers.openvla_checkpoints import write_tiny_openvla_checkpoint

    path = write_tiny_openvla_checkpoint(tmp_path / "openvla", datasets=("bridge_orig",))
    running = server_factory(model_type="openvla", model_path=str(path), chunk_size=16)
    info, chunk = _predict_and_stream(running, [])
    assert info.model_family == "openvla"
    assert info.chunk_size == 1 and info.model_horizon == 1  # one action per step whatever VLA_CHUNK_SIZE
    assert len(chunk.actions) == 1 and len(chunk.actions[0].joint_commands) == 7
    assert 0.0 < chunk.confidence <= 1.0


def test_groot_checkpoint_two_embodiments(server_factory, tmp_path):
    from tests.helpers.groot_checkpoints import write_tiny_groot_checkpoint

    path = write_tiny_groot_checkpoint(tmp_path / "groot", embodiments=("gr1", "new_embodiment"))
    running = server_factory(model_type="groot", model_path=str(path))
    with running.client() as client:
        info = client.info()
    assert set(info.supported_embodiments) == {"gr1", "new_embodiment"}
    dims = dict(info.state_dims)
    for tag in ("gr1", "new_embodiment"):
        cameras = {"wrist": IMAGE} if tag == "new_embodiment" else None  # it has a wrist camera too
        _, chunk = _predict_and_stream(running, [0.05] * dims[tag], embodiment=tag, cameras=cameras)
        assert len(chunk.actions) == min(16, info.chunk_size)
    with running.client() as client, pytest.raises(VLAError) as error:
        client.predict(IMAGE, [0.0] * dims["gr1"], "x", embodiment="unitree_h1")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "gr1" in error.value.message and "new_embodiment" in error.value.message
