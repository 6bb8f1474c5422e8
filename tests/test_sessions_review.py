"""greenscope.sessions off the happy path: log-outs, late failures, caches, cookies, Flask."""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import greenscope
from greenscope.sessions import SessionMiddleware, SQLAlchemyStore, create_session_model
from greenscope.wsgi import GreenscopeMiddleware

from conftest import mysql_url

HOUR = dt.timedelta(hours=1)
SECRET = "s" * 32


class Env:
    """A store on a fresh SQLite file, and a way to read its rows."""

    def __init__(self, tmp_path: Path) -> None:
        class Base(DeclarativeBase):
            pass

        self.model = create_session_model(Base)
        self.engine = create_engine(f"sqlite:///{tmp_path / 's.db'}")
        Base.metadata.create_all(self.engine)
        self.store = SQLAlchemyStore(self.engine, self.model, max_age=HOUR)

    def rows(self) -> dict[str, Any]:
        with Session(self.engine) as s:
            return {r.session_id: json.loads(r.data) for r in s.scalars(select(self.model))}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.engine.dispose()


def call(app: Any, path: str = "/", cookie: str | None = None) -> tuple[str, list[Any], bytes]:
    """One request: (status, headers, body), the body iterated and closed as servers do."""
    environ: dict[str, Any] = {"PATH_INFO": path}
    if cookie:
        environ["HTTP_COOKIE"] = cookie
    got: list[Any] = []

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> Any:
        got[:] = [status, headers]
        return lambda data: None

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return got[0], got[1], data


class FileWrapper:
    """A server's ``wsgi.file_wrapper``: a class, as servers provide it."""

    def __init__(self, f: Any, blksize: int = 8192) -> None:
        self.f = f

    def __iter__(self) -> Iterator[bytes]:
        return iter([self.f.read()])

    def close(self) -> None:
        self.f.close()


def set_cookie(headers: list[tuple[str, str]]) -> str | None:
    return next((v for n, v in headers if n == "Set-Cookie"), None)


def pair(headers: list[tuple[str, str]]) -> str:
    value = set_cookie(headers)
    assert value is not None
    return value.split(";", 1)[0]


def test_a_request_in_flight_cannot_undo_a_logout(env: Env) -> None:
    """A request that loaded the session before a log-out does not bring it back."""
    later: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        session = environ["greenscope.session"]
        if environ["PATH_INFO"] == "/login":
            session["user_id"] = 42
        elif environ["PATH_INFO"] == "/logout":
            session.clear()
        elif environ["PATH_INFO"] == "/slow":
            assert session["user_id"] == 42  # loaded before the log-out...
            later[0]()  # ...which another request makes now
            session["last_seen"] = "now"
        start_response("200 OK", [])
        return [b""]

    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    cookie = pair(call(mw, "/login")[1])
    later.append(lambda: call(mw, "/logout", cookie))
    _, headers, _ = call(mw, "/slow", cookie)
    assert env.rows() == {}, "the logged-out session came back"
    expired = set_cookie(headers)
    assert expired is not None
    assert "Max-Age=0" in expired


def test_an_id_whose_session_is_gone_is_not_reused(env: Env) -> None:
    """A cookie of a deleted (or expired) session gets a new id on its next save."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["greenscope.session"]["n"] = 1
        start_response("200 OK", [])
        return [b""]

    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    cookie = pair(call(mw)[1])
    (old,) = env.rows()
    env.store.delete(old)
    new = pair(call(mw, cookie=cookie)[1])
    assert new != cookie
    assert list(env.rows()) != [old]
    assert len(env.rows()) == 1


def fail() -> None:
    raise RuntimeError("after start_response")


def test_a_body_failing_after_start_response_keeps_nothing(env: Env) -> None:
    """start_response, then an error before the first chunk: the change is not saved."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["greenscope.session"]["balance"] = 70
        start_response("200 OK", [])
        fail()
        yield b"never"

    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    with pytest.raises(RuntimeError, match="after start_response"):
        call(mw)
    assert env.rows() == {}


def test_a_second_start_response_with_exc_info_keeps_nothing(env: Env) -> None:
    """An app that reports its error through start_response(..., exc_info) saves nothing."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["greenscope.session"]["step"] = "done"
        start_response("200 OK", [])
        try:
            raise ValueError("late")
        except ValueError:
            import sys  # noqa: PLC0415

            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"error"]

    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    status, headers, _ = call(mw)
    assert status.startswith("500")
    assert set_cookie(headers) is None
    assert env.rows() == {}


def test_a_streamed_body_saves_at_its_first_chunk_and_the_cookie_goes_with_it(env: Env) -> None:
    """The server's start_response is called once the first chunk exists, with Set-Cookie."""
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        environ["greenscope.session"]["n"] = 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        seen.append(f"rows before the first chunk: {len(env.rows())}")
        yield b"a"
        yield b"b"

    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    _, headers, body = call(mw)
    assert body == b"ab"
    assert seen == ["rows before the first chunk: 0"]
    assert set_cookie(headers) is not None
    assert len(env.rows()) == 1


