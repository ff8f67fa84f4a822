"""The GR00T ZeroMQ endpoint (transport/groot_zmq/: codec, layouts, endpoint; VLA_GROOT_PORT).

The client is written here from the protocol (Isaac-GR00T's gr00t/eval/service.py for N1.5 and
gr00t/policy/server_client.py for N1.6 / N1.7): a pyzmq REQ socket sending msgpack maps
{"endpoint", "data", "api_token"}, with numpy arrays as .npy bytes or in msgpack-numpy's form, read
back with np.load(allow_pickle=False). Servers are real, on ephemeral ports, serving a tiny GR00T
N1.5 checkpoint (gr1: one camera ego_view, state/actions left_arm 2, right_arm 2, left_hand 1,
right_hand 1; new_embodiment: cameras front and wrist, single_arm 5 + gripper 1). Expected actions
come from the same model in-process with the same seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import pickle
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, make_settings, start_server
from tests.helpers.groot_checkpoints import write_tiny_groot_checkpoint
from vla_inference.client import ChannelSecurity
from vla_inference.config import Settings
from vla_inference.models.base import InvalidObservation, ModelDescription, Observation
from vla_inference.models.groot.policy import GrootLoaded, GrootPolicy, camera_roles
from vla_inference.transport.groot_zmq import codec, layouts
from vla_inference.transport.servicer import ServerState

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "groot-endpoint-test-token-0123"
GR1 = {"left_arm": 2, "right_arm": 2, "left_hand": 1, "right_hand": 1}  # fourier_gr1_arms_only, in order
NEW = {"single_arm": 5, "gripper": 1}
TASK = "annotation.human.action.task_description"
HORIZON = 16
SETTINGS = make_settings()


# ---- the client, from the protocol -------------------------------------------------------------


def as_npy(array: np.ndarray) -> dict[str, Any]:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return {"__ndarray_class__": True, "as_npy": out.getvalue()}


def as_mnp(array: np.ndarray) -> dict[bytes, Any]:
    array = np.ascontiguousarray(array)
    return {
        b"nd": True,
        b"type": array.dtype.str,
        b"kind": b"",
        b"shape": list(array.shape),
        b"data": array.tobytes(),
    }


def client_decode(obj: dict[Any, Any]) -> Any:
    if "__ndarray_class__" in obj:
        return ("npy", np.load(io.BytesIO(obj["as_npy"]), allow_pickle=False))
    if b"nd" in obj:
        return ("mnp", np.frombuffer(obj[b"data"], dtype=np.dtype(obj[b"type"])).reshape(obj[b"shape"]))
    return obj


def arrays(obj: Any) -> Any:
    """A decoded answer with the (form, array) pairs replaced by the arrays; the forms collected."""
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] in ("npy", "mnp"):
        return obj[1]
    if isinstance(obj, dict):
        return {k: arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [arrays(v) for v in obj]
    return obj


def forms(obj: Any) -> set[str]:
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] in ("npy", "mnp"):
        return {obj[0]}
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return set().union(*(forms(v) for v in values))


class Client:
    """What NVIDIA's client does: one REQ socket, one request at a time."""

    def __init__(self, port: int, token: str | None = TOKEN, form: str = "npy", timeout_ms: int = 60_000):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"tcp://127.0.0.1:{port}")
        self.token = token
        self.form = form
        self.raw: Any = None

    def request(self, endpoint: str | None, data: Any = None, with_data: bool = True) -> bytes:
        message: dict[str, Any] = {} if endpoint is None else {"endpoint": endpoint}
        if with_data:
            message["data"] = data
        if self.token:
            message["api_token"] = self.token
        encode = as_npy if self.form == "npy" else as_mnp
        return msgpack.packb(message, default=lambda a: encode(a), use_bin_type=True)

    def send_raw(self, payload: bytes) -> Any:
        self.socket.send(payload)
        self.raw = msgpack.unpackb(self.socket.recv(), raw=False, object_hook=client_decode)
        return arrays(self.raw)

    def call(self, endpoint: str | None, data: Any = None, with_data: bool = True) -> Any:
        return self.send_raw(self.request(endpoint, data, with_data))

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


