"""greenscope.metrics: pool and registry figures, safe to collect from the hub, exported."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import gevent
import prometheus_client
import pytest
import sqlalchemy.exc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

import greenscope
from greenscope import metrics
from greenscope.metrics import _core, prometheus, statsd

from conftest import CountingEngine, errors_in_hub


@pytest.fixture(autouse=True)
def _no_publisher() -> Iterator[None]:
    yield
    metrics.stop(final=False)


@pytest.fixture
def engine(tmp_path: Any) -> Iterator[Engine]:
    """A fresh engine, labelled "test" (engines of earlier tests are relabelled)."""
    for old in list(_core._instrumented.values()):
        if old.name == "test":
            old.name = "earlier-test"
    e = create_engine(f"sqlite:///{tmp_path / 'm.db'}", poolclass=QueuePool, pool_size=2)
    metrics.instrument(e, name="test")
    yield e
    e.dispose()


def engine_snapshot(name: str = "test") -> metrics.EngineSnapshot:
    [found] = [e for e in metrics.snapshot().engines if e.name == name]
    return found


def test_engines_that_share_a_label_are_added_up(tmp_path: Any) -> None:
    """Two engines on one label are one time series: their figures are summed."""
    engines = [
        create_engine(f"sqlite:///{tmp_path / f'{i}.db'}", poolclass=QueuePool, pool_size=3)
        for i in range(2)
    ]
    for e in engines:
        metrics.instrument(e, name="shared")
    conns = [e.connect() for e in engines]
    snap = engine_snapshot("shared")
    assert (snap.size, snap.checked_out, snap.checkouts) == (6, 2, 2)
    for c in conns:
        c.close()
    assert engine_snapshot("shared").hold.count == 2
    for e in engines:
        e.dispose()


def test_checkouts_and_hold_times_are_counted(engine: Engine) -> None:
    """Each checkout is counted once, with its wait and its hold time, and checked in."""
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            assert engine_snapshot().checked_out == 1
    snap = engine_snapshot()
    assert (snap.checkouts, snap.checked_out, snap.size, snap.waiting) == (3, 0, 2, 0)
    assert snap.checkout_wait.count == 3
    assert snap.hold.count == 3
    assert sum(snap.hold.buckets) == 3
    assert snap.hold.sum > 0


def test_a_checkout_that_times_out_is_counted_with_its_wait(tmp_path: Any) -> None:
    """Pool exhaustion shows: the timed-out checkout, its wait, and who waited."""
    e = create_engine(
        f"sqlite:///{tmp_path / 'x.db'}",
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.2,
    )
    metrics.instrument(e, name="small")  # one test uses it
    held = e.connect()
    waiting: list[int] = []
    failed: list[BaseException] = []
    entered = threading.Event()

    def checkout() -> None:  # a native thread: QueuePool's wait is a real one here
        entered.set()
        try:
            e.connect()
        except sqlalchemy.exc.TimeoutError as exc:
            failed.append(exc)

    t = threading.Thread(target=checkout)
    t.start()
    entered.wait(5)
    for _ in range(100):  # until the thread is inside the checkout (bounded)
        waiting.append(engine_snapshot("small").waiting)
        if waiting[-1]:
            break
        t.join(0.01)
    t.join(5)
    held.close()
    snap = engine_snapshot("small")
    assert 1 in waiting, "a checkout waiting for a connection was not seen"
    assert failed, "the pool did not time out"
    assert (snap.checkout_timeouts, snap.waiting, snap.checkouts) == (1, 0, 1)
    assert snap.checkout_wait.count == 2
    assert snap.checkout_wait.sum >= 0.2
    e.dispose()


def test_invalidations_are_counted(engine: Engine) -> None:
    """An invalidated connection is counted, and still checked in."""
    with engine.connect() as conn:
        conn.invalidate()
    snap = engine_snapshot()
    assert (snap.invalidations, snap.checked_out, snap.hold.count) == (1, 0, 1)


def test_a_disposed_engines_new_pool_is_still_measured(engine: Engine) -> None:
    """dispose() makes a new pool (fork safety does it in every worker): it is timed too."""
    engine.dispose()
    with engine.connect():
        pass
    snap = engine_snapshot()
    assert (snap.checkouts, snap.checkout_wait.count) == (1, 1)


def test_engines_greenscope_knows_are_measured_without_asking(tmp_path: Any) -> None:
    """An engine behind a greenscope registry appears in the snapshot by itself."""
    e = create_engine(f"sqlite:///{tmp_path / 'k.db'}")
    Session_ = greenscope.scoped_session(sessionmaker(e))
    names = {s.name for s in metrics.snapshot().engines}
    assert f"sqlite:/{tmp_path / 'k.db'}" in names
    Session_.execute(text("SELECT 1"))
    Session_.remove()
    [snap] = [s for s in metrics.snapshot().engines if s.name.endswith("k.db")]
    assert snap.checkouts == 1
    e.dispose()


def test_checkins_inside_the_hub_are_counted_without_error(sqlite_db: CountingEngine) -> None:
    """A leaked Session freed by a GC pass in the hub: the listeners only count."""
    metrics.instrument(sqlite_db.engine, name="hub")

    def leak() -> None:
        session = Session(sqlite_db.engine)
        session.execute(text("SELECT 1"))
        session.info["cycle"] = session  # freed by the cyclic GC only

    gevent.spawn(leak).join()
    gc.disable()
    try:
        errors = errors_in_hub(gc.collect)
    finally:
        gc.enable()
    gevent.sleep(0)
    assert greenscope.wait_reaped(5)
    assert not errors
    snap = engine_snapshot("hub")
    assert (snap.checkouts, snap.hold.count, snap.checked_out) == (1, 1, 0)


def test_instrument_refuses_what_is_not_an_engine(engine: Engine) -> None:
    """Errors name the call and the fix."""
    with pytest.raises(TypeError, match=r"metrics.instrument\(engine\) takes an Engine"):
        metrics.instrument(42)
    with pytest.raises(ValueError, match=r"name=...\) takes a non-empty str"):
        metrics.instrument(engine, name="")
    with pytest.raises(ValueError, match=r"interval=...\) takes seconds > 0"):
        metrics.start(prometheus.PrometheusSink(prometheus_client.CollectorRegistry()), interval=0)


def test_the_interval_from_the_environment_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    """GREENSCOPE_METRICS_INTERVAL must be seconds > 0."""
    monkeypatch.setenv("GREENSCOPE_METRICS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="GREENSCOPE_METRICS_INTERVAL must be a number"):
        _core.interval_from_env()
    monkeypatch.setenv("GREENSCOPE_METRICS_INTERVAL", "0.5")
    assert _core.interval_from_env() == 0.5


def value(registry: Any, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    assert got is not None, f"no sample {name}{labels}"
    return float(got)


def test_prometheus_sink_publishes_counters_gauges_and_histograms(engine: Engine) -> None:
    """Counters follow greenscope.stats(); histograms hold every checkout once."""
    registry = prometheus_client.CollectorRegistry()
    sink = prometheus.PrometheusSink(registry)
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    before = greenscope.stats()
    Session_.execute(text("SELECT 1"))
    sink.publish(_core.collect())
    assert value(registry, "greenscope_sessions_live") == greenscope.stats().live
    assert value(registry, "greenscope_pool_checked_out", engine="test") == 1
    Session_.remove()
    sink.publish(_core.collect())
    after = greenscope.stats()
    assert value(registry, "greenscope_sessions_created_total") == after.created
    assert value(registry, "greenscope_sessions_removed_total") == after.removed
    assert after.created - before.created == 1
    assert value(registry, "greenscope_pool_checked_out", engine="test") == 0
    assert value(registry, "greenscope_pool_size", engine="test") == 2
    assert value(registry, "greenscope_pool_checkouts_total", engine="test") == 1
    assert value(registry, "greenscope_pool_connection_hold_seconds_count", engine="test") == 1
    assert value(registry, "greenscope_pool_checkout_wait_seconds_count", engine="test") == 1
    sink.publish(_core.collect())  # nothing new: nothing counted twice
    assert value(registry, "greenscope_pool_connection_hold_seconds_count", engine="test") == 1


def test_counters_never_go_down_when_a_registry_goes_away(engine: Engine) -> None:
    """A registry that is garbage collected leaves the totals; the counter stays put."""
    registry = prometheus_client.CollectorRegistry()
    sink = prometheus.PrometheusSink(registry)
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    Session_.execute(text("SELECT 1"))
    Session_.remove()
    sink.publish(_core.collect())
    high = value(registry, "greenscope_sessions_created_total")
    del Session_
    gc.collect()
    sink.publish(_core.collect())
    assert value(registry, "greenscope_sessions_created_total") == high


class FakeStatsd:
    """What gunicorn's Statsd logger offers, recording what it is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, float]] = []

    def gauge(self, name: str, value: float) -> None:
        self.sent.append(("g", name, value))

    def increment(self, name: str, value: float, sampling_rate: float = 1.0) -> None:
        self.sent.append(("c", name, value))

    def timer(self, name: str, value: float) -> None:
        self.sent.append(("ms", name, value))


