"""An in-process TCP fault proxy: partitions, latency and resets on demand, for the tests.

greenscope's hard cases happen when the network misbehaves while a Session is in use: a
``close()`` that hangs because the server no longer answers, a partition in the middle
of a ``COMMIT``, a connection reset under a query or in the pool. :class:`FaultProxy`
sits between a client (psycopg, SQLAlchemy, a raw socket) and a real server and
produces those faults deterministically, without root, iptables or a toxiproxy binary::

    with FaultProxy("127.0.0.1", 5432) as proxy:
        engine = create_engine(proxy.url_for("postgresql+psycopg://postgres@127.0.0.1/test"))
        ...
        proxy.stall()   # a partition: every recv() on both ends now blocks
        proxy.drop()    # reset every connection (RST): in-flight calls fail
        proxy.resume()  # forward again; bytes held back are delivered in order

The faults:

``stall()`` / ``resume()``
    Nothing is forwarded in either direction, on current and future connections, until
    ``resume()``, ``drop()`` or ``close()``; there is no timeout. The sockets stay open,
    so both peers simply wait. Unlike a real partition the proxy's kernel still
    acknowledges what the client sends (until its buffers fill) and answers TCP
    keepalives, so only application-level timeouts notice a stall. New connections
    are accepted, but the upstream connection is only opened once resumed.
``slow(delay)``
    Each chunk is delivered ``delay`` seconds after the proxy read it (0 turns it off);
    changing the delay applies to chunks still held back too.
``drop()``
    Every current connection is reset (``SO_LINGER`` 0, then close: an RST to both
    peers). New connections are accepted as usual. When ``drop()`` returns the
    connections are gone.
``refuse(on)``
    While on, new connections are accepted and reset at once: connecting fails fast.

What psycopg 3 (libpq) sees, as tests/test_faultproxy.py shows: a stalled query or
connect blocks with no end (a server-side ``statement_timeout`` cannot help, since the
query never reaches the server; only ``connect_timeout`` bounds a connect); after
``drop()`` the in-flight or next call raises ``OperationalError`` ("server closed the
connection unexpectedly", libpq's words for a reset too) and the connection is
``broken`` and ``closed``; while refusing, ``connect()`` raises ``OperationalError``
("Connection reset by peer") at once.

Thread-safety and gevent: the proxy runs in one real OS thread, started with the
*original* ``_thread`` functions and doing its I/O with the original ``select.poll``
on ``_socket`` sockets (never patched by gevent), with ``gevent.monkey.get_original``
when gevent is installed. It therefore works the same in a plain process and in one
that called ``monkey.patch_all()`` before importing this module: a stalled gevent
application cannot stall the proxy and the proxy never touches a gevent hub. All
public methods may be called from any thread or greenlet. They share one original
lock that the proxy thread holds only for short non-blocking work; ``drop()`` and
``close()`` also wait for the proxy thread (one loop pass, or its exit), blocking the
calling thread's hub for that long, which is microseconds. Once ``stall()`` returns,
no further byte is forwarded; once ``refuse()`` returns, every connection accepted
after it is reset.

Built for a handful of connections in tests, not for throughput: every loop pass
services every connection. POSIX only (``poll``).
"""

from __future__ import annotations

import _socket
import _thread
import contextlib
import errno
import importlib
import math
import select
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

from sqlalchemy.engine import make_url

try:
    from gevent import monkey as _monkey
except ImportError:  # gevent is optional: without it nothing can have been patched
    _monkey = None


def _original(module: str, name: str) -> Any:
    """``module.name`` as it was before gevent's monkey-patching (as it is, without gevent)."""
    if _monkey is None:
        return getattr(importlib.import_module(module), name)
    return _monkey.get_original(module, name)


_allocate_lock: Callable[[], _thread.LockType] = _original("_thread", "allocate_lock")
_poll: Callable[[], select.poll] = _original("select", "poll")

_CHUNK = 65536  # bytes read per recv()
_BUFFER_LIMIT = 1 << 20  # bytes held per direction before the proxy stops reading
_IN_PROGRESS = {0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN}
_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends an RST


def _start_thread(target: Callable[[], None]) -> Callable[[], object]:
    """Run ``target`` in a new real OS thread; return a function that joins it.

    Returns once the thread runs (so ``_thread._count()`` counts it). After the join the
    thread runs no more Python code and ``_thread._count()`` no longer counts it; on
    Python 3.13+ the OS thread itself has exited too.
    """
    started = _allocate_lock()
    started.acquire()
    sentinels: list[_thread.LockType] = []
    if sys.version_info >= (3, 13):

        def run() -> None:
            started.release()
            target()

        handle = _original("_thread", "start_joinable_thread")(run, daemon=True)
        started.acquire()
        join: Callable[[], object] = handle.join
        return join
    # Before 3.13: what threading.Thread.join() waits for, a lock the thread acquires and
    # the runtime releases once the thread's state is deleted.
    set_sentinel: Callable[[], _thread.LockType] = _original("_thread", "_set_sentinel")

    def run_with_sentinel() -> None:
        sentinel = set_sentinel()
        sentinel.acquire()
        sentinels.append(sentinel)
        started.release()
        target()

    _original("_thread", "start_new_thread")(run_with_sentinel, ())
    started.acquire()
    return sentinels[0].acquire