# ---- observations --------------------------------------------------------------------------------


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def state_values(widths: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {key: rng.uniform(-1, 1, width).astype(np.float32) for key, width in widths.items()}


def gr1_flat_n15(seed: int) -> dict[str, Any]:
    """N1.5's unbatched flat observation: video (T, H, W, 3), state (T, D); keys out of order, plus
    waist, which the served data config ignores."""
    state = state_values(GR1, seed)
    obs: dict[str, Any] = {"video.ego_view": frame(seed)[None]}
    for key in ("right_hand", "left_arm", "left_hand", "right_arm"):
        obs[f"state.{key}"] = state[key][None]
    obs["state.waist"] = np.zeros((1, 1), np.float32)
    obs[TASK] = [f"pick up the cube {seed}"]
    return obs


def reference(
    running: RunningServer,
    embodiment: str,
    seed_images: dict[str, int],
    state: dict[str, np.ndarray],
    text: str,
    seed: int,
) -> np.ndarray:
    """The model's chunk for the same decoded observation and seed, in-process."""
    widths = GR1 if embodiment == "gr1" else NEW
    observation = Observation(
        images={camera: frame(s) for camera, s in seed_images.items()},
        joint_positions=np.concatenate([state[key] for key in widths]).astype(np.float32),
        instruction=text,
        embodiment=embodiment,
        seed=seed,
    )
    return running.server.model.predict(observation).actions


def split_actions(chunk: np.ndarray, widths: dict[str, int]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for key, width in widths.items():
        out[key] = chunk[:, start : start + width]
        start += width
    return out


def scrape(running: RunningServer) -> str:
    return urllib.request.urlopen(running.metrics_url, timeout=5).read().decode()


def counted(running: RunningServer, status: str) -> float:
    """vla_inference_requests_total for the GR00T endpoint and `status`."""
    for line in scrape(running).splitlines():
        if (
            line.startswith("vla_inference_requests_total")
            and f'protocol="groot_zmq",status="{status}"}}' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- servers ---------------------------------------------------------------------------------------


class NamedCameraGroot(GrootPolicy):
    """GR00T whose ModelInfo names each camera's video key (ModelInfo.camera_keys), as the family
    can with one line: {role: key for role, key in camera_roles(embodiment)}."""

    def load_checkpoint(self, path: str | None) -> GrootLoaded:
        loaded = super().load_checkpoint(path)
        keys = {tag: dict(camera_roles(emb)) for tag, emb in loaded.embodiments.items()}
        loaded.description = dataclasses.replace(loaded.description, camera_keys=keys)
        return loaded


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_groot_checkpoint(tmp_path_factory.mktemp("groot-zmq") / "tiny", seed=1)


@pytest.fixture(scope="module")
def groot(ckpt: Path) -> Iterator[RunningServer]:
    """Tokens on (gRPC and ZeroMQ), batches of up to 4 with a wide window, named cameras."""
    settings = make_settings(
        model_type="groot",
        model_path=str(ckpt),
        groot_port=0,
        batch_size=4,
        batch_timeout_ms=300,
        auth_tokens=TOKEN,
    )
    running = start_server(settings, NamedCameraGroot(settings))
    yield running
    running.stop(grace_s=1.0)


@pytest.fixture
def client(groot: RunningServer) -> Iterator[Client]:
    c = Client(groot.server.groot_port)
    yield c
    c.close()


# ---- codec -------------------------------------------------------------------------------------------


def test_both_array_encodings_decode_and_answers_use_the_form_asked():
    image = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    state = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))  # a Fortran-order .npy
    for form, encode in (("npy", as_npy), ("msgpack-numpy", as_mnp)):
        payload = msgpack.packb(
            {"data": {"v": image, "s": state, "n": np.int64(3)}}, default=encode, use_bin_type=True
        )
        message = codec.unpack(payload)
        assert message.form == form
        assert message.content["data"]["v"].dtype == np.uint8
        np.testing.assert_array_equal(message.content["data"]["v"], image)
        np.testing.assert_array_equal(message.content["data"]["s"], state)
        answer = msgpack.unpackb(
            codec.pack({"a": state.astype(np.float32)}, form), raw=False, object_hook=client_decode
        )
        assert answer["a"][0] == ("npy" if form == "npy" else "mnp")
        np.testing.assert_array_equal(answer["a"][1], state.astype(np.float32))
    scalar = {b"nd": False, b"type": "<f4", b"data": np.float32(2.5).tobytes()}
    assert codec.unpack(msgpack.packb({"x": scalar}, use_bin_type=True)).content["x"] == pytest.approx(2.5)
    text = codec.unpack(msgpack.packb({"t": as_npy(np.array(["pick it"]))}, use_bin_type=True)).content["t"]
    assert text.tolist() == ["pick it"]
    assert codec.unpack(msgpack.packb({"endpoint": "ping"})).form is None


class Touch:
    """Unpickling this creates a file: proof that nothing was ever unpickled when it is absent."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def pickled_npy(path: Path) -> bytes:
    out = io.BytesIO()
    np.save(out, np.array([Touch(path)], dtype=object), allow_pickle=True)
    return out.getvalue()


def forged_header() -> bytes:
    """A valid .npy header claiming 10^10 floats, followed by 8 bytes."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)})
    return out.getvalue() + b"\0" * 8


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda p: {"__ndarray_class__": True, "as_npy": pickled_npy(p)}, "refused (allow_pickle=False)"),
        (
            lambda p: {
                b"nd": True,
                b"type": "|O",
                b"kind": b"O",
                b"shape": [1],
                b"data": pickle.dumps(Touch(p)),
            },
            "kind 'O'",
        ),
        (
            lambda p: {
                b"nd": True,
                b"type": [["a", "<f4"]],
                b"kind": b"V",
                b"shape": [1],
                b"data": b"\0" * 4,
            },
            "kind 'V'",
        ),
        (
            lambda p: {b"nd": True, b"type": "<c8", b"kind": b"", b"shape": [1], b"data": b"\0" * 8},
            "'<c8' is refused",
        ),
        (
            lambda p: {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": [3], b"data": b"\0" * 4},
            "needs 12 bytes, got 4",
        ),
        (lambda p: {"__ndarray_class__": True, "as_npy": b"PK\x03\x04 a zip"}, "not an .npy file"),
        (lambda p: {"__ndarray_class__": True, "as_npy": "text"}, "bytes of an .npy file"),
        (lambda p: msgpack.ExtType(1, b"x"), "extension type 1"),
    ],
)
def test_unpack_refuses_what_it_cannot_trust(tmp_path: Path, build: Callable[[Path], Any], words: str):
    marker = tmp_path / "unpickled"
    with pytest.raises(codec.DecodeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        codec.unpack(msgpack.packb({"data": {"x": build(marker)}}, use_bin_type=True))
    assert not marker.exists()


def test_a_forged_npy_header_is_refused_before_allocating():
    with pytest.raises(codec.DecodeError, match="needs 40000000000 bytes, got 8"):
        codec.decode_npy(forged_header())
    with pytest.raises(codec.DecodeError, match="not a msgpack message"):
        codec.unpack(b"\xc1 garbage")


def test_modality_config_in_each_release_encoding():
    n15 = codec.modality_config([0], ["video.ego_view"], legacy=True)
    assert n15["__ModalityConfig_class__"] is True
    assert json.loads(n15["as_json"]) == {"delta_indices": [0], "modality_keys": ["video.ego_view"]}
    newer = codec.modality_config([-15, 0], ["ego_view"], legacy=False)
    assert newer["__ModalityConfig_class__"] and newer["__ModalityConfig__"]  # 23ace64's and 626af89's marker
    assert newer["as_json"]["delta_indices"] == [-15, 0] and newer["as_json"]["modality_keys"] == ["ego_view"]
    assert set(newer["as_json"]) == {
        "delta_indices",
        "modality_keys",
        "sin_cos_embedding_keys",
        "mean_std_embedding_keys",
        "action_configs",
    }


# ---- layouts -------------------------------------------------------------------------------------------


def test_parts_read_the_key_index_layouts():
    names = ["left_arm.0", "left_arm.1", "right_arm.0", "gripper.0"]
    assert layouts.parts(names, "x", 4) == (
        layouts.Part("left_arm", 2),
        layouts.Part("right_arm", 1),
        layouts.Part("gripper", 1),
    )
    assert layouts.parts(["hand_x", "hand_y"], "joint_positions", 2) == (layouts.Part("joint_positions", 2),)
    assert layouts.parts(["a.0", "b.0", "a.1"], "joint_positions", 3) == (layouts.Part("joint_positions", 3),)
    assert layouts.parts([], "joint_positions", 0) == ()


def _info(**extra: Any) -> ModelDescription:
    base = {
        "name": "tiny",
        "version": "gr00t-n1.7",
        "family": "groot",
        "action_dim": 3,
        "chunk_size": 4,
        "horizon": 4,
        "embodiments": ("arm",),
        "default_embodiment": "arm",
        "state_dims": {"arm": 3},
        "camera_names": ("base",),
        "image_size": (8, 8),
        "device": "cpu",
        "dtype": "float32",
        "confidence_definition": "",
        "state_layouts": {"arm": ("joints.0", "joints.1", "grip.0")},
        "action_layouts": {"arm": ("joints.0", "joints.1", "grip.0")},
        "camera_keys": {"arm": {"base": "front"}},
    }
    base.update(extra)
    return ModelDescription(**base)


def test_the_time_axis_maps_to_the_history_the_model_reads():
    info = _info(image_history={"arm": (-2,)}, state_history={"arm": (-3, -1)})
    keys = layouts.vocabulary(info, "arm")
    assert keys.video_steps == (-2, 0) and keys.state_steps == (-3, -1, 0)
    frames = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (5, 9)])  # t=0: offset -2, t=1: now
    joints = np.arange(3, dtype=np.float32)[:, None] + np.zeros((3, 2), np.float32)
    nested = {
        "video": {"front": frames[None]},
        "state": {"joints": joints[None], "grip": np.array([[[7.0], [8.0], [9.0]]], np.float32)},
        "language": {"task": [["stack"]]},
    }
    batch = layouts.split(nested, 8)
    assert batch.nested and batch.batched and len(batch.samples) == 1
    observation = layouts.observation(batch.samples[0], keys, make_settings(), seed=None)
    assert observation.instruction == "stack" and observation.embodiment == "arm"
    assert observation.images["base"][0, 0, 0] == 9 and observation.past_images[-2]["base"][0, 0, 0] == 5
    np.testing.assert_array_equal(observation.joint_positions, [2, 2, 9])
    np.testing.assert_array_equal(observation.past_joint_positions[-3], [0, 0, 7])
    np.testing.assert_array_equal(observation.past_joint_positions[-1], [1, 1, 8])
    entries = layouts.modality_entries(keys, n15=False)
    assert entries["video"] == ([-2, 0], ["front"]) and entries["state"] == ([-3, -1, 0], ["joints", "grip"])
    assert entries["action"] == ([0, 1, 2, 3], ["joints", "grip"])
    with pytest.raises(
        InvalidObservation, match=r"1 frames on the time axis; this model reads 2 \(delta_indices \[-2, 0\]\)"
    ):
        layouts.observation(
            layouts.split({**nested, "video": {"front": frames[None, 1:]}}, 8).samples[0],
            keys,
            make_settings(),
            None,
        )


