"""GR00T through the real gRPC server: load, warm-up, ModelInfo, both embodiments, errors.

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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_groot_checkpoint(tmp_path_factory.mktemp("groot-server") / "tiny", seed=1)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_serves_two_embodiments(server_factory: Callable[..., RunningServer], ckpt: Path) -> None:
    running = server_factory(model_type="groot", model_path=str(ckpt), batch_size=2, chunk_size=8)
    with running.client() as client:
        info = client.info()
        assert list(info.supported_embodiments) == ["gr1", "so100"]
        assert info.model_family == "groot" and info.model_horizon == 16 and info.chunk_size == 8
        assert dict(info.state_dims) == {"gr1": 5, "so100": 6}
        assert list(info.camera_names) == ["base", "left_wrist"]

        gr1 = client.predict(
            _image(0), [0.1, 0.2, 0.3, 0.4, 0.5], "pick up the cube", embodiment="gr1", seed=3
        )
        so100 = client.predict(
            _image(1),
            [10, 10, 10, 10, 10, 10],
            "wave",
            embodiment="so100",
            cameras={"wrist": _image(2)},
            seed=4,
        )
        assert len(gr1.actions) == 8 and all(len(a.joint_commands) == 5 for a in gr1.actions)
        assert len(so100.actions) == 8 and all(len(a.joint_commands) == 6 for a in so100.actions)
        assert 0.0 < gr1.confidence <= 1.0

        with pytest.raises(grpc.RpcError) as err:
            client.predict(_image(0), [0.0] * 5, "go", embodiment="unitree_h1")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "gr1" in (err.value.details() or "")
