"""``python -m greenscope doctor`` and the worker-start hook: each check provoked for real.

Patching is process-global, so every case runs the doctor in a fresh process (warnings
are errors there too) on a fixture app from ``tests/doctor_apps`` and a gunicorn config
written into ``tmp_path``. To stay fast, most runs are forked from a "zygote" interpreter
that has imported what ``python -m greenscope`` imports before it reads anything
(greenscope, SQLAlchemy, gunicorn's settings, gevent unpatched, no driver), then calls
the CLI's ``main()``; a few run ``python -m greenscope`` itself. Assertions are on exit
status, check ids and severities, not on prose, except for the human report's key lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from conftest import pg_url, run_scenario

TESTS = Path(__file__).resolve().parent
HEALTHY = "doctor_apps.healthy:app"
OUR_WORKER = "greenscope.gunicorn.GeventWorker"

ZYGOTE = r"""
import json, os, sys, traceback
import gunicorn.config              # the CLI imports these before it reads a config
import greenscope.__main__ as cli   # greenscope, SQLAlchemy, gevent (not patched)
assert not [m for m in sys.modules if m.split(".")[0] in {"psycopg", "psycopg2"}]
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            os.environ.update(request["env"])
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            if "code" in request:  # a scenario: exit 0 unless it raises
                exec(request["code"], {"__name__": "__main__"})
                status = 0
            else:
                status = cli.main(request["argv"])
        except SystemExit as exc:  # argparse
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@dataclass
class Run:
    """One doctor run: exit status, output and, with --json, the parsed report."""

    status: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, Any]:
        return json.loads(self.stdout)  # type: ignore[no-any-return]

    def severities(self, check: str) -> list[str]:
        """The severities of one check's findings, in order."""
        return [f["severity"] for f in self.report["findings"] if f["check"] == check]

    def worst(self) -> dict[str, str]:
        """Check id -> its worst severity."""
        order = ["ok", "info", "warning", "error"]
        worst: dict[str, str] = {}
        for f in self.report["findings"]:
            if order.index(f["severity"]) >= order.index(worst.get(f["check"], "ok")):
                worst[f["check"]] = f["severity"]
        return worst


class Doctor(Protocol):
    def __call__(self, *args: str, config: str | None = None, **env: str) -> Run: ...


class Scenario(Protocol):
    def __call__(self, code: str, **env: str) -> Any: ...