@pytest.mark.parametrize(
    ("obs", "words"),
    [
        (
            {"video.front": np.zeros((2, 1, 2, 2, 3), np.uint8), "state.joints": np.zeros((3, 1, 2))},
            "batch sizes differ",
        ),
        (
            {"video.front": np.zeros((1, 2, 2, 3), np.float32), "state.joints": np.zeros((1, 2))},
            "got float32 pixels",
        ),
        (
            {
                "video.front": np.zeros((1, 2, 2, 3), np.uint8),
                "state.joints": np.zeros((1, 2)),
                "task": ["a", "b"],
            },
            "a string or",
        ),
        ({"video": {"front": np.zeros((1, 2, 2, 3), np.uint8)}}, r"uint8 frames \(B, T, H, W, 3\)"),
        ({"images": 1}, "unrecognised keys"),
        ([1, 2], "expected a map"),
    ],
)
def test_split_names_the_key(obs: Any, words: str):
    with pytest.raises(InvalidObservation, match=words):
        layouts.split(obs, 8)


def test_actions_are_recollated_per_form():
    keys = layouts.vocabulary(_info(), "arm")
    chunks = [np.full((4, 3), i, np.float32) for i in range(2)]
    flat = layouts.actions(chunks, keys, layouts.Batch(nested=False, batched=True, samples=()))
    assert flat["action.joints"].shape == (2, 4, 2) and flat["action.grip"].shape == (2, 4, 1)
    assert flat["action.grip"][1, 0, 0] == 1
    nested = layouts.actions(chunks[:1], keys, layouts.Batch(nested=True, batched=True, samples=()))
    assert set(nested) == {"joints", "grip"} and nested["joints"].shape == (1, 4, 2)
    single = layouts.actions(chunks[:1], keys, layouts.Batch(nested=False, batched=False, samples=()))
    assert single["action.joints"].shape == (4, 2)


