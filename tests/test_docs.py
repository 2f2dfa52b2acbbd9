"""The documentation site keeps its two promises: every measured number on it is rendered from
a record (benchmarks/render_docs.py), and every shell block marked runnable runs.

Also: `mkdocs build --strict` passes (no broken link, missing page or snippet).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED = DOCS / "generated"


def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs",
                                                  ROOT / "benchmarks" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> list[Path]:
    """The hand-written pages and the README: everything but the generated files."""
    return [p for p in sorted(DOCS.rglob("*.md")) if GENERATED not in p.parents] + [
        ROOT / "README.md"]


# --- numbers from records -------------------------------------------------------------------

def test_generated_pages_match_their_records():
    render = _render_docs()
    assert render.stale(render.render_all()) == [], (
        "docs/generated is out of date: run python benchmarks/render_docs.py")


def test_a_number_edited_by_hand_in_a_generated_page_is_caught(tmp_path):
    render = _render_docs()
    pages = render.render_all()
    copy = tmp_path / "generated"
    shutil.copytree(GENERATED, copy)
    headline = copy / "headline.md"
    text = headline.read_text()
    first_number = re.search(r"\d+\.\d", text)
    assert first_number, "the headline table has numbers"
    digit = text[first_number.end() - 1]
    edited = (text[:first_number.end() - 1] + str((int(digit) + 1) % 10)
              + text[first_number.end():])
    headline.write_text(edited)
    assert render.stale(pages, copy) == ["headline.md"]


def test_a_number_edited_in_the_readmes_generated_table_is_caught():
    render = _render_docs()
    pages = render.render_all()
    draft = (ROOT / "README.md").read_text()
    assert render.filled(draft, pages) == draft, "the README's table is rendered"
    start = draft.index("<!-- generated:headline.md -->")
    number = re.compile(r"\d+\.\d").search(draft, start)
    other = "1" if draft[number.start()] == "9" else "9"
    edited = draft[:number.start()] + other + draft[number.start() + 1:]  # 75.0 -> 95.0
    assert edited != draft
    assert render.filled(edited, pages) == draft


#: what a measured number looks like in prose; settings ("10 clients", "α = 0.5") are fine
MEASURED = {
    "an interval": re.compile(r"\[\s*\d+(\.\d+)?\s*,\s*\d+(\.\d+)?\s*\]"),
    "a p-value": re.compile(r"\bp\s*[=<≈]\s*(?!0\.05\b)\d"),  # p < 0.05 is the bar
    "a percentage": re.compile(r"\b(?!95\s?%)\d+(\.\d+)?\s?%"),  # 95 %: the interval's level
    "bytes": re.compile(r"\b\d+(\.\d+)?\s?(KB|MB|GB|TB|GiB|MiB)\b|\b\d+\s+B\b"),  # not 0.5B
    "a time": re.compile(r"\b\d+(\.\d+)?\s?(s|ms|min|h)\b(?!-)"),
    "a ratio": re.compile(r"\b\d+\.\d+\s?×"),
}


def measured_numbers(markdown: str) -> list[str]:
    """Measured-looking numbers in a page's prose: outside code blocks, inline code, HTML
    comments and the snippet lines that include generated files."""
    prose = re.sub(r"^(```|~~~).*?^\1", "", markdown, flags=re.S | re.M)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    prose = re.sub(r"<!-- generated:.*?<!-- /generated -->", "", prose, flags=re.S)
    prose = re.sub(r"<!--.*?-->", "", prose, flags=re.S)
    found = []
    for line in prose.splitlines():
        if line.lstrip().startswith("--8<--"):
            continue
        for what, pattern in MEASURED.items():
            found += [f"{what}: {m.group(0)!r} in {line.strip()[:80]!r}"
                      for m in pattern.finditer(line)]
    return found


def test_the_number_check_sees_what_the_readme_used_to_type():
    typed = ("subj's IFed-ICL 79.6 [75.8, 82.9], −8.2 (p = 0.00028), 3.5 MB a run, "
             "5.9 min for the grid, 2.22× in-process")
    kinds = {hit.split(":")[0] for hit in measured_numbers(typed)}
    assert kinds == {"an interval", "a p-value", "bytes", "a time", "a ratio"}
    assert measured_numbers("10 clients, α = 0.5, 95 % intervals, `--test-size 300`") == []


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_type_no_measured_number_by_hand(page):
    assert measured_numbers(page.read_text()) == [], (
        f"{page.relative_to(ROOT)} types a measured number: render it from its record "
        "(benchmarks/render_docs.py) and include the generated file")


# --- commands that run ----------------------------------------------------------------------

RUNNABLE = re.compile(r"^<!-- runnable(?P<slow>: slow)? -->\n```bash\n(?P<body>.*?)^```",
                      re.S | re.M)


def runnable_pages() -> list:
    """One parameter per page: its runnable blocks in order (a page is followed top to bottom,
    so a later block may use the files an earlier one wrote)."""
    pages = []
    for page in _pages():
        matches = list(RUNNABLE.finditer(page.read_text()))
        if matches:
            marks = [pytest.mark.slow] if any(m.group("slow") for m in matches) else []
            pages.append(pytest.param([m.group("body") for m in matches], marks=marks,
                                      id=str(page.relative_to(ROOT))))
    return pages


def test_the_docs_have_runnable_blocks():
    assert sum(len(p.values[0]) for p in runnable_pages()) >= 6


@pytest.mark.parametrize("blocks", runnable_pages())
def test_runnable_blocks_run(blocks, tmp_path):
    """Each block as a user would paste it: bash -e in one empty folder per page, fedsteer on
    the PATH."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for number, body in enumerate(blocks, 1):
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (f"block {number} exited {done.returncode}\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


# --- the site builds --------------------------------------------------------------------------

def test_mkdocs_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "results" / "index.html").is_file()
