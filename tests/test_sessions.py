"""greenscope.sessions: HTTP session data in SQL, in the store's own Session, on 3 databases."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest
from sqlalchemy import Engine, String, create_engine, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, registry, sessionmaker

import greenscope
from greenscope.sessions import (
    SessionMiddleware,
    SessionModelMixin,
    SQLAlchemyStore,
    create_session_model,
    register_session_model,
)

from conftest import mysql_url, pg_url

HOUR = dt.timedelta(hours=1)


@dataclass
class DB:
    name: str
    engine: Engine
    model: type[SessionModelMixin]
    items: Any  # an application table, to hold the app's own pending work
    base: Any


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DB]:
    """A fresh session table (and an app table) on each database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sessions.db'}"
    elif request.param == "postgresql":
        url = pg_url()
    else:
        url = mysql_url()
    suffix = uuid.uuid4().hex[:8]

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = f"gs_items_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(64))

    model = create_session_model(Base, table_name=f"gs_session_{suffix}")
    engine = create_engine(url, pool_size=20, max_overflow=60)
    Base.metadata.create_all(engine)
    yield DB(request.param, engine, model, Item, Base)
    greenscope.wait_reaped(10)
    Base.metadata.drop_all(engine)
    engine.dispose()


def rows(db: DB) -> list[tuple[str, bytes]]:
    with Session(db.engine) as s:
        return [(r.session_id, r.data) for r in s.scalars(select(db.model))]


def test_the_store_gets_sets_deletes_and_expires(db: DB) -> None:
    """get/set/delete/delete_all/delete_expired, with expiry, on each database."""
    store = SQLAlchemyStore(db.engine, db.model, max_age=HOUR)
    assert store.get("a") is None
    store.set("a", b"one")
    store.set("a", b"two")  # replaces, resets the expiry
    store.set("b", bytearray(b"bee"))
    assert store.get("a") == b"two"
    assert store.get("b") == b"bee"
    store.set("old", b"x", max_age=dt.timedelta(microseconds=1))
    time.sleep(0.01)
    assert store.get("old") is None, "an expired session is never returned"
    assert store.delete_expired() == 1
    assert sorted(r[0] for r in rows(db)) == ["a", "b"]
    store.delete("a")
    store.delete("a")  # missing: nothing happens
    assert store.get("a") is None
    store.delete_all()
    assert rows(db) == []
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_expires_at_is_utc_and_timezone_aware_on_every_database(db: DB) -> None:
    """Stored in UTC; read back timezone-aware, also from MariaDB's DATETIME."""
    store = SQLAlchemyStore(db.engine, db.model, max_age=HOUR)
    before = dt.datetime.now(dt.timezone.utc)
    store.set("tz", b"data")
    with Session(db.engine) as s:
        row = s.get(db.model, "tz")
        assert row is not None
        assert row.expires_at.tzinfo is not None
        assert row.expires_at.utcoffset() == dt.timedelta(0)
        assert before + HOUR <= row.expires_at <= before + HOUR + dt.timedelta(minutes=1)
        assert row.expired is False
        assert s.scalars(select(db.model.session_id).where(db.model.expired)).all() == []
        past = dt.datetime(2020, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))
        row.expires_at = past  # another time zone in: the same instant out, in UTC
        s.commit()
        s.expire_all()
        again = s.get(db.model, "tz")
        assert again is not None
        assert again.expires_at == past
        assert again.expires_at.utcoffset() == dt.timedelta(0)
        assert s.scalars(select(db.model.session_id).where(db.model.expired)).all() == ["tz"]


def test_fifty_greenlets_setting_one_id_leave_one_row(db: DB) -> None:
    """The upsert is atomic: concurrent sets of one id make one row, and no error."""
    store = SQLAlchemyStore(db.engine, db.model, max_age=HOUR)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            store.set("same", f"value {n}".encode())
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    if db.name == "sqlite":
        # sqlite3 blocks the hub; one engine's writers take turns on SQLite's one lock.
        gevent.joinall([gevent.spawn(writer, n) for n in range(50)], timeout=60)
    else:
        import threading  # noqa: PLC0415 - the test process is not monkey-patched

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    found = rows(db)
    assert len(found) == 1
    assert found[0][0] == "same"
    assert found[0][1].startswith(b"value ")


def app_with_pending_work(db: DB) -> Session:
    """The app's own Session in this greenlet, with uncommitted work: flushed, except on
    SQLite, whose one write lock the flush would hold (tested apart, below)."""
    app = Session(db.engine)
    app.add(db.items(name="pending"))
    if db.name != "sqlite":
        app.flush()
    return app