@pytest.fixture(scope="module")
def zygote() -> Iterator[subprocess.Popen[str]]:
    """An interpreter that forks one child per doctor run."""
    proc = subprocess.Popen(
        [sys.executable, "-W", "error", "-c", ZYGOTE],
        cwd=TESTS,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield proc
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.close()
    status = proc.wait(timeout=10)
    proc.stdout.close()
    assert status == 0


def _fork(zygote: subprocess.Popen[str], tmp_path: Path, request: dict[str, Any]) -> Run:
    """Have the zygote fork a child for ``request``; wait for it."""
    assert zygote.stdin is not None
    assert zygote.stdout is not None
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    request = {**request, "stdout": str(out), "stderr": str(err)}
    zygote.stdin.write(json.dumps(request) + "\n")
    zygote.stdin.flush()
    status = int(zygote.stdout.readline())
    return Run(status, out.read_text(), err.read_text())


@pytest.fixture
def doctor(zygote: subprocess.Popen[str], tmp_path: Path) -> Doctor:
    """Run ``greenscope doctor ARGS`` in a fresh fork, from tests/, config in tmp_path."""

    def run(*args: str, config: str | None = None, **env: str) -> Run:
        argv = ["doctor", *args]
        if config is not None:
            path = tmp_path / "gunicorn.conf.py"
            path.write_text(textwrap.dedent(config))
            argv += ["--gunicorn-config", str(path)]
        return _fork(zygote, tmp_path, {"argv": argv, "env": env})

    return run


@pytest.fixture
def scenario(zygote: subprocess.Popen[str], tmp_path: Path) -> Scenario:
    """Run code in a fresh fork (as conftest's run_scenario); return its last line as JSON."""

    def run(code: str, **env: str) -> Any:
        result = _fork(zygote, tmp_path, {"code": textwrap.dedent(code), "env": env})
        assert result.status == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    return run


def python_m_greenscope(*args: str) -> Run:
    """``python -m greenscope ARGS`` itself, from tests/."""
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "greenscope", *args],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def config(worker_class: str = OUR_WORKER, **settings: object) -> str:
    """A gunicorn config file's text."""
    lines = [f"worker_class = {worker_class!r}"]
    lines += [f"{key} = {value!r}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


ALL_OK = {
    "gevent-patch": "ok",
    "psycopg-import-order": "ok",
    "psycopg2-wait-callback": "ok",
    "sqlite-blocking": "ok",
    "pool-size": "ok",
    "max-connections": "info",  # not checked without --connect
    "engine-guard": "ok",
    "gc": "info",
    "stock-scoped-session": "ok",
    "request-end-removal": "ok",
}


def test_healthy_setup_passes(doctor: Doctor) -> None:
    """greenscope's worker, psycopg 3 after patching, a pool that covers: every check ok."""
    run = doctor("--app", HEALTHY, "--json", config=config(worker_connections=100))
    assert run.status == 0, run.stderr
    assert run.worst() == ALL_OK
    assert run.report["inspected"]["order"] == "patch-then-app"
    assert run.report["exit_status"] == 0
    assert set(run.report) == {
        "version",
        "inspected",
        "findings",
        "errors",
        "warnings",
        "exit_status",
    }


def test_gevent_patch_error_in_an_unpatched_process(scenario: Scenario) -> None:
    """diagnose() in a process gevent never patched: gevent-patch is an error."""
    result = scenario(
        """
        import json
        from greenscope.doctor import diagnose
        print(json.dumps([f.severity for f in diagnose() if f.check == "gevent-patch"]))
        """
    )
    assert result == ["error"]


def test_gevent_patch_error_without_gevent() -> None:
    """diagnose() with gevent missing: gevent-patch is an error naming the install."""
    result = run_scenario(
        """
        import json, sys
        sys.modules["gevent"] = None
        from greenscope.doctor import diagnose
        found = [f for f in diagnose() if f.check == "gevent-patch"]
        print(json.dumps([[f.severity, f.fix] for f in found]))
        """
    )
    assert len(result) == 1
    assert result[0][0] == "error"
    assert "pip install 'greenscope[gunicorn]'" in result[0][1]


def test_psycopg_imported_before_patching_with_preload(doctor: Doctor) -> None:
    """preload_app imports psycopg 3 in the unpatched master: psycopg-import-order errs."""
    run = doctor(
        "--app",
        HEALTHY,
        "--json",
        config=config(worker_connections=100, preload_app=True),
    )
    assert run.status == 1, run.stderr
    assert run.worst() == {**ALL_OK, "psycopg-import-order": "error"}
    assert run.report["inspected"]["order"] == "app-then-patch"


def test_psycopg_imported_by_the_config_file(doctor: Doctor) -> None:
    """A gunicorn.conf.py that imports psycopg runs before patching: psycopg-import-order errs."""
    text = "import psycopg\n" + config(worker_connections=100)
    run = doctor("--app", HEALTHY, "--json", config=text)
    assert run.status == 1, run.stderr
    assert run.severities("psycopg-import-order") == ["error"]


def test_psycopg_wait_func_env_fixes_queries_not_connects(doctor: Doctor) -> None:
    """PSYCOPG_WAIT_FUNC=wait_poll: still an error, as connects still block."""
    run = doctor(
        "--app",
        HEALTHY,
        "--json",
        config=config(worker_connections=100, preload_app=True),
        PSYCOPG_WAIT_FUNC="wait_poll",
    )
    assert run.status == 1, run.stderr
    [finding] = [f for f in run.report["findings"] if f["check"] == "psycopg-import-order"]
    assert finding["severity"] == "error"
    assert "every new connection" in finding["message"]
    assert "every query" not in finding["message"]


def test_psycopg2_without_wait_callback(doctor: Doctor) -> None:
    """psycopg2 with no psycogreen wait callback: psycopg2-wait-callback errs."""
    run = doctor(
        "--app",
        "doctor_apps.psycopg2_plain:app",
        "--json",
        config=config(worker_connections=100),
    )
    assert run.status == 1, run.stderr
    assert run.worst() == {**ALL_OK, "psycopg2-wait-callback": "error"}


def test_psycopg2_with_psycogreen(doctor: Doctor) -> None:
    """psycopg2 patched by psycogreen: psycopg2-wait-callback is ok."""
    run = doctor(
        "--app",
        "doctor_apps.psycopg2_green:app",
        "--json",
        config=config(worker_connections=100),
    )
    assert run.status == 0, run.stderr
    assert run.worst() == ALL_OK


def test_sqlite_file_warns_and_strict_fails(doctor: Doctor) -> None:
    """A file SQLite engine is a warning: exit 0, and exit 1 with --strict."""
    args = ("--app", "doctor_apps.sqlite_file:app", "--json")
    text = config(worker_connections=100)
    run = doctor(*args, config=text)
    assert run.status == 0, run.stderr
    expected = {**ALL_OK, "sqlite-blocking": "warning"}
    del expected["max-connections"]  # SQLite has no server to count connections against
    assert run.worst() == expected
    strict = doctor(*args, "--strict", config=text)
    assert strict.status == 1, strict.stderr
    assert strict.report["exit_status"] == 1


def test_sqlite_busy_timeout_beyond_gunicorn_timeout(doctor: Doctor) -> None:
    """A busy timeout at least gunicorn's timeout: the master would kill the worker, an error."""
    run = doctor(
        "--app",
        "doctor_apps.sqlite_file:app",
        "--json",
        config=config(worker_connections=100, timeout=30),
        DOCTOR_SQLITE_TIMEOUT="60",
    )
    assert run.status == 1, run.stderr
    assert run.severities("sqlite-blocking") == ["error"]


def test_sqlite_in_memory_is_an_error(doctor: Doctor) -> None:
    """An in-memory SQLite database under gevent: one database per greenlet, an error."""
    run = doctor(
        "--app",
        "doctor_apps.sqlite_memory:app",
        "--json",
        config=config(worker_connections=100),
    )
    assert run.status == 1, run.stderr
    assert run.severities("sqlite-blocking") == ["error"]
    assert run.severities("pool-size") == ["info"]  # SingletonThreadPool: not sized


def test_pool_smaller_than_worker_connections(doctor: Doctor) -> None:
    """gunicorn's default worker_connections (1000) against a pool of 100: pool-size errs."""
    run = doctor("--app", HEALTHY, "--json", config=config())
    assert run.status == 1, run.stderr
    assert run.worst() == {**ALL_OK, "pool-size": "error"}
    assert run.report["inspected"]["worker_connections"] == 1000


def test_pool_size_boundaries(scenario: Scenario) -> None:
    """Exactly enough, unlimited overflow and NullPool are ok; one short is an error."""
    result = scenario(
        """
        import json
        from gevent import monkey
        monkey.patch_all()
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool
        from greenscope.doctor import diagnose

        url = "postgresql+psycopg://app@db.invalid/"
        engines = [
            create_engine(url + "exact", pool_size=60, max_overflow=40),
            create_engine(url + "short", pool_size=60, max_overflow=39),
            create_engine(url + "unlimited", pool_size=5, max_overflow=-1),
            create_engine(url + "nullpool", poolclass=NullPool),
        ]
        def pool_findings(**kw):
            found = diagnose(worker_class="gevent", **kw)
            return [
                [f.message.split(":")[1].split("/")[-1], f.severity]
                for f in found if f.check == "pool-size"
            ]
        print(json.dumps([pool_findings(worker_connections=100), pool_findings()]))
        """
    )
    assert result[0] == [
        ["exact", "ok"],
        ["nullpool", "ok"],
        ["short", "error"],
        ["unlimited", "ok"],
    ]
    assert result[1] == [  # worker_connections unknown: nothing to compare with
        ["exact", "info"],
        ["nullpool", "ok"],
        ["short", "info"],
        ["unlimited", "ok"],
    ]


def test_engines_greenscope_cannot_see_are_flagged(scenario: Scenario) -> None:
    """An engine beside greenscope's registries warns until it is registered."""
    result = scenario(
        """
        import json
        from gevent import monkey
        monkey.patch_all()
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker
        import greenscope
        from greenscope.doctor import diagnose

        url = "postgresql+psycopg://app@db.invalid/"
        bound = create_engine(url + "bound")
        Session = greenscope.scoped_session(sessionmaker(bound))
        other = create_engine(url + "other")
        def known():
            return [
                [f.message.split()[1].split("/")[-1], f.severity]
                for f in diagnose(worker_class="gevent") if f.check == "known-engines"
            ]
        before = known()
        greenscope.register_engine(other)
        print(json.dumps([before, known()]))
        """
    )
    assert result == [[["other", "warning"]], []]


def test_engine_guard_is_reported_per_engine(scenario: Scenario) -> None:
    """Guarded engines are ok, an opted-out one warns, a user reset listener is noted."""
    result = scenario(
        """
        import json
        from gevent import monkey
        monkey.patch_all()
        from sqlalchemy import create_engine, event
        from sqlalchemy.orm import sessionmaker
        import greenscope
        from greenscope.doctor import diagnose

        url = "postgresql+psycopg://app@db.invalid/"
        bound = create_engine(url + "bound")
        Session = greenscope.scoped_session(sessionmaker(bound))  # guarded by default
        listened = greenscope.register_engine(create_engine(url + "listened"))
        event.listen(listened, "reset", lambda *args: None)
        out = greenscope.register_engine(create_engine(url + "out"), guard=False)
        print(json.dumps([
            [f.message.split()[1].split("/")[-1].rstrip(":"), f.severity]
            for f in diagnose(worker_class="gevent") if f.check == "engine-guard"
        ]))
        """
    )
    assert result == [["bound", "ok"], ["listened", "info"], ["out", "warning"]]


def test_flags_override_the_config(doctor: Doctor) -> None:
    """--worker-connections beats the config file, as gunicorn's flags do."""
    run = doctor(
        "--app",
        HEALTHY,
        "--json",
        "--worker-connections",
        "100",
        config=config(worker_connections=5000),
    )
    assert run.status == 0, run.stderr
    assert run.report["inspected"]["worker_connections"] == 100


def test_stock_scoped_session_built_before_patching(doctor: Doctor) -> None:
    """SQLAlchemy's scoped_session imported with preload_app shares one Session: an error."""
    run = doctor(
        "--app",
        "doctor_apps.stock_session:app",
        "--json",
        config=config(worker_connections=100, preload_app=True),
    )
    assert run.status == 1, run.stderr
    assert run.severities("stock-scoped-session") == ["error"]


def test_stock_scoped_session_in_flask_nobody_removes(doctor: Doctor) -> None:
    """Built after patching it is per greenlet, but greenscope's worker does not remove it
    and no Flask teardown does: keep-alive requests would share a Session, an error."""
    run = doctor(
        "--app",
        "doctor_apps.stock_session_flask:app",
        "--json",
        config=config(worker_connections=100),
    )
    assert run.status == 1, run.stderr
    assert run.severities("stock-scoped-session") == ["error"]


def test_stock_scoped_session_in_plain_wsgi_is_a_warning(doctor: Doctor) -> None:
    """In a plain WSGI app the doctor cannot see a remove() call: a warning, not an error."""
    run = doctor(
        "--app",
        "doctor_apps.stock_session:app",
        "--json",
        config=config(worker_connections=100),
    )
    assert run.status == 0, run.stderr
    assert run.severities("stock-scoped-session") == ["warning"]


def test_stock_scoped_session_removed_at_flask_teardown(doctor: Doctor) -> None:
    """SQLAlchemy's scoped_session that the app removes at teardown: an info, no failure."""
    run = doctor(
        "--app",
        "doctor_apps.stock_session_teardown:app",
        "--json",
        config=config("gevent", worker_connections=100),
    )
    assert run.status == 0, run.stderr
    assert run.severities("stock-scoped-session") == ["info"]
    assert run.severities("request-end-removal") == ["info"]  # no greenscope registry


HOOK_COMPOSED = """
from greenscope import gunicorn as greenscope_hooks

def post_request(worker, req, environ, resp):
    greenscope_hooks.post_request(worker, req, environ, resp)
"""

HOOK_OWN = """
def post_request(worker, req, environ, resp):
    pass
"""


@pytest.mark.parametrize(
    ("worker_class", "extra", "app", "expected"),
    [
        ("gevent", "", HEALTHY, "error"),
        ("gevent", "from greenscope.gunicorn import post_request\n", HEALTHY, "ok"),
        ("gevent", "post_request = 'greenscope.gunicorn.post_request'\n", HEALTHY, "ok"),
        ("gevent", HOOK_COMPOSED, HEALTHY, "ok"),
        ("gevent", HOOK_OWN, HEALTHY, "info"),
        ("gevent_pywsgi", "from greenscope.gunicorn import post_request\n", HEALTHY, "error"),
        ("gevent_pywsgi", "", "doctor_apps.middleware:app", "ok"),
        ("gevent", "", "doctor_apps.flask_app:app", "ok"),
        ("greenscope.gunicorn.GeventPyWSGIWorker", "", HEALTHY, "ok"),
        ("sync", "", HEALTHY, "warning"),
        ("gevent_pywsgi", "", "doctor_apps.middleware:wrapped", "ok"),
        ("gevent", "", "doctor_apps.flask_teardown_request:app", "ok"),
        ("gevent", "", "doctor_apps._wsgi:hello", "info"),
    ],
    ids=[
        "gevent",
        "gevent+hook",
        "gevent+hook-path",
        "gevent+composed-hook",
        "gevent+own-hook",
        "pywsgi+hook",
        "pywsgi+middleware",
        "gevent+flask-teardown",
        "greenscope-pywsgi",
        "sync",
        "pywsgi+middleware-inside-another",
        "gevent+flask-teardown-request",
        "gevent+no-database",
    ],
)
def test_request_end_removal(
    worker_class: str, extra: str, app: str, expected: str, doctor: Doctor
) -> None:
    """Who removes Sessions at request end: the worker, a post_request hook, the app, nobody."""
    text = config(worker_class, worker_connections=100) + textwrap.dedent(extra)
    run = doctor("--app", app, "--json", config=text)
    assert run.severities("request-end-removal") == [expected], run.stderr
    assert run.status == (1 if expected == "error" else 0)


def test_sync_worker_is_not_patched(doctor: Doctor) -> None:
    """A sync worker: the app is imported unpatched, gevent-patch is only an info."""
    run = doctor("--app", HEALTHY, "--json", config=config("sync"))
    assert run.status == 0, run.stderr
    assert run.report["inspected"]["order"] == "app-only"
    assert run.severities("gevent-patch") == ["info"]
    assert run.severities("pool-size") == ["ok"]  # one request at a time


def test_no_config_assumes_greenscope_worker() -> None:
    """python -m greenscope without a config or worker class: greenscope's worker assumed."""
    run = python_m_greenscope("doctor", "--app", HEALTHY, "--json")
    assert run.status == 1, run.stderr  # gunicorn's default worker_connections: pool too small
    inspected = run.report["inspected"]
    assert inspected["worker_class_assumed"] is True
    assert inspected["worker_class"] == OUR_WORKER
    assert inspected["order"] == "patch-then-app"
    assert run.worst() == {**ALL_OK, "pool-size": "error", "request-end-removal": "info"}


def test_app_from_wsgi_app_setting_and_factory(doctor: Doctor) -> None:
    """--app may be omitted when the config sets wsgi_app; factories are called."""
    text = config(worker_connections=100, wsgi_app="doctor_apps.healthy:create_app('hi')")
    run = doctor("--json", config=text)
    assert run.status == 0, run.stderr
    assert run.report["inspected"]["app"] == "doctor_apps.healthy:create_app('hi')"


def test_app_that_fails_to_import() -> None:
    """An app whose import raises: exit 2, one line with its message, the traceback on request."""
    run = python_m_greenscope("doctor", "--app", "doctor_apps.broken:app")
    assert run.status == 2
    assert run.stdout == ""
    [line] = run.stderr.splitlines()
    assert line.startswith("greenscope doctor: error: cannot import the app")
    assert "the app's settings are missing DATABASE_URL" in line
    assert "nothing was checked" in line
    assert "--traceback" in line
    shown = python_m_greenscope("doctor", "--app", "doctor_apps.broken:app", "--traceback")
    assert shown.status == 2
    assert "Traceback" in shown.stderr
    assert shown.stderr.strip().splitlines()[-1] == line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give the app"),
        (("--app", "doctor_apps.healthy:missing"), "cannot import the app"),
        (("--app", HEALTHY, "-c", "no-such-gunicorn.conf.py"), "does not exist"),
        (("--app", HEALTHY, "-k", "no.such.Worker"), "cannot load worker class"),
        (("--app", HEALTHY, "--worker-connections", "0"), "must be at least 1"),
        (("--app", HEALTHY, "--chdir", "/no/such/dir"), "cannot change to the directory"),
        (("--app", HEALTHY, "-k", "gevent", "--chdir", "/no/such/dir"), "invalid chdir"),
        (("--app", "doctor_apps.healthy:create_app(**{})"), "**kwargs cannot be given"),
    ],
    ids=[
        "no-app",
        "no-attribute",
        "no-config",
        "no-worker-class",
        "worker-connections",
        "chdir",
        "chdir-with-config",
        "kwargs",
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], message: str, doctor: Doctor) -> None:
    """Usage and loading errors exit 2 with one line saying what is wrong."""
    run = doctor(*args)
    assert run.status == 2
    assert message in run.stderr.strip().splitlines()[-1]


