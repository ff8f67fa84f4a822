"""GR00T N1.7 through the real gRPC server on an ephemeral port (the tiny NVIDIA-format checkpoint):
the version told by config.json with VLA_MODEL_TYPE unset, ModelInfo (layouts, history offsets),
Predict per embodiment, a Predict without the history its embodiment reads refused naming the
history and the offsets, and StreamControl filling that history from the stream's earlier
observations exactly as a Predict that sends it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.conftest import RunningServer, make_settings, start_server
from tests.helpers.groot17_checkpoints import write_tiny_groot17_checkpoint
from vla_inference.client import VLAError, make_observation
from vla_inference.models.base import Observation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DROID = "oxe_droid_relative_eef_relative_joint"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_groot17_checkpoint(tmp_path_factory.mktemp("groot17-server") / "tiny", seed=7)


def _image(seed: int, height: int = 36, width: int = 44) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _actions(chunk: object) -> np.ndarray:
    return np.asarray([list(a.joint_commands) for a in chunk.actions])  # type: ignore[attr-defined]


def test_serves_n17_told_from_its_config(server_factory: Callable[..., RunningServer], ckpt: Path) -> None:
    running = server_factory(model_path=str(ckpt), batch_size=2, chunk_size=8)  # VLA_MODEL_TYPE unset
    with running.client() as client:
        info = client.info()
        assert info.model_family == "groot" and info.model_version == "gr00t-n1.7"
        assert list(info.supported_embodiments) == ["libero_sim", DROID]
        assert info.model_horizon == 16 and info.chunk_size == 8
        assert dict(info.state_dims) == {"libero_sim": 7, DROID: 5}
        assert list(info.camera_names) == ["base", "left_wrist"]
        assert list(info.action_layouts[DROID].names) == [
            *(f"joint_position.{i}" for i in range(4)),
            "gripper_position.0",
        ]
        assert {k: list(v.offsets) for k, v in info.image_history.items()} == {DROID: [-15]}
        assert dict(info.state_history) == {}

        libero = client.predict(
            _image(0), [0.1] * 7, "Pick up the cube!", cameras={"wrist": _image(1, 32, 32)}, seed=3
        )
        assert _actions(libero).shape == (8, 7) and 0.0 < libero.confidence <= 1.0

        with pytest.raises(VLAError) as err:
            client.predict(_image(2), [0.2] * 5, "open the drawer", embodiment=DROID, seed=4)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "history"
        assert "[-15]" in err.value.message and DROID in err.value.message

        droid = client.predict(
            _image(2),
            [0.2] * 5,
            "open the drawer",
            embodiment=DROID,
            seed=4,
            history={-15: {"base": _image(3)}},
        )
        assert _actions(droid).shape == (8, 5)


def _lockstep(client: object, observations: list[object]) -> list[object]:
    """A StreamControl stream that sends each observation once the previous one is answered."""
    outbox: queue.Queue[object] = queue.Queue()

    def requests() -> Iterator[object]:
        while (item := outbox.get()) is not None:
            yield item

    answers = []
    outbox.put(observations[0])
    stream = client.stream(requests(), timeout=120)  # type: ignore[attr-defined]
    for index in range(len(observations)):
        answers.append(next(stream))
        outbox.put(observations[index + 1] if index + 1 < len(observations) else None)
    return answers


def test_a_stream_fills_the_history_as_predict_sends_it(
    server_factory: Callable[..., RunningServer], ckpt: Path
) -> None:
    running = server_factory(model_type="groot", model_path=str(ckpt), chunk_size=16)
    frames = [_image(100 + i) for i in range(17)]
    joints = [[0.01 * i, 0.2, -0.1, 0.3, 0.5] for i in range(17)]

    def observation(i: int, **kw: object) -> object:
        return make_observation(
            frames[i], joints[i], "open the drawer", embodiment=DROID, seed=9, request_id=f"o{i}", **kw
        )

    with running.client() as client:
        streamed = _lockstep(client, [observation(i) for i in range(17)])
        assert [chunk.request_id for chunk in streamed] == [f"o{i}" for i in range(17)]  # type: ignore[attr-defined]
        assert not any(chunk.HasField("error") for chunk in streamed)  # type: ignore[attr-defined]

        def predicted(i: int, past: int) -> np.ndarray:
            return _actions(client.predict_observation(observation(i, history={-15: {"base": frames[past]}})))

        # Fewer than 15 observations before: the stream's first stands in for step -15.
        np.testing.assert_allclose(_actions(streamed[0]), predicted(0, 0), rtol=0, atol=1e-6)
        np.testing.assert_allclose(_actions(streamed[5]), predicted(5, 0), rtol=0, atol=1e-6)
        # The 17th observation's step -15 is the 2nd observation.
        np.testing.assert_allclose(_actions(streamed[16]), predicted(16, 1), rtol=0, atol=1e-6)
        assert np.abs(_actions(streamed[16]) - predicted(16, 0)).max() > 1e-4  # the frame matters

        # What an observation sends wins over the stream's own.
        sent = _lockstep(client, [observation(0), observation(1, history={-15: {"base": frames[7]}})])
        np.testing.assert_allclose(_actions(sent[1]), predicted(1, 7), rtol=0, atol=1e-6)


def test_streams_keep_their_own_history(server_factory: Callable[..., RunningServer], ckpt: Path) -> None:
    """Two robots streaming at once: each stream's step -15 comes from its own first observation."""
    running = server_factory(model_type="groot", model_path=str(ckpt), batch_size=2, chunk_size=4)
    results: dict[int, list[object]] = {}

    with running.client() as client:

        def robot(k: int) -> None:
            observations = [
                make_observation(
                    _image(200 + 10 * k + i), [0.1 * k] * 5, "open the drawer", embodiment=DROID, seed=k
                )
                for i in range(3)
            ]
            results[k] = _lockstep(client, observations)

        threads = [threading.Thread(target=robot, args=(k,)) for k in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for k in (1, 2):
            expected = client.predict_observation(
                make_observation(
                    _image(200 + 10 * k + 2),
                    [0.1 * k] * 5,
                    "open the drawer",
                    embodiment=DROID,
                    seed=k,
                    history={-15: {"base": _image(200 + 10 * k)}},
                )
            )
            np.testing.assert_allclose(_actions(results[k][2]), _actions(expected), rtol=0, atol=1e-6)


def test_nvidias_client_reaches_n17_over_zeromq(ckpt: Path) -> None:
    """Isaac-GR00T's Gr00tPolicy format (nested, (B, T, ...)) through the ZeroMQ endpoint: the DROID
    embodiment's two frames on the time axis are the frame 15 steps back and the current one, its
    state and action keys are the checkpoint's, and the answer is the model's for that observation."""
    from tests.test_groot_zmq import Client

    settings = make_settings(
        model_type="groot", model_path=str(ckpt), groot_port=0, groot_embodiment=DROID, chunk_size=16
    )
    running = start_server(settings)
    client = Client(running.server.groot_port, token=None)
    try:
        modalities = client.call("get_modality_config", {})
        config = {name: entry["as_json"] for name, entry in modalities.items()}
        assert config["video"]["delta_indices"] == [-15, 0]
        assert config["video"]["modality_keys"] == ["exterior_image_1_left"]  # the checkpoint's own key
        assert config["state"]["modality_keys"] == ["joint_position", "gripper_position"]
        assert config["action"]["modality_keys"] == ["joint_position", "gripper_position"]
        earlier, now = _image(300), _image(301)
        joints, gripper = np.array([0.1, -0.2, 0.3, 0.0], np.float32), np.array([0.5], np.float32)
        obs = {
            "video": {"exterior_image_1_left": np.stack([earlier, now])[None]},
            "state": {"joint_position": joints[None, None], "gripper_position": gripper[None, None]},
            "language": {"annotation.language.language_instruction": [["open the drawer"]]},
        }
        action, info = client.call("get_action", {"observation": obs, "options": {"seed": 11}})
        assert info["embodiment"] == DROID
        expected = running.server.model.predict(
            Observation(
                images={"base": now},
                joint_positions=np.concatenate([joints, gripper]),
                instruction="open the drawer",
                embodiment=DROID,
                seed=11,
                past_images={-15: {"base": earlier}},
            )
        ).actions
        assert action["joint_position"].shape == (1, 16, 4) and action["gripper_position"].shape == (1, 16, 1)
        got = np.concatenate([action["joint_position"][0], action["gripper_position"][0]], axis=-1)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    finally:
        client.close()
        running.stop(grace_s=1.0)
