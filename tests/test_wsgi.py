"""GreenscopeMiddleware: removal at the response's close(), commit only when asked."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from sqlalchemy import exc, orm, text
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope.wsgi import GreenscopeMiddleware

from conftest import CountingEngine

Scoped = greenscope.scoped_session[orm.Session]
StartResponse = Callable[..., Any]


@pytest.fixture
def Session(sqlite_db: CountingEngine) -> Scoped:
    return greenscope.scoped_session(sessionmaker(sqlite_db.engine))


def noop_start_response(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
) -> Callable[[bytes], object]:
    return lambda data: None


def insert(Session: greenscope.scoped_session[Any], owner: str) -> None:
    Session.execute(text("INSERT INTO items (owner) VALUES (:o)"), {"o": owner})


def serve(app: Any) -> tuple[str, list[bytes]]:
    """A minimal PEP 3333 server: call, iterate, always close."""
    status: list[str] = []

    def start_response(s: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(s)
        return lambda data: None

    result = app({"PATH_INFO": "/"}, start_response)
    body: list[bytes] = []
    try:
        body.extend(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return status[-1], body


def writer(Session: Scoped, status: str = "200 OK") -> Any:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        insert(Session, "x")
        start_response(status, [])
        return [b"ok"]

    return app


def test_removes_at_close_not_when_the_app_returns(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A streamed body keeps its Session while it is iterated; close() removes it."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        for _ in range(3):
            yield str(Session.execute(text("SELECT count(*) FROM items")).scalar_one()).encode()

    result = GreenscopeMiddleware(app)({}, noop_start_response)
    assert list(result) == [b"0", b"0", b"0"]
    assert Session.registry.has()
    result.close()  # type: ignore[attr-defined]
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0


def test_does_not_commit_by_default(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """Without commit_on_success the request's uncommitted writes are rolled back."""
    assert serve(GreenscopeMiddleware(writer(Session))) == ("200 OK", [b"ok"])
    assert sqlite_db.count_rows() == 0
    assert not Session.registry.has()


def test_commits_before_the_body_when_asked(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """With commit_on_success a 2xx is committed when the app returns, before the body."""
    result = GreenscopeMiddleware(writer(Session), commit_on_success=True)({}, noop_start_response)
    assert sqlite_db.count_rows() == 1, "committed before the first chunk is sent"
    list(result)
    result.close()  # type: ignore[attr-defined]
    assert sqlite_db.count_rows() == 1
    assert sqlite_db.checkedout() == 0


def test_lazy_start_response_commits_at_close(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """A generator that starts the response itself is committed at close() if it succeeded."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        insert(Session, "lazy")
        start_response("201 Created", [])
        yield b"done"

    assert serve(GreenscopeMiddleware(app, commit_on_success=True)) == ("201 Created", [b"done"])
    assert sqlite_db.count_rows() == 1


@pytest.mark.parametrize("status", ["500 Internal Server Error", "503 Service Unavailable"])
def test_server_errors_are_rolled_back(
    Session: Scoped, sqlite_db: CountingEngine, status: str
) -> None:
    """A 5xx response is never committed, even with commit_on_success."""
    serve(GreenscopeMiddleware(writer(Session, status), commit_on_success=True))
    assert sqlite_db.count_rows() == 0
    assert not Session.registry.has()


def test_client_errors_are_committed_when_asked(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A 4xx is a successful response as far as the database goes."""
    serve(GreenscopeMiddleware(writer(Session, "404 Not Found"), commit_on_success=True))
    assert sqlite_db.count_rows() == 1


def test_app_that_raises_is_rolled_back(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """An exception from the app rolls back, removes, and propagates to the server."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        insert(Session, "x")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        serve(GreenscopeMiddleware(app, commit_on_success=True))
    assert sqlite_db.count_rows() == 0
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0


def test_body_that_raises_is_rolled_back(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """An exception while iterating the body means no commit, even if the status was 200."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        insert(Session, "x")
        yield b"partial"
        raise OSError("client went away")

    with pytest.raises(OSError, match="went away"):
        serve(GreenscopeMiddleware(app, commit_on_success=True))
    assert sqlite_db.count_rows() == 0
    assert not Session.registry.has()


def test_failing_commit_becomes_the_error_and_still_cleans_up(sqlite_db: CountingEngine) -> None:
    """If the commit fails, the app's iterable is closed, the Session removed, the error raised."""

    class FailingCommit(orm.Session):
        def commit(self) -> None:
            raise exc.OperationalError("COMMIT", {}, RuntimeError("connection lost"))

    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine, class_=FailingCommit))
    closed: list[bool] = []

    class Body(list[bytes]):
        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        insert(Session, "x")
        start_response("200 OK", [])
        return Body([b"ok"])

    with pytest.raises(exc.OperationalError, match="connection lost"):
        GreenscopeMiddleware(app, commit_on_success=True)({}, noop_start_response)
    assert closed == [True]
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0


def test_registry_can_opt_out(Session: Scoped) -> None:
    """A registry with request_scoped = False keeps its Session across requests."""
    Session.registry.request_scoped = False  # type: ignore[attr-defined]

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        Session()
        start_response("200 OK", [])
        return [b""]

    serve(GreenscopeMiddleware(app))
    assert Session.registry.has()
    Session.remove()


def test_wraps_only_callables() -> None:
    """Wrapping something that is not a WSGI app fails at once, saying what it needs."""
    with pytest.raises(TypeError, match="WSGI application"):
        GreenscopeMiddleware(None)  # type: ignore[arg-type]