_KEYS = [
    "video.front",
    "state.joints",
    "state.grip",
    "video",
    "state",
    "language",
    "front",
    "joints",
    "task",
    "seed",
]
_ARRAYS = st.builds(
    lambda shape, kind: np.zeros(shape, dtype=kind),
    st.lists(st.integers(0, 3), max_size=6),
    st.sampled_from([np.uint8, np.float32, np.int64, np.bool_]),
)
_VALUES = st.recursive(
    st.none() | st.integers() | st.text(max_size=5) | st.binary(max_size=5) | _ARRAYS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obs=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6))
def test_any_observation_is_served_or_refused_naming_a_key(obs: dict[str, Any]):
    """Whatever the structure, decoding ends in an Observation or InvalidObservation, nothing else."""
    keys = layouts.vocabulary(_info(), "arm")
    with contextlib.suppress(InvalidObservation):
        for sample in layouts.split(obs, 8).samples:
            observation = layouts.observation(sample, keys, SETTINGS, seed=None)
            assert observation.joint_positions.shape == (3,) and set(observation.images) == {"base"}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_any_bytes_decode_or_are_refused(data: bytes):
    with contextlib.suppress(codec.DecodeError):
        assert codec.unpack(data).form in (None, codec.NPY, codec.MNP)


# ---- the endpoint, against a real server -------------------------------------------------------------


