"""The fault proxy the other tests use to hang, partition and reset database connections.

The socket tests need nothing else: the upstream is either an echo server or a listening
socket the test accepts from itself, so both ends are in the test's hands. The
PostgreSQL tests (``GREENSCOPE_TEST_PG_URL``) show what psycopg sees for each fault, in
this plain process and in a monkey-patched subprocess.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import select
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from faultproxy import FaultProxy
from sqlalchemy.engine import make_url

from conftest import pg_url

TESTS = Path(__file__).resolve().parent


# -- helpers and fixtures ---------------------------------------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    """Sends back whatever it receives until the peer closes or resets."""

    def handle(self) -> None:
        sock = self.request
        assert isinstance(sock, socket.socket)
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                sock.sendall(data)


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """(host, port) of a threaded echo server; its threads are joined afterwards."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert isinstance(host, str)
        assert isinstance(port, int)
        yield host, port
    finally:
        server.shutdown()
        server.server_close()  # joins the handler threads
        thread.join()


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    """A listening socket standing in for the server: the test accepts from it itself."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        yield listener


@pytest.fixture
def proxy(upstream: socket.socket) -> Iterator[FaultProxy]:
    """A FaultProxy in front of ``upstream``."""
    with FaultProxy(*upstream.getsockname()[:2]) as fault_proxy:
        yield fault_proxy


@contextlib.contextmanager
def connected(
    proxy: FaultProxy, upstream: socket.socket
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server): both ends of one connection through ``proxy``."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as client:
        server, _ = upstream.accept()  # the proxy connects upstream once it has the client
        with server:
            server.settimeout(10)
            yield client, server


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes (the socket's timeout bounds each recv)."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def connect_and_recv(proxy: FaultProxy) -> bytes:
    """Connect a new client to ``proxy`` and read a byte (the reset may come first)."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as client:
        return client.recv(1)


def readable_within(sock: socket.socket, seconds: float) -> bool:
    """Whether ``sock`` has data (or EOF, or an error) within ``seconds``."""
    return bool(select.select([sock], [], [], seconds)[0])


class InThread:
    """Runs a call in a real thread, to watch it block and then finish (or fail)."""

    def __init__(self, func: Callable[[], object]) -> None:
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None
        self._func = func
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._func()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def join(self) -> None:
        assert self.done.wait(10), "the call did not finish within 10 s"
        self._thread.join()


@pytest.fixture
def pg() -> Iterator[tuple[FaultProxy, str]]:
    """(proxy, conninfo): a FaultProxy in front of PostgreSQL and a psycopg URL through it."""
    url = make_url(pg_url())
    if url.host is None or url.host.startswith("/"):
        pytest.skip("PostgreSQL must be reached over TCP to be proxied")
    with FaultProxy(url.host, url.port or 5432) as fault_proxy:
        through = make_url(fault_proxy.url_for(url.render_as_string(hide_password=False)))
        conninfo = through.set(drivername="postgresql").render_as_string(hide_password=False)
        yield fault_proxy, conninfo


