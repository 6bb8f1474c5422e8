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


def test_streamed_body_keeps_its_session_until_it_ends(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A streamed body keeps one Session while it is iterated; its end removes it."""
    seen: list[orm.Session] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        for _ in range(3):
            seen.append(Session())
            yield str(Session.execute(text("SELECT count(*) FROM items")).scalar_one()).encode()

    result = GreenscopeMiddleware(app)({}, noop_start_response)
    iterator = iter(result)
    assert next(iterator) == b"0"
    assert Session.registry.has(), "not removed when the app returned"
    assert list(iterator) == [b"0", b"0"]
    assert len(set(map(id, seen))) == 1
    assert not Session.registry.has(), "removed once the body is exhausted"
    result.close()  # type: ignore[attr-defined]
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0


def test_close_removes_a_body_abandoned_half_way(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A body the server stops iterating (client gone) is rolled back at its close()."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        while True:
            insert(Session, "x")
            yield b"chunk"

    result = GreenscopeMiddleware(app)({}, noop_start_response)
    next(iter(result))
    assert sqlite_db.checkedout() == 1
    result.close()  # type: ignore[attr-defined]
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0
    assert sqlite_db.count_rows() == 0


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


def test_body_that_raises_after_its_first_chunk_keeps_only_what_was_acknowledged(
    Session: Scoped, sqlite_db: CountingEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes before the first chunk are committed with it; a later write and raise roll back."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        insert(Session, "acknowledged")
        yield b"partial"
        insert(Session, "late")
        raise OSError("client went away")

    with pytest.raises(OSError, match="went away"):
        serve(GreenscopeMiddleware(app, commit_on_success=True))
    with sqlite_db.engine.connect() as conn:
        rows = conn.execute(text("SELECT owner FROM items")).scalars().all()
    assert rows == ["acknowledged"]
    assert not Session.registry.has()
    assert "after the request was committed" in caplog.text


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


def test_abandoned_body_commits_nothing_past_the_hang_up(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A body closed before its end (client hung up) commits none of its later writes."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        for i in range(10):
            insert(Session, f"row-{i}")
            yield b"chunk"

    result = GreenscopeMiddleware(app, commit_on_success=True)({}, noop_start_response)
    iterator = iter(result)
    next(iterator)  # row-0 is committed with the first chunk, before it is sent
    next(iterator)
    result.close()  # type: ignore[attr-defined]  # what the server does on a hang-up
    assert sqlite_db.count_rows() == 1
    assert not Session.registry.has()


def test_writes_made_while_the_body_is_produced_are_committed(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A complete streamed body's writes are committed at close(), not rolled back."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        insert(Session, "before-return")
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            insert(Session, "during-body")
            yield b"ok"

        return body()

    serve(GreenscopeMiddleware(app, commit_on_success=True))
    assert sqlite_db.count_rows() == 2


def test_write_callable_commits_before_the_first_write(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """An app using write() is committed before anything is sent through it."""
    rows_at_write: list[int] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        insert(Session, "legacy")
        write = start_response("200 OK", [])
        write(b"saved")
        return []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return lambda data: rows_at_write.append(sqlite_db.count_rows())

    result = GreenscopeMiddleware(app, commit_on_success=True)({}, start_response)
    result.close()  # type: ignore[attr-defined]
    assert rows_at_write == [1]


def test_non_iterable_result_still_removes_and_commits_nothing(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """An app returning something that is not iterable fails; nothing stays or commits."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Any:
        insert(Session, "x")
        start_response("200 OK", [])
        return 42

    with pytest.raises(TypeError):
        GreenscopeMiddleware(app)({}, noop_start_response)
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0
    assert sqlite_db.count_rows() == 0


def test_list_bodies_stay_lists_and_file_wrappers_pass_through(Session: Scoped) -> None:
    """Servers keep their fast paths: Content-Length for lists, sendfile for file wrappers."""

    class FileWrapper:
        def __init__(self) -> None:
            self.closed = False

        def __iter__(self) -> Iterator[bytes]:
            yield b"file"

        def close(self) -> None:
            self.closed = True

    wrapper = FileWrapper()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Any:
        Session()
        start_response("200 OK", [])
        return environ["body"]

    listed = GreenscopeMiddleware(app)({"body": [b"a"]}, noop_start_response)
    assert isinstance(listed, list)
    assert len(listed) == 1
    listed.close()  # type: ignore[attr-defined]
    assert not Session.registry.has()
    environ = {"body": wrapper, "wsgi.file_wrapper": FileWrapper}
    same = GreenscopeMiddleware(app)(environ, noop_start_response)
    assert same is wrapper
    same.close()
    assert wrapper.closed
    assert not Session.registry.has()


def test_malformed_status_counts_as_a_failure(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """A status line the middleware cannot parse is treated as a server error: no commit."""
    serve(GreenscopeMiddleware(writer(Session, ""), commit_on_success=True))
    assert sqlite_db.count_rows() == 0