def test_human_report_of_a_healthy_setup(doctor: Doctor) -> None:
    """The text report: header, one aligned line per check, 'no problems found'."""
    run = doctor("--app", HEALTHY, config=config(worker_connections=100))
    assert run.status == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "greenscope doctor"
    assert lines[1] == f"  app     {HEALTHY}"
    assert lines[3].startswith(f"  worker  {OUR_WORKER}, worker_connections 100, timeout 30 s")
    assert "  ok     gevent-patch  " not in run.stdout  # no leading indent on findings
    assert "ok     gevent-patch            gevent patched threading, socket and select" in lines
    assert (
        "ok     pool-size               engine postgresql+psycopg://app:***@db.invalid/app: "
        "pool_size 20 +" in lines
    )
    assert "secret" not in run.stdout
    assert lines[-1] == "no problems found"
    assert "fix:" not in run.stdout


def test_human_report_of_a_broken_setup(doctor: Doctor) -> None:
    """The text report of errors: ERROR lines, an indented fix, the counting summary."""
    text = config("gevent", preload_app=True)  # worker_connections 1000, no hook
    run = doctor("--app", HEALTHY, config=text)
    assert run.status == 1, run.stderr
    lines = run.stdout.splitlines()
    errors = [line.split()[1] for line in lines if line.startswith("ERROR")]
    assert errors == ["psycopg-import-order", "pool-size", "request-end-removal"]
    fixes = [line for line in lines if line.lstrip().startswith("fix: ")]
    assert len(fixes) == 3
    assert all(line.startswith(" " * 31 + "fix: ") for line in fixes)
    assert all(len(line) <= 100 for line in lines[5:])
    assert lines[-1] == "3 errors: this setup will fail in production"