def test_ping_modality_config_and_model_info(groot: RunningServer, client: Client):
    assert client.call("ping", with_data=False) == {"status": "ok", "message": "Server is running"}
    config = client.call("get_modality_config", with_data=False)
    assert set(config) == {"video", "state", "action", "language"}
    assert all(entry["__ModalityConfig_class__"] is True for entry in config.values())
    decoded = {
        name: json.loads(entry["as_json"]) for name, entry in config.items()
    }  # the N1.5 service's form
    assert decoded["video"] == {"delta_indices": [0], "modality_keys": ["video.ego_view"]}
    assert decoded["state"]["modality_keys"] == [f"state.{key}" for key in GR1]
    assert decoded["action"] == {
        "delta_indices": list(range(HORIZON)),
        "modality_keys": [f"action.{k}" for k in GR1],
    }
    assert decoded["language"] == {"delta_indices": [0], "modality_keys": [TASK]}
    assert client.call("reset", {"options": None}) == {}
    with groot.client(security=ChannelSecurity(token=TOKEN)) as grpc_client:
        ports = dict(grpc_client.info().protocol_ports)
    assert ports == {"grpc": groot.server.port, "groot_zmq": groot.server.groot_port}
    assert groot.server.groot_zmq is not None
    assert groot.server.groot_zmq.address.startswith("tcp://127.0.0.1:")  # VLA_HOST's default, never "*"


