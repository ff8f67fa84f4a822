"""Errors a person can act on: every user mistake at the command line is one line and exit code 1
(2 for usage), never a traceback; a port already in use names the port and its setting;
`vla-inference config` shows what the configured model really uses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.toy_model import ToyPolicy
from vla_inference.cli import main
from vla_inference.preprocessing.images import encode_jpeg

CLI = [sys.executable, "-m", "vla_inference"]
NOWHERE = "127.0.0.1:1"  # nothing listens there


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLA_")}
    return env | overrides


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def frame(tmp_path: Path) -> Path:
    path = tmp_path / "frame.jpg"
    path.write_bytes(encode_jpeg(np.full((32, 32, 3), 90, np.uint8)))
    return path


@pytest.fixture
def toy_server(server_factory):  # type: ignore[no-untyped-def]
    return server_factory(ToyPolicy)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["predict", "--image", "missing.jpg", "--joints", "1,2"], "cannot read --image 'missing.jpg'"),
        (["predict", "--image", "{frame}", "--joints", "0.1,abc"], "value 1 ('abc') is not a number"),
        (["predict", "--image", "{frame}", "--joints", "@{bad_json}"], "not valid JSON"),
        (["predict", "--image", "{frame}", "--joints", "@{not_numbers}"], "expected a JSON array of numbers"),
        (["predict", "--image", "{frame}", "--joints", "@missing.json"], "cannot read --joints file"),
        (["predict", "--image", "{frame}", "--joints", "1", "--token-file", "x"], "cannot read --token-file"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_1(argv, words, frame, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[0.1, 0.2,")
    not_numbers = tmp_path / "state.json"
    not_numbers.write_text('{"state": [1, 2]}')
    names = {"frame": frame, "bad_json": bad_json, "not_numbers": not_numbers}
    argv = [a.format(**names) for a in argv]
    assert main([*argv, "--target", NOWHERE]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("vla-inference predict: ") and words in line, line


def test_a_server_that_is_down_is_one_line_with_a_hint(frame, capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in (["predict", "--image", str(frame), "--joints", "0"], ["info"]):
        assert main([*argv, "--target", NOWHERE, "--timeout", "3"]) == 1
        line = _one_line(capsys.readouterr().err)
        assert "UNAVAILABLE" in line and f"is a server running at {NOWHERE}?" in line, line


def test_usage_errors_exit_2(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--joints", "1"])  # --image is required
    assert exit_info.value.code == 2
    assert "--image" in capsys.readouterr().err


def test_server_refusals_are_one_line(toy_server, frame, capsys) -> None:  # type: ignore[no-untyped-def]
    target = ["--target", toy_server.target]
    assert main(["predict", *target, "--image", str(frame), "--joints", "0,0,nan,0,0,0,0"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("vla-inference predict: INVALID_ARGUMENT") and "value 2 is nan" in line
    corrupt = frame.parent / "corrupt.jpg"
    corrupt.write_bytes(frame.read_bytes()[:100])
    assert main(["predict", *target, "--image", str(corrupt), "--joints", "0,0,0,0,0,0,0"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "camera_image: not a decodable JPEG" in line and "tjDecompress" not in line, line


def test_predict_without_joints_sends_zeros_of_the_models_state_length(toy_server, frame, capsys) -> None:  # type: ignore[no-untyped-def]
    predict = ["predict", "--target", toy_server.target, "--image", str(frame), "--instruction", "wave"]
    assert main([*predict, "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["actions"]) == 8
    assert "sending 7 zeros, the state length of embodiment 'arm7'" in _one_line(captured.err)
    assert main([*predict, "--embodiment", "arm6"]) == 0
    assert "sending 6 zeros" in capsys.readouterr().err
    assert main([*predict, "--embodiment", "h1"]) == 1
    assert "it knows: arm7 (7 values), arm6 (6 values)" in _one_line(capsys.readouterr().err)


def test_joints_from_a_json_file(toy_server, frame, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state.json"
    state.write_text(json.dumps([0.1] * 7))
    argv = [
        "predict",
        "--target",
        toy_server.target,
        "--image",
        str(frame),
        "--joints",
        f"@{state}",
        "--instruction",
        "wave",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and len(json.loads(captured.out)["actions"][0]) == 7


def test_a_closed_pipe_is_not_a_traceback(toy_server) -> None:  # type: ignore[no-untyped-def]
    """`vla-inference info | head -c 1`: the reader goes away before the output is written."""
    command = f"{sys.executable} -m vla_inference info --target {toy_server.target} | head -c 1"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert result.stdout == "{"
    assert result.stderr == "", result.stderr  # no BrokenPipeError, no "Exception ignored"


def test_sim_waits_for_the_server_to_serve(server_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    """`make run & vla-inference sim ...`: the target may still be loading; sim waits (--wait-s)."""
    from vla_inference.cli import UserError, build_parser, wait_until_serving

    gate = threading.Event()

    class SlowLoading(ToyPolicy):
        def load(self, checkpoint_path, device):  # type: ignore[no-untyped-def]
            gate.wait(30)
            super().load(checkpoint_path, device)

    running = server_factory(SlowLoading, wait=False)
    while not running.server.port:
        time.sleep(0.02)
    args = build_parser().parse_args(["sim", "--target", running.target])
    assert args.wait_s == 60.0  # the default
    with pytest.raises(UserError, match=r"not SERVING within --wait-s 0.5 s \(last: NOT_SERVING\)"):
        wait_until_serving(args, 0.5)
    threading.Timer(1.0, gate.set).start()
    started = time.monotonic()
    wait_until_serving(args, 30)
    assert 0.5 < time.monotonic() - started < 30
    assert "waiting for" in capsys.readouterr().err
    nothing = build_parser().parse_args(["sim", "--target", NOWHERE])
    with pytest.raises(UserError, match="UNAVAILABLE"):
        wait_until_serving(nothing, 0.5)


# --- ports in use ------------------------------------------------------------------------------------
@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("setting", ["VLA_GRPC_PORT", "VLA_METRICS_PORT", "VLA_OPENPI_PORT"])
def test_a_port_in_use_names_the_port_and_its_setting(setting: str, taken_port: int) -> None:
    ports = {"VLA_GRPC_PORT": "0", "VLA_METRICS_PORT": "0", setting: str(taken_port)}
    env = _env(VLA_EMBEDDED_MODEL="random", VLA_LOG_LEVEL="WARNING", **ports)
    result = subprocess.run([*CLI, "serve"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert f"cannot serve: {setting}={taken_port} is in use on 127.0.0.1" in line, line
    assert f"set {setting} to a free port" in line


def test_the_metrics_port_message_mentions_prometheus_on_9090() -> None:
    from vla_inference.transport.server import bind_error

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", 9090))
        except OSError:
            pass  # something already listens on 9090: the message is the same
        else:
            sock.listen()
        message = str(bind_error("VLA_METRICS_PORT", "127.0.0.1", 9090))
    assert message.startswith("VLA_METRICS_PORT=9090 is in use") and "Prometheus" in message


# --- vla-inference config ------------------------------------------------------------------------------
def _config(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "config"], env=_env(**env), capture_output=True, text=True, timeout=60)


def test_config_shows_the_model_input_size_and_hides_unset_ports() -> None:
    result = _config()
    assert result.returncode == 0 and result.stderr == ""
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "96x96 (the embedded metaworld model)" in rows["(model"]  # "(model input size)"
    assert "VLA_OPENPI_PORT" not in rows  # unset: the endpoint is off
    assert "VLA_IMAGE_WIDTH" not in rows and "VLA_IMAGE_HEIGHT" not in rows
    assert "224x224 (the embedded random model)" in _config(VLA_EMBEDDED_MODEL="random").stdout
    shown = _config(VLA_OPENPI_PORT="8000")
    assert any(line.split()[:2] == ["VLA_OPENPI_PORT", "8000"] for line in shown.stdout.splitlines())


def test_the_removed_image_size_variables_are_named_when_set() -> None:
    result = _config(VLA_IMAGE_WIDTH="320")
    assert result.returncode == 0
    assert "VLA_IMAGE_WIDTH is set but has no effect" in _one_line(result.stderr)