def test_statsd_sink_sends_increments_gauges_and_timers(engine: Engine) -> None:
    """Counters go as increments (summed by StatsD), pool state as gauges, times in ms."""
    client = FakeStatsd()
    sink = statsd.StatsdSink(client)
    Session_ = greenscope.scoped_session(sessionmaker(engine))
    sink.publish(_core.collect())
    client.sent.clear()
    Session_.execute(text("SELECT 1"))
    Session_.remove()
    sink.publish(_core.collect())
    sent = {(kind, name): v for kind, name, v in client.sent}
    assert sent[("c", "greenscope.sessions.created")] == 1
    assert sent[("c", "greenscope.sessions.removed")] == 1
    assert sent[("g", "greenscope.pool.test.checked_out")] == 0
    assert sent[("c", "greenscope.pool.test.checkouts")] == 1
    assert ("ms", "greenscope.pool.test.hold") in sent
    assert ("ms", "greenscope.pool.test.checkout_wait") in sent


def test_statsd_sink_refuses_a_client_without_the_methods() -> None:
    """A wrong client is refused with what is needed."""
    with pytest.raises(TypeError, match=r"gauge\(\) and increment\(\)"):
        statsd.StatsdSink(object())


def test_the_publisher_publishes_on_its_own_and_once_more_at_stop(engine: Engine) -> None:
    """start() publishes every interval; stop(final=True) publishes the last counts."""
    client = FakeStatsd()
    published = threading.Event()
    real_publish = statsd.StatsdSink.publish

    class Sink(statsd.StatsdSink):
        def publish(self, collected: _core.Collected) -> None:
            real_publish(self, collected)
            published.set()

    metrics.start(Sink(client), interval=0.05)
    assert published.wait(5), "the publisher did not run"
    client.sent.clear()
    with engine.connect():
        pass
    metrics.stop(final=True)
    assert ("c", "greenscope.pool.test.checkouts") in {(k, n) for k, n, _ in client.sent}


def test_metrics_middleware_serves_metrics_and_passes_the_rest_on() -> None:
    """GET /metrics answers in Prometheus's text format; other paths reach the app."""
    calls: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(environ["PATH_INFO"])
        start_response("204 No Content", [])
        return []

    wrapped = prometheus.MetricsMiddleware(app)
    statuses: list[str] = []
    body = b"".join(wrapped({"PATH_INFO": "/metrics"}, lambda s, h: statuses.append(s)))
    wrapped({"PATH_INFO": "/other"}, lambda s, h: statuses.append(s))
    assert statuses == ["200 OK", "204 No Content"]
    assert calls == ["/other"]
    assert b"# TYPE" in body
    with pytest.raises(ValueError, match="takes a path like '/metrics'"):
        prometheus.MetricsMiddleware(app, path="metrics")
    with pytest.raises(TypeError, match="takes a WSGI app"):
        prometheus.MetricsMiddleware(42)  # type: ignore[arg-type]


def test_setup_multiprocess_refuses_a_prometheus_client_already_in_single_process_mode(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imported too early, prometheus_client would show one worker per scrape: refused."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(RuntimeError, match="imported before PROMETHEUS_MULTIPROC_DIR was set"):
        prometheus.setup_multiprocess(str(tmp_path))