@pytest.mark.parametrize("call", ["set", "get_expired", "delete"])
def test_the_store_never_commits_or_rolls_back_the_apps_session(db: DB, call: str) -> None:
    """The app's pending work survives set(), get() of an expired id and delete()."""
    store = SQLAlchemyStore(db.engine, db.model, max_age=HOUR)
    store.set("expired", b"x", max_age=dt.timedelta(microseconds=1))
    time.sleep(0.01)
    app = app_with_pending_work(db)
    if call == "set":
        store.set("new", b"data")
    elif call == "get_expired":
        assert store.get("expired") is None
    else:
        store.delete("expired")
    assert app.new or app.in_transaction(), "the store flushed or ended the app's work"
    assert app.new or db.name != "sqlite", "the store flushed the app's pending object"
    with Session(db.engine) as other:
        assert other.scalar(select(func.count()).select_from(db.items)) == 0, "committed"
    app.commit()  # the app decides: now it is stored
    with Session(db.engine) as other:
        assert other.scalar(select(func.count()).select_from(db.items)) == 1, "rolled back"
    app.close()


def test_on_sqlite_a_write_under_the_apps_own_write_lock_is_refused_with_a_reason(
    tmp_path: Path,
) -> None:
    """SQLite: the store refuses to wait for a lock its own greenlet holds, and says why."""

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)

    model = create_session_model(Base)
    engine = create_engine(f"sqlite:///{tmp_path / 'one.db'}")
    Base.metadata.create_all(engine)
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    store = SQLAlchemyStore(engine, model, max_age=HOUR)
    store.set("before", b"ok")  # no app transaction yet: fine
    Session_.add(Item())
    Session_.flush()  # the app now holds SQLite's write lock
    with pytest.raises(RuntimeError, match="holds SQLite's write lock"):
        store.set("during", b"refused")
    assert store.get("before") == b"ok", "reads still work"
    Session_.commit()
    store.set("after", b"ok")
    Session_.remove()
    engine.dispose()


def test_flask_sessions_backend_commits_the_apps_work_the_control(tmp_path: Path) -> None:
    """Control: Flask-Session's SQLAlchemy backend commits the view's pending work."""
    import flask  # noqa: PLC0415 - test dependencies, as is Flask-SQLAlchemy
    import flask_session  # type: ignore[import-untyped]  # noqa: PLC0415
    from flask_sqlalchemy import SQLAlchemy  # noqa: PLC0415

    app = flask.Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'fs.db'}",
        SESSION_TYPE="sqlalchemy",
        SECRET_KEY="x" * 32,
    )
    db = SQLAlchemy(app)

    class Note(db.Model):  # type: ignore[name-defined,misc]  # Flask-SQLAlchemy's base
        id: Mapped[int] = mapped_column(primary_key=True)

    app.config["SESSION_SQLALCHEMY"] = db
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its datetime.utcnow()
        flask_session.Session(app)

        @app.route("/")
        def view() -> str:
            db.session.add(Note())  # pending, never committed by the view
            flask.session["visited"] = True
            return "ok"

        with app.app_context():
            db.create_all()
        app.test_client().get("/")
    with app.app_context():
        stored = db.session.scalar(select(func.count()).select_from(Note))
        db.session.remove()
        db.engine.dispose()
    assert stored == 1, "Flask-Session saved the HTTP session with db.session.commit()"


def test_bad_input_is_refused_with_what_to_do(db: DB) -> None:
    """Empty, too long and non-str ids; non-bytes data; a bad max_age; an unmapped model."""
    store = SQLAlchemyStore(db.engine, db.model, max_age=HOUR)
    with pytest.raises(ValueError, match="non-empty session id"):
        store.set("", b"x")
    with pytest.raises(ValueError, match="at most 255 characters; got 256"):
        store.get("x" * 256)
    with pytest.raises(TypeError, match="takes a str session id; got int"):
        store.delete(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"takes bytes \(serialize the session"):
        store.set("a", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"max_age as a datetime\.timedelta"):
        SQLAlchemyStore(db.engine, db.model, max_age=3600)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_age from more than 0 to 400 days"):
        store.set("a", b"x", max_age=dt.timedelta(0))
    with pytest.raises(ValueError, match="max_age from 1 second to 400 days"):
        SQLAlchemyStore(db.engine, db.model, max_age=dt.timedelta(milliseconds=500))
    with pytest.raises(ValueError, match="max_age from 1 second to 400 days"):
        SQLAlchemyStore(db.engine, db.model, max_age=dt.timedelta.max)
    for bad in ("a b", "nul\x00", "tab\t", "caf\u00e9", "trailing "):
        with pytest.raises(ValueError, match="visible ASCII characters"):
            store.set(bad, b"x")
    with pytest.raises(TypeError, match="takes an Engine or a sessionmaker"):
        SQLAlchemyStore("sqlite://", db.model, max_age=HOUR)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="subclass of SessionModelMixin"):
        SQLAlchemyStore(db.engine, db.items, max_age=HOUR)


