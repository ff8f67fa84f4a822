"""The openpi-compatible websocket endpoint (transport/openpi/: codec, layouts, endpoint).

Clients are the real `openpi-client` package (WebsocketClientPolicy, what openpi's LIBERO / DROID /
ALOHA examples use) or, where a test needs the raw protocol, `websockets`' own client. Servers are
real, on ephemeral ports, serving tiny openpi-format pi0 checkpoints whose state and action sizes
match each layout. Expected actions come from the same model in-process with the same seed.
"""

from __future__ import annotations

import logging
import pickle
import re
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode
from websockets.sync.client import connect

from tests.conftest import RunningServer, make_settings
from tests.helpers.pi0_checkpoints import write_tiny_openpi_checkpoint
from tests.support.certs import make_pki
from vla_inference.config import Settings
from vla_inference.models.base import InvalidObservation, ModelDescription, Observation
from vla_inference.transport.openpi import codec, layouts
from vla_inference.transport.servicer import ServerState

TOKEN = "openpi-endpoint-test-token-0123"


# ---- helpers -----------------------------------------------------------------------------------


def _image(seed: int, chw: bool = False) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return np.ascontiguousarray(image.transpose(2, 0, 1)) if chw else image


def libero_obs(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "observation/image": _image(i),
        "observation/wrist_image": _image(100 + i),
        "observation/state": np.linspace(-0.5, 0.5, 8).astype(np.float32) + 0.1 * i,
        "prompt": f"put the bowl on plate {i}",
        **extra,
    }


def droid_obs(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "observation/exterior_image_1_left": _image(i),
        "observation/wrist_image_left": _image(200 + i),
        "observation/joint_position": np.linspace(-1, 1, 7) + 0.05 * i,  # float64, as DROID sends
        "observation/gripper_position": np.array([0.3]),
        "prompt": "open the drawer",
        **extra,
    }


def aloha_obs(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "state": np.linspace(0, 1, 14).astype(np.float32) * i,
        "images": {
            "cam_high": _image(i, chw=True),
            "cam_low": _image(300 + i, chw=True),
            "cam_left_wrist": _image(400 + i, chw=True),
            "cam_right_wrist": _image(500 + i, chw=True),
        },
        "prompt": "fold the towel",
        **extra,
    }


def expected(
    running: RunningServer, images: dict[str, np.ndarray], state: np.ndarray, prompt: str, seed: int
) -> np.ndarray:
    """What the gRPC path's model gives for the same decoded observation and seed."""
    observation = Observation(
        images=images, joint_positions=np.asarray(state, np.float32), instruction=prompt, seed=seed
    )
    return running.server.model.predict(observation).actions


def policy(running: RunningServer, **kw: Any) -> WebsocketClientPolicy:
    return WebsocketClientPolicy("127.0.0.1", running.server.openpi_port, **kw)


def raw_connect(running: RunningServer, **kw: Any):
    return connect(f"ws://127.0.0.1:{running.server.openpi_port}", compression=None, max_size=None, **kw)


def scrape(running: RunningServer) -> str:
    return urllib.request.urlopen(running.metrics_url, timeout=5).read().decode()


def refused(ws: Any, payload: bytes | str) -> str:
    """Send one message; return the server's one text line after checking it closed with 1011."""
    ws.send(payload)
    line = ws.recv(timeout=30)
    assert isinstance(line, str)
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCode.INTERNAL_ERROR
    assert "\n" not in line and "Traceback" not in line
    return line


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("openpi")
    return {
        "libero": write_tiny_openpi_checkpoint(
            root / "libero", asset_ids=("libero",), state_dim=8, action_dim=7
        ),
        "droid": write_tiny_openpi_checkpoint(
            root / "droid", asset_ids=("droid",), state_dim=8, action_dim=8
        ),
        "aloha": write_tiny_openpi_checkpoint(
            root / "aloha", asset_ids=("trossen",), state_dim=14, action_dim=14
        ),
    }


@pytest.fixture
def libero(server_factory, checkpoints) -> RunningServer:
    return server_factory(model_path=str(checkpoints["libero"]), openpi_port=0)


