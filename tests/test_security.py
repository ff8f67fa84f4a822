"""Transport security over real channels: TLS, mutual TLS, bearer tokens, loopback defaults,
start-up validation of the VLA_TLS_* / VLA_AUTH_* variables, and decompression bombs."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import urllib.request
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.certs import Pki, make_pki
from tests.support.toy_model import ToyPolicy
from vla_inference import cli
from vla_inference.api.v1 import vla_inference_pb2 as pb
from vla_inference.client import AsyncVLAClient, ChannelSecurity, VLAClient, VLAError, make_observation
from vla_inference.config import ConfigError, Settings
from vla_inference.preprocessing import images
from vla_inference.preprocessing.images import encode_jpeg
from vla_inference.transport.security import TokenChecker

IMAGE = (np.arange(32 * 24 * 3) % 251).astype(np.uint8).reshape(24, 32, 3)
JOINTS = [0.1, -0.2, 0.3, 0.0, 0.5, -0.5, 1.0]
TOKEN_A = "tok-a-0123456789abcdef"
TOKEN_B = "tok-b-0123456789abcdef"
TOKEN_FILE_TOKEN = "tok-file-0123456789abcdef"
# 127.0.0.1 in /proc/net/tcp, ::ffff:127.0.0.1 and ::1 in /proc/net/tcp6 (little-endian words)
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _predict_code(client: VLAClient) -> grpc.StatusCode:
    try:
        client.predict(IMAGE, JOINTS, "x", timeout=3)
    except VLAError as exc:
        return exc.code
    return grpc.StatusCode.OK


# --- binding ------------------------------------------------------------------------------------
def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.append(address)
    return found


def test_default_binds_are_loopback_for_grpc_and_metrics(monkeypatch, server_factory):
    monkeypatch.delenv("VLA_HOST", raising=False)
    monkeypatch.delenv("VLA_METRICS_HOST", raising=False)
    defaults = Settings()
    assert defaults.host == "127.0.0.1"
    assert defaults.metrics_host == "127.0.0.1"
    assert defaults.metrics_enabled and defaults.metrics_port != defaults.grpc_port
    running = server_factory(ToyPolicy)  # host / metrics_host left at their defaults
    assert running.server.port and running.server.metrics_port
    for port in (running.server.port, running.server.metrics_port):
        addresses = _listeners(port)
        if not Path("/proc/net/tcp").exists():
            pytest.skip("no /proc/net/tcp to read listening sockets from")
        assert addresses, f"nothing listens on {port}"
        assert set(addresses) <= LOOPBACK, f"port {port} listens on {addresses}, not on loopback only"


# --- TLS ----------------------------------------------------------------------------------------
def test_tls_server_answers_tls_clients_and_refuses_others(server_factory, pki):
    running = server_factory(ToyPolicy, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key))
    with VLAClient(running.target, security=ChannelSecurity(root_certificates=pki.ca.cert_pem)) as client:
        assert len(client.predict(IMAGE, JOINTS, "over tls", seed=1).actions) == 8
        assert client.info().model_name == "toy-policy"
    with VLAClient(running.target) as plaintext:
        assert _predict_code(plaintext) in REFUSED
    untrusted = ChannelSecurity(root_certificates=pki.foreign_ca.cert_pem)
    with VLAClient(running.target, security=untrusted) as client:
        assert _predict_code(client) in REFUSED


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(server_factory, pki):
    running = server_factory(
        ToyPolicy,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_client_ca_file=str(pki.ca.cert),
    )
    good = ChannelSecurity(
        root_certificates=pki.ca.cert_pem,
        certificate_chain=pki.client.cert_pem,
        private_key=pki.client.key_pem,
    )
    with VLAClient(running.target, security=good) as client:
        assert len(client.predict(IMAGE, JOINTS, "mtls", seed=1).actions) == 8
    no_cert = ChannelSecurity(root_certificates=pki.ca.cert_pem)
    foreign = ChannelSecurity(
        root_certificates=pki.ca.cert_pem,
        certificate_chain=pki.foreign_client.cert_pem,
        private_key=pki.foreign_client.key_pem,
    )
    for security in (no_cert, foreign):
        with VLAClient(running.target, security=security) as client:
            assert _predict_code(client) in REFUSED


# --- tokens -------------------------------------------------------------------------------------
@pytest.fixture
def token_server(server_factory, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# rotated 2026-11\n{TOKEN_FILE_TOKEN}\n\n")
    return server_factory(ToyPolicy, auth_tokens=f"{TOKEN_A}, {TOKEN_B}", auth_token_file=str(token_file))


def test_every_configured_token_is_accepted(token_server):
    for token in (TOKEN_A, TOKEN_B, TOKEN_FILE_TOKEN):
        with VLAClient(token_server.target, security=ChannelSecurity(token=token)) as client:
            assert len(client.predict(IMAGE, JOINTS, "x", seed=1).actions) == 8
            assert client.info().model_name == "toy-policy"
            assert client.health().ready
            chunks = list(client.stream(iter([make_observation(IMAGE, JOINTS, "s", request_id="s1")])))
            assert [c.request_id for c in chunks] == ["s1"]


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong-token-0123456789"),),
        (("authorization", f"Bearer {TOKEN_A[:-1]}"),),  # prefix of a valid token
        (("authorization", f"Bearer {TOKEN_A}x"),),  # valid token plus a character
        (("authorization", f"Basic {TOKEN_A}"),),  # wrong scheme
        (("authorization", TOKEN_A),),  # no scheme
        (("x-api-key", TOKEN_A),),  # wrong header
    ],
    ids=["none", "wrong", "prefix", "suffix", "basic", "no-scheme", "other-header"],
)
def test_every_rpc_without_a_valid_token_is_unauthenticated(token_server, metadata):
    channel = grpc.insecure_channel(token_server.target)
    observation = make_observation(IMAGE, JOINTS, "x", request_id="r").SerializeToString()
    calls = {
        "Predict": lambda: channel.unary_unary("/vla_inference.v1.VLAInference/Predict")(
            observation, timeout=5, metadata=metadata
        ),
        "GetModelInfo": lambda: channel.unary_unary("/vla_inference.v1.VLAInference/GetModelInfo")(
            b"", timeout=5, metadata=metadata
        ),
        "HealthCheck": lambda: channel.unary_unary("/vla_inference.v1.VLAInference/HealthCheck")(
            b"", timeout=5, metadata=metadata
        ),
        "StreamControl": lambda: list(
            channel.stream_stream("/vla_inference.v1.VLAInference/StreamControl")(
                iter([observation]), timeout=5, metadata=metadata
            )
        ),
        # garbage body: refused for the token, before anything parses it
        "Predict-garbage": lambda: channel.unary_unary("/vla_inference.v1.VLAInference/Predict")(
            b"\xff\xff\xff", timeout=5, metadata=metadata
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert "bearer token" in info.value.details()
        assert TOKEN_A not in info.value.details()
    channel.close()


def test_health_and_reflection_stay_open_and_denials_are_counted(token_server):
    channel = grpc.insecure_channel(token_server.target)
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    assert "vla_inference.v1.VLAInference" in {
        s.name for r in responses for s in r.list_services_response.service
    }
    with VLAClient(token_server.target) as anonymous:
        assert _predict_code(anonymous) == grpc.StatusCode.UNAUTHENTICATED
        assert _predict_code(anonymous) == grpc.StatusCode.UNAUTHENTICATED
    text = urllib.request.urlopen(token_server.metrics_url, timeout=5).read().decode()
    counted = '{model="toy/embedded-random",protocol="grpc",status="UNAUTHENTICATED"}'
    assert f"vla_inference_requests_total{counted} 2.0" in text
    assert 'status="OK"' not in text  # a refused request never reached the servicer
    channel.close()


def test_token_check_compares_against_every_token(monkeypatch):
    import hmac

    checker = TokenChecker([TOKEN_A, TOKEN_B, TOKEN_FILE_TOKEN])
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, expected in ((TOKEN_A, True), (TOKEN_FILE_TOKEN, True), ("nope", False), (None, False)):
        calls.clear()
        assert checker.check(presented) is expected
        assert len(calls) == 3  # no early exit on a match or a mismatch
        assert all(a == b == 32 for a, b in calls)  # fixed-length digests: lengths do not leak


def test_async_client_with_tls_and_token(server_factory, pki):
    running = server_factory(
        ToyPolicy,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        auth_tokens=TOKEN_A,
    )

    async def go() -> tuple[int, grpc.StatusCode]:
        security = ChannelSecurity(token=TOKEN_A, root_certificates=pki.ca.cert_pem)
        async with AsyncVLAClient(running.target, security=security) as client:
            chunk = await client.predict(IMAGE, JOINTS, "async", seed=2)
        anonymous = ChannelSecurity(root_certificates=pki.ca.cert_pem)
        async with AsyncVLAClient(running.target, security=anonymous) as client:
            try:
                await client.info()
                code = grpc.StatusCode.OK
            except VLAError as exc:
                code = exc.code
        return len(chunk.actions), code

    assert asyncio.run(go()) == (8, grpc.StatusCode.UNAUTHENTICATED)


def test_cli_against_mutual_tls_and_token_server(server_factory, pki, tmp_path, capsys):
    running = server_factory(
        ToyPolicy,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_client_ca_file=str(pki.ca.cert),
        auth_tokens=TOKEN_A,
    )
    image = tmp_path / "frame.jpg"
    image.write_bytes(encode_jpeg(IMAGE))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN_A + "\n")
    tls = [
        "--target",
        f"localhost:{running.server.port}",
        "--ca-cert",
        str(pki.ca.cert),
        "--client-cert",
        str(pki.client.cert),
        "--client-key",
        str(pki.client.key),
    ]
    joints = ["--joints", ",".join(map(str, JOINTS)), "--instruction", "pick up the cup"]
    assert cli.main(["predict", *tls, *joints, "--image", str(image), "--token-file", str(token_file)]) == 0
    assert len(json.loads(capsys.readouterr().out)["actions"]) == 8
    assert cli.main(["info", *tls, "--token", TOKEN_A]) == 0
    assert json.loads(capsys.readouterr().out)["modelName"] == "toy-policy"
    assert cli.main(["health", *tls]) == 0  # the probe needs no token
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli.main(["predict", *tls, *joints, "--image", str(image)]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli.main(["info", "--target", f"localhost:{running.server.port}", "--token", TOKEN_A]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err  # plaintext to a TLS port


# --- start-up validation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "variable", "words"),
    [
        (
            {"VLA_TLS_CERT_FILE": "/no/such.crt", "VLA_TLS_KEY_FILE": "/no/such.key"},
            "VLA_TLS_CERT_FILE",
            "readable",
        ),
        ({"VLA_TLS_CERT_FILE": "{server.cert}"}, "VLA_TLS_KEY_FILE", "both set"),
        ({"VLA_TLS_KEY_FILE": "{server.key}"}, "VLA_TLS_KEY_FILE", "both set"),
        (
            {"VLA_TLS_CERT_FILE": "{server.key}", "VLA_TLS_KEY_FILE": "{server.key}"},
            "VLA_TLS_CERT_FILE",
            "CERTIFICATE",
        ),
        (
            {"VLA_TLS_CERT_FILE": "{server.cert}", "VLA_TLS_KEY_FILE": "{server.cert}"},
            "VLA_TLS_KEY_FILE",
            "PRIVATE KEY",
        ),
        ({"VLA_TLS_CLIENT_CA_FILE": "{ca.cert}"}, "VLA_TLS_CLIENT_CA_FILE", "only together"),
        ({"VLA_AUTH_TOKENS": "short"}, "VLA_AUTH_TOKENS", "at least 16"),
        ({"VLA_AUTH_TOKENS": "has a space in it 0123456789"}, "VLA_AUTH_TOKENS", "printable"),
        ({"VLA_AUTH_TOKEN_FILE": "/no/such/tokens"}, "VLA_AUTH_TOKEN_FILE", "readable"),
        ({"VLA_AUTH_TOKEN_FILE": "{empty}"}, "VLA_AUTH_TOKEN_FILE", "at least one token"),
    ],
)
def test_bad_security_settings_fail_start_up_in_one_line(
    monkeypatch, pki, tmp_path, capsys, env, variable, words
):
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    names = {"server": pki.server, "ca": pki.ca}
    for key, value in env.items():
        if value.startswith("{"):
            stem, _, attr = value.strip("{}").partition(".")
            value = str(empty) if stem == "empty" else str(getattr(names[stem], attr))
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env()
    message = str(info.value)
    assert message.startswith(f"invalid {variable}=") and words in message and "\n" not in message
    assert "short" not in message and "space in it" not in message  # tokens are never echoed
    with pytest.raises(SystemExit) as exit_info:  # `vla-inference serve` refuses to start
        cli.main(["serve"])
    assert exit_info.value.code == 2
    assert variable in capsys.readouterr().err


def test_tokens_are_masked_in_config_output_and_repr(monkeypatch, capsys):
    monkeypatch.setenv("VLA_AUTH_TOKENS", TOKEN_A)
    assert TOKEN_A not in repr(Settings.from_env())
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "VLA_AUTH_TOKENS" in out and TOKEN_A not in out


# --- decompression bombs -------------------------------------------------------------------------
def _jpeg_claiming(width: int, height: int) -> bytes:
    """A valid small baseline JPEG whose SOF0 header claims width x height."""
    data = bytearray(encode_jpeg(np.zeros((8, 8, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # rows of zeros compress ~1000:1; 64 KiB of them is a 60-odd-byte IDAT
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 65536, 9))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("encoding", "data", "size"),
    [
        (pb.IMAGE_ENCODING_JPEG, _jpeg_claiming(65000, 65000), (0, 0)),
        (pb.IMAGE_ENCODING_PNG, _png_claiming(1 << 20, 1 << 20), (0, 0)),
        (pb.IMAGE_ENCODING_PNG, _png_claiming(0xFFFFFFFF, 0xFFFFFFFF), (0, 0)),
        (pb.IMAGE_ENCODING_RAW_RGB, b"\0" * 12, (1 << 20, 1 << 20)),
    ],
    ids=["jpeg-65000^2", "png-2^20^2", "png-2^32^2", "raw-2^20^2"],
)
def test_decompression_bomb_is_refused_before_decoding(server_factory, monkeypatch, encoding, data, size):
    assert len(data) < 1000  # a tiny file ...
    decoded = []

    def must_not_decode(*args, **kwargs):
        decoded.append(args)
        raise AssertionError("decoder reached")

    # the server runs in this process: any call into a pixel decoder would be recorded here
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", must_not_decode)
    monkeypatch.setattr(images.Image, "open", must_not_decode)
    running = server_factory(ToyPolicy)  # default VLA_MAX_IMAGE_PIXELS (4096 x 4096)
    observation = make_observation(None, JOINTS, "bomb")
    observation.camera_image = data
    observation.camera_image_encoding = encoding
    observation.camera_image_width, observation.camera_image_height = size
    with running.client() as client:
        t0 = time.monotonic()
        with pytest.raises(VLAError) as info:
            client.predict_observation(observation, timeout=10)
        elapsed = time.monotonic() - t0
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field == "camera_image"
    assert "over the limit" in info.value.message and "VLA_MAX_IMAGE_PIXELS" in info.value.message
    assert decoded == [] and elapsed < 2.0
    monkeypatch.undo()  # real decoders back: the server still answers normal requests
    with running.client() as client:
        assert len(client.predict(IMAGE, JOINTS, "after the bomb").actions) == 8
