"""greenscope's metrics scraped from a real multi-worker gunicorn: they add up across workers.

Two greenscope workers serve the demo; keep-alive clients spread requests over both. The
Prometheus metrics (multiprocess mode, set up by the config's hooks) must then equal the
sum of what each worker's own ``/stats`` says, pool gauges must add up across the live
workers, and a worker that is replaced must keep its counts and drop its gauges. With
``--statsd-host`` the same counts arrive over UDP through gunicorn's own logger.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
sys.path.insert(0, str(DEPLOY))
import loadgen  # noqa: E402 - lives in deploy/, shared with `make demo`

pytestmark = pytest.mark.timeout(120)

WORKERS = 2
POOL_SIZE = 3
INTERVAL = 0.2  # seconds between two publishes of a worker

CONFIG = """
from greenscope.metrics import prometheus

prometheus.setup_multiprocess()  # before anything imports prometheus_client
on_starting = prometheus.on_starting
child_exit = prometheus.child_exit
"""


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}",
        "GREENSCOPE_DEMO_TABLE": "demo_items",
        "GREENSCOPE_DEMO_POOL_SIZE": str(POOL_SIZE),
        "GREENSCOPE_DEMO_MAX_OVERFLOW": "2",
        "GREENSCOPE_METRICS_INTERVAL": str(INTERVAL),
        "PYTHONPATH": str(DEPLOY),
        **extra,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def start(tmp_path: Path, env: dict[str, str], *flags: str) -> loadgen.Server:
    loadgen.create_demo_schema(env)
    port = loadgen.free_port()
    argv = [sys.executable, "-m", "gunicorn", "--chdir", str(DEPLOY), "-w", str(WORKERS)]
    argv += ["-k", "greenscope.gunicorn.GeventWorker", "-b", f"127.0.0.1:{port}", *flags]
    argv += ["--graceful-timeout", "10", "demo_app:app"]
    return loadgen.Server(argv, port, env, str(tmp_path))


def load(port: int, requests: int, clients: int = 6) -> None:
    """``requests`` GET /sql over keep-alive connections (one Session each)."""
    errors: list[str] = []

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(n):
            conn.request("GET", "/sql")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(str(resp.status))
        conn.close()

    threads = [
        threading.Thread(target=client, args=(requests // clients,)) for _ in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def worker_pids(server: loadgen.Server) -> set[int]:
    master = server.proc.pid
    return {int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()}


def per_worker_stats(server: loadgen.Server, deadline: float = 20) -> dict[int, dict[str, Any]]:
    """The latest /stats of every live worker (new connections land on each in turn)."""
    seen: dict[int, dict[str, Any]] = {}
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        s = loadgen.get_stats(server.port)
        seen[s["pid"]] = s
        pids = worker_pids(server)
        if pids <= seen.keys():
            return {p: seen[p] for p in pids}
    raise AssertionError(f"not every worker answered /stats: saw {sorted(seen)}")


def scrape(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 200, body
    samples: dict[str, float] = {}
    for line in body.splitlines():
        m = re.match(r"^(greenscope_[^\s]+) ([0-9.e+-]+)$", line)
        if m:
            samples[m.group(1)] = float(m.group(2))
    return samples


def settle(predicate: Any, what: str, deadline: float = 20) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, what
        time.sleep(INTERVAL / 2)


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[loadgen.Server]:
    config = tmp_path / "gunicorn.metrics.conf.py"
    config.write_text(CONFIG)
    server = start(tmp_path, demo_env(tmp_path), "-c", str(config))
    yield server
    server.stop()


def test_prometheus_metrics_add_up_across_workers_and_match_greenscope(
    prometheus_server: loadgen.Server,
) -> None:
    """A scrape's counters equal the sum of every worker's own counters."""
    server = prometheus_server
    made = 0
    for _ in range(20):  # the kernel may hand every connection to one worker for a while
        load(server.port, requests=60)
        made += 60
        stats = per_worker_stats(server)
        if all(s["greenscope"]["created"] > 0 for s in stats.values()):
            break
    assert len(stats) == WORKERS
    assert all(s["greenscope"]["created"] > 0 for s in stats.values()), "a worker served none"
    created = sum(s["greenscope"]["created"] for s in stats.values())
    removed = sum(s["greenscope"]["removed"] for s in stats.values())
    assert created == made
    demo = '{engine="demo"}'

    def published() -> bool:  # every worker's publisher has run since the load ended
        m = scrape(server.port)
        return bool(m.get("greenscope_sessions_created_total") == created)

    settle(published, "the scraped counters never reached the workers' own")
    m = scrape(server.port)
    assert m["greenscope_sessions_removed_total"] == removed == made
    assert m["greenscope_sessions_reaped_total"] == 0
    assert m["greenscope_sessions_live"] == 0
    assert m[f"greenscope_pool_size{demo}"] == WORKERS * POOL_SIZE, "gauges add up over workers"
    assert m[f"greenscope_pool_checked_out{demo}"] == 0
    checkouts = m[f"greenscope_pool_checkouts_total{demo}"]
    assert checkouts >= made
    assert m[f"greenscope_pool_connection_hold_seconds_count{demo}"] == checkouts
    assert m[f"greenscope_pool_checkout_wait_seconds_count{demo}"] == checkouts
    assert m[f"greenscope_pool_checkout_timeouts_total{demo}"] == 0
    dashboard = (DEPLOY / "grafana-dashboard.json").read_text()
    for name in set(re.findall(r"greenscope_[a-z_]+", dashboard)):
        assert any(sample.startswith(name) for sample in m), f"the dashboard reads {name}"

    # A worker replaced: its counts stay in the counters, its gauges leave the sums.
    victim = min(stats)
    os.kill(victim, signal.SIGTERM)
    settle(
        lambda: victim not in worker_pids(server) and len(worker_pids(server)) == WORKERS,
        "gunicorn did not replace the worker",
    )
    per_worker_stats(server)  # the new worker answers (and publishes its gauges)
    settle(
        lambda: scrape(server.port).get(f"greenscope_pool_size{demo}") == WORKERS * POOL_SIZE,
        "the dead worker's gauges stayed in the sums",
    )
    m = scrape(server.port)
    assert m["greenscope_sessions_created_total"] == created, "a dead worker's counts were lost"
    load(server.port, requests=60)
    settle(
        lambda: scrape(server.port).get("greenscope_sessions_created_total") == created + 60,
        "the new worker's counts do not add up",
    )


def test_statsd_metrics_arrive_through_gunicorns_own_logger(tmp_path: Path) -> None:
    """With --statsd-host, every worker's counts reach StatsD, and add up."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    packets: list[str] = []
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = udp.recv(65536)
            except TimeoutError:
                continue
            packets.extend(data.decode().splitlines())

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    host = f"127.0.0.1:{udp.getsockname()[1]}"
    server = start(tmp_path, demo_env(tmp_path), "--statsd-host", host, "--statsd-prefix", "app")
    try:
        load(server.port, requests=120)
        stats = per_worker_stats(server)
        created = sum(s["greenscope"]["created"] for s in stats.values())

        def counted(name: str) -> float:
            total = 0.0
            for line in list(packets):
                m = re.match(rf"^app\.{re.escape(name)}:([0-9.]+)\|c", line)
                if m:
                    total += float(m.group(1))
            return total

        settle(
            lambda: counted("greenscope.sessions.created") == created,
            "StatsD did not get every worker's created Sessions",
        )
        assert counted("greenscope.sessions.removed") == created == 120
        assert counted("greenscope.pool.demo.checkouts") >= 120
        assert any(line.startswith("app.greenscope.pool.demo.hold:") for line in packets)
        assert any(line.startswith("app.greenscope.sessions.live:") for line in packets)
    finally:
        server.stop()
        stop.set()
        receiver.join(5)
        udp.close()


def test_metrics_are_off_with_greenscope_metrics_0(tmp_path: Path) -> None:
    """GREENSCOPE_METRICS=0: nothing is published, even with --statsd-host."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(2 * INTERVAL)
    host = f"127.0.0.1:{udp.getsockname()[1]}"
    env = demo_env(tmp_path, GREENSCOPE_METRICS="0")
    server = start(tmp_path, env, "--statsd-host", host, "--statsd-prefix", f"x{uuid.uuid4().hex}")
    try:
        load(server.port, requests=12)
        received: list[str] = []
        deadline = time.monotonic() + 5 * INTERVAL
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                received.extend(udp.recv(65536).decode().splitlines())
    finally:
        server.stop()
        udp.close()
    assert received, "gunicorn's own statsd metrics should still arrive"
    assert not [line for line in received if ".greenscope." in line]