# ---- msgpack with openpi's numpy extension (no server) --------------------------------------------


def test_pack_is_byte_identical_to_openpi_client_and_the_documented_example():
    message = {"observation/state": np.array([1.0, -2.5], np.float32), "prompt": "hi"}
    data = codec.pack(message)
    assert data == msgpack_numpy.packb(message)
    expected_bytes = (
        b"\x82\xb1observation/state\x84\xc4\x0b__ndarray__\xc3\xc4\x04data\xc4\x08"
        + np.array([1.0, -2.5], np.float32).tobytes()
        + b"\xc4\x05dtype\xa3<f4\xc4\x05shape\x91\x02\xa6prompt\xa2hi"
    )
    assert data == expected_bytes
    scalar = {"x": np.float32(1.5), "n": np.int64(-3)}
    assert codec.pack(scalar) == msgpack_numpy.packb(scalar)


def test_unpack_reads_what_openpi_client_packs():
    message = {
        "image": _image(0),
        "chw": _image(1, chw=True),
        "state": np.arange(8, dtype=np.float64),
        "mask": np.array([True, False]),
        "ids": np.arange(3, dtype=np.int64).reshape(1, 3),
        "scalar": np.float32(2.5),
        "nested": {"cam": np.zeros((2, 2, 3), np.uint8)},
        "prompt": "stack the blocks",
    }
    decoded = codec.unpack(msgpack_numpy.packb(message))
    assert decoded.keys() == message.keys()
    for key in ("image", "chw", "state", "mask", "ids"):
        assert decoded[key].dtype == message[key].dtype
        np.testing.assert_array_equal(decoded[key], message[key])
    assert decoded["scalar"] == np.float32(2.5) and isinstance(decoded["scalar"], np.float32)
    np.testing.assert_array_equal(decoded["nested"]["cam"], message["nested"]["cam"])
    assert decoded["prompt"] == "stack the blocks"
    # and the other way round: openpi-client decodes our answers
    answer = {"actions": np.ones((10, 7), np.float32), "server_timing": {"infer_ms": 1.5}}
    back = msgpack_numpy.unpackb(codec.pack(answer))
    np.testing.assert_array_equal(back["actions"], answer["actions"])
    assert back["server_timing"] == {"infer_ms": 1.5}


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _array_map(dtype: str, shape: list[int], data: bytes) -> bytes:
    return msgpack.packb(
        {"x": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}}, use_bin_type=True
    )


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (_array_map("|O", [1], b"\0" * 8), "dtype '|O'"),
        (_array_map("|V8", [1], b"\0" * 8), "dtype '|V8'"),
        (_array_map("<c8", [1], b"\0" * 8), "dtype '<c8'"),
        (_array_map("<f4", [3], b"\0" * 8), "needs 12 bytes, got 8"),
        (_array_map("<f4", [-1], b""), "shape"),
        (_array_map("<f4", [1] * 9, b"\0" * 4), "shape"),
        (msgpack.packb({"x": msgpack.ExtType(1, b"abc")}), "extension type 1"),
        (msgpack.packb({1: "int key"}), "not a msgpack message"),
        (b"\xc1", "not a msgpack message"),
        (b"\x82\xa1a", "not a msgpack message"),
        (pickle.dumps({"prompt": "hi"}), "not a msgpack message"),
        (msgpack.packb(_nested(20)), "nests deeper"),
    ],
)
def test_unpack_refuses_what_it_cannot_trust(payload: bytes, words: str):
    with pytest.raises(codec.DecodeError, match="^.*" + re.escape(words)):
        codec.unpack(payload)


# ---- observation layouts (no server) --------------------------------------------------------------


INFO = ModelDescription(
    name="m",
    version="1",
    family="pi0",
    action_dim=7,
    chunk_size=4,
    horizon=4,
    embodiments=("e",),
    default_embodiment="e",
    state_dims={"e": 8},
    camera_names=("base", "left_wrist", "right_wrist"),
    image_size=(224, 224),
    device="cpu",
    dtype="float32",
    confidence_definition="",
)


