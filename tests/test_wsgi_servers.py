"""GreenscopeMiddleware under real servers, which call close() from different places.

waitress runs the app in a task thread but sends a ``wsgi.file_wrapper`` body, and calls
its ``close()``, from its main thread, after the task thread has moved on to the next
request. gevent's pywsgi runs each connection in its own greenlet and closes there.
gunicorn is covered by ``test_e2e_servers.py``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope.wsgi import GreenscopeMiddleware

from conftest import CountingEngine

App = Callable[[dict[str, Any], Any], Any]


def read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(65536):
            yield chunk


def make_app(Session: greenscope.scoped_session[Any], big_file: Path, table: str = "items") -> App:
    """/file writes without committing, then returns a file; /commit writes and commits."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        Session.execute(text(f"INSERT INTO {table} (owner) VALUES (:o)"), {"o": path})
        if path == "/file":
            start_response("200 OK", [("Content-Length", str(big_file.stat().st_size))])
            wrapper = environ.get("wsgi.file_wrapper")  # pywsgi has none: a plain iterator
            if wrapper is None:
                return read_chunks(big_file)
            return wrapper(big_file.open("rb"), 65536)
        if path == "/commit":
            Session.commit()
            start_response("200 OK", [("Content-Length", "2")])
            return [b"ok"]
        if path == "/stream":
            start_response("201 Created", [])
            return iter([b"stored"])
        start_response("404 Not Found", [("Content-Length", "0")])
        return []

    return app


class Server:
    """A WSGI server in a background OS thread, on a free loopback port."""

    def __init__(self, kind: str, app: App) -> None:
        self.kind = kind
        self.thread = threading.Thread(target=self._serve, args=(app,), daemon=True)
        self.ready = threading.Event()
        self.port = 0
        self.stop: Callable[[], None] = lambda: None
        self.thread.start()
        assert self.ready.wait(10), f"{kind} did not start"

    def _serve(self, app: App) -> None:
        if self.kind == "waitress":
            from waitress.server import create_server  # noqa: PLC0415

            server = create_server(app, host="127.0.0.1", port=0, threads=1)
            self.port = server.effective_port
            self.stop = server.close
            self.ready.set()
            with contextlib.suppress(OSError):  # closed under the loop at shutdown
                server.run()
        else:
            import gevent  # noqa: PLC0415
            from gevent.pywsgi import WSGIServer  # noqa: PLC0415

            server = WSGIServer(("127.0.0.1", 0), app, log=None)
            server.start()
            self.port = server.server_port
            hub = gevent.get_hub()
            done = gevent.event.Event()
            self.stop = lambda: hub.loop.run_callback_threadsafe(done.set)
            self.ready.set()
            done.wait()
            server.stop(timeout=1)

    def close(self) -> None:
        self.stop()
        self.thread.join(10)


def request(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with sock:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(params=["waitress", "pywsgi"])
def served(
    request: pytest.FixtureRequest, sqlite_db: CountingEngine, tmp_path: Path
) -> Iterator[tuple[Server, CountingEngine, str]]:
    """A server and its database: SQLite for waitress, PostgreSQL for pywsgi.

    pywsgi streams the file from the request's greenlet, which keeps its transaction
    (and SQLite's single write lock) open meanwhile: the next writer needs a database
    that allows two.
    """
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (8 * 1024 * 1024))  # more than the socket buffers hold
    if request.param == "waitress":
        db, table = sqlite_db, "items"
    else:
        url, table = request.getfixturevalue("pg_table")
        db = CountingEngine(create_engine(url, pool_size=5))
    Session = greenscope.scoped_session(sessionmaker(db.engine))
    server = Server(request.param, GreenscopeMiddleware(make_app(Session, big, table)))
    yield server, db, table
    server.close()
    if db is not sqlite_db:
        assert greenscope.wait_reaped(10)
        greenscope.close_all(shutdown=False)
        db.engine.dispose()


def stored(db: CountingEngine, table: str = "items") -> list[str]:
    with db.engine.connect() as conn:
        return list(conn.execute(text(f"SELECT owner FROM {table} ORDER BY id")).scalars())


def test_a_file_body_sent_later_leaks_nothing_into_the_next_request(
    served: tuple[Server, CountingEngine, str],
) -> None:
    """The next request on the worker never commits a file request's uncommitted write."""
    server, db, table = served
    slow = request(server.port, "/file")
    assert slow.recv(16).startswith(b"HTTP/1.1 200"), "the app returned; the file is pending"
    assert read_all(request(server.port, "/commit")).endswith(b"ok")
    assert stored(db, table) == ["/commit"], "the /file write was rolled back, not committed"
    assert len(read_all(slow)) > 8 * 1024 * 1024
    assert wait_for(lambda: db.checkedout() == 0), "nothing stays checked out while idle"


def test_commit_on_success_stores_a_streamed_write_once(
    sqlite_db: CountingEngine, tmp_path: Path
) -> None:
    """Under waitress a streamed 201 is committed once, before its first chunk is sent."""
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine))
    app = GreenscopeMiddleware(make_app(Session, tmp_path), commit_on_success=True)
    server = Server("waitress", app)
    try:
        assert b"\r\nstored\r\n" in read_all(request(server.port, "/stream"))
        assert stored(sqlite_db) == ["/stream"]
        assert wait_for(lambda: sqlite_db.checkedout() == 0)
    finally:
        server.close()
