"""Configuration errors, `vla-inference config`, and the CLI client commands against a live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.support.toy_model import ToyPolicy
from vla_inference.cli import main
from vla_inference.config import ConfigError, Settings
from vla_inference.preprocessing.images import encode_jpeg

ORIGINAL_DEFAULTS = {
    "VLA_MODEL_TYPE": "pi0",
    "VLA_MODEL_PATH": "",
    "VLA_DEVICE": "cpu",
    "VLA_BATCH_SIZE": "1",
    "VLA_CHUNK_SIZE": "16",
    "VLA_TIMEOUT_MS": "5000",
    # The original design's VLA_IMAGE_WIDTH / VLA_IMAGE_HEIGHT (224) are gone: no model family read
    # them; a model's input size comes from its checkpoint (see test_config_shows_the_model_input_size).
    "VLA_ACTION_DIM": "7",
    "VLA_GRPC_PORT": "50051",
    "VLA_MAX_WORKERS": "4",
    "VLA_MAX_MESSAGE_SIZE_MB": "16",
    "VLA_METRICS_ENABLED": "True",
    "VLA_METRICS_PORT": "9090",
}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VLA_")}


def test_defaults_of_the_original_design(monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith("VLA_"):
            monkeypatch.delenv(key)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: (line.split()[1] if len(line.split()) > 1 else "") for line in out.splitlines()}
    for variable, default in ORIGINAL_DEFAULTS.items():
        if default == "":
            assert variable in out
        else:
            assert rows[variable] == default, variable
    assert rows["VLA_HOST"] == "127.0.0.1"  # loopback unless told otherwise


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("VLA_BATCH_SIZE", "zero", "VLA_BATCH_SIZE='zero': expected a whole number"),
        ("VLA_BATCH_SIZE", "0", "VLA_BATCH_SIZE='0': expected >= 1"),
        ("VLA_GRPC_PORT", "70000", "VLA_GRPC_PORT='70000': expected >= 0 and <= 65535"),
        ("VLA_MODEL_TYPE", "gpt4", "VLA_MODEL_TYPE='gpt4': expected one of"),
        ("VLA_DEVICE", "tpu", "VLA_DEVICE='tpu': expected cpu, cuda or cuda:N"),
        ("VLA_METRICS_ENABLED", "maybe", "VLA_METRICS_ENABLED='maybe': expected true or false"),
        ("VLA_TIMEOUT_MS", "-5", "VLA_TIMEOUT_MS='-5': expected >= 1"),
        ("VLA_LOG_LEVEL", "LOUD", "VLA_LOG_LEVEL='LOUD'"),
    ],
)
def test_invalid_value_stops_with_one_clear_line(variable, value, words):
    env = _clean_env() | {variable: value}
    result = subprocess.run(
        [sys.executable, "-m", "vla_inference", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0]


def test_a_model_that_cannot_load_stops_with_one_clear_line_and_no_traceback(tmp_path):
    env = _clean_env() | {
        "VLA_MODEL_TYPE": "openvla",
        "VLA_MODEL_PATH": str(tmp_path / "missing"),
        "VLA_GRPC_PORT": "0",
        "VLA_METRICS_PORT": "0",
        "VLA_LOG_LEVEL": "WARNING",
    }
    result = subprocess.run(
        [sys.executable, "-m", "vla_inference", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no "Exception ignored ... Event loop is closed" after it
    assert "cannot serve" in lines[0] and "does not exist" in lines[0]


def test_config_does_not_import_the_models():
    """config.py validates VLA_MODEL_TYPE from its own list; importing it loads no model code."""
    code = (
        "import sys, vla_inference.config; "
        "print(sorted(m for m in sys.modules if m.startswith('vla_inference')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "['vla_inference', 'vla_inference.config']"


def test_from_env_raises_config_error(monkeypatch):
    monkeypatch.setenv("VLA_MAX_WORKERS", "1000")
    with pytest.raises(ConfigError, match="VLA_MAX_WORKERS='1000'"):
        Settings.from_env()


def test_explicitly_set_is_tracked(monkeypatch):
    monkeypatch.setenv("VLA_ACTION_DIM", "14")
    settings = Settings.from_env()
    assert settings.action_dim == 14 and settings.explicitly_set("action_dim")
    assert not settings.explicitly_set("chunk_size")


@pytest.fixture
def toy_server(server_factory):
    return server_factory(ToyPolicy)


def test_cli_predict_info_health(toy_server, tmp_path, capsys):
    image = tmp_path / "frame.jpg"
    image.write_bytes(encode_jpeg(np.full((32, 32, 3), 100, np.uint8)))
    target = ["--target", toy_server.target]
    joints = "0.1,0.2,0.3,0.4,0.5,0.6,0.7"
    argv = [
        "predict",
        *target,
        "--image",
        str(image),
        "--instruction",
        "wave",
        "--joints",
        joints,
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["model"] == "toy-policy" and len(answer["actions"]) == 8 and len(answer["actions"][0]) == 7
    assert main(["info", *target]) == 0
    assert json.loads(capsys.readouterr().out)["modelName"] == "toy-policy"
    assert main(["health", *target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["predict", *target, "--image", str(image), "--joints", "1,2"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_cli_health_fails_when_nothing_listens(capsys):
    assert main(["health", "--target", "127.0.0.1:1", "--timeout", "1"]) == 1
    assert "not serving" in capsys.readouterr().err
