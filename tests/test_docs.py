"""The documentation builds without a warning, and its Python examples run as written.

Which examples run. Every fenced block of ``README.md`` and of ``docs/**/*.md`` whose info
string starts with ``python`` is an example, and the rest of the info string says how it
is tested:

* ```` ```python ```` (nothing after the language): *runnable*. It runs on its own, in a
  fresh interpreter with warnings as errors (``python -W error example.py``), in an empty
  temporary directory, and must exit 0 and write nothing to stderr. So it is complete:
  its imports, its engine (SQLite files in the current directory), its cleanup
  (``engine.dispose()``), and log output it means to show sent to stdout.
* ```` ```python fragment ````: an excerpt that cannot run alone (a ``gunicorn.conf.py``
  line, code that needs your app or your database, a server that runs forever). It is
  only compiled, so it is still valid Python.

Any other word after ``python`` is an error, so a misspelt marker cannot silently turn a
test off. A fence may be indented (inside a list item); its indentation is removed. Text
that a page pulls in with MyST's ``{include}`` is tested where it is written (the README's
quickstart and doctor reports, by ``tests/test_readme.py``). On GitHub, and in the built
site, ``fragment`` is ignored: the block is highlighted as Python.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])
PAGES = [p for p in PAGES if "_build" not in p.relative_to(ROOT).parts]
MARKERS = {"fragment"}

_OPEN = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Example:
    page: Path
    line: int  # of the opening fence, 1-based
    markers: frozenset[str]
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _fences(page: Path) -> list[tuple[int, str, str]]:
    """(line, info, content) of every fenced block of ``page``, indentation removed."""
    lines = page.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        close = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body = []
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            j += 1
        found.append((i + 1, info, "\n".join(body) + "\n"))
        i = j + 1
    return found


def _examples() -> list[Example]:
    examples = []
    for page in PAGES:
        for line, info, code in _fences(page):
            words = info.split()
            if words and words[0] == "python":
                examples.append(Example(page, line, frozenset(words[1:]), code))
    return examples


EXAMPLES = _examples()
RUNNABLE = [e for e in EXAMPLES if not e.markers]
FRAGMENTS = [e for e in EXAMPLES if e.markers]


def test_examples_are_found_and_marked_correctly() -> None:
    """Every page's python blocks are found, and each is runnable or marked ``fragment``."""
    assert len(RUNNABLE) >= 10, [e.name for e in EXAMPLES]
    unknown = {e.name: sorted(e.markers - MARKERS) for e in EXAMPLES if e.markers - MARKERS}
    assert not unknown, f"unknown markers after ```python (only {sorted(MARKERS)}): {unknown}"
    assert RUNNABLE[0].page.name == "README.md", "the README's quickstart runs first"


@pytest.mark.parametrize("example", RUNNABLE, ids=lambda e: e.name)
def test_runnable_example_runs_as_written(example: Example, tmp_path: Path) -> None:
    """A runnable python block exits 0, stderr empty, warnings as errors, in a new process."""
    script = tmp_path / "example.py"
    script.write_text(example.code)
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"{example.name}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr == "", f"{example.name} wrote to stderr:\n{proc.stderr}"


@pytest.mark.parametrize("example", FRAGMENTS, ids=lambda e: e.name)
def test_fragment_is_valid_python(example: Example) -> None:
    """A ``python fragment`` block is not run, but compiles."""
    compile(example.code, example.name, "exec")


def test_relative_links_point_to_files() -> None:
    """Every relative link of the README and the docs names a file of the repository."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if not path or re.match(r"^[a-z]+:", path):  # same-page anchor, URL, mailto:
                continue
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    """The Sphinx site builds with warnings as errors and every reference resolved (-n)."""
    missing = [m for m in ("sphinx", "furo", "myst_parser") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"the docs extra is not installed (no {', '.join(missing)}): "
            "pip install -e '.[docs]' to build the documentation"
        )
    build = ["-W", "--keep-going", "-n", "-q", "-b", "html", "-d", str(tmp_path / "doctrees")]
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", *build, str(DOCS), str(tmp_path / "html")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert (tmp_path / "html" / "api.html").exists()
