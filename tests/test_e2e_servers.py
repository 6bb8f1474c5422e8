"""End to end: the demo service under a real gunicorn (or gevent's pywsgi), real clients.

Every server variant runs on SQLite and on PostgreSQL: greenscope's two worker classes,
the stock ``-k gevent`` worker with greenscope's hooks, and gevent's ``WSGIServer`` with
the WSGI middleware. Many keep-alive clients mix writes, deliberate failures, forgotten
commits, streamed bodies, background writes and mid-stream hang-ups; then, while their
connections are still open and idle, the audit must find nothing checked out, nothing
idle in transaction, no request that saw another's Session, every acknowledged write
stored once and nothing from a failed or forgotten request.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import pg_url

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
sys.path.insert(0, str(DEPLOY))
import loadgen  # noqa: E402 - lives in deploy/, shared with `make demo`

pytestmark = pytest.mark.timeout(180)

PYWSGI_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import sys
from gevent.pywsgi import WSGIServer
from greenscope.wsgi import GreenscopeMiddleware
import demo_app
app = GreenscopeMiddleware(demo_app.app)
WSGIServer(("127.0.0.1", int(sys.argv[1])), app, log=None).serve_forever()
"""


@dataclass
class Database:
    url: str
    table: str
    app_name: str


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The demo's table in a fresh SQLite file or a fresh PostgreSQL table."""
    table = f"demo_{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'demo.db'}"
    else:
        request.applymarker(pytest.mark.postgres)
        url = pg_url().replace("postgresql://", "postgresql+psycopg://")
    db = Database(url, table, f"greenscope-e2e-{uuid.uuid4().hex[:8]}")
    loadgen.create_demo_schema(demo_env(db, "greenscope"))
    yield db
    if request.param == "postgres":
        from sqlalchemy import create_engine, text  # noqa: PLC0415

        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


def demo_env(db: Database, mode: str) -> dict[str, str]:
    import os  # noqa: PLC0415

    return {
        **os.environ,
        "DATABASE_URL": db.url,
        "GREENSCOPE_DEMO_TABLE": db.table,
        "GREENSCOPE_DEMO_APP_NAME": db.app_name,
        "GREENSCOPE_DEMO_MODE": mode,
        "PYTHONPATH": str(DEPLOY),
    }


def gunicorn_argv(variant: str, port: int) -> list[str]:
    base = [sys.executable, "-m", "gunicorn", "--chdir", str(DEPLOY), "-w", "1"]
    # Idle keep-alive connections stay open for a minute: the audit runs while they are.
    base += ["-b", f"127.0.0.1:{port}", "--graceful-timeout", "20", "--keep-alive", "60"]
    if variant == "pywsgi+middleware":
        return [sys.executable, "-c", PYWSGI_SCRIPT, str(port)]
    if variant == "gevent+hooks":
        return [*base, "-c", str(DEPLOY / "gunicorn.hooks.conf.py"), "demo_app:app"]
    return [*base, "-c", str(DEPLOY / "gunicorn.conf.py"), "-k", variant, "demo_app:app"]


