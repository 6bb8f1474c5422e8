"""``make soak-fleet``: three gunicorn hosts behind HAProxy, through PgBouncer, under faults.

    python deploy/soak_fleet.py            # 30,000 requests
    python deploy/soak_fleet.py --quick    # 6,000 requests

Needs root (network namespaces), Debian's ``haproxy`` and ``pgbouncer``, and PostgreSQL.

Topology (all on this machine, each "host" in its own network namespace)::

    soak clients --> HAProxy 127.0.0.1:P --+--> host 1 (netns, 10.X.0.11:8000)  gunicorn,
      (keep-alive,      roundrobin,        +--> host 2 (netns, 10.X.0.12:8000)  2 greenscope
       idempotent        health checks,    +--> host 3 (netns, 10.X.0.13:8000)  workers each
       retries)          L7 retries                     |
                                                        v  (over the veth link: PostgreSQL
                                          PgBouncer 10.X.0.1:Q, transaction mode, pool 10
                                                        |     listens on 127.0.0.1 only)
                                                        v
                                                  PostgreSQL 127.0.0.1:5432

The hosts are namespaces joined by a bridge (``ip netns``, veth); PgBouncer listens on the
bridge, since PostgreSQL listens on loopback only. The soak's usual request mix runs
through HAProxy, and on top of the single-host faults (pg_terminate_backend, orphans,
timeouts, hang-ups): host 1 is SIGKILLed (master and workers, no cleanup at all) and
restarted; host 2 is reloaded (SIGHUP). Clients retry a write whose answer they did not
get (no answer, 502, 503, 504) once, with the same key; HAProxy retries requests on
another host when a connection fails or a host hangs up without answering. Duplicates
are prevented by the demo's idempotency keys: a key stored already is answered 201 as a
replay and stores nothing.

The audit: every acknowledged write stored exactly once; nothing from a failed or
never-committing request stored; no answer that saw another request's objects (a header
each response carries, so a killed host's requests count too); PgBouncer's backends
within its pool while the hosts' pools add up to several times more; nothing waiting,
active or idle in transaction while the clients idle, every live worker idle with
nothing checked out; greenscope's counters balance in every worker that reported, and
every worker that was not SIGKILLed reported.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

import loadgen
import pgbouncer
import soak

DEPLOY = Path(__file__).resolve().parent
HOSTS = 3
WORKERS = 2  # per host
APP_PORT = 8000
PGBOUNCER_POOL = 10
CRASHES = 5  # writes whose worker dies after the COMMIT

PROFILES = {
    "full": {"requests": 30_000, "clients": 24, "max_requests": 2_500, "jitter": 500},
    "quick": {"requests": 6_000, "clients": 16, "max_requests": 500, "jitter": 100},
}


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


class Network:
    """A bridge on the machine and one namespace per host, joined by veth pairs."""

    def __init__(self, run_id: str, hosts: int) -> None:
        self.tag = run_id[:4]
        self.subnet = 200 + int(run_id[:2], 16) % 50  # 10.200-249.0.0/24: one per run
        self.bridge = f"gsb{self.tag}"
        self.gateway = f"10.{self.subnet}.0.1"
        self.namespaces = [f"gs{self.tag}h{i}" for i in range(1, hosts + 1)]
        self.addresses = [f"10.{self.subnet}.0.{10 + i}" for i in range(1, hosts + 1)]

    def up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.namespaces, self.addresses, strict=True), 1):
            outside, inside = f"gs{self.tag}v{i}o", f"gs{self.tag}v{i}i"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", self.gateway)

    def down(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)


class HAProxy:
    """HAProxy on loopback in front of the hosts, with a stats socket for the audit."""

    def __init__(self, workdir: str, addresses: list[str]) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(binary):
            raise RuntimeError("haproxy is not installed: apt-get install -y haproxy")
        self.port = loadgen.free_port()
        self.dir = Path(workdir) / "haproxy"
        self.dir.mkdir()
        self.socket = self.dir / "stats.sock"
        servers = "\n".join(
            f"  server h{i} {addr}:{APP_PORT} check" for i, addr in enumerate(addresses, 1)
        )
        # retry-on: a connection that failed, or a host that hung up without answering
        # (SIGKILL mid-request), is retried on another host (redispatch). For a POST that
        # may run it twice: the demo's idempotency keys make that safe.
        config = f"""
