"""The documentation cannot drift: the settings table is generated from config.py, every relative
link (and its #anchor) resolves, the README stays a front page, `make help` lists every target."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vla_inference.config import (
    MARKDOWN_BEGIN,
    MARKDOWN_END,
    SECTIONS,
    Settings,
    markdown_table,
    render_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "SECURITY.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "deploy" / "helm" / "vla-inference" / "README.md",
    ROOT / "examples" / "metaworld" / "README.md",
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_settings_table_is_the_generated_one() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    assert render_markdown(text) == text, (
        "docs/configuration.md differs from config.py: run `.venv/bin/python -m vla_inference.config --write`"
    )


def test_the_table_lists_every_setting_with_its_default() -> None:
    table = markdown_table()
    for name, info in Settings.model_fields.items():
        assert f"| `VLA_{name.upper()}` |" in table, name
        assert info.description, f"{name} has no description"
    assert "| `VLA_METRICS_PORT` | `9090` |" in table and "| `VLA_OPENPI_PORT` | (empty) |" in table
    assert "| `VLA_ALLOW_EMPTY_INSTRUCTION` | `false` |" in table
    assert set(SECTIONS) <= set(Settings.model_fields)
    assert table.count("### ") == len(SECTIONS)


def test_render_refuses_a_document_without_markers() -> None:
    with pytest.raises(ValueError, match="BEGIN settings table"):
        render_markdown("# no markers here\n")
    assert MARKDOWN_BEGIN in render_markdown(f"a\n{MARKDOWN_BEGIN}\nold\n{MARKDOWN_END}\nb\n")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: Path) -> None:
    text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        path = (document.parent / file_part).resolve() if file_part else document
        assert path.exists(), f"{document.relative_to(ROOT)}: {target} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), (
                f"{document.relative_to(ROOT)}: no heading for #{anchor} in {path.name}"
            )


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, len(lines)
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:3] == ["## Two commands", "## Quick start", "## Models served"], headings


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_help_lists_every_target_aligned() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    phony = re.search(r"^\.PHONY: (.+)$", makefile, flags=re.M)
    assert phony is not None
    result = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.strip()]
    listed = {row.split()[0] for row in rows}
    assert set(phony.group(1).split()) <= listed, set(phony.group(1).split()) - listed
    starts = {len(row) - len(row.split(maxsplit=1)[1]) for row in rows}
    assert len(starts) == 1, result.stdout  # every description starts in the same column