def backend_state(application_name: str) -> tuple[str, str]:
    """(state, query) of the backend so named, seen directly (not through the proxy)."""
    direct = make_url(pg_url()).set(drivername="postgresql")
    with psycopg.connect(direct.render_as_string(hide_password=False)) as conn:
        row = conn.execute(
            "SELECT state, query FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        ).fetchone()
    assert row is not None, f"no backend named {application_name}"
    return row[0], row[1]


# -- without a database -----------------------------------------------------------------


def test_url_for_replaces_host_and_port_only() -> None:
    """url_for() keeps driver, user, password, database and query; swaps host and port."""
    with FaultProxy("127.0.0.1", 5432) as proxy:
        where = f"{proxy.host}:{proxy.port}"
        assert proxy.host == "127.0.0.1"
        assert proxy.url_for("postgresql+psycopg://postgres@127.0.0.1:5432/test") == (
            f"postgresql+psycopg://postgres@{where}/test"
        )
        assert proxy.url_for("postgresql+psycopg://u:p%40ss@db.example/test?sslmode=off") == (
            f"postgresql+psycopg://u:p%40ss@{where}/test?sslmode=off"
        )


def test_bytes_flow_both_ways(echo_server: tuple[str, int]) -> None:
    """Two MiB go through to an echo server and come back intact; EOF is passed on."""
    payload = os.urandom(2 << 20)  # more than the proxy buffers: its backpressure is used
    with (
        FaultProxy(*echo_server) as proxy,
        socket.create_connection((proxy.host, proxy.port), timeout=10) as client,
    ):
        sender = InThread(lambda: client.sendall(payload))
        assert recv_exactly(client, len(payload)) == payload
        sender.join()
        assert sender.error is None
        assert proxy.connections == 1
        client.shutdown(socket.SHUT_WR)  # the echo server sees EOF and closes: so do we
        assert client.recv(1) == b""
        assert proxy.connections == 0


def test_stall_holds_bytes_in_both_directions_until_resume(
    proxy: FaultProxy, upstream: socket.socket
) -> None:
    """Nothing crosses a stalled proxy either way; resume() delivers what was held."""
    with connected(proxy, upstream) as (client, server):
        proxy.stall()
        client.sendall(b"ping")
        server.sendall(b"pong")
        assert not readable_within(server, 0.3)
        assert not readable_within(client, 0.3)
        assert proxy.connections == 1
        proxy.resume()
        assert recv_exactly(server, 4) == b"ping"
        assert recv_exactly(client, 4) == b"pong"


def test_stall_holds_new_connections_too(proxy: FaultProxy, upstream: socket.socket) -> None:
    """A client connecting during a stall is accepted but reaches upstream only on resume."""
    proxy.stall()
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as client:
        client.sendall(b"hello")
        assert not readable_within(upstream, 0.3)  # no upstream connection yet
        proxy.resume()
        server, _ = upstream.accept()
        with server:
            server.settimeout(10)
            assert recv_exactly(server, 5) == b"hello"


def test_slow_delays_each_chunk(proxy: FaultProxy, upstream: socket.socket) -> None:
    """slow(d) holds each chunk d seconds; slow(0) releases what is held at once."""
    with connected(proxy, upstream) as (client, server):
        proxy.slow(0.2)
        start = time.monotonic()
        client.sendall(b"a")
        assert recv_exactly(server, 1) == b"a"
        server.sendall(b"b")
        assert recv_exactly(client, 1) == b"b"
        assert time.monotonic() - start >= 0.4
        proxy.slow(3600)
        client.sendall(b"c")
        assert not readable_within(server, 0.3)
        proxy.slow(0)
        assert recv_exactly(server, 1) == b"c"
        with pytest.raises(ValueError, match="delay"):
            proxy.slow(-1)


def test_drop_resets_both_ends_and_keeps_accepting(
    proxy: FaultProxy, upstream: socket.socket
) -> None:
    """drop() sends an RST to the client and the server; a new connection works."""
    with connected(proxy, upstream) as (client, server):
        client.sendall(b"x")
        assert recv_exactly(server, 1) == b"x"
        proxy.drop()
        assert proxy.connections == 0
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        with pytest.raises(ConnectionResetError):
            server.recv(1)
    with connected(proxy, upstream) as (client, server):
        client.sendall(b"y")
        assert recv_exactly(server, 1) == b"y"


def test_refuse_resets_new_connections_only(proxy: FaultProxy, upstream: socket.socket) -> None:
    """While refusing, new clients are reset at once; open ones and later ones work."""
    with connected(proxy, upstream) as (client, server):
        proxy.refuse()
        with pytest.raises(ConnectionResetError):
            connect_and_recv(proxy)
        assert proxy.connections == 1
        client.sendall(b"still open")
        assert recv_exactly(server, 10) == b"still open"
        proxy.refuse(False)
    with connected(proxy, upstream) as (client, server):
        client.sendall(b"z")
        assert recv_exactly(server, 1) == b"z"


def test_close_is_idempotent_and_leaves_no_thread(upstream: socket.socket) -> None:
    """close() resets connections, stops listening and joins its one thread; twice is fine."""
    baseline = _thread._count()  # counts raw _thread threads, which threading cannot see
    proxy = FaultProxy(*upstream.getsockname()[:2])
    assert _thread._count() == baseline + 1
    with connected(proxy, upstream) as (client, server):
        proxy.stall()  # a stalled connection is reset by close() too
        proxy.close()
        assert _thread._count() == baseline
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        with pytest.raises(ConnectionResetError):
            server.recv(1)
    proxy.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=10).close()
    proxy.drop()  # after close: nothing to do, and no waiting on a thread that is gone
    proxy.stall()
    proxy.resume()
    assert proxy.connections == 0
    assert _thread._count() == baseline


# -- PostgreSQL through psycopg ---------------------------------------------------------


@pytest.mark.postgres
def test_pg_stall_blocks_a_query_until_resume(pg: tuple[FaultProxy, str]) -> None:
    """A query sent into a stall waits (the server never sees it), then completes."""
    proxy, conninfo = pg
    name = f"faultproxy-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(conninfo, autocommit=True, application_name=name) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.stall()
        query = InThread(lambda: conn.execute("SELECT 2").fetchone())
        assert not query.done.wait(0.5), "the query went through a stalled proxy"
        assert backend_state(name) == ("idle", "SELECT 1")  # held by the proxy
        proxy.resume()
        query.join()
        assert query.error is None
        assert query.result == (2,)