VARIANTS = [
    "greenscope.gunicorn.GeventWorker",
    "greenscope.gunicorn.GeventPyWSGIWorker",
    "gevent+hooks",
    "pywsgi+middleware",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_concurrent_keepalive_load_leaves_nothing_behind(
    variant: str, database: Database, tmp_path: Path
) -> None:
    """Under mixed keep-alive load nothing leaks, nothing is lost, nothing is shared."""
    port = loadgen.free_port()
    server = loadgen.Server(
        gunicorn_argv(variant, port), port, demo_env(database, "greenscope"), str(tmp_path)
    )
    try:
        out, clients = loadgen.run_load(port, clients=12, rounds=6, disconnects=4)
        report = loadgen.audit(  # the keep-alive connections are still open and idle
            port, database.url, database.table, out, app_name=database.app_name
        )
        open_after_audit = sum(loadgen.still_open(c) for c in clients)
        for client in clients:
            client.close()
    finally:
        code = server.stop()
    log = server.log()
    assert open_after_audit == 12, "the audit must run while the clients idle"
    assert report["unexpected"] == [], log
    assert report["requests"] == 12 * 6 * 6
    assert report["expected_failures"] == 12 * 6
    assert report["disconnects"] == 4
    assert report["checkedout"] == 0, log
    assert report["idle_in_tx"] in (None, 0)
    assert report["saw_foreign"] == 0
    assert report["background_failed"] == 0
    assert report["lost"] == []
    assert report["background_lost"] == []
    assert report["leaked"] == []
    assert report["duplicates"] == 0
    stats = report["greenscope"]
    assert stats["created"] == stats["removed"] + stats["reaped"] + stats["live"]
    assert stats["live"] == 0
    assert stats["failed"] == 0
    # The only tracebacks are the deliberate failures'; nothing failed in the hub.
    assert log.count("Traceback") == log.count("RuntimeError: deliberate failure"), log
    assert "BlockingSwitchOutError" not in log
    assert "greenscope:" not in log, log  # no orphan warning, no failed close
    if variant != "pywsgi+middleware":
        assert code == 0, log


def test_the_audit_catches_a_server_without_request_end_removal(
    database: Database, tmp_path: Path
) -> None:
    """The control: stock -k gevent with no hook leaves connections and state behind."""
    port = loadgen.free_port()
    argv = gunicorn_argv("gevent+hooks", port)
    argv[argv.index("-c") + 1] = str(tmp_path / "no_hooks.conf.py")
    (tmp_path / "no_hooks.conf.py").write_text('worker_class = "gevent"\n')
    server = loadgen.Server(argv, port, demo_env(database, "greenscope"), str(tmp_path))
    try:
        out, clients = loadgen.run_load(port, clients=6, rounds=2, disconnects=0)
        report = loadgen.audit(port, database.url, database.table, out, app_name=database.app_name)
        for client in clients:
            client.close()
    finally:
        server.stop()
    assert report["checkedout"] == 6, (report["unexpected"], report)  # one per idle client
    assert report["saw_foreign"] > 0
    assert report["idle_in_tx"] in (None, 6)


@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_sigterm_lets_the_request_in_flight_finish(
    variant: str, database: Database, tmp_path: Path
) -> None:
    """SIGTERM with a request in flight: it completes, its write is stored, exit is clean."""
    port = loadgen.free_port()
    server = loadgen.Server(
        gunicorn_argv(variant, port), port, demo_env(database, "greenscope"), str(tmp_path)
    )
    result: list[tuple[int, bytes, float]] = []

    def slow_request() -> None:
        client = loadgen.Client(port)
        try:
            result.append(client.request("GET", "/slow?key=in-flight"))
        finally:
            client.close()

    in_flight = threading.Thread(target=slow_request)
    try:
        before = loadgen.get_stats(port)["requests"]
        in_flight.start()
        while loadgen.get_stats(port)["requests"] == before:  # the server has it now
            pass
        server.proc.send_signal(signal.SIGTERM)
        in_flight.join(30)
    finally:
        code = server.stop()
    assert result, server.log()
    assert result[0][0] == 201, server.log()
    assert code == 0, server.log()
    out = loadgen.Outcome(acked={"in-flight"})
    from sqlalchemy import create_engine, text  # noqa: PLC0415

    engine = create_engine(database.url)
    with engine.connect() as conn:
        keys = [k for (k,) in conn.execute(text(f"SELECT key FROM {database.table}"))]
    engine.dispose()
    assert keys == sorted(out.acked)


@pytest.mark.parametrize("variant", ["greenscope.gunicorn.GeventWorker", "gevent+hooks"])
def test_preload_workers_never_share_the_masters_connections(
    variant: str, database: Database, tmp_path: Path
) -> None:
    """With --preload and a query at import, two workers serve the load without errors."""
    if database.url.startswith("sqlite"):
        pytest.skip("two worker processes writing one SQLite file contend for its lock")
    port = loadgen.free_port()
    argv = gunicorn_argv(variant, port)
    argv[argv.index("-w") + 1] = "2"
    argv[-1:-1] = ["--preload"]
    env = {**demo_env(database, "greenscope"), "GREENSCOPE_DEMO_IMPORT_QUERY": "1"}
    server = loadgen.Server(argv, port, env, str(tmp_path))
    try:
        out, clients = loadgen.run_load(port, clients=8, rounds=4, disconnects=2)
        for client in clients:
            client.close()
        report = loadgen.audit(port, database.url, database.table, out)
    finally:
        code = server.stop()
    log = server.log()
    assert report["unexpected"] == [], log
    assert report["lost"] == []
    assert report["leaked"] == []
    assert log.count("Traceback") == log.count("RuntimeError: deliberate failure"), log
    assert code == 0, log


def test_flask_example_under_gunicorn(tmp_path: Path) -> None:
    """The Flask-SQLAlchemy example under greenscope's worker: writes, background greenlets."""
    env = demo_env(Database(f"sqlite:///{tmp_path / 'flask.db'}", "notes", "flask"), "greenscope")
    subprocess.run(
        [sys.executable, "-c", "import flask_app; flask_app.create_schema()"],
        env=env,
        check=True,
        timeout=60,
    )
    port = loadgen.free_port()
    argv = [sys.executable, "-m", "gunicorn", "--chdir", str(DEPLOY), "-w", "1"]
    argv += ["-b", f"127.0.0.1:{port}", "-k", "greenscope.gunicorn.GeventWorker"]
    server = loadgen.Server([*argv, "flask_app:app"], port, env, str(tmp_path))
    try:
        statuses: list[int] = []

        def client(i: int) -> None:
            c = loadgen.Client(port)
            try:
                for j in range(5):
                    statuses.append(c.request("POST", f"/notes/c{i}-{j}")[0])
            finally:
                c.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        c = loadgen.Client(port)
        try:
            assert c.request("GET", "/notes/1")[0] == 200
            assert c.request("GET", "/notes/100000")[0] == 404
            stats: dict[str, Any] = {}
            for _ in range(100):  # background greenlets may still be committing
                stats = json.loads(c.request("GET", "/stats")[1])
                if stats["notes"] == 100:
                    break
        finally:
            c.close()
    finally:
        code = server.stop()
    assert statuses == [201] * 50
    assert stats["notes"] == 100
    assert stats["checkedout"] == 0
    sessions = stats["sessions"]  # read before /stats made its own Session
    assert sessions["live"] == 0
    assert sessions["created"] == sessions["removed"] + sessions["reaped"]
    assert sessions["reaped"] == 0  # every Session was removed by a teardown
    assert code == 0, server.log()


def test_a_write_sent_again_is_answered_as_before_and_stored_once(
    database: Database, tmp_path: Path
) -> None:
    """Idempotency keys: a retried /write or /slow (a balancer's retry) stores nothing twice."""
    port = loadgen.free_port()
    server = loadgen.Server(
        gunicorn_argv(VARIANTS[0], port), port, demo_env(database, "greenscope"), str(tmp_path)
    )
    client = loadgen.Client(port)
    try:
        answers = [
            client.request(method, path)[:2]
            for method, path in [
                ("POST", "/write?key=w"),
                ("POST", "/write?key=w"),
                ("GET", "/slow?key=s"),
                ("GET", "/slow?key=s"),
                ("GET", "/slow?key=w"),  # another kind's key: a client error
            ]
        ]
    finally:
        client.close()
        server.stop()
    statuses = [status for status, _ in answers]
    assert statuses == [201, 201, 201, 201, 409], answers
    assert b'"replayed": true' not in answers[0][1]
    assert b'"replayed": true' in answers[1][1]
    assert b'"replayed": true' in answers[3][1]
    from sqlalchemy import create_engine, text  # noqa: PLC0415

    engine = create_engine(database.url)
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT key, count(*) FROM {database.table} GROUP BY key"))
        assert dict(rows.all()) == {"w": 1, "s": 1}
    engine.dispose()