global
  maxconn 4000
  stats socket {self.socket} mode 600 level admin

defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 30s
  timeout http-keep-alive 30s
  option http-keep-alive
  retries 2
  option redispatch 1
  retry-on conn-failure empty-response

frontend soak
  bind 127.0.0.1:{self.port}
  default_backend hosts

backend hosts
  balance roundrobin
  option httpchk GET /health
  http-check expect status 200
  default-server inter 300ms fall 2 rise 2
{servers}
"""
        path = self.dir / "haproxy.cfg"
        path.write_text(config)
        check = subprocess.run([binary, "-c", "-f", str(path)], check=False, capture_output=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its config:\n{check.stderr.decode()}")
        self.log_path = self.dir / "haproxy.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(path)], stdout=self._log, stderr=self._log
        )

    def stats(self) -> list[dict[str, str]]:
        """``show stat``: a row per frontend, backend and server."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        text_ = data.decode().lstrip("# ")
        return list(csv.DictReader(io.StringIO(text_)))

    def backend(self) -> dict[str, str]:
        for row in self.stats():
            if row.get("pxname") == "hosts" and row.get("svname") == "BACKEND":
                return row
        return {}

    def wait_up(self, count: int, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                up = [
                    r
                    for r in self.stats()
                    if r.get("pxname") == "hosts" and r.get("status", "").startswith("UP")
                ]
                if len(up) >= count:
                    return
            time.sleep(0.1)
        raise RuntimeError("HAProxy did not see the hosts up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Fleet(soak.Soak):
    """The single-host soak's clients, faults and audit, over three hosts and HAProxy."""

    def __init__(self, url: str, profile: dict[str, int], workdir: str, seed: int) -> None:
        self.network = Network(os.urandom(4).hex(), HOSTS)
        self.network.up()
        bouncer = pgbouncer.PgBouncer(
            url,
            workdir,
            pool_size=PGBOUNCER_POOL,
            listen=(self.network.gateway, "127.0.0.1"),
        ).start()
        super().__init__(url, profile, workdir, seed, bouncer=bouncer)
        self.haproxy = HAProxy(workdir, self.network.addresses)
        self.port = self.haproxy.port
        self.tally.unknown_statuses = frozenset({"502", "503", "504"})
        # Boots that are not max_requests recycles: the first workers of the hosts that
        # are not killed, the killed host's restart, host 2's reload.
        self.expected_boots = (HOSTS + 1) * WORKERS
        self.client_pool_slots = HOSTS * WORKERS * soak.POOL_CAP
        self.tally.retry_writes = True
        self.hosts: list[loadgen.Server | None] = [None] * HOSTS
        self.incarnations = [0] * HOSTS
        self.killed_dirs: set[Path] = set()
        self.workers_killed = 0
        self.lb_backend: dict[str, str] = {}

    def host_dir(self, i: int) -> Path:
        path = self.reports / f"host{i + 1}-{self.incarnations[i]}"
        path.mkdir(exist_ok=True)
        return path

    def start_host(self, i: int) -> loadgen.Server:
        ns, addr = self.network.namespaces[i], self.network.addresses[i]
        env = {**self.env, "GREENSCOPE_SOAK_DIR": str(self.host_dir(i))}
        env["GREENSCOPE_DEMO_CRASH_DIR"] = str(self.host_dir(i))
        env["GREENSCOPE_DEMO_APP_NAME"] = f"{self.app_prefix}-h{i + 1}-{{pid}}"
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "gunicorn"]
        argv += ["-c", str(DEPLOY / "gunicorn.soak.conf.py"), "--chdir", str(DEPLOY)]
        argv += ["-b", f"{addr}:{APP_PORT}", "-k", "greenscope.gunicorn.GeventWorker"]
        argv += ["-w", str(WORKERS), "--worker-connections", str(soak.POOL_CAP)]
        # keepalive < graceful_timeout: an idle keep-alive connection (HAProxy keeps its
        # own to every host) must not hold a worker through a reload until the master
        # SIGKILLs it (deploy/README.md, "Scaling out").
        argv += ["--keep-alive", "5", "--graceful-timeout", "20", "--timeout", "60"]
        argv += ["--max-requests", str(self.profile["max_requests"])]
        argv += ["--max-requests-jitter", str(self.profile["jitter"]), "demo_app:app"]
        server = loadgen.Server(
            argv,
            APP_PORT,
            env,
            self.workdir,
            log_name=f"host{i + 1}-{len(self.servers)}",
            host=addr,
        )
        self.servers.append(server)
        self.hosts[i] = server
        return server

    def start(self) -> loadgen.Server:  # the base class's restart fault: restart host 3
        return self.start_host(HOSTS - 1)

    def worker_pids(self) -> list[int]:
        pids = []
        for server in self.hosts:
            if server is None or server.proc.poll() is not None:
                continue
            master = server.proc.pid
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{master}/task/{master}/children").read_text()
                pids += [int(p) for p in children.split()]
        return pids

    def chaos(self, stop: threading.Event) -> None:
        budget = self.tally.budget
        kills_at = [budget * i // 24 for i in range(1, 24)]
        sigkill_at, hup_at = budget * 4 // 10, budget * 6 // 10
        crashes_at = [budget * i // (CRASHES + 1) for i in range(1, CRASHES + 1)]
        while not stop.is_set():
            done = self.tally.done()
            self._sample_connections()
            if crashes_at and done >= crashes_at[0]:
                crashes_at.pop(0)
                self._crash_after_commit(len(crashes_at))
            if kills_at and done >= kills_at[0]:
                for _ in range(20):
                    if self._terminate_one_backend():
                        self.tally.faults["pg_terminate_backend"] += 1
                        break
                    time.sleep(0.02)
                kills_at.pop(0)
            if sigkill_at and done >= sigkill_at:
                sigkill_at = 0
                self._kill_and_restart(0)
            if hup_at and done >= hup_at:
                hup_at = 0
                host = self.hosts[1]
                assert host is not None
                host.proc.send_signal(signal.SIGHUP)
                self.tally.faults["host 2: SIGHUP reload"] += 1
            stop.wait(0.1)

    def _crash_after_commit(self, n: int) -> None:
        """A write whose worker dies right after its COMMIT, before answering: HAProxy
        sees the host hang up and sends the request to another host (retry-on
        empty-response), where the idempotency key makes it a replay, not a duplicate."""
        key = f"{self.run_id}-crash-{n}"
        t = self.tally
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("POST", f"/write?key={key}&crash=after_commit")
            resp = conn.getresponse()
            status, body = str(resp.status), resp.read()
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            status, body = f"dropped({type(exc).__name__})", b""
        with t.lock:
            t.faults["worker crash after COMMIT (HAProxy retries)"] += 1
            t.crash_outcomes[status] += 1
            if status == "201":
                t.acked.add(key)
                t.crash_replays += b'"replayed": true' in body
            else:
                t.unknown_writes.add(key)
                t.unexpected.append(f"crash after commit {key}: {status}")

    def _kill_and_restart(self, i: int) -> None:
        """SIGKILL a whole host (no finally, no worker_exit, no hook), then restart it."""
        host = self.hosts[i]
        assert host is not None
        self.workers_killed += len(self._children(host))
        self.killed_dirs.add(self.host_dir(i))
        host.kill()
        self.tally.faults["host 1: SIGKILL and restart"] += 1
        time.sleep(1.0)  # clients meanwhile: HAProxy marks it down and sends them elsewhere
        self.incarnations[i] += 1
        self.start_host(i)

    @staticmethod
    def _children(server: loadgen.Server) -> list[int]:
        master = server.proc.pid
        try:
            return [
                int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()
            ]
        except OSError:
            return []

    def _run(self, progress: bool) -> dict[str, Any]:
        for i in range(HOSTS):
            self.start_host(i)
        self.haproxy.wait_up(HOSTS)
        return super()._run_load(progress)

    def idle_audit(self) -> dict[str, Any]:
        """Every live worker of every host settles; PgBouncer has nothing in flight."""
        end = time.monotonic() + 20
        seen: dict[int, dict[str, Any]] = {}
        while time.monotonic() < end:
            for server in self.hosts:
                if server is None:
                    continue
                with contextlib.suppress(OSError, ValueError, json.JSONDecodeError):
                    s = loadgen.get_stats(server.port, server.host)
                    seen[s["pid"]] = s
            pids = set(self.worker_pids())
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
        base = self._pgbouncer_idle()
        pids = set(self.worker_pids())
        return {
            **base,
            "workers_seen": sorted(p for p in seen if p in pids),
            "workers": sorted(pids),
            "checkedout": sum(seen[p]["checkedout"] for p in pids if p in seen),
            "live": sum(seen[p]["greenscope"]["live"] for p in pids if p in seen),
        }

    def _pgbouncer_idle(self) -> dict[str, Any]:
        [(idle_in_tx, total)] = self._backends(
            "SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%'), "
            "count(*) FROM pg_stat_activity WHERE {mine}"
        )
        assert self.bouncer is not None
        pool = self.bouncer.pool()
        servers = self.bouncer.show("SERVERS")
        return {
            "pgbouncer_cl_waiting": pool.get("cl_waiting", 0),
            "pgbouncer_servers_active": sum(r["state"] == "active" for r in servers),
            "idle_in_tx": idle_in_tx,
            "connections": total,
        }

    def after_exit_audit(self) -> dict[str, Any]:
        audit = super().after_exit_audit_of(
            [d for d in self.reports.iterdir() if d.is_dir() and d not in self.killed_dirs]
        )
        audit["workers_killed"] = self.workers_killed
        return audit

    def stop_all(self) -> int:
        """Drain, then stop: the balancer first (a deploy deregisters a host before it
        stops it), so that no idle keep-alive connection of HAProxy's holds a worker
        until graceful_timeout, when the master SIGKILLs it and worker_exit never runs."""
        self.lb_backend = self.haproxy.backend()
        self.haproxy.stop()
        code = 0
        for server in self.hosts:
            if server is not None:
                code = max(code, server.stop(signal.SIGTERM))
        return code

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.haproxy.stop()
        if self.bouncer is not None:
            self.bouncer.stop()
        self.network.down()


def _print_fleet(f: dict[str, Any]) -> None:
    def row(label: str, value: Any) -> None:
        print(f"  {label:<46} {value!s:>10}")

    print("fleet")
    row("hosts x workers per host", f"{HOSTS} x {WORKERS}")
    row("workers SIGKILLed (no report expected)", f["workers_killed"])
    row("HAProxy retries / redispatches", f"{f['lb_retries']} / {f['lb_redispatches']}")
    row("client retries with the same key", f["client_retries"])
    row("writes answered as replays (no duplicate)", f["replayed"])
    row(f"  of the {CRASHES} whose worker died after COMMIT", f["crash_replays"])
    row("answers to those", f["crash_outcomes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Soak three gunicorn hosts behind HAProxy, through PgBouncer, with faults.",
        epilog=f"DATABASE_URL selects the database (default {soak.DEFAULT_URL}). Needs root.",
    )
    parser.add_argument("--quick", action="store_true", help="the reduced run")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the request mix")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy every log to DIR")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the fleet soak needs root: it makes network namespaces")
    for tool in ("haproxy", "pgbouncer"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            parser.error(f"{tool} is not installed: apt-get install -y {tool}")
    profile = dict(PROFILES["quick" if args.quick else "full"])
    url = os.environ.get("DATABASE_URL") or soak.DEFAULT_URL
    try:
        create_engine(url, poolclass=NullPool).connect().close()
    except Exception as exc:
        print(f"soak-fleet: cannot connect to {url}: {exc}", file=sys.stderr)
        return 2
    print(
        f"soak-fleet: {profile['requests']} requests, {profile['clients']} clients, "
        f"{HOSTS} hosts x {WORKERS} workers, HAProxy, PgBouncer pool {PGBOUNCER_POOL}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="greenscope-fleet-") as workdir:
        fleet = Fleet(url, profile, workdir, args.seed)
        try:
            figures = fleet.run(progress=not args.json)
            backend = fleet.lb_backend
        finally:
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                for server in fleet.servers:
                    shutil.copy(server.log_path, args.keep_logs)
                shutil.copy(fleet.haproxy.log_path, args.keep_logs)
            fleet.close()
    figures["hosts"] = HOSTS
    figures["lb_retries"] = int(backend.get("wretr") or 0)
    figures["lb_redispatches"] = int(backend.get("wredis") or 0)
    figures["workers_killed"] = fleet.workers_killed
    figures["crash_replays"] = fleet.tally.crash_replays
    figures["crash_outcomes"] = dict(fleet.tally.crash_outcomes)
    problems = soak.verdict(figures, profile["requests"])
    if args.json:
        print(json.dumps({**figures, "problems": problems}, indent=2))
    else:
        soak.print_figures(figures, problems)
        _print_fleet(figures)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