def test_the_legacy_write_callable_saves_before_it_sends(env: Env) -> None:
    """write() sends at once: the session is saved and the headers go first."""
    sent: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        environ["greenscope.session"]["n"] = 1
        write = start_response("200 OK", [])
        write(b"hello")
        return []

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> Any:
        sent.append(("start", set_cookie(headers) is not None))
        return lambda data: sent.append(("write", data))

    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    list(mw({"PATH_INFO": "/"}, start_response))
    assert sent == [("start", True), ("write", b"hello")]
    assert len(env.rows()) == 1


def test_a_response_that_read_the_session_varies_on_cookie(env: Env) -> None:
    """A shared cache must not serve one user's page to another: Vary: Cookie, merged."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        name = environ["greenscope.session"].get("name", "nobody")
        start_response("200 OK", [("Vary", "Accept-Encoding"), ("Cache-Control", "public")])
        return [name.encode()]

    def untouched(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"static"]

    _, headers, _ = call(SessionMiddleware(app, env.store, secret_key=SECRET))
    assert ("Vary", "Accept-Encoding, Cookie") in headers
    _, headers, _ = call(SessionMiddleware(untouched, env.store, secret_key=SECRET))
    assert not [h for h in headers if h[0] == "Vary"], "a page that never read it varies"


@pytest.mark.parametrize(
    "other", ['prefs={"a":1,"b":2}', "ab_test=a b", 'tracking="unterminated', "bad;name=1"]
)
def test_another_sites_unparsable_cookie_does_not_hide_the_session(env: Env, other: str) -> None:
    """A JSON, spaced or broken cookie before ours: the session is still found."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        session = environ["greenscope.session"]
        if environ["PATH_INFO"] == "/set":
            session["name"] = "alice"
        start_response("200 OK", [])
        return [session.get("name", "").encode()]

    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    cookie = pair(call(mw, "/set")[1])
    assert call(mw, "/", f"{other}; {cookie}")[2] == b"alice"


def test_a_file_wrapper_body_reaches_the_server_as_it_is(env: Env) -> None:
    """wsgi.file_wrapper bodies pass through (sendfile), the session saved first."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        environ["greenscope.session"]["n"] = 1
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"file"))

    got: list[Any] = []
    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    body = mw(
        {"PATH_INFO": "/", "wsgi.file_wrapper": FileWrapper},
        lambda status, headers, exc_info=None: got.append(headers),
    )
    assert type(body) is FileWrapper
    assert set_cookie(got[0]) is not None
    assert len(env.rows()) == 1


def test_session_ids_compare_exactly_on_mariadb() -> None:
    """On MariaDB another user's id differing in case is another session."""
    url = mysql_url()

    class Base(DeclarativeBase):
        pass

    model = create_session_model(Base, table_name=f"gs_case_{uuid.uuid4().hex[:8]}")
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    try:
        store = SQLAlchemyStore(engine, model, max_age=HOUR)
        store.set("abcdef", b"alice")
        assert store.get("AbCdEf") is None
        store.set("ABCDEF", b"mallory")
        assert store.get("abcdef") == b"alice"
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_update_writes_only_a_live_session(env: Env) -> None:
    """update() replaces a live session and refuses a missing or expired one."""
    store = env.store
    assert store.update("nobody", b"{}") is False
    store.set("a", b'{"v":1}')
    assert store.update("a", b'{"v":2}') is True
    assert store.get("a") == b'{"v":2}'
    store.set("old", b"{}", max_age=dt.timedelta(microseconds=1))
    assert store.update("old", b'{"v":3}') is False
    assert "old" not in {k for k, v in env.rows().items() if v}


# -- Flask ----------------------------------------------------------------------------------


def flask_app(env: Env, **config: Any) -> Any:
    import flask  # noqa: PLC0415 - the flask extra, a test dependency

    from greenscope.sessions import FlaskSessionInterface  # noqa: PLC0415

    app = flask.Flask(__name__)
    app.config.update(SECRET_KEY="k" * 32, **config)
    app.session_interface = FlaskSessionInterface(env.store)

    @app.route("/login")
    def login() -> str:
        flask.session["user"] = "alice"
        return "in"

    @app.route("/who")
    def who() -> str:
        return str(flask.session.get("user"))

    @app.route("/logout")
    def logout() -> str:
        flask.session.clear()
        return "out"

    return app


