"""A real server on an ephemeral port serving a tiny OpenVLA-OFT checkpoint whose `.pt` files were
converted by the command (`python -m vla_inference convert oft DIR`, a subprocess, as an operator runs it).

Proves: nothing but VLA_MODEL_PATH picks the OFT policy (the directory is detected); GetModelInfo
reports the chunk, the proprio dims, both cameras, no real-time chunking and the confidence's meaning;
several robots sending at once (different prompts, image sizes, states) are served in shared batches,
and each gets the answer the policy gives it alone; a request without the wrist camera is
INVALID_ARGUMENT naming the cameras; `vla-inference predict --camera wrist=FILE` sends the second camera
and prints the same chunk.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.oft_checkpoints import DATASET, STEP, pattern_image, write_tiny_oft_checkpoint
from vla_inference.cli import main
from vla_inference.client import VLAError
from vla_inference.config import Settings
from vla_inference.models.base import Observation
from vla_inference.models.openvla.policy import OpenVLAOFTPolicy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASKS = ["pick up the alphabet soup and place it in the basket", "open the top drawer", "turn on the stove"]
SIZES = [(224, 224), (256, 256), (180, 240), (224, 224)]


def _png(image: np.ndarray) -> bytes:
    """Lossless, so the server decodes exactly the frame the local policy sees."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _converted(tmp_path: Path) -> Path:
    path = write_tiny_oft_checkpoint(tmp_path / "libero_oft", seed=3)  # upstream's .pt files only
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLA_")}
    done = subprocess.run(
        [sys.executable, "-m", "vla_inference", "convert", "oft", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {path / f'action_head--{STEP}_checkpoint.safetensors'}" in done.stdout
    return path


def test_a_converted_checkpoint_serves_a_batch_of_robots(server_factory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = _converted(tmp_path)
    running = server_factory(model_path=str(path), batch_size=4, batch_timeout_ms=300.0)
    rng = np.random.default_rng(7)
    robots = [
        (
            pattern_image(*SIZES[i], seed=i),
            pattern_image(*SIZES[i], seed=i + 4),
            rng.uniform(-1.0, 1.0, 8).astype(np.float32),
            TASKS[i % len(TASKS)],
        )
        for i in range(4)
    ]
    with running.client(timeout=60) as client:
        info = client.info()
        assert (info.model_family, info.model_name, info.action_dim) == ("openvla", "libero_oft", 7)
        assert (info.chunk_size, info.model_horizon) == (8, 8)
        assert list(info.camera_names) == ["base", "left_wrist"] and dict(info.state_dims) == {DATASET: 8}
        assert list(info.rtc_methods) == [] and "always 1.0" in info.confidence_definition
        assert "Real-time chunking does not apply" in info.description

        def predict(robot):  # type: ignore[no-untyped-def]
            base, wrist, joints, task = robot
            return client.predict(_png(base), joints.tolist(), task, cameras={"wrist": _png(wrist)})

        with ThreadPoolExecutor(len(robots)) as pool:
            chunks = list(pool.map(predict, robots))

        with pytest.raises(VLAError) as err:
            client.predict(_png(robots[0][0]), robots[0][2].tolist(), TASKS[0])
        assert err.value.code_name == "INVALID_ARGUMENT" and "left_wrist" in err.value.message

    assert max(chunk.timing.batch_size for chunk in chunks) > 1  # robots shared a forward pass
    local = OpenVLAOFTPolicy(Settings(model_type="openvla"))
    local.load(str(path), "cpu")
    for chunk, (base, wrist, joints, task) in zip(chunks, robots, strict=True):
        got = np.array([a.joint_commands for a in chunk.actions], np.float32)
        alone = local.predict(Observation({"base": base, "wrist": wrist}, joints, task)).actions
        assert got.shape == (8, 7) and chunk.confidence == pytest.approx(1.0)
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5)

    base, wrist, joints, task = robots[1]
    (tmp_path / "base.png").write_bytes(_png(base))
    (tmp_path / "wrist.png").write_bytes(_png(wrist))
    capsys.readouterr()
    predict = ["predict", "--target", running.target, "--image", str(tmp_path / "base.png")]
    predict += ["--instruction", task, "--joints", ",".join(map(str, joints.tolist()))]
    assert main([*predict, "--camera", f"wrist={tmp_path / 'wrist.png'}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(printed["actions"], [a.joint_commands for a in chunks[1].actions], atol=2e-6)
    assert main([*predict, "--camera", "wrist"]) == 1
    assert capsys.readouterr().err.strip() == (
        "vla-inference predict: --camera 'wrist': expected NAME=FILE, e.g. --camera wrist=wrist.jpg"
    )

    first = np.array([a.joint_commands for a in chunks[0].actions])
    second = np.array([a.joint_commands for a in chunks[1].actions])
    assert np.abs(first - second).max() > 1e-3
