"""GR00T through the real gRPC server: load, warm-up, ModelInfo (layouts), both embodiments, errors.

A smoke test of the backend inside the server (the lead's server tests cover the transport).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import RunningServer
from tests.helpers.groot_checkpoints import write_tiny_groot_checkpoint
from vla_inference.client import VLAError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_groot_checkpoint(tmp_path_factory.mktemp("groot-server") / "tiny", seed=1)


def _image(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_serves_two_embodiments(server_factory: Callable[..., RunningServer], ckpt: Path) -> None:
    running = server_factory(model_type="groot", model_path=str(ckpt), batch_size=2, chunk_size=8)
    with running.client() as client:
        info = client.info()
        assert list(info.supported_embodiments) == ["gr1", "new_embodiment"]
        assert info.model_family == "groot" and info.model_horizon == 16 and info.chunk_size == 8
        assert dict(info.state_dims) == {"gr1": 6, "new_embodiment": 6}
        assert list(info.camera_names) == ["base", "left_wrist"]
        gr1 = ["left_arm.0", "left_arm.1", "right_arm.0", "right_arm.1", "left_hand.0", "right_hand.0"]
        assert list(info.state_layouts["gr1"].names) == gr1
        assert list(info.action_layouts["gr1"].names) == gr1
        assert list(info.action_layouts["new_embodiment"].names)[-1] == "gripper.0"
        assert "fourier_gr1_arms_only" in info.description

        gr1_chunk = client.predict(
            _image(0), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "pick up the cube", embodiment="gr1", seed=3
        )
        ne_chunk = client.predict(
            _image(1, 120, 90),  # another size than the metadata's 64 x 48: resized to it first
            [10, 10, 10, 10, 10, 10],
            "wave",
            embodiment="new_embodiment",
            cameras={"wrist": _image(2)},
            seed=4,
        )
        assert len(gr1_chunk.actions) == 8 and all(len(a.joint_commands) == 6 for a in gr1_chunk.actions)
        assert len(ne_chunk.actions) == 8 and all(len(a.joint_commands) == 6 for a in ne_chunk.actions)
        assert 0.0 < gr1_chunk.confidence <= 1.0

        with pytest.raises(VLAError) as err:
            client.predict(_image(0), [0.0] * 6, "go", embodiment="unitree_h1")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "embodiment_tag"
        assert "gr1" in err.value.message


def test_instruction_limit_names_the_proto_field(
    server_factory: Callable[..., RunningServer], ckpt: Path
) -> None:
    """VLA_MAX_INSTRUCTION_CHARS is checked once, in the transport, under the proto's field name."""
    running = server_factory(
        model_type="groot", model_path=str(ckpt), max_instruction_chars=10, warmup_batches=0
    )
    with running.client() as client, pytest.raises(VLAError) as err:
        client.predict(_image(0), [0.0] * 6, "pick up the red cube", embodiment="gr1")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field == "language_instruction" and "language_instruction" in err.value.message