def test_flask_read_responses_vary_on_cookie(env: Env) -> None:
    """A Flask view that only read the session still sends Vary: Cookie."""
    client = flask_app(env).test_client()
    client.get("/login")
    response = client.get("/who")
    assert response.text == "alice"
    assert "Cookie" in response.vary


def test_flask_logout_cookie_keeps_the_cookies_attributes(env: Env) -> None:
    """The expiring cookie carries Secure and SameSite, or a browser ignores it."""
    app = flask_app(
        env,
        SESSION_COOKIE_NAME="__Host-session",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    client = app.test_client()
    client.get("/login", base_url="https://localhost")
    response = client.get("/logout", base_url="https://localhost")
    header = response.headers["Set-Cookie"]
    assert "Max-Age=0" in header
    assert "Secure" in header
    assert "SameSite=Lax" in header
    assert env.rows() == {}


def test_flask_without_a_secret_key_writes_nothing(env: Env) -> None:
    """A missing SECRET_KEY fails the request before the session is stored."""
    app = flask_app(env)
    app.config["SECRET_KEY"] = None
    assert app.test_client().get("/login").status_code == 500
    assert env.rows() == {}


def test_flask_secret_key_fallbacks_keep_sessions_across_a_rotation(env: Env) -> None:
    """After rotating SECRET_KEY, a cookie signed with the fallback still verifies."""
    app = flask_app(env)
    client = app.test_client()
    client.get("/login")
    app.config.update(SECRET_KEY="n" * 32, SECRET_KEY_FALLBACKS=["k" * 32])
    assert client.get("/who").text == "alice"


def test_an_error_after_the_first_chunk_reaches_the_servers_start_response(env: Env) -> None:
    """start_response(..., exc_info) after the headers went out goes to the server's."""
    calls: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first"
        try:
            raise ValueError("mid-stream")
        except ValueError:
            import sys  # noqa: PLC0415

            start_response("500 Internal Server Error", [], sys.exc_info())

    def server_start_response(status: str, headers: list[Any], exc_info: Any = None) -> Any:
        calls.append((status, exc_info is not None))
        if exc_info is not None:
            raise exc_info[1].with_traceback(exc_info[2])  # as PEP 3333 servers do
        return lambda data: None

    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    body = mw({"PATH_INFO": "/"}, server_start_response)
    with pytest.raises(ValueError, match="mid-stream"):
        list(body)
    assert calls == [("200 OK", False), ("500 Internal Server Error", True)]


def test_a_failing_save_closes_a_file_body_the_server_never_gets(env: Env) -> None:
    """The store is down when a file body is returned: the error, and the file closed."""

    opened = io.BytesIO(b"file")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        environ["greenscope.session"]["n"] = 1
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](opened)

    env.engine.dispose()
    env.model.__table__.drop(env.engine)  # type: ignore[attr-defined]
    mw = SessionMiddleware(app, env.store, secret_key=SECRET)
    with pytest.raises(Exception, match="no such table"):
        mw({"PATH_INFO": "/", "wsgi.file_wrapper": FileWrapper}, lambda *a: None)
    assert opened.closed


def test_inside_session_middleware_a_failing_commit_keeps_no_session_change(
    tmp_path: Path,
) -> None:
    """SessionMiddleware(GreenscopeMiddleware(app, commit_on_success=True)): the app's
    commit comes first; when it fails, the session change is not kept."""

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        ref: Mapped[str] = mapped_column(String(16), unique=True)

    model = create_session_model(Base)
    engine = create_engine(f"sqlite:///{tmp_path / 'o.db'}")
    Base.metadata.create_all(engine)
    store = SQLAlchemyStore(engine, model, max_age=HOUR)
    db = greenscope.scoped_session(sessionmaker(engine))

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        db.add(Order(ref=environ["PATH_INFO"]))  # flushed, and refused, at the commit
        environ["greenscope.session"]["order"] = environ["PATH_INFO"]
        start_response("200 OK", [])
        yield b"thanks"

    mw = SessionMiddleware(
        GreenscopeMiddleware(app, commit_on_success=True), store, secret_key=SECRET
    )
    _, headers, body = call(mw, "/a")
    assert body == b"thanks"
    cookie = pair(headers)
    with pytest.raises(Exception, match="UNIQUE constraint failed"):
        call(mw, "/a", cookie)  # the same ref again: the commit fails
    with Session(engine) as s:
        rows = {r.session_id: json.loads(r.data) for r in s.scalars(select(model))}
        assert s.scalar(select(Order.ref)) == "/a"
    assert list(rows.values()) == [{"order": "/a"}]
    engine.dispose()


