"""``make soak``: the demo service on PostgreSQL under load, with faults, then an audit.

    python deploy/soak.py                  # the full soak: 50,000 requests
    python deploy/soak.py --quick          # the reduced run CI makes: 6,000 requests
    DATABASE_URL=postgresql+psycopg://user@host/db python deploy/soak.py

It starts ``gunicorn -k greenscope.gunicorn.GeventWorker`` with 2 workers on a loopback
port and drives a fixed number of requests from keep-alive clients, a mix of: writes
that commit, reads, streamed bodies, requests that raise after flushing, requests that
forget to commit, requests whose query is cut short by a ``gevent.Timeout`` (caught, and
escaping the app), greenlets spawned by a request that end without commit or
``remove()``, clients that hang up mid-request and mid-stream. Meanwhile workers are
recycled by ``max_requests``, the master gets a SIGHUP (reload) and later a SIGTERM
followed by a fresh start on the same port (a restart), and backends idle in a
transaction are killed with ``pg_terminate_backend``.

Then it checks, and prints the figures:

* every write acknowledged with 2xx is stored exactly once; nothing from a request that
  failed, timed out, forgot its commit or was orphaned is stored;
* no request saw another's objects (each worker counts, and reports when it exits);
* while the clients idle on open keep-alive connections (each one's last request used
  the database), no backend is idle in transaction, no connection is checked out and
  no Session is live in any worker; at no sample did a worker hold more connections
  than its pool allows (backends of queries abandoned on a ``gevent.Timeout``, which
  PostgreSQL ends within ``client_connection_check_interval``, are counted apart);
* greenscope's counters, summed over every worker process that ran, balance (created =
  removed + reaped + live), no Session was live at a worker's exit, and no more were
  reaped than the orphans the soak spawned (any other reap would be a Session that
  request-end removal missed); every worker that started reported at exit.

Exit status 0 if all of that holds and every fault was injected at least once.
A write whose answer never arrived (a dropped connection), or whose COMMIT's answer was
lost (the demo answers 503), may or may not be stored: those are counted, not judged.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import loadgen
import pgbouncer

DEPLOY = Path(__file__).resolve().parent
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1/test"

WORKERS = 2
POOL_SIZE = 8
MAX_OVERFLOW = 24
POOL_CAP = POOL_SIZE + MAX_OVERFLOW  # per worker; worker_connections matches it
# --pgbouncer: PgBouncer's pool, a fraction of what the workers' pools add up to; the
# demo's request deadline; how long the database is away (PgBouncer PAUSE).
PGBOUNCER_POOL = 10
DEADLINE = 2.5
PAUSE_SECONDS = 8.0
OUTAGE = "database outage (PgBouncer PAUSE)"
SERVER_STATES = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")

PROFILES: dict[str, dict[str, int]] = {
    "full": {"requests": 50_000, "clients": 16, "max_requests": 2_500, "jitter": 500},
    "quick": {"requests": 6_000, "clients": 12, "max_requests": 700, "jitter": 150},
}

# (kind, weight): what each client thread picks per request.
MIX: list[tuple[str, int]] = [
    ("write", 34),
    ("sql", 16),
    ("stream", 8),
    ("fail", 8),
    ("forget", 8),
    ("slow", 5),
    ("timeout", 5),
    ("timeout_escape", 2),
    ("orphan", 5),
    ("hangup_request", 3),
    ("hangup_stream", 2),
]

# Keys of these kinds must never be stored, whatever the client saw.
NEVER_STORED = {"fail", "forget", "timeout", "timeout_escape", "orphan"}
# Writes: stored exactly once when acknowledged (201), never when answered 5xx, except
# 503, the demo's "the COMMIT's answer was lost": either outcome is then correct.
WRITES = {"write", "slow"}
EXPECTED_STATUS = {
    "write": 201,
    "slow": 201,
    "sql": 200,
    "stream": 200,
    "fail": 500,
    "forget": 200,
    "timeout": 504,
    "orphan": 202,
    "timeout_escape": 500,  # gunicorn answers what escapes the app with a 500
}


@dataclass
class Tally:
    """Everything the clients and the fault injector saw; shared by threads."""

    budget: int
    issued: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # "kind status"
    acked: set[str] = field(default_factory=set)
    failed_writes: set[str] = field(default_factory=set)  # answered 5xx
    unknown_writes: set[str] = field(default_factory=set)  # no answer
    never_stored: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    max_conns: dict[str, int] = field(default_factory=dict)  # application_name -> max held
    max_backends: int = 0  # per worker, abandoned backends included (all, via PgBouncer)
    refused_waits: int = 0
    foreign_answers: int = 0  # responses that carried X-Saw-Foreign
    # The database outage (PgBouncer PAUSE): its window, and what clients saw during it.
    paused_at: float | None = None
    resumed_at: float | None = None
    paused_outcomes: Counter[str] = field(default_factory=Counter)
    paused_max_latency: float = 0.0
    first_ack_after_resume: float | None = None
    max_client_waiting: int = 0  # PgBouncer's cl_waiting
    max_servers: int = 0  # PgBouncer's server connections, in any state
    # Answers of a write whose outcome the client cannot know: 503 is the demo's "the
    # COMMIT's answer was lost"; behind a load balancer, its own 502 and 504 too.
    unknown_statuses: frozenset[str] = frozenset({"503"})
    retry_writes: bool = False  # retry an unknown write once, with the same key
    client_retries: int = 0
    replayed: int = 0  # writes answered 201 as a replay of a stored key
    crash_replays: int = 0  # of which: the fleet soak's crash after COMMIT, retried
    crash_outcomes: Counter[str] = field(default_factory=Counter)
    seen: dict[str, str] = field(default_factory=dict)  # key -> "kind outcome", for reports
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self) -> int | None:
        with self.lock:
            if self.issued >= self.budget:
                return None
            self.issued += 1
            return self.issued

    def done(self) -> int:
        with self.lock:
            return sum(self.outcomes.values())


def _rst(sock: socket.socket) -> None:
    """Close with a TCP reset, as a client that vanishes does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