def _reset(sock: _socket.socket) -> None:
    """Close ``sock`` abruptly: the peer gets an RST, not a FIN."""
    with contextlib.suppress(OSError):  # already dead: closing is all there is left to do
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _nodelay(sock: _socket.socket) -> None:
    """Send small chunks at once: Nagle plus delayed ACKs would add 40 ms stalls."""
    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)


class _Pipe:
    """One direction of a connection: chunks read from one side, not yet written."""

    def __init__(self) -> None:
        self.chunks: deque[tuple[float, bytes]] = deque()  # (time read, data)
        self.size = 0
        self.eof = False  # the source half-closed: shut the destination down once drained
        self.shut = False  # and that is done

    def wants_read(self) -> bool:
        return not self.eof and self.size < _BUFFER_LIMIT

    def due_in(self, now: float, delay: float) -> float | None:
        """Seconds until the first chunk may be written (<= 0: now); None if empty."""
        return self.chunks[0][0] + delay - now if self.chunks else None

    def read(self, src: _socket.socket, now: float) -> None:
        while self.wants_read():
            try:
                data = src.recv(_CHUNK)
            except BlockingIOError:
                return
            if not data:
                self.eof = True
                return
            self.chunks.append((now, data))
            self.size += len(data)

    def write(self, dst: _socket.socket, now: float, delay: float) -> None:
        while self.chunks:
            read_at, data = self.chunks[0]
            if read_at + delay > now:
                return
            try:
                sent = dst.send(data)
            except BlockingIOError:
                return
            self.size -= sent
            if sent < len(data):
                self.chunks[0] = (read_at, data[sent:])
                return
            self.chunks.popleft()
        if self.eof and not self.shut:
            dst.shutdown(_socket.SHUT_WR)
            self.shut = True


