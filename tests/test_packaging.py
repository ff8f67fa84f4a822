"""`pip install .` gives a working server: the wheel carries the generated gRPC code and the embedded
default model, and `vla-inference serve` from it answers a Predict.

What this proves, and how it stays fast: the wheel is built from a copy of the sources *without* the
generated gRPC code (so setup.py's build hook must generate it), with this venv's setuptools and
grpcio-tools (`--no-build-isolation`: no download). It is installed with `--no-deps` into a fresh
venv that sees this venv's third-party packages through a .pth line, but not this checkout's
editable `vla_inference` (that .pth file is only read in a site directory): the package that
runs is the wheel's, outside the source tree. Its dependencies are this venv's, which
pyproject.toml pins; resolving them afresh is what `make install-runtime` does (measured in the
README), not repeated here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vla_inference.client import VLAClient

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = [
    "vla_inference/api/v1/vla_inference.proto",
    "vla_inference/api/v1/vla_inference_pb2.py",
    "vla_inference/api/v1/vla_inference_pb2_grpc.py",
    "vla_inference/py.typed",
    "vla_inference/models/pi0/assets/demo_tokenizer.model",
    "vla_inference/models/pi0/assets/metaworld/config.json",
    "vla_inference/models/pi0/assets/metaworld/model.safetensors",
    "vla_inference/models/pi0/assets/metaworld/tokenizer.model",
    "vla_inference/models/pi0/assets/metaworld/assets/metaworld_sawyer/norm_stats.json",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns its bin directory."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py"),
    )
    assert not list((source / "src").rglob("*_pb2*"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "dist"),
            str(source),
        ],
        check=True,
        timeout=600,
    )
    (wheel,) = (work / "dist").glob("vla_inference-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = [name for name in PACKAGED if name not in names]
        assert not missing, f"not in the wheel: {missing}"
        weights = archive.getinfo("vla_inference/models/pi0/assets/metaworld/model.safetensors")
        assert weights.file_size == (ROOT / "src" / weights.filename).stat().st_size

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "zz_test_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    return venv / "bin"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLA_") and k != "PYTHONPATH"}
    return env | {"VLA_TORCH_THREADS": "1"}


def test_the_installed_package_is_the_wheels(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [
            str(installed / "python"),
            "-c",
            "import vla_inference.api.v1.vla_inference_pb2 as m; print(m.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(installed.parent)), where.stdout  # not this checkout's src/


def test_config_reads_the_packaged_model(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(installed / "vla-inference"), "config"], capture_output=True, text=True, cwd=tmp_path, env=_env()
    )
    assert result.returncode == 0, result.stderr
    assert "96x96 (the embedded metaworld model)" in result.stdout  # read from the wheel's assets


def test_serve_from_the_wheel_answers_a_predict(installed: Path, tmp_path: Path) -> None:
    env = _env() | {"VLA_GRPC_PORT": "0", "VLA_METRICS_ENABLED": "false", "VLA_WARMUP_BATCHES": "1"}
    server = subprocess.Popen(
        [str(installed / "vla-inference"), "serve"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        port, seen = 0, []
        deadline = time.monotonic() + 180
        assert server.stderr is not None
        while time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "gRPC listening on" in line:
                port = int(line.split(":")[-1].split()[0])
            if " SERVING " in line:
                break
        assert port and any(" SERVING " in line for line in seen), "".join(seen)
        with VLAClient(f"127.0.0.1:{port}") as client:
            info = client.info()
            chunk = client.predict(np.zeros((96, 96, 3), np.uint8), [0.0] * 21, "reach the goal", seed=0)
        assert "MetaWorld" in info.model_name and len(chunk.actions) == info.chunk_size
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