WORKER_SCENARIO = """
    import json, os
    from gevent import monkey
    monkey.patch_all()
    from sqlalchemy import create_engine
    from greenscope import gunicorn as hooks

    engine = create_engine("sqlite:///never-created.db", pool_size=5, max_overflow=5)

    class Log:
        def __init__(self):
            self.calls = []
        def error(self, msg, *args):
            self.calls.append(["error", msg % args])
        def warning(self, msg, *args):
            self.calls.append(["warning", msg % args])
        def info(self, msg, *args):
            self.calls.append(["info", msg % args])
        def exception(self, msg, *args):
            self.calls.append(["exception", msg % args])

    class Cfg:
        worker_connections = 100
        threads = 1
        timeout = 30
        def post_request(self, *args):
            pass
        post_request.__module__ = "gunicorn.config"  # gunicorn's no-op default

    class Worker(hooks.GeventWorker):
        def __init__(self):  # gunicorn's takes the arbiter's sockets and settings
            self.cfg = Cfg()
            self.log = Log()
"""


def test_post_worker_init_logs_warnings_and_errors_once(scenario: Scenario) -> None:
    """The hook logs each warning and error once per process, through worker.log."""
    result = scenario(
        WORKER_SCENARIO
        + """
    worker = Worker()
    hooks.post_worker_init(worker)
    hooks.post_worker_init(worker)  # again, or greenscope's worker at run(): nothing new
    print(json.dumps(worker.log.calls))
    """
    )
    levels = [level for level, _ in result]
    assert levels == ["warning", "error"], result
    assert result[0][1].startswith("greenscope doctor sqlite-blocking: engine sqlite:///")
    assert result[1][1].startswith("greenscope doctor pool-size: engine sqlite:///")
    assert "Fix: `create_engine(" in result[1][1]
    assert all("greenscope:" not in message for _, message in result)