class _Connection:
    """A client accepted by the proxy and its connection to the upstream server."""

    def __init__(self, client: _socket.socket) -> None:
        self.client = client
        self.upstream: _socket.socket | None = None  # opened when not stalled
        self.connecting = False
        self.up = _Pipe()  # client -> upstream
        self.down = _Pipe()  # upstream -> client

    def sockets(self) -> list[_socket.socket]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (a free port) to ``upstream_host:upstream_port``.

    The upstream is the first address ``getaddrinfo`` gives, resolved once, here. Always
    ``close()`` it (or use it as a context manager): its thread keeps it alive until then.
    See the module docstring for what each fault does and the thread-safety rules.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        family, _type, _proto, _name, address = _socket.getaddrinfo(
            upstream_host, upstream_port, 0, _socket.SOCK_STREAM
        )[0]
        self._upstream_family: int = family
        self._upstream_address: Any = address
        self._lock = _allocate_lock()  # guards everything below, held only briefly
        self._close_lock = _allocate_lock()  # serializes close()
        self._connections: list[_Connection] = []
        self._stalled = False
        self._refusing = False
        self._delay = 0.0
        self._drop_requested = False
        self._waiters: list[_thread.LockType] = []  # drop() calls waiting for a loop pass
        self._stopping = False  # close() was called
        self._stopped = False  # the proxy thread has finished
        self._closed = False
        self._error: BaseException | None = None

        self._listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        self._wake_r, self._wake_w = _socket.socketpair()
        try:
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(128)
            for sock in (self._listener, self._wake_r, self._wake_w):
                sock.setblocking(False)
            self.host: str = "127.0.0.1"
            self.port: int = self._listener.getsockname()[1]
            self._join = _start_thread(self._run)
        except BaseException:
            for sock in (self._listener, self._wake_r, self._wake_w):
                sock.close()
            raise

    def __repr__(self) -> str:
        return f"<FaultProxy {self.host}:{self.port} -> {self._upstream_address!r}>"

    # -- the public API (any thread or greenlet) ------------------------------------

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy (accepted and not yet closed)."""
        with self._lock:
            return len(self._connections)

    def url_for(self, url: str) -> str:
        """``url`` (a SQLAlchemy URL string) with its host and port replaced by the proxy's."""
        proxied = make_url(url).set(host=self.host, port=self.port)
        return proxied.render_as_string(hide_password=False)

    def stall(self) -> None:
        """Stop forwarding in both directions on all connections, keeping them open."""
        self._set(stalled=True)

    def resume(self) -> None:
        """Forward again; bytes held back while stalled are delivered, in order."""
        self._set(stalled=False)

    def slow(self, delay: float) -> None:
        """Deliver each chunk ``delay`` seconds after it was read (0: at once)."""
        if not delay >= 0:
            raise ValueError(f"delay must be >= 0, not {delay!r}")
        self._set(delay=float(delay))

    def refuse(self, on: bool = True) -> None:
        """While on, reset each new connection as soon as it is accepted."""
        self._set(refusing=on)

    def drop(self) -> None:
        """Reset every current connection (RST to both peers); return once they are gone."""
        done = _allocate_lock()
        done.acquire()
        with self._lock:
            if self._stopped:
                return
            self._drop_requested = True
            self._waiters.append(done)
        self._wake()
        done.acquire()  # released by the proxy thread after the reset, or when it stops

    def close(self) -> None:
        """Stop listening, reset every connection and join the proxy thread. Idempotent.

        Raises RuntimeError (once) if the proxy thread failed.
        """
        with self._close_lock:
            if self._closed:
                return
            with self._lock:
                self._stopping = True
            self._wake()
            self._join()
            self._wake_r.close()
            self._wake_w.close()
            self._closed = True
            error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"{self!r}: the proxy thread failed") from error

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------

    def _set(
        self,
        *,
        stalled: bool | None = None,
        refusing: bool | None = None,
        delay: float | None = None,
    ) -> None:
        """Change the settings; the proxy thread applies them before any further I/O."""
        with self._lock:
            if stalled is not None:
                self._stalled = stalled
            if refusing is not None:
                self._refusing = refusing
            if delay is not None:
                self._delay = delay
        self._wake()

    def _wake(self) -> None:
        """Interrupt the proxy thread's poll() so that it looks at the settings again."""
        # Full: a wake-up is pending anyway. Closed: the proxy is closed.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        """The proxy thread: service everything, then poll until something changes."""
        try:
            while True:
                with self._lock:
                    if self._drop_requested:
                        self._drop_requested = False
                        self._reset_all()
                    self._release_waiters()
                    if self._stopping:
                        return
                    self._drain_wake()
                    self._accept()
                    now = time.monotonic()
                    if not self._stalled:
                        for conn in list(self._connections):
                            self._service(conn, now)
                    interest, timeout = self._interest(time.monotonic())
                poller = _poll()
                for fd, mask in interest.items():
                    poller.register(fd, mask)
                poller.poll(timeout)
        except BaseException as exc:  # reported by close(); the thread must not die loudly
            self._error = exc
        finally:
            with self._lock:
                self._stopped = True
                self._reset_all()
                self._listener.close()
                self._release_waiters()

    def _release_waiters(self) -> None:
        for done in self._waiters:
            done.release()
        self._waiters.clear()

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _accept(self) -> None:
        """Accept every pending client (resetting each one at once while refusing)."""
        while True:
            try:
                fd, _address = self._listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue  # the client gave up before we got to it
                return
            client = _socket.socket(fileno=fd)
            if self._refusing:
                _reset(client)
                continue
            client.setblocking(False)
            _nodelay(client)
            self._connections.append(_Connection(client))

    def _service(self, conn: _Connection, now: float) -> None:
        """Move what can be moved without blocking; reset the connection on any error."""
        try:
            if conn.upstream is None:
                conn.upstream = _socket.socket(self._upstream_family, _socket.SOCK_STREAM)
                conn.upstream.setblocking(False)
                status = conn.upstream.connect_ex(self._upstream_address)
                if status not in _IN_PROGRESS:
                    raise OSError(status, f"connecting to {self._upstream_address!r} failed")
                conn.connecting = True
            upstream = conn.upstream
            if conn.connecting:
                status = upstream.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
                if status:
                    raise OSError(status, f"connecting to {self._upstream_address!r} failed")
                try:
                    upstream.getpeername()
                except OSError as exc:
                    if exc.errno == errno.ENOTCONN:
                        return  # still connecting
                    raise
                conn.connecting = False
                _nodelay(upstream)
            conn.up.read(conn.client, now)
            conn.down.read(upstream, now)
            conn.up.write(upstream, now, self._delay)
            conn.down.write(conn.client, now, self._delay)
        except OSError:
            self._connections.remove(conn)
            for sock in conn.sockets():
                _reset(sock)
            return
        if conn.up.shut and conn.down.shut:  # both sides said goodbye: close politely
            self._connections.remove(conn)
            for sock in conn.sockets():
                sock.close()

    def _reset_all(self) -> None:
        for conn in self._connections:
            for sock in conn.sockets():
                _reset(sock)
        self._connections.clear()

    def _interest(self, now: float) -> tuple[dict[int, int], float | None]:
        """What to poll for (fd -> events) and for how long (milliseconds, None: forever)."""
        interest = {self._listener.fileno(): select.POLLIN, self._wake_r.fileno(): select.POLLIN}
        wait: float | None = None
        if self._stalled:
            return interest, None
        for conn in self._connections:
            if conn.upstream is None:  # cannot happen after _service(); kept for safety
                continue
            if conn.connecting:
                interest[conn.upstream.fileno()] = select.POLLOUT
                continue
            for src, dst, pipe in (
                (conn.client, conn.upstream, conn.up),
                (conn.upstream, conn.client, conn.down),
            ):
                if pipe.wants_read():
                    interest[src.fileno()] = interest.get(src.fileno(), 0) | select.POLLIN
                due_in = pipe.due_in(now, self._delay)
                if due_in is None:
                    continue
                if due_in <= 0:
                    interest[dst.fileno()] = interest.get(dst.fileno(), 0) | select.POLLOUT
                else:
                    wait = due_in if wait is None else min(wait, due_in)
        return interest, None if wait is None else math.ceil(wait * 1000)