def expires_at(env: Env) -> dict[str, dt.datetime]:
    with Session(env.engine) as s:
        return {r.session_id: r.expires_at for r in s.scalars(select(env.model))}


def reader(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    session = environ["greenscope.session"]
    if environ["PATH_INFO"] == "/login":
        session["user"] = "alice"
    elif environ["PATH_INFO"] == "/fail":
        session.get("user")
        start_response("500 Internal Server Error", [])
        return [b""]
    elif environ["PATH_INFO"] == "/static":
        start_response("200 OK", [])
        return [b"static"]
    start_response("200 OK", [])
    return [str(session.get("user")).encode()]


def age_row(env: Env, sid: str, left: dt.timedelta) -> None:
    """Make the session's row expire ``left`` from now (as if it had lived the rest)."""
    env.store.touch(sid, max_age=left)


def test_a_read_session_is_extended_once_it_lived_a_tenth(env: Env) -> None:
    """An active user who only reads is not logged out: expiry and cookie are reset."""
    mw = SessionMiddleware(reader, env.store, secret_key=SECRET)
    cookie = pair(call(mw, "/login")[1])
    (sid,) = env.rows()
    before = expires_at(env)[sid]
    _, headers, body = call(mw, "/", cookie)
    assert body == b"alice"
    assert set_cookie(headers) is None, "a fresh session was written again"
    assert expires_at(env)[sid] == before
    age_row(env, sid, dt.timedelta(minutes=30))  # half its hour gone
    _, headers, body = call(mw, "/", cookie)
    assert body == b"alice"
    refreshed = set_cookie(headers)
    assert refreshed is not None
    assert "Max-Age=3600" in refreshed
    assert refreshed.split(";", 1)[0] == cookie, "the id changed"
    assert expires_at(env)[sid] > before


def test_no_extension_for_failed_or_untouched_requests_or_when_off(env: Env) -> None:
    """A 5xx, a request that never reads the session, or refresh off: nothing written."""
    mw = SessionMiddleware(reader, env.store, secret_key=SECRET)
    cookie = pair(call(mw, "/login")[1])
    (sid,) = env.rows()
    age_row(env, sid, dt.timedelta(minutes=30))
    before = expires_at(env)[sid]
    for path in ("/fail", "/static"):
        _, headers, _ = call(mw, path, cookie)
        assert set_cookie(headers) is None, path
    off = SessionMiddleware(reader, env.store, secret_key=SECRET, refresh_each_request=False)
    _, headers, body = call(off, "/", cookie)
    assert body == b"alice"
    assert set_cookie(headers) is None
    assert expires_at(env)[sid] == before


def test_extending_a_session_that_ended_meanwhile_expires_the_cookie(env: Env) -> None:
    """touch() of a session deleted while the request ran writes nothing, ends the cookie."""
    later: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        user = environ["greenscope.session"].get("user")
        later[0]()
        start_response("200 OK", [])
        return [str(user).encode()]

    mw = SessionMiddleware(reader, env.store, secret_key=SECRET)
    cookie = pair(call(mw, "/login")[1])
    (sid,) = env.rows()
    age_row(env, sid, dt.timedelta(minutes=30))
    later.append(lambda: env.store.delete(sid))
    _, headers, _ = call(SessionMiddleware(app, env.store, secret_key=SECRET), "/", cookie)
    expired = set_cookie(headers)
    assert expired is not None
    assert "Max-Age=0" in expired
    assert env.rows() == {}


def test_flask_extends_a_read_session_and_honours_refresh_off(env: Env) -> None:
    """SESSION_REFRESH_EACH_REQUEST: True extends a read session past a tenth; False not."""
    app = flask_app(env)
    client = app.test_client()
    client.get("/login")
    (sid,) = env.rows()
    age_row(env, sid, dt.timedelta(minutes=30))
    before = expires_at(env)[sid]
    response = client.get("/who")
    assert response.text == "alice"
    assert "Set-Cookie" in response.headers
    assert expires_at(env)[sid] > before
    age_row(env, sid, dt.timedelta(minutes=30))
    before = expires_at(env)[sid]
    app.config["SESSION_REFRESH_EACH_REQUEST"] = False
    response = client.get("/who")
    assert "Set-Cookie" not in response.headers
    assert expires_at(env)[sid] == before