def test_greenscope_worker_runs_the_checks_before_serving(scenario: Scenario) -> None:
    """GeventWorker.run() runs the checks first; GREENSCOPE_DOCTOR=0 turns that off."""
    code = (
        WORKER_SCENARIO
        + """
    from gunicorn.workers import ggevent
    served = []
    ggevent.GeventWorker.run = lambda self: served.append(len(self.log.calls))
    worker = Worker()
    worker.run()
    print(json.dumps(served))
    """
    )
    assert scenario(code) == [2]
    assert scenario(code, GREENSCOPE_DOCTOR="0") == [0]


def test_post_worker_init_never_raises(scenario: Scenario) -> None:
    """A worker whose settings break the checks: logged with the exception, not raised."""
    result = scenario(
        WORKER_SCENARIO
        + """
    worker = Worker()
    worker.cfg = None  # anything the checks cannot read
    hooks.post_worker_init(worker)
    print(json.dumps([level for level, _ in worker.log.calls]))
    """
    )
    assert result == ["exception"]


def celery_doctor(*argv: str, **env: str) -> Run:
    """``python -m greenscope doctor --celery ...`` in a fresh process, from tests/."""
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "greenscope", "doctor", "--json", *argv],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    ("pool", "install", "expected"),
    [
        ("threads", "0", "error"),  # the next task inherits the Session
        ("gevent", "0", "warning"),  # orphans: a WARNING per task
        ("prefork", "1", "ok"),
    ],
)
def test_celery_worker_without_install_is_flagged(pool: str, install: str, expected: str) -> None:
    """--celery: install() missing is an error for long-lived pools, a warning for gevent."""
    run = celery_doctor(
        "--celery",
        "doctor_apps.celery_worker:app",
        "-P",
        pool,
        "--concurrency",
        "8",
        INSTALL=install,
    )
    assert run.severities("celery-install") == [expected], run.stderr
    assert run.status == (1 if expected == "error" else 0)