def test_flat_n15_round_trip_matches_the_model(groot: RunningServer, client: Client):
    obs = gr1_flat_n15(3)
    obs["seed"] = 11
    answer = client.call("get_action", obs)  # N1.5's service: data is the observation itself
    assert forms(client.raw) == {"npy"}
    assert set(answer) == {f"action.{key}" for key in GR1}
    state = {key: obs[f"state.{key}"][0] for key in GR1}
    expected = split_actions(reference(groot, "gr1", {"base": 3}, state, "pick up the cube 3", 11), GR1)
    for key, width in GR1.items():
        assert (
            answer[f"action.{key}"].shape == (HORIZON, width) and answer[f"action.{key}"].dtype == np.float32
        )
        np.testing.assert_allclose(answer[f"action.{key}"], expected[key], rtol=1e-5, atol=1e-5)
    # (H, W, 3) and (D,) without the time axis are N1.5's single step as well
    squeezed = {k: v[0] if isinstance(v, np.ndarray) else v for k, v in obs.items()}
    again = client.call("get_action", squeezed)
    np.testing.assert_allclose(again["action.left_arm"], answer["action.left_arm"], rtol=1e-6, atol=1e-6)


def test_nested_t1_in_msgpack_numpy_form(groot: RunningServer):
    """N1.6 / N1.7's Gr00tPolicy format at 626af89: nested, (B, T, ...), msgpack-numpy arrays; the
    embodiment is the one whose state keys the observation carries (new_embodiment here)."""
    c = Client(groot.server.groot_port, form="mnp")
    try:
        state = state_values(NEW, 5)
        obs = {
            "video": {"front": frame(5)[None, None], "wrist": frame(6)[None, None]},
            "state": {key: value[None, None] for key, value in state.items()},
            "language": {"task": [["wave"]]},
        }
        action, info = c.call("get_action", {"observation": obs, "options": {"seed": 21}})
        assert forms(c.raw) == {"mnp"}
        assert info["embodiment"] == "new_embodiment" and len(info["total_ms"]) == 1
        expected = split_actions(
            reference(groot, "new_embodiment", {"base": 5, "left_wrist": 6}, state, "wave", 21), NEW
        )
        assert set(action) == set(NEW)
        for key, width in NEW.items():
            assert action[key].shape == (1, HORIZON, width)
            np.testing.assert_allclose(action[key][0], expected[key], rtol=1e-5, atol=1e-5)
    finally:
        c.close()


def test_a_batch_of_two_is_split_answered_per_sample_and_recollated(groot: RunningServer, client: Client):
    """Gr00tSimPolicyWrapper's flat form, batched: (B, T, ...) arrays and B instructions; sample i
    draws its noise from seed + i; both samples share one forward pass."""
    states = [state_values(GR1, 7), state_values(GR1, 8)]
    obs = {
        "video.ego_view": np.stack([frame(7)[None], frame(8)[None]]),
        **{f"state.{key}": np.stack([s[key][None] for s in states]) for key in GR1},
        TASK: ("pick up the cube", "place it in the box"),
    }
    action, info = client.call("get_action", {"observation": obs, "options": {"seed": 40}})
    assert info["batch_size"] == [2, 2]
    for i, (text, seed) in enumerate((("pick up the cube", 40), ("place it in the box", 41))):
        expected = split_actions(reference(groot, "gr1", {"base": 7 + i}, states[i], text, seed), GR1)
        for key, width in GR1.items():
            assert action[f"action.{key}"].shape == (2, HORIZON, width)
            np.testing.assert_allclose(action[f"action.{key}"][i], expected[key], rtol=1e-5, atol=1e-5)
    assert counted(groot, "OK") >= 2  # each sample counted as a request of its own


