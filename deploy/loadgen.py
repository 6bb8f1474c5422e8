"""Load generator and auditor for the demo service (used by ``make demo`` and the e2e tests).

Standard library only, threads and ``http.client``: it runs in its own process, unpatched,
so it measures the server rather than itself. Every client keeps its connection alive
across requests, as browsers and proxies do, which is exactly where a Session leaks from
one request to the next under ``gunicorn -k gevent``.

Each client runs rounds of: background write, write, stream, write, fail (500), forget
(no commit, a transaction left open). Separate clients hang up in the middle of a
streamed body. The audit then checks, while the keep-alive connections are still open
and idle, that no connection is checked out, that no backend is idle in transaction
(PostgreSQL), that no request saw another's Session state, that every acknowledged
write is stored exactly once and that nothing from a failed or forgotten request is.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

TIMEOUT = 30.0


@dataclass
class Outcome:
    """What the clients saw."""

    acked: set[str] = field(default_factory=set)  # 201: must be stored
    queued: set[str] = field(default_factory=set)  # 202 background: must be stored
    must_not_exist: set[str] = field(default_factory=set)  # /fail and /forget keys
    ok: int = 0  # responses with the expected status
    unexpected: list[str] = field(default_factory=list)  # anything else
    expected_failures: int = 0  # the deliberate 500s
    disconnects: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def requests(self) -> int:
        return self.ok + len(self.unexpected)

    def record(self, ok: bool, latency: float, note: str = "") -> None:
        with self.lock:
            self.latencies.append(latency)
            if ok:
                self.ok += 1
            else:
                self.unexpected.append(note)


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)

    def request(self, method: str, path: str) -> tuple[int, bytes, float]:
        start = time.perf_counter()
        self.conn.request(method, path)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()  # http.client reconnects on the next request
        return resp.status, body, time.perf_counter() - start

    def close(self) -> None:
        self.conn.close()


def _client_rounds(port: int, name: str, rounds: int, out: Outcome, keep: list[Client]) -> None:
    client = Client(port)
    keep.append(client)
    for r in range(rounds):
        key = f"{name}-{r}"
        # Ends with /forget, which leaves a transaction (and a pool connection) open: so a
        # server that does not remove at request end shows it while the client idles.
        plan: list[tuple[str, str, int, str]] = [
            ("POST", f"/background?key={key}-bg", 202, "queued"),
            ("POST", f"/write?key={key}-w1", 201, "acked"),
            ("GET", "/stream?n=5", 200, ""),
            ("POST", f"/write?key={key}-w2", 201, "acked"),
            ("POST", f"/fail?key={key}-fail", 500, "must_not_exist"),
            ("POST", f"/forget?key={key}-forget", 200, "must_not_exist"),
        ]
        for method, path, expected, bucket in plan:
            try:
                status, body, latency = client.request(method, path)
            except (OSError, http.client.HTTPException) as exc:
                out.record(False, 0.0, f"{method} {path}: {type(exc).__name__}: {exc}")
                client.close()
                continue
            ok = status == expected
            out.record(ok, latency, f"{method} {path}: {status} {body[:200]!r}")
            if ok and bucket:
                with out.lock:
                    getattr(out, bucket).add(path.split("key=")[1])
            elif bucket == "must_not_exist":
                with out.lock:
                    out.must_not_exist.add(path.split("key=")[1])
            if expected == 500 and status == 500:
                with out.lock:
                    out.expected_failures += 1


def _hang_up_mid_stream(port: int, out: Outcome) -> None:
    """Ask for a long streamed body, read the first bytes, and hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /stream?n=400 HTTP/1.1\r\nHost: demo\r\n\r\n")
        data = b""
        while b"\n0 " not in data and len(data) < 100_000:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with out.lock:
        out.disconnects += 1


def run_load(
    port: int,
    *,
    clients: int = 10,
    rounds: int = 10,
    disconnects: int = 4,
    prefix: str = "k",
    progress: Callable[[Outcome], None] | None = None,
) -> tuple[Outcome, list[Client]]:
    """Drive the load; return what was seen and the still-open keep-alive clients."""
    out = Outcome()
    keep: list[Client] = []
    threads = [
        threading.Thread(target=_client_rounds, args=(port, f"{prefix}{i}", rounds, out, keep))
        for i in range(clients)
    ]
    threads += [
        threading.Thread(target=_hang_up_mid_stream, args=(port, out)) for _ in range(disconnects)
    ]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if progress is not None:
            progress(out)
        for t in threads:
            t.join(0.2)
    if progress is not None:
        progress(out)
    return out, keep