def test_layouts_map_cameras_state_and_prompt():
    settings = Settings()
    obs = layouts.observation_from_openpi(libero_obs(1), settings, INFO)
    assert set(obs.images) == {"base", "left_wrist"}
    np.testing.assert_array_equal(obs.images["base"], libero_obs(1)["observation/image"])
    np.testing.assert_array_equal(obs.joint_positions, libero_obs(1)["observation/state"])
    assert obs.instruction == "put the bowl on plate 1" and obs.seed is None

    droid = layouts.observation_from_openpi(droid_obs(0, seed=np.uint64(9)), settings, INFO)
    assert droid.joint_positions.tolist() == pytest.approx([*np.linspace(-1, 1, 7), 0.3])
    assert droid.joint_positions.dtype == np.float32 and droid.seed == 9
    np.testing.assert_array_equal(droid.images["left_wrist"], _image(200))

    aloha_info = ModelDescription(**{**INFO.__dict__, "state_dims": {"e": 14}})
    aloha = layouts.observation_from_openpi(aloha_obs(2), settings, aloha_info)
    assert set(aloha.images) == {"base", "left_wrist", "right_wrist"}  # cam_low is not a pi0 input
    np.testing.assert_array_equal(aloha.images["right_wrist"], _image(502))  # CHW -> HWC

    one_camera = ModelDescription(**{**INFO.__dict__, "camera_names": ("base",)})
    assert set(layouts.observation_from_openpi(libero_obs(0), settings, one_camera).images) == {"base"}