def test_bad_requests_get_one_error_line_and_the_endpoint_goes_on(
    groot: RunningServer, client: Client, tmp_path: Path
):
    marker = tmp_path / "unpickled"
    two_steps = gr1_flat_n15(0)
    two_steps["video.ego_view"] = np.concatenate([two_steps["video.ego_view"]] * 2)
    cases = [
        (b"\xc1 garbage", "INVALID_ARGUMENT: invalid observation: message: not a msgpack message"),
        (
            msgpack.packb(
                {
                    "endpoint": "get_action",
                    "api_token": TOKEN,
                    "data": {"video.ego_view": {"__ndarray_class__": True, "as_npy": pickled_npy(marker)}},
                }
            ),
            "allow_pickle=False",
        ),
        (
            msgpack.packb(
                {
                    "endpoint": "get_action",
                    "api_token": TOKEN,
                    "data": {
                        "x": {
                            b"nd": True,
                            b"type": "|O",
                            b"kind": b"O",
                            b"shape": [1],
                            b"data": pickle.dumps(Touch(marker)),
                        }
                    },
                }
            ),
            "kind 'O' is refused",
        ),
        (
            client.request("get_action", two_steps),
            "video.ego_view: 2 frames on the time axis; this model reads 1 (delta_indices [0])",
        ),
        (
            client.request("get_action", {**gr1_flat_n15(0), "state.left_arm": np.zeros((1, 3), np.float32)}),
            "state.left_arm: shape (1, 3)",
        ),
        (
            client.request(
                "get_action", {k: v for k, v in gr1_flat_n15(0).items() if k != "state.right_hand"}
            ),
            "state.right_hand: missing",
        ),
        (
            client.request("get_action", {**gr1_flat_n15(0), TASK: [""]}),
            f"{TASK}: the model needs a language instruction",
        ),
        (client.request("get_action", {"observation": [], "options": {}}), "expected a map of observations"),
        (
            client.request(
                "get_action", {"observation": gr1_flat_n15(0), "options": {"embodiment_tag": "unitree_h1"}}
            ),
            "unknown embodiment 'unitree_h1'",
        ),
        (client.request("fly"), "INVALID_ARGUMENT: unknown endpoint 'fly'"),
        (msgpack.packb([1, 2]), "expected a map {endpoint, data, api_token}"),
    ]
    for payload, words in cases:
        answer = client.send_raw(payload)
        assert set(answer) == {"error"} and words in answer["error"], (words, answer)
        assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert not marker.exists()  # nothing was ever unpickled
    assert set(client.call("get_action", gr1_flat_n15(1))) == {f"action.{key}" for key in GR1}
    assert client.call(None, gr1_flat_n15(1))["action.left_arm"].shape == (
        HORIZON,
        2,
    )  # no endpoint: get_action


def test_the_token_is_upstreams_and_kill_is_refused(groot: RunningServer):
    before = counted(groot, "UNAUTHENTICATED")
    for token in ("wrong-token-of-enough-length", None):
        c = Client(groot.server.groot_port, token=token)
        try:
            assert c.call("ping", with_data=False) == {"error": "Unauthorized: Invalid API token"}
            assert c.call("get_action", gr1_flat_n15(0)) == {"error": "Unauthorized: Invalid API token"}
        finally:
            c.close()
    assert counted(groot, "UNAUTHENTICATED") == before + 4
    c = Client(groot.server.groot_port)
    try:
        assert c.call("kill", with_data=False)["error"].startswith("PERMISSION_DENIED: kill is refused")
        assert c.call("ping", with_data=False)["status"] == "ok"  # still serving
    finally:
        c.close()


def test_a_client_that_leaves_mid_request_does_not_stop_the_others(
    groot: RunningServer, caplog: pytest.LogCaptureFixture
):
    def ok_count() -> float:
        return counted(groot, "OK")

    caplog.set_level(logging.DEBUG, logger="vla_inference.transport.groot_zmq.endpoint")
    before = ok_count()
    leaver = Client(groot.server.groot_port)
    leaver.socket.send(leaver.request("get_action", gr1_flat_n15(2)))
    leaver.socket.close(linger=5000)  # gone before its answer (the request is flushed first)
    leaver.context.term()
    deadline = time.monotonic() + 30
    while ok_count() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ok_count() == before + 1  # it was served; its answer went nowhere
    deadline = time.monotonic() + 10
    while "answer dropped" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "GR00T client gone before its answer" in caplog.text
    other = Client(groot.server.groot_port)
    try:
        assert other.call("get_action", gr1_flat_n15(3))["action.left_arm"].shape == (HORIZON, 2)
    finally:
        other.close()


