"""Docs that match the repository: every referenced document exists in it, links and anchors resolve,
and the README's configuration table covers every key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from fastgrow.config import DataConfig, ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".sh", ".cfg", ".ini", ".yml", ".yaml", ".json", ""}
# Names the code or a test creates at run time (not documents of the repository).
# tests/test_data.py writes sub/b.md as a corpus file; tools/gpu_check.sh writes OUT/summary.md.
GENERATED = {"sub/b.md", "summary.md", "OUT/summary.md"}
DOC_REF = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.md)\b")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def repo_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = [n for n in out.splitlines() if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk, skipping build output
        skip = {".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache", ".ruff_cache"}
        names = [
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(REPO).parts) and "egg-info" not in str(p)
        ]
    return [REPO / n for n in sorted(names) if (REPO / n).is_file()]


def _text(p: Path) -> str | None:
    if p.suffix not in TEXT_SUFFIXES:
        return None
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def test_every_referenced_document_is_in_the_repository():
    files = repo_files()
    rel = {str(p.relative_to(REPO)) for p in files}
    basenames = {p.name for p in files}
    missing = []
    for p in files:
        text = _text(p)
        if text is None:
            continue
        for m in DOC_REF.finditer(text):
            ref = m.group(1)
            if ref in GENERATED:
                continue
            here = str((p.parent / ref).resolve().relative_to(REPO)) if (p.parent / ref).exists() else None
            if ref in rel or here in rel or Path(ref).name in basenames:
                continue
            line = text.count("\n", 0, m.start()) + 1
            missing.append(f"{p.relative_to(REPO)}:{line}: {ref}")
    assert not missing, "references to documents that are not in the repository:\n" + "\n".join(missing)


def _anchors(md: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for line in md.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_markdown_links_and_anchors_resolve():
    bad = []
    for p in repo_files():
        if p.suffix != ".md":
            continue
        text = p.read_text(encoding="utf-8")
        for m in MD_LINK.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (p.parent / path).resolve() if path else p
            if not dest.exists() or REPO not in dest.parents and dest != REPO:
                bad.append(f"{p.relative_to(REPO)}: {target} (no such file in the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{p.relative_to(REPO)}: {target} (no heading #{anchor})")
    assert not bad, "\n".join(bad)


def test_the_architecture_document_covers_what_the_code_points_at():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for topic in ("TrainState", "grow()", "Checkpoint protocol", "Kernel file anatomy", "Performance targets"):
        assert topic in doc, topic
    assert "## 10. MFU convention" in doc and "6 N + 6 L S d" in doc


@pytest.mark.parametrize("section, cls", [("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)])
def test_readme_configuration_table_lists_every_key(section, cls):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Configuration", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    documented = set()
    for row in rows:
        names = re.findall(r"`([\w.]+)`", row.split("|")[1])
        prefix = names[0].split(".")[0] if names and "." in names[0] else None
        documented |= {n if "." in n else f"{prefix}.{n}" for n in names}
    for f in dataclasses.fields(cls):
        assert f"{section}.{f.name}" in documented, f"{section}.{f.name} is missing from README's Configuration table"
