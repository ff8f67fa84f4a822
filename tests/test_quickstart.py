"""The README's quick start, block by block, as a newcomer pastes it after `make run`.

Every fenced block between "## Quick start" and the next "## " heading of README.md is read from the
README itself (there is no second copy) and run, in order, from a folder that looks like the
repository root (a link to each top-level entry, and `.venv` to the running virtual environment),
against a real server with the settings `make run` uses:

- a bash block made only of `[VLA_X=value ...] make run` lines says how the server is started: its
  settings are applied to the test's server (one server, started before the first block);
- a block whose first line is a comment naming a file (`// ts-demo/quickstart.mjs`) is written to
  that file, as the README asks the reader to save it;
- every other bash block runs in `bash -euo pipefail`, every python block in the venv's python.

The only edits: the test's server listens on free ports, so the ports the README's blocks use are
rewritten (PORT_EDITS, each of which must apply somewhere), and the CLI, whose default target is
localhost:50051, gets VLA_TARGET. Each block must exit 0; blocks that ask for actions must show them
(EXPECTED).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import RunningServer, start_server
from vla_inference.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Quick start"

# README text -> what it becomes, given the server's real ports.
PORT_EDITS = {
    "localhost:50051": lambda ports: f"localhost:{ports['grpc']}",
    '"localhost", 8000': lambda ports: f'"localhost", {ports["openpi"]}',
}
# A block containing the first string must print the second.
EXPECTED = [
    ("vla-inference predict", '"actions": [['),
    ("client.predict(frame, joints=state", "16 actions; first:"),
    ("except VLAError", "INVALID_ARGUMENT joint_positions"),
    ("node quickstart.mjs", "16 actions; first:"),
    ("policy.infer(", "(16, 4)"),
]
SERVER_LINE = re.compile(r"^((?:VLA_[A-Z0-9_]+=\S+\s+)*)make run$")
FILE_HEADER = re.compile(r"^(?://|#) ([\w./-]+\.(?:mjs|cjs|js|ts|py))$")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int  # in README.md, for messages

    @property
    def server_settings(self) -> dict[str, str] | None:
        """{VLA_X: value} when this block starts the server (`[VLA_X=v ...] make run`), else None."""
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        if self.language != "bash" or not lines:
            return None
        matches = [SERVER_LINE.match(line) for line in lines]
        if not all(matches):
            return None
        settings: dict[str, str] = {}
        for match in matches:
            assert match is not None
            for pair in match.group(1).split():
                name, _, value = pair.partition("=")
                settings[name] = value
        return settings

    @property
    def file(self) -> str | None:
        match = FILE_HEADER.match(self.text.splitlines()[0]) if self.text else None
        return match.group(1) if match else None


def quickstart_blocks(readme: str) -> list[Block]:
    lines = readme.splitlines()
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    blocks, i = [], start + 1
    while i < end:
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            close = next(j for j in range(i + 1, end) if lines[j].strip() == "```")
            blocks.append(Block(fence.group(1), "\n".join(lines[i + 1 : close]) + "\n", i + 1))
            i = close + 1
        else:
            i += 1
    return blocks


BLOCKS = quickstart_blocks(README.read_text(encoding="utf-8"))


def test_the_quick_start_has_every_kind_of_example() -> None:
    languages = [b.language for b in BLOCKS]
    assert {"bash", "python", "js"} <= set(languages), languages
    for block in BLOCKS:
        assert block.language in ("bash", "python", "js"), f"README.md:{block.line}: {block.language!r}"
        if block.language == "js":
            assert block.file, f"README.md:{block.line}: a JavaScript block names its file on its first line"
    text = "".join(b.text for b in BLOCKS)
    for readme_text in PORT_EDITS:
        assert readme_text in text, f"the quick start no longer uses {readme_text!r}: update PORT_EDITS"
    for marker, _ in EXPECTED:
        assert any(marker in b.text for b in BLOCKS), f"no quick-start block contains {marker!r}"
    assert "openpi_client" in text and "VLAClient" in text and "@vla-inference/client" in text
    assert ".venv/bin/vla-inference" in text  # the CLI is called where `make run` installed it


@dataclass
class Scene:
    server: RunningServer
    ports: dict[str, int]
    root: Path  # what the blocks see as the repository root

    def edit(self, text: str) -> str:
        for readme_text, real in PORT_EDITS.items():
            text = text.replace(readme_text, real(self.ports))
        assert "50051" not in text and "8000" not in text, text  # nothing talks to the default ports
        return text

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLA_") and k != "PYTHONPATH"}
        return env | {"VLA_TARGET": f"localhost:{self.ports['grpc']}"}


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    settings: dict[str, str] = {}
    for block in BLOCKS:
        for name, value in (block.server_settings or {}).items():
            assert settings.get(name, value) == value, f"README.md:{block.line}: {name} set twice"
            settings[name] = value
    assert settings.get("VLA_OPENPI_PORT") == "8000", settings  # what PORT_EDITS assumes
    fields = {name.removeprefix("VLA_").lower(): value for name, value in settings.items()}
    fields |= {key: "0" for key in fields if key.endswith("_port")}  # free ports instead
    # `make run`'s settings (the defaults: the embedded MetaWorld policy) plus the README's, on free
    # ports; one torch thread and one warm-up batch keep a shared CI machine responsive.
    server_settings = Settings(grpc_port=0, metrics_port=0, torch_threads=1, warmup_batches=1, **fields)
    assert server_settings.model_path == "" and server_settings.embedded_model == "metaworld"
    server = start_server(server_settings)
    root = tmp_path_factory.mktemp("checkout")
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv", "ts-demo") and not entry.name.endswith(".tgz"):
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(Path(sys.prefix))
    ports = {"grpc": server.server.port, "openpi": server.server.openpi_port}
    assert all(ports.values()), ports
    yield Scene(server, ports, root)
    server.stop(grace_s=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}-{b.language}" for b in BLOCKS])
def test_quick_start_block(scene: Scene, block: Block) -> None:
    if block.server_settings is not None:
        return  # applied to the server in `scene`
    text = scene.edit(block.text)
    if block.file:
        path = scene.root / block.file
        assert path.parent.is_dir(), f"README.md:{block.line}: {path.parent.name}/ does not exist yet"
        path.write_text(text, encoding="utf-8")
        return
    if block.language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", text]
        result = subprocess.run(
            command, cwd=scene.root, env=scene.env(), capture_output=True, text=True, timeout=600
        )
    else:
        assert block.language == "python"
        result = subprocess.run(
            [str(scene.root / ".venv" / "bin" / "python"), "-"],
            input=text,
            cwd=scene.root,
            env=scene.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    where = f"README.md:{block.line}:\n{text}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, where
    assert "Traceback" not in result.stderr, where
    for marker, shown in EXPECTED:
        if marker in block.text:
            assert shown in result.stdout, where