def test_several_clients_at_once_get_their_own_answers_and_batch_with_grpc(groot: RunningServer):
    clients = [Client(groot.server.groot_port) for _ in range(3)]
    barrier = threading.Barrier(len(clients) + 1)
    answers: dict[int, Any] = {}
    errors: list[BaseException] = []

    def robot(index: int) -> None:
        try:
            state = state_values(GR1, 20 + index)
            obs = {
                "video.ego_view": frame(20 + index)[None, None],
                **{f"state.{key}": value[None, None] for key, value in state.items()},
                TASK: [f"pick up the cube {index}"],
            }
            barrier.wait(timeout=60)
            answers[index] = clients[index].call(
                "get_action", {"observation": obs, "options": {"seed": 70 + index}}
            )
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    def grpc_robot() -> None:
        try:
            with groot.client(security=ChannelSecurity(token=TOKEN)) as grpc_client:
                barrier.wait(timeout=60)
                answers[-1] = grpc_client.predict(frame(9), [0.1] * 6, "wave", embodiment="gr1", seed=3)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(len(clients))]
    threads.append(threading.Thread(target=grpc_robot))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for c in clients:
        c.close()
    assert not errors and len(answers) == 4
    sizes = [answers[i][1]["batch_size"][0] for i in range(3)] + [answers[-1].timing.batch_size]
    assert max(sizes) > 1  # robots of both protocols shared forward passes
    for index in range(3):
        state = state_values(GR1, 20 + index)
        expected = split_actions(
            reference(groot, "gr1", {"base": 20 + index}, state, f"pick up the cube {index}", 70 + index), GR1
        )
        for key in GR1:
            np.testing.assert_allclose(
                answers[index][0][f"action.{key}"][0], expected[key], rtol=1e-5, atol=1e-5
            )


# ---- without camera_keys, draining, settings ---------------------------------------------------------


def test_the_family_as_on_main_and_draining(ckpt: Path):
    """The GR00T family as served: ModelInfo.camera_keys names each embodiment's own video keys, so the
    modality config lists NVIDIA's (gr1: video.ego_view); while draining every request gets
    UNAVAILABLE; stop closes the endpoint."""
    settings = make_settings(model_type="groot", model_path=str(ckpt), groot_port=0, warmup_batches=0)
    running = start_server(settings)
    c = Client(running.server.groot_port, token=None, timeout_ms=5000)
    try:
        video = layouts.modality_entries(
            layouts.vocabulary(running.server.model.model_info, "gr1"), n15=True
        )["video"]
        assert video == ([0], ["video.ego_view"])
        assert running.server.model.model_info.camera_keys["gr1"] == {"base": "ego_view"}
        assert c.call("get_action", gr1_flat_n15(4))["action.right_hand"].shape == (HORIZON, 1)
        running.server.state.phase = ServerState.DRAINING
        assert c.call("ping", with_data=False)["error"].startswith("UNAVAILABLE: ")
        assert c.call("get_action", gr1_flat_n15(4))["error"].startswith("UNAVAILABLE: ")
        running.server.state.phase = ServerState.SERVING
    finally:
        running.stop(grace_s=1.0)
    with pytest.raises(zmq.Again):
        c.call("ping", with_data=False)  # nothing answers once stopped
    c.close()


def test_off_by_default_and_port_settings():
    assert Settings().groot_port is None and Settings(groot_port="off").groot_port is None
    assert Settings(groot_port=0).groot_port == 0
    with pytest.raises(ValueError, match="a port other than VLA_GRPC_PORT and VLA_OPENPI_PORT"):
        Settings(grpc_port=5555, groot_port=5555)
    with pytest.raises(ValueError, match="a port other than VLA_GRPC_PORT and VLA_OPENPI_PORT"):
        Settings(openpi_port=5555, groot_port=5555)
