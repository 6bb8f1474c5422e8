"""The README's quickstart runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    """The first Python block of the README runs cleanly (warnings are errors) in a new process."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert blocks, "the README has a python quickstart block"
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
    assert (tmp_path / "quickstart.db").exists()


def test_doctor_output_in_the_readme_is_what_it_prints() -> None:
    """Each `python -m greenscope doctor` session shown in the README runs and prints that."""
    sessions = re.findall(r"```console\n\$ (.*?)\n(.*?)```", README.read_text(), re.DOTALL)
    sessions = [(cmd, out) for cmd, out in sessions if "greenscope doctor" in cmd]
    assert len(sessions) == 2, "the README shows a healthy and a broken setup"
    for command, shown in sessions:
        proc = subprocess.run(
            ["bash", "-c", command.replace("python -m", f"{sys.executable} -m")],
            cwd=README.parent,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.stdout == shown, f"{command}\n{proc.stderr}"
        assert proc.returncode == (1 if "ERROR" in shown else 0), proc.stderr