class SoakClient(threading.Thread):
    """One keep-alive client: picks a kind per request until the budget is spent."""

    def __init__(self, tally: Tally, port: int, run_id: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.tally, self.port, self.run_id = tally, port, run_id
        self.rng = random.Random(seed)
        self.conn: http.client.HTTPConnection | None = None
        kinds, weights = zip(*MIX, strict=True)
        self.kinds, self.weights = list(kinds), list(weights)

    def run(self) -> None:
        while (n := self.tally.take()) is not None:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            key = f"{self.run_id}-{n}"
            started = time.monotonic()
            outcome = self._attempt(kind, key)
            if self._unknown(kind, outcome) and self.tally.retry_writes:
                # What a careful client does: send the write again with the same
                # idempotency key. Stored already, it is answered 201 as a replay.
                with self.tally.lock:
                    self.tally.client_retries += 1
                time.sleep(0.05)
                outcome = self._attempt(kind, key)
            ended = time.monotonic()
            with self.tally.lock:
                self.tally.outcomes[f"{kind} {outcome}"] += 1
                t = self.tally
                during_pause = (
                    t.paused_at is not None
                    and started >= t.paused_at
                    and (t.resumed_at is None or started < t.resumed_at)
                )
                # Started while the database was away: not judged as usual (it may fail
                # fast, or wait and succeed once the database is back). Answered while
                # it was still away: it must have failed fast.
                if during_pause and t.resumed_at is None:
                    t.paused_outcomes[outcome] += 1
                    t.paused_max_latency = max(t.paused_max_latency, ended - started)
                elif (
                    outcome == "201"
                    and not during_pause
                    and t.resumed_at is not None
                    and t.first_ack_after_resume is None
                    and started >= t.resumed_at
                ):
                    t.first_ack_after_resume = ended - t.resumed_at
                self._judge(kind, key, outcome, expected=not during_pause)
        # End on a keep-alive connection whose last request used the database, left open
        # through the idle audit: a Session that request-end removal missed would still
        # be held by its connection's greenlet then (and only reaped once it closes).
        outcome = self._attempt("sql", f"{self.run_id}-idle")
        if outcome != "200" or self.conn is None:
            with self.tally.lock:
                self.tally.unexpected.append(f"idle probe: {outcome}")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def _unknown(self, kind: str, outcome: str) -> bool:
        """A write whose outcome this client cannot know (no answer, or a 502/503/504)."""
        if kind != "write":  # /slow is a request to have in flight, not to retry
            return False
        return outcome in self.tally.unknown_statuses or outcome.startswith("dropped")

    def _attempt(self, kind: str, key: str) -> str:
        """Send one request, waiting out a restart; return its status or what went wrong."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return self._send(kind, key)
            except ConnectionRefusedError:
                # Nothing listens (the restart's gap): the request never reached a server.
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                with self.tally.lock:
                    self.tally.refused_waits += 1
                if time.monotonic() > deadline:
                    return "refused"
                time.sleep(0.02)
            except (OSError, http.client.HTTPException) as exc:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                return f"dropped({type(exc).__name__})"

    def _send(self, kind: str, key: str) -> str:
        if kind == "hangup_request":
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                sock.sendall(f"GET /slow?key={key} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
                _rst(sock)  # gone before the response: the app runs on regardless
            return "hung-up"
        if kind == "hangup_stream":
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                sock.sendall(b"GET /stream?n=400 HTTP/1.1\r\nHost: soak\r\n\r\n")
                data = b""
                while b"\n0 " not in data and len(data) < 100_000:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return "dropped(EOF)"
                    data += chunk
                _rst(sock)  # mid-stream: the server's next write fails
            return "hung-up"
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        path = {
            "write": f"/write?key={key}",
            "slow": f"/slow?key={key}",
            "sql": "/sql",
            "stream": "/stream?n=5",
            "fail": f"/fail?key={key}",
            "forget": f"/forget?key={key}",
            "timeout": f"/timeout?key={key}",
            "timeout_escape": f"/timeout?key={key}&escape=1",
            "orphan": f"/orphan?key={key}",
        }[kind]
        self.conn.request("GET" if kind in {"sql", "stream", "slow"} else "POST", path)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.getheader("X-Saw-Foreign"):
            with self.tally.lock:
                self.tally.foreign_answers += 1
        if b'"replayed": true' in body:
            with self.tally.lock:
                self.tally.replayed += 1
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = None
        return str(resp.status)

    def _judge(self, kind: str, key: str, outcome: str, *, expected: bool = True) -> None:
        t = self.tally
        t.seen[key] = f"{kind} {outcome}"
        if kind in NEVER_STORED:
            t.never_stored.add(key)
        if kind in WRITES:
            if outcome == "201":
                t.acked.add(key)
            elif outcome.startswith("5") and outcome not in t.unknown_statuses:
                t.failed_writes.add(key)
            else:
                t.unknown_writes.add(key)
        if kind == "hangup_request":
            t.unknown_writes.add(key)  # a /slow the client never heard back from
        status = EXPECTED_STATUS.get(kind)
        if expected and status is not None and outcome != str(status):
            t.unexpected.append(f"{kind} {key}: {outcome}")


class Soak:
    """The server, its restarts and the fault injector."""

    def __init__(
        self,
        url: str,
        profile: dict[str, int],
        workdir: str,
        seed: int,
        *,
        worker_class: str = "greenscope.gunicorn.GeventWorker",
        bouncer: pgbouncer.PgBouncer | None = None,
    ) -> None:
        self.url = url
        self.bouncer = bouncer
        self.worker_class = worker_class
        self.profile = profile
        self.workdir = workdir
        self.seed = seed
        self.run_id = uuid.uuid4().hex[:8]
        self.table = f"soak_{self.run_id}"
        self.app_prefix = f"greenscope-soak-{self.run_id}"
        self.reports = Path(workdir) / "reports"
        self.reports.mkdir()
        self.port = loadgen.free_port()
        self.tally = Tally(budget=profile["requests"])
        self.expected_boots = WORKERS * 3  # the first workers, the reload's, the restart's
        self.client_pool_slots = WORKERS * POOL_CAP  # what the workers' pools add up to
        self.admin = create_engine(url, poolclass=NullPool)
        self.servers: list[loadgen.Server] = []
        # Which backends are the soak's: by application name, or through PgBouncer by the
        # role PgBouncer logs in as (server connections serve every client in turn).
        if bouncer is None:
            self.mine, self.mine_param = "application_name LIKE :p", f"{self.app_prefix}-%"
        else:
            self.mine, self.mine_param = "usename = :p", pgbouncer.ROLE
        self.env = {
            **os.environ,
            "DATABASE_URL": url if bouncer is None else bouncer.url,
            "GREENSCOPE_DEMO_TABLE": self.table,
            "GREENSCOPE_DEMO_APP_NAME": f"{self.app_prefix}-{{pid}}",
            "GREENSCOPE_DEMO_POOL_SIZE": str(POOL_SIZE),
            "GREENSCOPE_DEMO_MAX_OVERFLOW": str(MAX_OVERFLOW),
            "GREENSCOPE_SOAK_DIR": str(self.reports),
            "PYTHONPATH": str(DEPLOY),
        }
        self.env.pop("GREENSCOPE_DEBUG", None)
        if bouncer is not None:
            self.env["GREENSCOPE_DEMO_PGBOUNCER"] = "1"
            self.env["GREENSCOPE_DEMO_DEADLINE"] = str(DEADLINE)

    # -- the server -----------------------------------------------------------------

    def start(self) -> loadgen.Server:
        argv = [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.soak.conf.py")]
        argv += ["--chdir", str(DEPLOY), "-b", f"127.0.0.1:{self.port}"]
        argv += ["-k", self.worker_class, "-w", str(WORKERS)]
        argv += ["--worker-connections", str(POOL_CAP), "--keep-alive", "30"]
        argv += ["--graceful-timeout", "20", "--timeout", "60"]
        argv += ["--max-requests", str(self.profile["max_requests"])]
        argv += ["--max-requests-jitter", str(self.profile["jitter"]), "demo_app:app"]
        server = loadgen.Server(
            argv, self.port, self.env, self.workdir, log_name=f"soak-{len(self.servers)}"
        )
        self.servers.append(server)
        return server

    def worker_pids(self) -> list[int]:
        master = self.servers[-1].proc.pid
        try:
            children = Path(f"/proc/{master}/task/{master}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in children.split()]

    # -- faults ---------------------------------------------------------------------

    def _backends(self, sql: str) -> list[Any]:
        """Rows of ``sql`` about this soak's backends (``{mine}`` selects them)."""
        with self.admin.connect() as conn:
            query = text(sql.replace("{mine}", self.mine))
            return list(conn.execute(query, {"p": self.mine_param}).all())

    def _terminate_one_backend(self) -> bool:
        """Kill one of the soak's backends that is idle inside a transaction."""
        killed = self._backends(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE {mine} AND state = 'idle in transaction' LIMIT 1"
        )
        return bool(killed and killed[0][0])

    def _sample_connections(self) -> None:
        # A query cut short by gevent.Timeout leaves its backend running after the pool
        # dropped the connection, until PostgreSQL's client_connection_check_interval
        # notices (deploy/README.md). Only /timeout runs pg_sleep, and its 0.05 s timeout
        # always cuts it short: its backends, abandoned or about to be, are counted apart
        # (undercounting the pool's by the few /timeout requests in flight at a sample).
        if self.bouncer is not None:
            # Through PgBouncer backends are not per worker: count PgBouncer's server
            # connections against its pool, and how many clients wait for one. Backends
            # PgBouncer already dropped (a /timeout client hung up mid-query: PostgreSQL
            # ends it within client_connection_check_interval) are counted apart.
            [(n,)] = self._backends("SELECT count(*) FROM pg_stat_activity WHERE {mine}")
            pool = self.bouncer.pool()
            servers = sum(int(pool.get(k, 0)) for k in SERVER_STATES)
            with self.tally.lock:
                self.tally.max_backends = max(self.tally.max_backends, n)
                self.tally.max_servers = max(self.tally.max_servers, servers)
                waiting = int(pool.get("cl_waiting", 0))
                self.tally.max_client_waiting = max(self.tally.max_client_waiting, waiting)
            return
        rows = self._backends(
            "SELECT application_name, count(*), count(*) FILTER (WHERE "
            "state = 'active' AND query LIKE 'SELECT pg_sleep%') "
            "FROM pg_stat_activity WHERE {mine} GROUP BY application_name"
        )
        with self.tally.lock:
            for name, n, abandoned in rows:
                self.tally.max_conns[name] = max(self.tally.max_conns.get(name, 0), n - abandoned)
                self.tally.max_backends = max(self.tally.max_backends, n)

    def chaos(self, stop: threading.Event) -> None:
        """Inject the faults at fixed points of the request budget, and sample."""
        budget = self.tally.budget
        kills_at = [budget * i // 24 for i in range(1, 24)]
        hup_at, restart_at = budget * 3 // 10, budget * 6 // 10
        pause_at = budget * 45 // 100 if self.bouncer is not None else 0
        while not stop.is_set():
            done = self.tally.done()
            self._sample_connections()
            if kills_at and done >= kills_at[0]:
                for _ in range(20):  # wait (a little) for a transaction to be idle in
                    if self._terminate_one_backend():
                        self.tally.faults["pg_terminate_backend"] += 1
                        break
                    time.sleep(0.02)
                kills_at.pop(0)
            if hup_at and done >= hup_at:
                hup_at = 0
                self.servers[-1].proc.send_signal(signal.SIGHUP)
                self.tally.faults["SIGHUP reload"] += 1
            if pause_at and done >= pause_at:
                pause_at = 0
                self._outage()
            if restart_at and done >= restart_at:
                restart_at = 0
                code = self.servers[-1].stop(signal.SIGTERM)
                self.tally.faults["SIGTERM restart"] += 1
                if code != 0:
                    with self.tally.lock:
                        self.tally.unexpected.append(f"master exited {code} on SIGTERM")
                self.start()
            stop.wait(0.1)

    def _outage(self) -> None:
        """The database goes away for PAUSE_SECONDS (PgBouncer PAUSE), then comes back."""
        assert self.bouncer is not None
        # PAUSE returns once the transactions in flight have ended; from then on every
        # query waits in PgBouncer. The outage's window starts there.
        self.bouncer.pause()
        with self.tally.lock:
            self.tally.paused_at = time.monotonic()
        end = time.monotonic() + PAUSE_SECONDS
        while time.monotonic() < end:
            self._sample_connections()
            time.sleep(0.1)
        self.bouncer.resume()
        with self.tally.lock:
            self.tally.resumed_at = time.monotonic()
        self.tally.faults[OUTAGE] += 1

    # -- the run --------------------------------------------------------------------

    def run(self, progress: bool) -> dict[str, Any]:
        loadgen.create_demo_schema(self.env)
        try:
            return self._run(progress)
        finally:
            for server in self.servers:
                server.stop()
            with self.admin.begin() as conn:
                conn.execute(text(f"DROP TABLE IF EXISTS {self.table}"))
            self.admin.dispose()

    def _run(self, progress: bool) -> dict[str, Any]:
        self.start()
        return self._run_load(progress)

    def stop_all(self) -> int:
        """Stop the serving gunicorn (SIGTERM, graceful); return its exit status."""
        return self.servers[-1].stop(signal.SIGTERM)

    def _run_load(self, progress: bool) -> dict[str, Any]:
        """Clients and faults until the budget is spent, then the audits (servers up)."""
        started = time.monotonic()
        clients = [
            SoakClient(self.tally, self.port, self.run_id, self.seed * 1000 + i)
            for i in range(self.profile["clients"])
        ]
        stop = threading.Event()
        chaos = threading.Thread(target=self.chaos, args=(stop,), daemon=True)
        chaos.start()
        for c in clients:
            c.start()
        last = 0.0
        while any(c.is_alive() for c in clients):
            for c in clients:
                c.join(0.5)
            if progress and time.monotonic() - last > 5:
                last = time.monotonic()
                print(f"  {self.tally.done()}/{self.tally.budget} requests", file=sys.stderr)
        stop.set()
        chaos.join(60)
        load_seconds = time.monotonic() - started
        idle = self.idle_audit()
        for c in clients:
            c.close()
        exit_status = self.stop_all()
        after = self.after_exit_audit()
        rows = self.table_audit()
        figures = self.figures(idle, after, rows, load_seconds, exit_status)
        figures["log_errors"] = self.log_errors()
        return figures

    def idle_audit(self) -> dict[str, Any]:
        """With the clients idle: every worker settles to nothing checked out, nothing live."""
        end = time.monotonic() + 15
        seen: dict[int, dict[str, Any]] = {}
        while time.monotonic() < end:
            pids = set(self.worker_pids())
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                s = loadgen.get_stats(self.port)
                seen[s["pid"]] = s
            current = [seen.get(p) for p in pids]
            if pids and all(
                s is not None
                and s["checkedout"] == 0
                and s["greenscope"]["live"] == 0
                and s["background_pending"] == 0
                for s in current
            ):
                break
            time.sleep(0.05)
        pids = set(self.worker_pids())
        [(idle_in_tx, total)] = self._backends(
            "SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%'), "
            "count(*) FROM pg_stat_activity WHERE {mine}"
        )
        pool = self.bouncer.pool() if self.bouncer is not None else {}
        servers = self.bouncer.show("SERVERS") if self.bouncer is not None else []
        return {
            "pgbouncer_cl_waiting": pool.get("cl_waiting", 0),
            "pgbouncer_servers_active": sum(r["state"] == "active" for r in servers),
            "workers_seen": sorted(p for p in seen if p in pids),
            "workers": sorted(pids),
            "checkedout": sum(seen[p]["checkedout"] for p in pids if p in seen),
            "live": sum(seen[p]["greenscope"]["live"] for p in pids if p in seen),
            "idle_in_tx": idle_in_tx,
            "connections": total,
        }

    def after_exit_audit(self) -> dict[str, Any]:
        return self.after_exit_audit_of([self.reports])

    def after_exit_audit_of(self, dirs: list[Path]) -> dict[str, Any]:
        """What the workers that reported into ``dirs`` said at exit, and what is left."""
        started = {p.name.split("-", 1)[1] for d in dirs for p in d.glob("started-*")}
        crashed = {p.name.split("-", 1)[1] for d in dirs for p in d.glob("crashed-*")}
        started -= crashed  # died on purpose (the fleet soak's crash after COMMIT)
        exits = [json.loads(p.read_text()) for d in dirs for p in d.glob("exit-*.json")]
        total: Counter[str] = Counter()
        counters: Counter[str] = Counter()
        for report in exits:
            total.update(report["greenscope"])
            counters.update(report["counters"])
        # A backend ends a moment after its client closed the socket: give it 5 s. Through
        # PgBouncer, its idle server connections stay pooled: only busy ones count.
        busy = " AND state <> 'idle'" if self.bouncer is not None else ""
        end = time.monotonic() + 5
        while True:
            [(left,)] = self._backends(
                f"SELECT count(*) FROM pg_stat_activity WHERE {{mine}}{busy}"
            )
            if left == 0 or time.monotonic() > end:
                break
            time.sleep(0.1)
        return {
            "workers_started": len(started),
            "workers_reported": len({str(r["pid"]) for r in exits} & started),
            "greenscope": dict(total),
            "counters": dict(counters),
            "checkedout_at_exit": sum(r["checkedout"] for r in exits),
            "connections_after_exit": left,
        }

    def table_audit(self) -> dict[str, Any]:
        with self.admin.connect() as conn:
            rows = conn.execute(text(f"SELECT key, count(*) FROM {self.table} GROUP BY key")).all()
        stored: dict[str, int] = {k: n for k, n in rows}  # noqa: C416 - typed Rows
        t = self.tally
        return {
            "stored": stored,
            "lost": sorted(t.acked - stored.keys()),
            "twice": sorted(k for k, n in stored.items() if n > 1),
            "leaked": sorted((t.never_stored | t.failed_writes) & stored.keys()),
            "unknown_stored": len(t.unknown_writes & stored.keys()),
        }

    def log_errors(self) -> list[str]:
        found: Counter[str] = Counter()
        for server in self.servers:
            for m in re.finditer(
                r"^([A-Za-z_][\w.]*(?:Error|Exception|Timeout|Exit)): (.*)$",
                server.log(),
                re.MULTILINE,
            ):
                if "deliberate failure" not in m.group(2):  # /fail's, by design
                    found[f"{m.group(1)}: {m.group(2)[:80]}"] += 1
        return [f"{n:>6} x {what}" for what, n in found.most_common(8)]

    def figures(
        self,
        idle: dict[str, Any],
        after: dict[str, Any],
        rows: dict[str, Any],
        seconds: float,
        exit_status: int,
    ) -> dict[str, Any]:
        t = self.tally
        gs = after["greenscope"]
        kinds: Counter[str] = Counter()
        for key, n in t.outcomes.items():
            kinds[key.split()[0]] += n
        counters = after["counters"]
        faults = dict(t.faults)
        # Started for other reasons: the first workers, the reload's, the restart's.
        faults["max_requests recycles"] = max(0, after["workers_started"] - self.expected_boots)
        faults["raised (500 after flush)"] = counters.get("deliberate_failures", 0)
        faults["forgotten commits"] = kinds["forget"]
        faults["gevent.Timeout caught (504)"] = kinds["timeout"]
        faults["gevent.Timeout escaping the app"] = kinds["timeout_escape"]
        faults["orphaned greenlets (no commit, no remove)"] = kinds["orphan"]
        faults["hang-ups mid-request"] = kinds["hangup_request"]
        faults["hang-ups mid-stream"] = kinds["hangup_stream"]
        paused = t.paused_outcomes
        return {
            "pgbouncer": self.bouncer is not None,
            "pgbouncer_pool_size": self.bouncer.pool_size if self.bouncer else 0,
            "client_pools_add_up_to": self.client_pool_slots,
            "max_client_waiting": t.max_client_waiting,
            "max_pgbouncer_servers": t.max_servers,
            "idle_pgbouncer_cl_waiting": idle.get("pgbouncer_cl_waiting", 0),
            "idle_pgbouncer_servers_active": idle.get("pgbouncer_servers_active", 0),
            "outage_answers": dict(sorted(paused.items())),
            "outage_failed_fast": sum(paused[k] for k in ("503", "504")),
            "outage_max_latency": round(t.paused_max_latency, 2),
            "recovery_seconds": (
                None if t.first_ack_after_resume is None else round(t.first_ack_after_resume, 2)
            ),
            "deadline": DEADLINE,
            "foreign_answers": t.foreign_answers,
            "client_retries": t.client_retries,
            "replayed": t.replayed,
            "requests": sum(kinds.values()),
            "seconds": round(seconds, 1),
            "outcomes": dict(sorted(t.outcomes.items())),
            "faults": faults,
            "unexpected": len(t.unexpected),
            "unexpected_first": t.unexpected[:8],
            "refused_waits": t.refused_waits,
            "acked_writes": len(t.acked),
            "acked_lost": len(rows["lost"]),
            "stored_twice": len(rows["twice"]),
            "failed_or_never_stored_keys": len(t.never_stored | t.failed_writes),
            "leaked": len(rows["leaked"]),
            "leaked_first": [f"{k} ({t.seen.get(k, '?')})" for k in rows["leaked"][:8]],
            "unanswered_writes": len(t.unknown_writes),
            "unanswered_writes_stored": rows["unknown_stored"],
            "saw_foreign": counters.get("saw_foreign", 0),
            "idle_workers": idle["workers"],
            "idle_workers_seen": idle["workers_seen"],
            "idle_checkedout": idle["checkedout"],
            "idle_live": idle["live"],
            "idle_in_transaction": idle["idle_in_tx"],
            "idle_connections": idle["connections"],
            "max_connections_per_worker": max(t.max_conns.values(), default=0),
            "max_backends_per_worker": t.max_backends,
            "pool_cap_per_worker": POOL_CAP,
            "workers_started": after["workers_started"],
            "workers_reported": after["workers_reported"],
            "created": gs.get("created", 0),
            "removed": gs.get("removed", 0),
            "reaped": gs.get("reaped", 0),
            "orphans_spawned": counters.get("orphans", 0),
            "failed_closes": gs.get("failed", 0),
            "live_at_exit": gs.get("live", 0),
            "checkedout_at_exit": after["checkedout_at_exit"],
            "connections_after_exit": after["connections_after_exit"],
            "exit_status": exit_status,
        }


def verdict(f: dict[str, Any], budget: int) -> list[str]:
    """What failed; empty if the soak passed."""
    problems = []
    checks = [
        (f["requests"] == budget, f"{f['requests']} requests made, not {budget}"),
        (f["acked_lost"] == 0, f"{f['acked_lost']} acknowledged writes lost"),
        (f["stored_twice"] == 0, f"{f['stored_twice']} keys stored twice"),
        (f["leaked"] == 0, f"{f['leaked']} failed/never-commit keys stored"),
        (f["saw_foreign"] == 0, f"{f['saw_foreign']} requests saw another's objects"),
        (f["idle_in_transaction"] == 0, "backends idle in transaction while clients idle"),
        (f["idle_checkedout"] == 0, "connections checked out while clients idle"),
        (f["idle_live"] == 0, "Sessions live while clients idle"),
        (
            f["idle_workers_seen"] == f["idle_workers"] and f["idle_workers"],
            "not every worker answered /stats while idle",
        ),
        (
            f["max_connections_per_worker"] <= f["pool_cap_per_worker"],
            "a worker held more connections than its pool allows",
        ),
        (
            f["created"] == f["removed"] + f["reaped"] + f["live_at_exit"],
            "greenscope counters do not balance",
        ),
        (f["live_at_exit"] == 0, "Sessions still live when their worker exited"),
        # Only the orphans the soak makes may be reaped: any other reap is a Session that
        # request-end removal missed, closed only when its connection's greenlet ended.
        (
            f["reaped"] <= f["orphans_spawned"],
            f"{f['reaped']} reaped, more than the {f['orphans_spawned']} orphans spawned",
        ),
        (f["workers_reported"] == f["workers_started"], "a worker exited without reporting"),
        (f["connections_after_exit"] == 0, "connections left after the server exited"),
        (f["exit_status"] == 0, f"the server exited {f['exit_status']}"),
        # Not vacuous: most requests got their expected answer, and every fault happened.
        (f["unexpected"] <= budget // 50, f"{f['unexpected']} unexpected answers (> 2%)"),
        (f["acked_writes"] >= budget // 5, "too few acknowledged writes to judge"),
        (f["reaped"] > 0, "no orphan was reaped"),
        (all(n > 0 for n in f["faults"].values()), "a fault was never injected"),
    ]
    checks.append(
        (f["foreign_answers"] == 0, f"{f['foreign_answers']} answers saw another's objects")
    )
    if f["pgbouncer"]:
        checks += [
            (
                f["max_pgbouncer_servers"] <= f["pgbouncer_pool_size"],
                f"{f['max_pgbouncer_servers']} server connections, more than PgBouncer's pool",
            ),
            (f["idle_pgbouncer_cl_waiting"] == 0, "clients still waiting in PgBouncer"),
            (f["idle_pgbouncer_servers_active"] == 0, "PgBouncer server connections active"),
        ]
    if f["faults"].get(OUTAGE):
        allowed = {"503", "504", "202", "hung-up"}  # and drops: a stream cut mid-body
        odd = {k: n for k, n in f["outage_answers"].items() if k not in allowed}
        odd = {k: n for k, n in odd.items() if not k.startswith("dropped")}
        checks += [
            (f["outage_failed_fast"] > 0, "no request failed fast during the outage"),
            (not odd, f"answers during the outage other than 503/504: {odd}"),
            (
                f["outage_max_latency"] <= f["deadline"] + 2,
                f"a request took {f['outage_max_latency']} s during the outage",
            ),
            (
                f["recovery_seconds"] is not None and f["recovery_seconds"] <= 10,
                f"no recovery within 10 s of RESUME ({f['recovery_seconds']})",
            ),
        ]
    for ok, message in checks:
        if not ok:
            problems.append(message)
    return problems


Row = Any  # print_figures' row(label, value, target="")


def _print_connections(f: dict[str, Any], row: Row) -> None:
    if f["pgbouncer"]:
        row("client pools (all workers' pool_size+max_overflow)", f["client_pools_add_up_to"])
        row("PgBouncer pool (server connections)", f["pgbouncer_pool_size"])
        row("max server connections at any sample", f["max_pgbouncer_servers"], "<= its pool")
        row("  + backends PgBouncer dropped, still ending", f["max_backends_per_worker"])
        row("max clients waiting in PgBouncer", f["max_client_waiting"])
        row("clients idle: waiting in PgBouncer", f["idle_pgbouncer_cl_waiting"], "must be 0")
        row("clients idle: server connections active", f["idle_pgbouncer_servers_active"], "0")
    else:
        row("max held per worker at any sample", f["max_connections_per_worker"])
        row("  + backends of cut-short queries", f["max_backends_per_worker"])
        row("pool limit per worker (pool_size+max_overflow)", f["pool_cap_per_worker"])


def _print_outage(f: dict[str, Any], row: Row) -> None:
    print(f"database outage: PgBouncer PAUSE for {PAUSE_SECONDS:g} s, deadline {DEADLINE:g} s")
    row("answers during the outage", f["outage_answers"])
    row("  failed fast (503, 504)", f["outage_failed_fast"], "must be > 0")
    row("  slowest answer (s)", f["outage_max_latency"], f"<= {DEADLINE + 2:g}")
    row("recovery: RESUME to the first 201 (s)", f["recovery_seconds"], "<= 10")


def _print_examples(f: dict[str, Any]) -> None:
    if f["leaked_first"]:
        print("stored although they must not be (kind, answer):")
        for line in f["leaked_first"]:
            print(f"    {line}")
    if f["unexpected_first"]:
        print("first unexpected answers:")
        for line in f["unexpected_first"]:
            print(f"    {line}")


def print_figures(f: dict[str, Any], problems: list[str], *, control: bool = False) -> None:
    def row(label: str, value: Any, target: str = "") -> None:
        print(f"  {label:<46} {value!s:>10}  {target}")

    print(f"\ngreenscope soak: {f['requests']} requests in {f['seconds']} s")
    if control:
        print("CONTROL RUN (stock -k gevent, no request-end removal): the audit must fail")
    print("faults injected")
    for name, n in f["faults"].items():
        row(name, n)
    print("answers")
    row("as expected", f["requests"] - f["unexpected"])
    row("unexpected (a fault's victims)", f["unexpected"], "<= 2%")
    row("refused connects, retried (restart gap)", f["refused_waits"])
    print("data")
    row("writes acknowledged (201)", f["acked_writes"])
    row("  lost", f["acked_lost"], "must be 0")
    row("  stored twice", f["stored_twice"], "must be 0")
    row("keys of failed/never-committing requests", f["failed_or_never_stored_keys"])
    row("  stored", f["leaked"], "must be 0")
    row("writes never answered, or 503 (commit unknown)", f["unanswered_writes"])
    row("  of which stored (either is correct)", f["unanswered_writes_stored"])
    row("requests that saw another's objects", f["saw_foreign"], "must be 0")
    row("answers that said they saw another's objects", f["foreign_answers"], "must be 0")
    print("connections")
    _print_connections(f, row)
    row("clients idle: connections open", f["idle_connections"])
    row("clients idle: idle in transaction", f["idle_in_transaction"], "must be 0")
    row("clients idle: checked out", f["idle_checkedout"], "must be 0")
    row("after exit: connections left", f["connections_after_exit"], "must be 0")
    print("greenscope counters, summed over every worker process")
    row("worker processes started / reported", f"{f['workers_started']}/{f['workers_reported']}")
    row("created", f["created"])
    row("removed", f["removed"])
    row("reaped (orphans)", f["reaped"], f"<= {f['orphans_spawned']} orphans spawned")
    row("live at exit", f["live_at_exit"], "must be 0")
    balanced = f["created"] == f["removed"] + f["reaped"] + f["live_at_exit"]
    row("created = removed + reaped + live", "yes" if balanced else "NO")
    row("closes that failed (logged)", f["failed_closes"])
    if f["faults"].get(OUTAGE):
        _print_outage(f, row)
    _print_examples(f)
    if f["log_errors"]:
        print("most frequent errors in the server logs:")
        for line in f["log_errors"]:
            print(f"  {line}")
    print()
    if problems:
        print("SOAK FAILED: " + "; ".join(problems))
    else:
        print("soak passed: nothing lost, leaked, shared or left open.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Soak the demo service on PostgreSQL with faults injected, then audit.",
        epilog=f"DATABASE_URL selects the database (default {DEFAULT_URL}).",
    )
    parser.add_argument("--quick", action="store_true", help="the reduced CI run")
    parser.add_argument("--requests", type=int, help="requests to make (overrides the profile)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the request mix")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the server logs to DIR")
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help=f"through PgBouncer in transaction mode (a pool of {PGBOUNCER_POOL} for the "
        f"workers' {WORKERS} x {POOL_CAP}), with a {PAUSE_SECONDS:g} s database outage "
        "(PAUSE) and PgBouncer's view in the audit; needs Debian's pgbouncer",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="the control run: 2,000 requests under the stock `-k gevent` worker (no "
        "request-end removal); exit 0 only if the audit catches the shared Sessions and "
        "leaked connections, proving it can fail",
    )
    args = parser.parse_args(argv)
    profile = dict(PROFILES["quick" if args.quick or args.control else "full"])
    if args.control:
        profile["requests"] = 2_000
    if args.requests is not None:
        if args.requests < 1000:
            parser.error("--requests must be at least 1000 (every fault needs room)")
        profile["requests"] = args.requests
    url = os.environ.get("DATABASE_URL") or DEFAULT_URL
    if not url.startswith("postgresql"):
        parser.error(f"the soak needs PostgreSQL (pg_terminate_backend); DATABASE_URL={url}")
    try:
        create_engine(url, poolclass=NullPool).connect().close()
    except Exception as exc:
        print(f"soak: cannot connect to {url}: {exc}", file=sys.stderr)
        return 2
    print(
        f"soak: {profile['requests']} requests, {profile['clients']} clients, "
        f"{WORKERS} workers, max_requests {profile['max_requests']}",
        file=sys.stderr,
    )
    if args.pgbouncer and pgbouncer.available() is None:
        parser.error("--pgbouncer needs pgbouncer: apt-get install -y pgbouncer")
    return _run(args, profile, url)


def _run(args: argparse.Namespace, profile: dict[str, int], url: str) -> int:
    with tempfile.TemporaryDirectory(prefix="greenscope-soak-") as workdir:
        worker = "gevent" if args.control else "greenscope.gunicorn.GeventWorker"
        bouncer = None
        if args.pgbouncer:
            bouncer = pgbouncer.PgBouncer(url, workdir, pool_size=PGBOUNCER_POOL).start()
        soak = Soak(url, profile, workdir, args.seed, worker_class=worker, bouncer=bouncer)
        try:
            figures = soak.run(progress=not args.json)
        except KeyboardInterrupt:
            print("\ninterrupted: server stopped, soak table dropped", file=sys.stderr)
            return 130
        finally:
            if bouncer is not None:
                bouncer.stop()
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                for server in soak.servers:
                    shutil.copy(server.log_path, args.keep_logs)
                if bouncer is not None:
                    (Path(args.keep_logs) / "pgbouncer.log").write_text(bouncer.log())
    problems = verdict(figures, profile["requests"])
    if args.json:
        print(json.dumps({**figures, "problems": problems}, indent=2))
    else:
        print_figures(figures, problems, control=args.control)
    if args.control:
        return _control_verdict(figures)
    return 1 if problems else 0


def _control_verdict(f: dict[str, Any]) -> int:
    """Without request-end removal the audit must see what greenscope prevents."""
    caught = {
        "requests that saw another's objects": f["saw_foreign"] > 0,
        "connections checked out while clients idle": f["idle_checkedout"] > 0,
        "Sessions reaped beyond the orphans": f["reaped"] > f["orphans_spawned"],
    }
    missed = [what for what, seen in caught.items() if not seen]
    if missed:
        print(f"CONTROL FAILED: the audit did not catch: {'; '.join(missed)}")
        return 1
    print("control: without request-end removal the audit fails, as it must.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