def test_other_dialects_get_a_clear_not_implemented_error() -> None:
    """An untested dialect's upsert is refused, naming it."""

    class Base(DeclarativeBase):
        pass

    model = create_session_model(Base)
    engine = create_engine("sqlite://")
    store = SQLAlchemyStore(engine, model, max_age=HOUR)
    with Session(engine) as s:
        s.get_bind(model).dialect.name = "oracle"
        with pytest.raises(NotImplementedError, match="'oracle' dialect"):
            store._upsert(s, {"session_id": "a", "data": b"", "expires_at": None})
    engine.dispose()


def test_models_map_on_a_registry_and_as_your_own_subclass(tmp_path: Path) -> None:
    """create_session_model on a registry; register_session_model for a subclass."""
    reg = registry()
    on_registry = create_session_model(reg, table_name="web_sessions")
    assert on_registry.__table__.name == "web_sessions"  # type: ignore[attr-defined]

    class Base(DeclarativeBase):
        pass

    class MySession(SessionModelMixin):
        __tablename__ = "my_sessions"
        user_id: Mapped[int | None] = mapped_column(default=None)

    assert register_session_model(Base, MySession) is MySession
    assert register_session_model(Base, MySession) is MySession  # idempotent
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    Base.metadata.create_all(engine)
    reg.metadata.create_all(engine)
    store = SQLAlchemyStore(engine, MySession, max_age=HOUR)
    store.set("s", b"d")
    assert store.get("s") == b"d"
    with pytest.raises(TypeError, match="subclass of"):
        register_session_model(Base, dict)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="takes a DeclarativeBase subclass"):
        create_session_model(object())
    engine.dispose()


# -- the WSGI middleware ----------------------------------------------------------------


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    session = environ["greenscope.session"]
    path = environ["PATH_INFO"]
    if path == "/set":
        session["name"] = environ["QUERY_STRING"]
    elif path == "/login":
        session.regenerate()
    elif path == "/clear":
        session.clear()
    elif path == "/fail":
        session["name"] = "from a failed request"
        start_response("500 Internal Server Error", [])
        return [b"failed"]
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(dict(session)).encode()]