def test_celery_gevent_pool_flags_soft_time_limit_and_pool_size() -> None:
    """-P gevent: soft_time_limit is ignored there (warning); -c 100 against a pool of 10."""
    run = celery_doctor(
        "--celery",
        "doctor_apps.celery_worker:app",
        "-P",
        "gevent",
        "--concurrency",
        "100",
        INSTALL="1",
        SOFT="1",
    )
    assert run.severities("celery-soft-time-limit") == ["warning"]
    assert run.severities("pool-size") == ["error"]
    assert run.severities("gevent-patch") == ["ok"], "patched before the app, as Celery does"
    assert run.report["inspected"] == {
        "celery": "doctor_apps.celery_worker:app",
        "pool": "gevent",
        "concurrency": 100,
        "order": "patch-then-app",
    }


def test_celery_and_gunicorn_options_do_not_mix() -> None:
    """--celery with --app, or --pool without --celery: one line, exit 2."""
    run = celery_doctor("--celery", "x:app", "--app", "y:app")
    assert run.status == 2
    assert run.stderr.strip().endswith("not with APP, --app, -c, -k or -w")
    run = celery_doctor("--pool", "gevent", "--app", "y:app")
    assert run.status == 2
    assert "go with --celery" in run.stderr


# -- the framework ---------------------------------------------------------------------


def test_every_check_is_registered_once_in_report_order() -> None:
    """Each id of CHECKS has one registered check, run in CHECKS order, tagged by family."""
    from greenscope.doctor import CHECKS, _framework  # noqa: PLC0415 - no patching here

    registered = _framework._registered()
    assert [check.id for check in registered] == list(CHECKS)
    families = {check.tag: check.func.__module__ for check in registered}
    assert families == {
        "gevent": "greenscope.doctor._gevent",
        "pools": "greenscope.doctor._pools",
        "registries": "greenscope.doctor._registries",
        "servers": "greenscope.doctor._servers",
        "celery": "greenscope.doctor._celery",
    }
    with pytest.raises(ValueError, match="add it to CHECKS"):
        _framework.register("no-such-check", tag="pools")


def test_the_doctor_never_imports_greenscope_gunicorn() -> None:
    """No import circle: greenscope's hooks are known without importing greenscope.gunicorn."""
    result = run_scenario(
        """
        import json, sys
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker
        import greenscope
        from greenscope.doctor import diagnose

        Session = greenscope.scoped_session(sessionmaker(create_engine("sqlite://")))

        def composed(worker, req, environ, resp):
            greenscope.remove_current()

        def marked(worker, req, environ, resp):
            pass
        marked.__greenscope_hook__ = "post_request"  # the marker greenscope's hooks may carry

        def own(worker, req, environ, resp):
            pass

        severities = [
            [f.severity for f in diagnose(worker_class="gevent", post_request=hook)
             if f.check == "request-end-removal"]
            for hook in (composed, marked, own)
        ]
        print(json.dumps([severities, "greenscope.gunicorn" in sys.modules]))
        """
    )
    assert result == [[["ok"], ["ok"], ["info"]], False]


# -- defects: each test failed before its fix ------------------------------------------


