"""greenscope.sessions under a real gunicorn gevent worker, and in Flask with greenscope.flask."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Mapped, mapped_column

from conftest import mysql_url, pg_url, run_scenario

HERE = Path(__file__).resolve().parent
APPS = HERE / "session_apps"
sys.path.insert(0, str(HERE.parent / "deploy"))
import loadgen  # noqa: E402 - lives in deploy/

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The app's environment, with its session table created (and dropped afterwards)."""
    url = f"sqlite:///{tmp_path / 'sessions.db'}" if request.param == "sqlite" else pg_url()
    table = f"gs_sess_{uuid.uuid4().hex[:8]}"
    environment = {
        **os.environ,
        "DATABASE_URL": url,
        "GREENSCOPE_SESSION_TABLE": table,
        "PYTHONPATH": str(APPS),
    }
    subprocess.run(
        [sys.executable, "-c", "import wsgi_sessions; wsgi_sessions.create_schema()"],
        env=environment,
        check=True,
        timeout=60,
    )
    yield environment
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


class Browser:
    """One keep-alive connection that keeps its cookie, as a browser does."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.cookie: str | None = None

    def get(self, path: str) -> dict[str, Any]:
        headers = {"Cookie": self.cookie} if self.cookie else {}
        self.conn.request("GET", path, headers=headers)
        resp = self.conn.getresponse()
        body = json.loads(resp.read())
        set_cookie = resp.getheader("Set-Cookie")
        if set_cookie:
            self.cookie = set_cookie.split(";", 1)[0]
        assert resp.status == 200, body
        return body  # type: ignore[no-any-return]


def test_each_keep_alive_client_sees_only_its_own_session(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Many browsers on one worker: their own data only; a tampered cookie starts afresh;
    nothing checked out, no Session live, while they idle on open connections."""
    port = loadgen.free_port()
    argv = [sys.executable, "-m", "gunicorn", "--chdir", str(APPS), "-w", "1"]
    argv += ["-k", "greenscope.gunicorn.GeventWorker", "-b", f"127.0.0.1:{port}"]
    argv += ["--keep-alive", "60", "wsgi_sessions:app"]
    server = loadgen.Server(argv, port, env, str(tmp_path))
    browsers = [Browser(port) for _ in range(8)]
    tampered = Browser(port)
    try:
        for n, b in enumerate(browsers):
            assert b.get(f"/set?who=client-{n}")["session"] == {"who": f"client-{n}"}
        for _ in range(3):  # interleaved: every request on its own keep-alive connection
            for n, b in enumerate(browsers):
                assert b.get("/")["session"] == {"who": f"client-{n}"}
        assert browsers[0].cookie is not None
        name, value = browsers[0].cookie.split("=", 1)
        tampered.cookie = f"{name}={value[:-4]}AAAA"
        assert tampered.get("/")["session"] == {}, "a tampered cookie reached a session"
        stats: dict[str, Any] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the browsers idle, their connections open
            stats = loadgen.get_stats(port)
            if stats["checkedout"] == 0 and stats["live"] == 0:
                break
            time.sleep(0.05)
        assert stats["checkedout"] == 0, stats
        assert stats["live"] == 0, stats
        engine = create_engine(env["DATABASE_URL"])
        with engine.connect() as conn:
            rows = conn.execute(
                text(f"SELECT count(*) FROM {env['GREENSCOPE_SESSION_TABLE']}")
            ).scalar_one()
        engine.dispose()
        assert rows == 8
    finally:
        for b in [*browsers, tampered]:
            b.conn.close()
        server.stop()


def test_the_flask_interface_with_greenscope_flask(tmp_path: Path) -> None:
    """Flask's session in the store; the view's db.session work is its own to commit."""
    import flask  # noqa: PLC0415

    from greenscope.flask import SQLAlchemy  # noqa: PLC0415
    from greenscope.sessions import (  # noqa: PLC0415
        FlaskSessionInterface,
        SQLAlchemyStore,
        create_session_model,
    )

    app = flask.Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'f.db'}", SECRET_KEY="k" * 32
    )
    db = SQLAlchemy(app)

    class Note(db.Model):  # type: ignore[name-defined,misc]  # Flask-SQLAlchemy's base
        id: Mapped[int] = mapped_column(primary_key=True)

    model = create_session_model(db.Model)
    with app.app_context():
        db.create_all()
        store = SQLAlchemyStore(db.engine, model, max_age=dt.timedelta(hours=1))
    app.session_interface = FlaskSessionInterface(store)

    @app.route("/visit")
    def visit() -> dict[str, Any]:
        flask.session["visits"] = flask.session.get("visits", 0) + 1
        db.session.add(Note())  # pending: the view never commits it
        return {"visits": flask.session["visits"]}

    @app.route("/fail")
    def fail() -> str:
        flask.session["visits"] = 100
        raise RuntimeError("boom")

    @app.route("/login")
    def login() -> dict[str, Any]:
        flask.session.regenerate()  # type: ignore[attr-defined]
        return {"visits": flask.session["visits"]}

    client = app.test_client()
    assert client.get("/visit").json == {"visits": 1}
    assert client.get("/visit").json == {"visits": 2}
    cookie = client.get_cookie("session")
    assert cookie is not None
    assert "visits" not in cookie.value, "the data is in the cookie"
    app.testing = False  # a real 500, as in production
    assert client.get("/fail").status_code == 500
    assert client.get("/visit").json == {"visits": 3}, "a failed request's change was kept"
    before = client.get_cookie("session")
    assert client.get("/login").json == {"visits": 3}
    after = client.get_cookie("session")
    assert before is not None
    assert after is not None
    assert after.value != before.value, "regenerate() kept the id"
    other = app.test_client()
    assert other.get("/visit").json == {"visits": 1}, "a second browser saw the first's"
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Note)) == 0, "committed"
        assert db.session.scalar(select(func.count()).select_from(model)) == 2
        db.session.remove()
        db.engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
def test_fifty_patched_greenlets_setting_one_id_leave_one_row(database: str) -> None:
    """Under gevent's patching, 50 greenlets set one id at once: one row, no error."""
    url = pg_url() if database == "postgresql" else mysql_url()
    result = run_scenario(
        f"""
        from gevent import monkey
        monkey.patch_all()
        import datetime, json, uuid
        import gevent
        from sqlalchemy import create_engine, func, select
        from sqlalchemy.orm import DeclarativeBase, Session
        from greenscope.sessions import SQLAlchemyStore, create_session_model

        class Base(DeclarativeBase):
            pass

        model = create_session_model(Base, table_name="gs_race_" + uuid.uuid4().hex[:8])
        engine = create_engine({url!r}, pool_size=50, max_overflow=10)
        Base.metadata.create_all(engine)
        store = SQLAlchemyStore(engine, model, max_age=datetime.timedelta(hours=1))
        start = gevent.event.Event()
        errors = []

        def writer(n):
            start.wait()
            try:
                store.set("same", b"value %d" % n)
            except Exception as exc:
                errors.append(repr(exc))

        greenlets = [gevent.spawn(writer, n) for n in range(50)]
        gevent.sleep(0)
        start.set()
        gevent.joinall(greenlets, timeout=60)
        with Session(engine) as s:
            count = s.scalar(select(func.count()).select_from(model))
        Base.metadata.drop_all(engine)
        engine.dispose()
        print(json.dumps({{"rows": count, "errors": errors[:3]}}))
        """
    )
    assert result == {"rows": 1, "errors": []}