class Client:
    """A tiny cookie-keeping WSGI client."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cookie: str | None = None

    def get(self, path: str, query: str = "") -> tuple[str, dict[str, Any], list[tuple[str, str]]]:
        environ = {"PATH_INFO": path, "QUERY_STRING": query}
        if self.cookie:
            environ["HTTP_COOKIE"] = self.cookie
        got: list[Any] = []
        body = b"".join(
            self.app(environ, lambda status, headers, *exc: got.extend([status, headers]))
        )
        status, headers = got
        for name, value in headers:
            if name == "Set-Cookie":
                pair = value.split(";", 1)[0]
                self.cookie = None if pair.endswith("=") or "Max-Age=0" in value else pair
        data = json.loads(body) if body.startswith(b"{") else {}
        return status, data, headers


def test_the_middleware_keeps_each_clients_data_server_side(tmp_path: Path) -> None:
    """A signed id in the cookie, the data in the table, saved only when modified."""

    class Base(DeclarativeBase):
        pass

    model = create_session_model(Base)
    engine = create_engine(f"sqlite:///{tmp_path / 'w.db'}")
    Base.metadata.create_all(engine)
    store = SQLAlchemyStore(engine, model, max_age=HOUR)
    app = SessionMiddleware(wsgi_app, store, secret_key="s" * 32)
    writes: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: writes.append(a[2]))
    alice, bob = Client(app), Client(app)
    assert alice.get("/set", "alice")[1] == {"name": "alice"}
    assert bob.get("/set", "bob")[1] == {"name": "bob"}
    assert alice.get("/")[1] == {"name": "alice"}
    assert bob.get("/")[1] == {"name": "bob"}
    assert alice.cookie is not None
    assert "alice" not in alice.cookie, "the data is in the cookie"
    header = next(v for n, v in alice.get("/set", "alice2")[2] if n == "Set-Cookie")
    assert "HttpOnly" in header
    assert "Secure" in header
    assert "SameSite=Lax" in header
    writes.clear()
    alice.get("/")
    assert not [w for w in writes if w.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    before = alice.cookie
    alice.get("/login")  # regenerate: a new id, the same data, the old id gone
    assert alice.cookie != before
    assert alice.get("/")[1] == {"name": "alice2"}
    assert len(rows_of(engine, model)) == 2  # alice's new id and bob's
    status, _, _ = alice.get("/fail")
    assert status.startswith("500")
    assert alice.get("/")[1] == {"name": "alice2"}, "a failed request's change was kept"
    alice.cookie = alice.cookie[:-3] + "xyz"  # tampered
    assert alice.get("/")[1] == {}, "a tampered cookie gets a new, empty session"
    bob.get("/clear")
    assert bob.cookie is None
    assert len(rows_of(engine, model)) == 1
    engine.dispose()


def rows_of(engine: Engine, model: Any) -> list[Any]:
    with Session(engine) as s:
        return list(s.scalars(select(model)))


def test_the_middleware_refuses_a_weak_secret_and_bad_cookie_settings(tmp_path: Path) -> None:
    """Errors name the argument and what is allowed."""

    class Base(DeclarativeBase):
        pass

    store = SQLAlchemyStore(create_engine("sqlite://"), create_session_model(Base), max_age=HOUR)
    with pytest.raises(ValueError, match="at least 16 characters"):
        SessionMiddleware(wsgi_app, store, secret_key="short")
    with pytest.raises(ValueError, match=r"samesite=\.\.\.\) takes 'Strict', 'Lax', 'None'"):
        SessionMiddleware(wsgi_app, store, secret_key="s" * 32, samesite="lax")
    with pytest.raises(ValueError, match="SameSite=None without Secure"):
        SessionMiddleware(wsgi_app, store, secret_key="s" * 32, samesite="None", secure=False)
    with pytest.raises(TypeError, match="takes a SQLAlchemyStore"):
        SessionMiddleware(wsgi_app, object(), secret_key="s" * 32)  # type: ignore[arg-type]
    for name in ("my session", "", "a;b", "é"):
        with pytest.raises(ValueError, match=r"cookie_name=\.\.\.\) takes a cookie name"):
            SessionMiddleware(wsgi_app, store, secret_key="s" * 32, cookie_name=name)
    with pytest.raises(ValueError, match=r"path=\.\.\.\) takes a path"):
        SessionMiddleware(wsgi_app, store, secret_key="s" * 32, path=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"domain=\.\.\.\) takes a domain"):
        SessionMiddleware(wsgi_app, store, secret_key="s" * 32, domain=123)  # type: ignore[arg-type]


def test_a_change_in_a_streamed_body_is_not_saved_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After start_response the cookie is sent: a later change is dropped, with a WARNING."""

    class Base(DeclarativeBase):
        pass

    model = create_session_model(Base)
    engine = create_engine(f"sqlite:///{tmp_path / 's.db'}")
    Base.metadata.create_all(engine)
    store = SQLAlchemyStore(engine, model, max_age=HOUR)

    def streaming(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first"
        environ["greenscope.session"]["late"] = True
        yield b"second"

    app = SessionMiddleware(streaming, store, secret_key="s" * 32)
    body = app({"PATH_INFO": "/"}, lambda *a: None)
    assert b"".join(body) == b"firstsecond"
    body.close()  # type: ignore[attr-defined]
    assert "changed after the response started" in caplog.text
    assert rows_of(engine, model) == []
    engine.dispose()


def test_the_deploy_example_sweeps_expired_sessions_in_a_background_greenlet(
    tmp_path: Path,
) -> None:
    """deploy/sessions_cleanup.py: a greenlet deletes what expired, and keeps the rest."""
    import sys  # noqa: PLC0415

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
    import sessions_cleanup  # noqa: PLC0415 - lives in deploy/

    class Base(DeclarativeBase):
        pass

    model = create_session_model(Base)
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    Base.metadata.create_all(engine)
    store = SQLAlchemyStore(engine, model, max_age=HOUR)
    store.set("stale", b"x", max_age=dt.timedelta(microseconds=1))
    store.set("fresh", b"y")
    sweeper = sessions_cleanup.sweep_in_background(store, interval=0.01)
    try:
        with gevent.Timeout(10):
            while len(rows_of(engine, model)) != 1:
                gevent.sleep(0.01)
    finally:
        sweeper.kill()
    assert [r.session_id for r in rows_of(engine, model)] == ["fresh"]
    engine.dispose()
