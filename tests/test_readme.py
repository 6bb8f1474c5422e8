"""The README's quickstart and doctor reports are what the code prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
DOCTOR_PAGE = README.parent / "docs" / "doctor.md"


def _any_address(text: str) -> str:
    """Object addresses (``at 0x7f...``) change from run to run."""
    return re.sub(r"0x[0-9a-f]+", "0x...", text)


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    """The README's first Python block runs cleanly (warnings are errors) and prints that."""
    readme = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    assert blocks, "the README has a python quickstart block"
    # The first ```text block after it, with no other block in between.
    shown = re.search(r"```python\n.*?```\n(?:(?!```).)*```text\n(.*?)```", readme, re.DOTALL)
    assert shown, "the quickstart is followed by a ```text block of what it prints"
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", blocks[0]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert _any_address(proc.stdout) == _any_address(shown.group(1))
    assert (tmp_path / "quickstart.db").exists()


def test_doctor_output_in_the_readme_is_what_it_prints() -> None:
    """Each doctor session shown (the README's healthy one, the doctor page's broken one)
    runs and prints that."""
    text = README.read_text() + DOCTOR_PAGE.read_text()
    sessions = re.findall(r"```console\n\$ (.*?)\n(.*?)```", text, re.DOTALL)
    sessions = [(cmd, out) for cmd, out in sessions if "greenscope doctor" in cmd]
    assert len(sessions) == 2, "a healthy setup (README) and a broken one (docs/doctor.md)"
    for command, shown in sessions:
        proc = subprocess.run(
            ["bash", "-c", command.replace("../.venv/bin/python -m", f"{sys.executable} -m")],
            cwd=README.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.stdout == shown, f"{command}\n{proc.stderr}"
        assert proc.returncode == (1 if "ERROR" in shown else 0), proc.stderr