def test_no_config_judges_gunicorn_defaults(doctor: Doctor) -> None:
    """No config, no -k: gunicorn's defaults are judged (pool-size errs) and the header says so."""
    run = doctor("--app", HEALTHY)
    assert run.status == 1, run.stderr
    lines = run.stdout.splitlines()
    assert lines[2].startswith("  config  none, no --worker-class: greenscope's worker")
    assert lines[3] == (
        f"  worker  {OUR_WORKER} (assumed), worker_connections 1000, timeout 30 s, workers 1"
    )
    assert [line.split()[1] for line in lines if line.startswith("ERROR")] == ["pool-size"]
    assert "unknown" not in run.stdout
    gevent = doctor("--app", HEALTHY, "-k", "gevent", "--json")  # a worker class, still no config
    assert gevent.report["inspected"]["worker_connections"] == 1000
    assert gevent.severities("pool-size") == ["error"]


def test_app_given_positionally_as_gunicorn_takes_it(doctor: Doctor) -> None:
    """`doctor APP` works as --app does; the same app twice is fine, two different apps are not."""
    text = config(worker_connections=100)
    run = doctor(HEALTHY, "--json", config=text)
    assert run.status == 0, run.stderr
    assert run.report["inspected"]["app"] == HEALTHY
    same = doctor(HEALTHY, "--app", HEALTHY, "--json", config=text)
    assert same.status == 0, same.stderr
    clash = doctor(HEALTHY, "--app", "doctor_apps.middleware:app", config=text)
    assert clash.status == 2
    [line] = clash.stderr.splitlines()
    assert "given twice" in line
    assert "doctor_apps.middleware:app" in line


GREENSCOPE = [sys.executable, "-W", "error", "-m", "greenscope"]
HEALTHY_WORKER = ["-k", OUR_WORKER, "--worker-connections", "100"]  # HEALTHY exits 0 with it