@pytest.mark.postgres
def test_pg_stall_blocks_connecting_until_resume(pg: tuple[FaultProxy, str]) -> None:
    """psycopg.connect() through a stalled proxy waits, and succeeds on resume()."""
    proxy, conninfo = pg
    proxy.stall()

    def connect_and_query() -> object:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            return conn.execute("SELECT 3").fetchone()

    attempt = InThread(connect_and_query)
    assert not attempt.done.wait(0.5), "connected through a stalled proxy"
    assert proxy.connections == 1
    proxy.resume()
    attempt.join()
    assert attempt.error is None
    assert attempt.result == (3,)


@pytest.mark.postgres
def test_pg_drop_fails_the_next_query_then_reconnecting_works(
    pg: tuple[FaultProxy, str],
) -> None:
    """After drop() the connection's next query raises OperationalError; a new one works."""
    proxy, conninfo = pg
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.drop()
        assert proxy.connections == 0
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        assert conn.broken
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT 4").fetchone() == (4,)


@pytest.mark.postgres
def test_pg_drop_fails_an_in_flight_query(pg: tuple[FaultProxy, str]) -> None:
    """A query hung in a stall fails with OperationalError when the proxy drops it."""
    proxy, conninfo = pg
    with psycopg.connect(conninfo, autocommit=True) as conn:
        proxy.stall()
        query = InThread(lambda: conn.execute("SELECT 1"))
        assert not query.done.wait(0.5), "the query went through a stalled proxy"
        proxy.drop()
        query.join()
        assert isinstance(query.error, psycopg.OperationalError), query.error
        assert conn.broken
    proxy.resume()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT 5").fetchone() == (5,)


@pytest.mark.postgres
def test_pg_refuse_fails_connecting_quickly(pg: tuple[FaultProxy, str]) -> None:
    """While refusing, psycopg.connect() fails at once; afterwards it connects."""
    proxy, conninfo = pg
    proxy.refuse()
    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(conninfo, connect_timeout=10).close()
    assert time.monotonic() - start < 5
    assert proxy.connections == 0
    proxy.refuse(False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT 6").fetchone() == (6,)


PATCHED_SCENARIO = """
from gevent import monkey
monkey.patch_all()

import _socket, json, struct, sys
sys.path.insert(0, sys.argv[2])

import gevent, gevent.event
import psycopg
from sqlalchemy.engine import make_url

from faultproxy import FaultProxy

url = make_url(sys.argv[1])
report = {}
with FaultProxy(url.host, url.port or 5432) as proxy:
    conninfo = make_url(proxy.url_for(sys.argv[1])).set(drivername="postgresql")
    conninfo = conninfo.render_as_string(hide_password=False)

    # The proxy needs no hub: an unpatched blocking socket gets PostgreSQL's answer to
    # an SSLRequest through it while this (the hub's) thread never yields.
    # (With gevent's threads or sockets in the proxy, this recv() would time out.)
    raw = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        raw.settimeout(10)
        raw.connect((proxy.host, proxy.port))
        raw.sendall(struct.pack("!ii", 8, 80877103))
        report["ssl_answer"] = raw.recv(1).decode()
    finally:
        raw.close()

    connected, stalled, ticked = gevent.event.Event(), gevent.event.Event(), gevent.event.Event()
    state = {"ticks": 0, "sending": False}

    def query():
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("SELECT 1")
            connected.set()
            stalled.wait()
            state["sending"] = True
            try:
                conn.execute("SELECT 2")
            except psycopg.OperationalError as exc:
                return type(exc).__name__
            return "completed"

    def ticker():
        while state["ticks"] < 20:
            gevent.sleep(0.01)
            state["ticks"] += 1
        ticked.set()

    worker = gevent.spawn(query)
    assert connected.wait(10), "could not connect through the proxy"
    proxy.stall()
    stalled.set()
    gevent.spawn(ticker)
    assert ticked.wait(10), "the ticker stopped while a query was stalled"
    report["sending"] = state["sending"]
    report["blocked_while_ticking"] = not worker.ready()
    proxy.drop()
    report["after_drop"] = worker.get(timeout=10)
    proxy.resume()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        report["reconnected"] = conn.execute("SELECT 7").fetchone()[0]
print(json.dumps(report))
"""


@pytest.mark.postgres
def test_pg_in_a_monkey_patched_process() -> None:
    """After patch_all(): a stalled query blocks only its greenlet; drop() fails it."""
    url = pg_url()
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(PATCHED_SCENARIO), url, str(TESTS)],
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.stderr == ""  # -W error turns warnings in finalizers into printed errors
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {
        "ssl_answer": report["ssl_answer"],
        "sending": True,  # the query greenlet had sent its query...
        "blocked_while_ticking": True,  # ...and stayed blocked while another one ran
        "after_drop": "OperationalError",
        "reconnected": 7,
    }
    assert report["ssl_answer"] in {"N", "S"}