def get_stats(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/stats")
        result: dict[str, Any] = json.loads(conn.getresponse().read())
        return result
    finally:
        conn.close()


def still_open(client: Client) -> bool:
    """True if the server has not closed this keep-alive connection."""
    sock = client.conn.sock
    if sock is None:
        return False
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read, not closed
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def settle(port: int, deadline: float = 5.0) -> dict[str, Any]:
    """Poll /stats until background writes are done and no connection is checked out.

    The server removes a request's Session after the response was sent (a rollback may
    still be on the wire), so a client can be a moment ahead of it; this waits at most
    ``deadline`` seconds and returns the last stats either way (the caller asserts on
    them). Servers under test keep idle connections for longer than that, so a leak is
    still there when the stats are read.
    """
    end = time.monotonic() + deadline
    stats = get_stats(port)
    while time.monotonic() < end and (stats["background_pending"] or stats["checkedout"]):
        time.sleep(0.05)
        stats = get_stats(port)
    return stats


def audit(
    port: int,
    url: str,
    table: str,
    out: Outcome,
    *,
    app_name: str | None = None,
) -> dict[str, Any]:
    """Check the server and the table against what the clients were told."""
    stats = settle(port)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            keys = [k for (k,) in conn.execute(text(f"SELECT key FROM {table}"))]
            idle_in_tx = None
            if engine.dialect.name == "postgresql" and app_name:
                idle_in_tx = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a "
                        "AND state LIKE 'idle in transaction%'"
                    ),
                    {"a": app_name},
                ).scalar_one()
    finally:
        engine.dispose()
    stored = set(keys)
    latencies = sorted(out.latencies) or [0.0]
    # A 500 from /fail counts as expected only if the server says it failed on purpose
    # (not, say, on "database is locked" before it got there).
    accidental = max(0, out.expected_failures - stats["deliberate_failures"])
    return {
        "requests": out.requests,
        "ok": out.ok - accidental,
        "unexpected": out.unexpected[:10],
        "unexpected_count": len(out.unexpected) + accidental,
        "expected_failures": min(out.expected_failures, stats["deliberate_failures"]),
        "disconnects": out.disconnects,
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
        "checkedout": stats["checkedout"],
        "idle_in_tx": idle_in_tx,
        "saw_foreign": stats["saw_foreign"],
        "background_failed": stats["background_failed"],
        "lost": sorted(out.acked - stored),
        "background_lost": sorted(out.queued - stored),
        "leaked": sorted(out.must_not_exist & stored),
        "duplicates": len(keys) - len(stored),
        "greenscope": stats["greenscope"],
        "mode": stats["mode"],
    }


def create_demo_schema(env: dict[str, str]) -> None:
    """Create the demo's table (DATABASE_URL, GREENSCOPE_DEMO_TABLE in ``env``)."""
    subprocess.run(
        [sys.executable, "-c", "import demo_app; demo_app.create_schema()"],
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent)},
        check=True,
        timeout=60,
    )


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """A server subprocess on a loopback port: started, health-checked, stopped."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        env: dict[str, str],
        cwd: str,
        log_name: str = "",
        *,
        host: str = "127.0.0.1",
        start_timeout: float = 30,
    ) -> None:
        self.port = port
        self.host = host
        self.log_path = f"{cwd}/{log_name or f'server-{port}'}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,  # its own process group: kill() reaches the workers too
        )
        end = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                get_stats(port, host)
                break
            except OSError:
                if time.monotonic() > end:
                    self.stop()
                    raise RuntimeError(
                        f"server did not answer in {start_timeout:g} s:\n{self.log()}"
                    ) from None
                time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        """SIGKILL the master and its workers at once: a host that dies, no cleanup."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def stop(self, sig: int = 15, timeout: float = 40) -> int:
        """Send ``sig`` (SIGTERM: graceful) and wait; kill after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