NO_GEVENT = """
import sys
sys.modules["gevent"] = None  # as in a venv without gevent: `import gevent` raises ImportError
from greenscope.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_advice_without_gevent_names_the_wsgi_middleware() -> None:
    """Without gevent a sync worker is told to use the WSGI middleware, not greenscope.gunicorn."""
    argv = ["doctor", "-k", "sync", "--app", HEALTHY, "--json"]
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", NO_GEVENT, *argv],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    run = Run(proc.returncode, proc.stdout, proc.stderr)
    assert run.status == 0, run.stderr
    [finding] = [f for f in run.report["findings"] if f["check"] == "request-end-removal"]
    assert finding["severity"] == "warning"
    assert "greenscope.wsgi.GreenscopeMiddleware" in finding["fix"]
    # greenscope.gunicorn imports gevent: advice to use it would stop gunicorn from starting.
    advice = " ".join(f["fix"] for f in run.report["findings"])
    assert "from greenscope.gunicorn import" not in advice
    assert "-k greenscope.gunicorn" not in advice


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--app", "nosuchmod:app"), "Run the doctor where 'nosuchmod' can be imported"),
        (
            ("--app", HEALTHY, "-k", "nosuch.Worker"),
            "No module named 'nosuch' (ModuleNotFoundError)",
        ),
        (("--app", "doctor_apps.broken:app"), "missing DATABASE_URL (RuntimeError)"),
    ],
    ids=["no-module", "no-worker-class", "app-raises"],
)
def test_expected_failures_print_one_line(
    args: tuple[str, ...], message: str, doctor: Doctor
) -> None:
    """An app or worker class that fails to load: one line on what to do; --traceback adds more."""
    run = doctor(*args)
    assert run.status == 2
    [line] = run.stderr.splitlines()
    assert line.startswith("greenscope doctor: error: ")
    assert message in line
    assert "RuntimeError('" not in line  # gunicorn's wrapper, whose message is a traceback
    shown = doctor(*args, "--traceback")
    assert shown.status == 2
    assert shown.stderr.startswith("Traceback (most recent call last):")
    assert shown.stderr.splitlines()[-1] == line


def test_closed_stdout_ends_quietly() -> None:
    """A reader gone before the report (`| head`): exit 1, no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # closed before the doctor writes: every write to stdout fails (EPIPE)
    try:
        proc = subprocess.run(
            [*GREENSCOPE, "doctor", "--app", HEALTHY, "--json", *HEALTHY_WORKER],
            cwd=TESTS,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert proc.stderr == ""
    assert proc.returncode == 1


def test_max_connections_not_checked_without_connect(doctor: Doctor) -> None:
    """Without --connect: workers x (P + M) is counted, and an info says how to check it."""
    run = doctor("--app", HEALTHY, "--json", config=config(worker_connections=100, workers=3))
    assert run.status == 0, run.stderr
    assert run.report["inspected"]["workers"] == 3
    [finding] = [f for f in run.report["findings"] if f["check"] == "max-connections"]
    assert finding["severity"] == "info"
    assert "3 workers x 100 connections" in finding["message"]
    assert "= 300" in finding["message"]
    assert "`--connect`" in finding["message"]
    assert "SHOW max_connections" in finding["message"]
    flag = doctor(
        "--app", HEALTHY, "-w", "2", "--json", config=config(worker_connections=100, workers=3)
    )
    assert flag.report["inspected"]["workers"] == 2  # the flag beats the config, as in gunicorn
    assert (
        doctor("--app", HEALTHY, "--json").report["inspected"]["workers"] == 1
    )  # gunicorn's default


def test_max_connections_unreachable_database_is_an_info(doctor: Doctor) -> None:
    """--connect to a database that cannot be reached: an info naming why, never a failure."""
    run = doctor(
        "--app",
        "doctor_apps.sized_pool:app",
        "--connect",
        "--json",
        config=config(worker_connections=50),
        DOCTOR_DB_URL="postgresql+psycopg://app@db.invalid/app",
    )
    assert run.status == 0, run.stderr
    [finding] = [f for f in run.report["findings"] if f["check"] == "max-connections"]
    assert finding["severity"] == "info"
    assert "could not ask the server" in finding["message"]
    assert "db.invalid" in finding["message"]


def _pg_limits(url: str) -> tuple[int, int]:
    """(max_connections, connections reserved for superusers) of the test server."""
    from sqlalchemy import create_engine, text  # noqa: PLC0415 - only the PostgreSQL tests

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            limit = int(conn.execute(text("SHOW max_connections")).scalar_one())
            reserved = int(conn.execute(text("SHOW superuser_reserved_connections")).scalar_one())
            extra = conn.execute(text("SELECT current_setting('reserved_connections', true)"))
            reserved += int(extra.scalar_one() or 0)
    finally:
        engine.dispose()
    return limit, reserved


def test_max_connections_asked_from_postgres(doctor: Doctor) -> None:
    """--connect: below the usable limit ok, reaching max_connections warns, beyond it errs."""
    url = pg_url()
    limit, reserved = _pg_limits(url)
    cases = [  # (workers, pool_size): workers x pool_size against the server's limits
        (1, limit - reserved - 1, "ok"),
        (2, limit // 2, "warning"),  # our own test setup: 2 x 50 against 100
        (1, limit - reserved, "warning"),
        (3, limit // 2, "error"),
    ]
    for workers, pool_size, expected in cases:
        run = doctor(
            "--app",
            "doctor_apps.sized_pool:app",
            "--connect",
            "-w",
            str(workers),
            "--json",
            config=config(worker_connections=pool_size),
            DOCTOR_DB_URL=url,
            POOL_SIZE=str(pool_size),
            MAX_OVERFLOW="0",
        )
        [finding] = [f for f in run.report["findings"] if f["check"] == "max-connections"]
        assert finding["severity"] == expected, (workers, pool_size, finding)
        assert f"max_connections {limit}" in finding["message"]
        assert run.status == (1 if expected == "error" else 0), run.stderr


def test_async_engine_is_labelled_and_advised_as_async(scenario: Scenario) -> None:
    """An AsyncEngine's pool: named "async engine", create_async_engine advice, the gevent note."""
    result = scenario(
        """
        import json
        from gevent import monkey
        monkey.patch_all()
        from sqlalchemy.ext.asyncio import create_async_engine
        from greenscope.doctor import diagnose

        engine = create_async_engine(
            "postgresql+psycopg://app@db.invalid/app", pool_size=5, max_overflow=5
        )
        found = diagnose(worker_class="gevent", worker_connections=100)
        print(json.dumps([
            [f.severity, f.message, f.fix] for f in found if f.check == "pool-size"
        ]))
        """
    )
    [[severity, message, fix]] = result
    assert severity == "error"
    assert message.startswith("async engine postgresql+psycopg://app@db.invalid/app:")
    assert "asyncio event loop" in message
    assert fix.startswith("`create_async_engine(..., pool_size=P, max_overflow=M)`")


def test_pool_size_counts_the_connection_a_session_store_adds(scenario: Scenario) -> None:
    """A greenscope.sessions store on the app's engine: each request may hold two."""
    result = scenario(
        """
        import datetime, json
        from gevent import monkey
        monkey.patch_all()
        from sqlalchemy import create_engine
        from sqlalchemy.orm import DeclarativeBase, sessionmaker
        import greenscope
        from greenscope.doctor import diagnose
        from greenscope.sessions import SQLAlchemyStore, create_session_model

        class Base(DeclarativeBase):
            pass

        engine = create_engine("postgresql+psycopg://app@db.invalid/app", pool_size=10,
                               max_overflow=10)
        Session = greenscope.scoped_session(sessionmaker(engine))
        store = SQLAlchemyStore(engine, create_session_model(Base),
                                max_age=datetime.timedelta(hours=1))

        def pool(n):
            [f] = [f for f in diagnose(worker_class="gevent", worker_connections=n)
                   if f.check == "pool-size"]
            return [f.severity, f.message, f.fix or ""]

        print(json.dumps([pool(10), pool(11)]))
        """
    )
    (ok, ok_msg, _), (err, err_msg, fix) = result
    assert ok == "ok", ok_msg
    assert "worker_connections x 2" in ok_msg
    assert err == "error", err_msg
    assert "may need 22 at once" in err_msg
    assert "greenscope.sessions' store's" in err_msg
    assert "`worker_connections = 10`" in fix
