"""`make package`: build the sdist and wheel, check them, install the wheel in a clean venv.

Checks: `twine check --strict` on both; the wheel holds `greenscope/py.typed`, the
LICENSE, the compiled `greenscope._hot` and its `.pyi`, and no tests or C sources; the
wheel installed with its `gunicorn` extra into a new virtualenv (no checkout on
sys.path) imports greenscope.gunicorn, runs the compiled module and the README's
quickstart. Then a wheel built with no C compiler (`CC=false`): it must build, hold no
extension, and run the README's quickstart on the pure-Python fallback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout


COMPILED = "import greenscope._hot as h; print(h.compiled)"


def main() -> int:
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="greenscope-package-") as tmp:
        dist = Path(tmp) / "dist"
        run(python, "-m", "build", "--outdir", str(dist), ".")
        files = sorted(dist.iterdir())
        run(python, "-m", "twine", "check", "--strict", *map(str, files))
        wheel = next(f for f in files if f.suffix == ".whl")
        names = zipfile.ZipFile(wheel).namelist()
        problems = []
        if "greenscope/py.typed" not in names:
            problems.append("the wheel has no greenscope/py.typed")
        if not any(n.endswith("LICENSE") for n in names):
            problems.append("the wheel has no LICENSE")
        if tests := [n for n in names if n.startswith(("tests/", "deploy/", "benchmarks/"))]:
            problems.append(f"the wheel ships {tests[:3]}")
        if not any(re.fullmatch(r"greenscope/_hot\..*\.so", n) for n in names):
            problems.append("the wheel has no compiled greenscope._hot")
        if "greenscope/_hot.pyi" not in names:
            problems.append("the wheel has no greenscope/_hot.pyi")
        if c_files := [n for n in names if n.endswith(".c")]:
            problems.append(f"the wheel ships C sources {c_files}")
        venv = Path(tmp) / "venv"
        run(python, "-m", "venv", str(venv))
        pip = str(venv / "bin" / "pip")
        run(pip, "install", "--quiet", "--disable-pip-version-check", f"{wheel}[gunicorn]")
        readme = (ROOT / "README.md").read_text()
        quickstart = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)[0]
        workdir = Path(tmp) / "work"  # not the checkout: greenscope must come from the wheel
        workdir.mkdir()
        vpython = str(venv / "bin" / "python")
        out = run(
            vpython,
            "-W",
            "error",
            "-c",
            "import greenscope, greenscope.gunicorn; print(greenscope.__file__)",
            cwd=workdir,
        )
        if str(venv) not in out:
            problems.append(f"greenscope was imported from {out.strip()}, not the wheel")
        print(run(vpython, "-W", "error", "-c", quickstart, cwd=workdir), end="")
        if run(vpython, "-c", COMPILED, cwd=workdir).strip() != "True":
            problems.append("the installed wheel runs the pure-Python greenscope._hot")

        # No C compiler: the optional extension is skipped, the package still installs.
        plain = Path(tmp) / "plain"
        env = {**os.environ, "CC": "false"}
        sdist = next(f for f in files if f.name.endswith(".tar.gz"))  # no build/ reused
        run(
            python,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(plain),
            str(sdist),
            env=env,
        )
        plain_wheel = next(plain.glob("*.whl"))
        if any(n.endswith(".so") for n in zipfile.ZipFile(plain_wheel).namelist()):
            problems.append("the wheel built with CC=false holds an extension")
        run(pip, "install", "--quiet", "--force-reinstall", "--no-deps", str(plain_wheel))
        if run(vpython, "-c", COMPILED, cwd=workdir).strip() != "False":
            problems.append("the wheel built without a compiler is not the pure-Python one")
        print(run(vpython, "-W", "error", "-c", quickstart, cwd=workdir), end="")
    for problem in problems:
        print(f"package: {problem}", file=sys.stderr)
    print("package: ok" if not problems else "package: FAILED")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