def test_float_images_are_scaled_like_openpi():
    obs = libero_obs(0)
    obs["observation/image"] = np.full((3, 10, 12), 0.5, np.float32)  # CHW float in [0, 1]
    image = layouts.observation_from_openpi(obs, Settings(), INFO).images["base"]
    assert image.shape == (10, 12, 3) and image.dtype == np.uint8 and int(image[0, 0, 0]) == 127


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"prompt": 7}, "prompt: expected a string (the task), got int"),
        ({"observation/state": np.zeros(5, np.float32)}, "5 state values (LIBERO layout)"),
        ({"observation/state": np.array([np.nan] * 8)}, "finite"),
        ({"observation/state": np.array(["a"] * 8)}, "numbers"),
        ({"observation/image": np.zeros((224, 224), np.uint8)}, "observation/image: expected an image"),
        ({"observation/image": np.zeros((224, 224, 3), np.int64)}, "uint8"),
        ({"observation/image": np.zeros((224, 224, 4), np.uint8)}, "3 colour channels"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_observations_name_the_key(change: dict[str, Any], words: str):
    obs = {k: v for k, v in {**libero_obs(0), **change}.items() if v is not None}
    with pytest.raises(InvalidObservation, match=re.escape(words)):
        layouts.observation_from_openpi(obs, Settings(), INFO)


def test_unknown_keys_list_the_layouts_and_the_setting_forces_one():
    with pytest.raises(
        InvalidObservation, match=r"unrecognised keys \('image', 'prompt', 'qpos'\).*DROID.*LIBERO.*ALOHA"
    ):
        layouts.observation_from_openpi({"qpos": [0.0], "image": 1, "prompt": "x"}, Settings(), INFO)
    forced = Settings(openpi_layout="droid")
    with pytest.raises(InvalidObservation, match="observation/joint_position: missing"):
        layouts.observation_from_openpi(
            {"observation/state": [0.0] * 8, "observation/exterior_image_1_left": _image(0), "prompt": "x"},
            forced,
            INFO,
        )


def test_off_by_default_and_port_settings():
    assert Settings().openpi_port is None
    assert Settings(openpi_port="").openpi_port is None
    assert Settings(openpi_port="8000").openpi_port == 8000
    with pytest.raises(ValueError, match="other than VLA_GRPC_PORT"):
        Settings.from_env(grpc_port=50051, openpi_port=50051)


# ---- the endpoint with openpi-client ---------------------------------------------------------------


def test_libero_with_openpi_client_matches_the_model(libero: RunningServer):
    client = policy(libero)
    metadata = client.get_server_metadata()
    assert metadata["action_dim"] == 7 and metadata["state_dim"] == 8 and metadata["embodiment"] == "libero"
    first = client.infer(libero_obs(1, seed=11))
    assert first["actions"].shape == (16, 7) and first["actions"].dtype == np.float32
    reference = expected(
        libero,
        {"base": _image(1), "left_wrist": _image(101)},
        libero_obs(1)["observation/state"],
        "put the bowl on plate 1",
        11,
    )
    np.testing.assert_allclose(first["actions"], reference, rtol=1e-5, atol=1e-5)
    assert first["server_timing"]["infer_ms"] > 0 and "prev_total_ms" not in first["server_timing"]
    assert first["policy_timing"]["batch_size"] == 1 and first["policy_timing"]["infer_ms"] > 0
    second = client.infer(libero_obs(1))  # no seed: fresh noise, same shapes
    assert second["server_timing"]["prev_total_ms"] >= first["server_timing"]["infer_ms"]
    assert not np.allclose(second["actions"], first["actions"])
    counted = 'vla_inference_requests_total{model="pi0/libero",protocol="openpi",status="OK"} 2.0'
    assert counted in scrape(libero)


def test_droid_with_openpi_client(server_factory, checkpoints):
    running = server_factory(model_path=str(checkpoints["droid"]), openpi_port=0)
    client = policy(running)
    answer = client.infer(droid_obs(2, seed=5))
    assert answer["actions"].shape == (16, 8)
    state = np.concatenate([droid_obs(2)["observation/joint_position"], [0.3]])
    reference = expected(running, {"base": _image(2), "left_wrist": _image(202)}, state, "open the drawer", 5)
    np.testing.assert_allclose(answer["actions"], reference, rtol=1e-5, atol=1e-5)


def test_aloha_chw_images_with_openpi_client(server_factory, checkpoints):
    running = server_factory(model_path=str(checkpoints["aloha"]), openpi_port=0, chunk_size=50)
    answer = policy(running).infer(aloha_obs(3, seed=1))
    assert answer["actions"].shape == (50, 14)
    images = {"base": _image(3), "left_wrist": _image(403), "right_wrist": _image(503)}
    reference = expected(running, images, aloha_obs(3)["state"], "fold the towel", 1)
    np.testing.assert_allclose(answer["actions"], reference, rtol=1e-5, atol=1e-5)


def test_several_clients_at_once_share_batches_and_get_their_own_answers(server_factory, checkpoints):
    running = server_factory(
        model_path=str(checkpoints["libero"]), openpi_port=0, batch_size=4, batch_timeout_ms=300
    )
    clients = [policy(running) for _ in range(4)]
    barrier = threading.Barrier(len(clients))
    answers: dict[tuple[int, int], dict[str, Any]] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            for step in range(3):
                barrier.wait(timeout=60)
                answers[index, step] = clients[index].infer(libero_obs(index, seed=100 * index + step))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(answers) == 12
    assert max(a["policy_timing"]["batch_size"] for a in answers.values()) > 1
    for (index, step), answer in answers.items():
        obs = libero_obs(index)
        images = {"base": obs["observation/image"], "left_wrist": obs["observation/wrist_image"]}
        reference = expected(running, images, obs["observation/state"], obs["prompt"], 100 * index + step)
        np.testing.assert_allclose(answer["actions"], reference, rtol=1e-4, atol=1e-4)


def test_openpi_and_grpc_robots_batch_together(server_factory, checkpoints):
    running = server_factory(
        model_path=str(checkpoints["libero"]), openpi_port=0, batch_size=2, batch_timeout_ms=1000
    )
    client = policy(running)
    results: dict[str, Any] = {}

    def grpc_robot() -> None:
        with running.client() as robot:
            results["grpc"] = robot.predict(_image(7), joints=[0.1] * 8, instruction="push the block", seed=3)

    thread = threading.Thread(target=grpc_robot)
    thread.start()
    results["openpi"] = client.infer(libero_obs(0))
    thread.join(timeout=60)
    assert results["openpi"]["policy_timing"]["batch_size"] == 2
    assert results["grpc"].timing.batch_size == 2
    text = scrape(running)
    # one request each, counted under its own protocol
    assert 'protocol="grpc",status="OK"} 1.0' in text and 'protocol="openpi",status="OK"} 1.0' in text


def test_a_bad_client_gets_one_line_and_1011_while_others_go_on(libero: RunningServer):
    good = policy(libero)
    assert good.infer(libero_obs(0))["actions"].shape == (16, 7)
    bad = policy(libero)
    with pytest.raises(
        RuntimeError, match=r"INVALID_ARGUMENT: invalid observation: observation/state: 3 state"
    ):
        bad.infer(libero_obs(0, **{"observation/state": np.zeros(3, np.float32)}))
    with raw_connect(libero) as ws:
        msgpack_numpy.unpackb(ws.recv(timeout=30))  # metadata first
        line = refused(ws, codec.pack(libero_obs(0, prompt=7)))
        assert line.startswith("INVALID_ARGUMENT: invalid observation: prompt")
    for payload, words in (
        (b"\xc1 garbage", "not a msgpack message"),
        (pickle.dumps(libero_obs(0)), "not a msgpack message"),
        (_array_map("|O", [1], b"\0" * 8), "dtype '|O'"),
        ("a text frame", "binary frames"),
    ):
        with raw_connect(libero) as ws:
            ws.recv(timeout=30)
            assert words in refused(ws, payload)
    assert good.infer(libero_obs(1))["actions"].shape == (16, 7)  # the good client never noticed
    text = scrape(libero)
    assert 'protocol="openpi",status="INVALID_ARGUMENT"} 6.0' in text
    assert 'protocol="openpi",status="OK"} 2.0' in text


def test_control_messages_are_acknowledged(libero: RunningServer):
    with raw_connect(libero) as ws:
        ws.recv(timeout=30)
        ws.send(codec.pack({"__ctrl__": "episode_start", "__experiment__": "x", "__episode_id__": 1}))
        assert msgpack_numpy.unpackb(ws.recv(timeout=30)) == {"__ack__": "episode_start"}
        ws.send(codec.pack({"__ctrl__": "something_else"}))
        assert msgpack_numpy.unpackb(ws.recv(timeout=30)) == {"__ack__": "ignored"}
        ws.send(codec.pack(libero_obs(0)))
        assert msgpack_numpy.unpackb(ws.recv(timeout=30))["actions"].shape == (16, 7)


def test_healthz_follows_the_server_and_stop_closes_connections(libero: RunningServer):
    url = f"http://127.0.0.1:{libero.server.openpi_port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200 and reply.read() == b"OK\n"
    client = policy(libero)
    libero.server.state.phase = ServerState.NOT_SERVING  # as while a forward pass hangs
    with pytest.raises(urllib.error.HTTPError) as unhealthy:
        urllib.request.urlopen(url, timeout=5)
    assert unhealthy.value.code == 503
    unhealthy.value.close()
    with pytest.raises(RuntimeError, match=r"^Error in inference server:\nUNAVAILABLE: "):
        client.infer(libero_obs(0))
    libero.server.state.phase = ServerState.SERVING
    client = policy(libero)
    assert client.infer(libero_obs(0))["actions"].shape == (16, 7)
    libero.stop(grace_s=1.0)
    with pytest.raises(ConnectionClosed) as closed:
        client.infer(libero_obs(0))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCode.GOING_AWAY
    with pytest.raises(OSError):
        policy(libero)


def test_messages_over_the_size_limit_are_refused(server_factory, checkpoints):
    running = server_factory(model_path=str(checkpoints["libero"]), openpi_port=0, max_message_size_mb=1)
    client = policy(running)
    with pytest.raises(ConnectionClosedError) as closed:
        client.infer(libero_obs(0, **{"observation/image": np.zeros((1000, 1000, 3), np.uint8)}))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCode.MESSAGE_TOO_BIG
    assert policy(running).infer(libero_obs(0))["actions"].shape == (16, 7)
    assert 'protocol="openpi",status="RESOURCE_EXHAUSTED"} 1.0' in scrape(running)


def test_api_key_is_required_when_tokens_are_configured(server_factory, checkpoints):
    running = server_factory(model_path=str(checkpoints["libero"]), openpi_port=0, auth_tokens=TOKEN)
    assert policy(running, api_key=TOKEN).infer(libero_obs(0))["actions"].shape == (16, 7)
    for key in (None, "wrong-token-wrong-token-wrong"):
        with pytest.raises(InvalidStatus) as refused_status:
            policy(running, api_key=key)
        assert refused_status.value.response.status_code == 401
    with raw_connect(running, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert msgpack_numpy.unpackb(ws.recv(timeout=30))["action_dim"] == 7
    url = f"http://127.0.0.1:{running.server.openpi_port}/healthz"
    assert urllib.request.urlopen(url, timeout=5).read() == b"OK\n"  # probes need no token
    assert 'protocol="openpi",status="UNAUTHENTICATED"} 2.0' in scrape(running)


def test_wss_with_mutual_tls(server_factory, checkpoints, tmp_path):
    pki = make_pki(tmp_path)
    running = server_factory(
        model_path=str(checkpoints["libero"]),
        openpi_port=0,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_client_ca_file=str(pki.ca.cert),
    )
    uri = f"wss://localhost:{running.server.openpi_port}"
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    with connect(uri, ssl=context, compression=None, max_size=None) as ws:
        assert msgpack_numpy.unpackb(ws.recv(timeout=30))["state_dim"] == 8
        ws.send(codec.pack(libero_obs(0)))
        assert msgpack_numpy.unpackb(ws.recv(timeout=30))["actions"].shape == (16, 7)
    # Without a client certificate the TLS handshake (or, with TLS 1.3, the first read) fails;
    # plaintext cannot speak to the TLS port at all.
    anonymous = ssl.create_default_context(cafile=str(pki.ca.cert))
    for target, options in ((uri, {"ssl": anonymous}), (uri.replace("wss:", "ws:"), {})):
        failed = (ssl.SSLError, OSError, InvalidHandshake, ConnectionClosed)
        with pytest.raises(failed), connect(target, open_timeout=10, **options) as ws:
            ws.recv(timeout=10)


def test_the_endpoint_is_off_unless_asked(server_factory):
    running = server_factory()
    assert running.server.openpi is None and running.server.openpi_port == 0
    assert make_settings().openpi_port is None


def test_a_missing_prompt_is_refused_like_grpc_unless_allowed(server_factory, checkpoints, caplog):
    strict = server_factory(model_path=str(checkpoints["libero"]), openpi_port=0)
    without = {k: v for k, v in libero_obs(0).items() if k != "prompt"}
    for obs in (without, libero_obs(0, prompt=""), libero_obs(0, prompt="  ")):
        with pytest.raises(
            RuntimeError,
            match=r"INVALID_ARGUMENT: invalid observation: prompt: the model needs a language instruction",
        ):
            policy(strict).infer(obs)
    assert 'protocol="openpi",status="INVALID_ARGUMENT"} 3.0' in scrape(strict)

    caplog.set_level(logging.WARNING, logger="vla_inference.engine")
    lenient = server_factory(
        model_path=str(checkpoints["libero"]), openpi_port=0, allow_empty_instruction=True
    )
    first = policy(lenient)
    assert first.infer(without)["actions"].shape == (16, 7)
    assert first.infer(libero_obs(1, prompt=""))["actions"].shape == (16, 7)
    assert policy(lenient).infer(without)["actions"].shape == (16, 7)
    warnings = [r.getMessage() for r in caplog.records if "without a language instruction" in r.getMessage()]
    assert len(warnings) == 2, warnings  # once per connection
    assert all("(prompt)" in w and "once per openpi connection" in w for w in warnings)
