"""Orphaned Sessions of gevent greenlets: rolled back, connection returned, closed safely."""

from __future__ import annotations

import logging
import threading
from typing import Any

import gevent
import gevent.pool
import gevent.threadpool
import pytest
from gevent.event import Event
from greenlet import getcurrent
from greenlet import greenlet as RawGreenlet
from sqlalchemy import orm, text
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope import _cleanup

from conftest import CountingEngine, errors_in_hub


class RecordingSession(orm.Session):
    """A Session that records where its close() ran."""

    closes: list[dict[str, Any]] = []  # noqa: RUF012 - reset per test by the fixture

    def close(self) -> None:
        RecordingSession.closes.append(
            {"in_hub": _cleanup.in_hub(), "thread": _cleanup.get_ident(), "greenlet": getcurrent()}
        )
        super().close()


@pytest.fixture
def db(sqlite_db: CountingEngine) -> CountingEngine:
    RecordingSession.closes = []
    return sqlite_db


def scoped(db: CountingEngine) -> greenscope.scoped_session[orm.Session]:
    return greenscope.scoped_session(sessionmaker(db.engine, class_=RecordingSession))


def insert(Session: greenscope.scoped_session[orm.Session], owner: str) -> None:
    Session.execute(text("INSERT INTO items (owner) VALUES (:o)"), {"o": owner})


def test_finished_greenlet_still_referenced_is_cleaned_at_completion(db: CountingEngine) -> None:
    """A kept spawn() handle does not keep its finished greenlet's transaction open."""
    Session = scoped(db)
    g = gevent.spawn(insert, Session, "kept")
    g.join()
    assert greenscope.wait_reaped(10)
    assert db.checkedout() == 0
    assert db.count_rows() == 0, "an orphan's transaction is rolled back, never committed"
    assert g.dead  # still referenced here, yet cleaned
    assert Session.registry.stats().reaped == 1  # type: ignore[attr-defined]


def test_greenlet_that_raised_is_cleaned(db: CountingEngine) -> None:
    """A greenlet that raised mid-transaction gives its connection back, nothing committed."""
    Session = scoped(db)

    def fail() -> None:
        insert(Session, "raised")
        raise ValueError("boom")

    g = gevent.spawn(fail)
    g.join()
    assert isinstance(g.exception, ValueError)
    assert greenscope.wait_reaped(10)
    assert db.checkedout() == 0
    assert db.count_rows() == 0


def test_greenlet_killed_mid_transaction_is_cleaned(db: CountingEngine) -> None:
    """A greenlet killed while its transaction is open gives its connection back."""
    Session = scoped(db)
    inside, never = Event(), Event()

    def work() -> None:
        insert(Session, "killed")
        inside.set()
        never.wait()

    g = gevent.spawn(work)
    inside.wait(5)
    assert db.checkedout() == 1
    g.kill(block=True, timeout=5)
    assert greenscope.wait_reaped(10)
    assert db.checkedout() == 0
    assert db.count_rows() == 0


def test_unreferenced_pool_greenlets_are_cleaned(db: CountingEngine) -> None:
    """Greenlets of a gevent Pool, freed in the hub as they finish, are all cleaned."""
    Session = scoped(db)
    pool = gevent.pool.Pool(5)
    for i in range(20):
        pool.spawn(lambda i=i: Session.execute(text("SELECT :i"), {"i": i}))
    pool.join(timeout=10)
    assert greenscope.wait_reaped(10)
    assert db.checkedout() == 0
    assert db.invalidated == 0
    assert Session.registry.stats() == greenscope.RegistryStats(created=20, reaped=20)  # type: ignore[attr-defined]


def test_close_never_runs_in_the_hub(db: CountingEngine) -> None:
    """Orphans are closed in an ordinary greenlet of the owner's thread, not in the hub."""
    Session = scoped(db)
    gevent.spawn(insert, Session, "a").join()
    assert greenscope.wait_reaped(10)
    g = RawGreenlet(lambda: insert(Session, "b"))  # a raw greenlet in a thread with a hub
    g.switch()
    del g  # freed here: the weakref callback runs in this greenlet, mid-test
    assert greenscope.wait_reaped(10)
    assert len(RecordingSession.closes) == 2
    for close in RecordingSession.closes:
        assert close["in_hub"] is False
        assert close["greenlet"] is not gevent.get_hub()
        assert close["thread"] == _cleanup.get_ident()


def test_orphan_is_logged_naming_its_greenlet(
    db: CountingEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Each reaped orphan logs one warning that names its greenlet and says what to do."""
    Session = scoped(db)
    g = gevent.spawn(insert, Session, "logged")
    g.name = "checkout-worker"
    g.join()
    with caplog.at_level(logging.WARNING, logger="greenscope"):
        assert greenscope.wait_reaped(10)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "'checkout-worker'" in record.getMessage()
    assert "remove()" in record.getMessage()


def test_orphan_warnings_follow_the_greenscope_loggers_level(
    db: CountingEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """An orphan's WARNING is logged only while the greenscope logger logs WARNINGs."""
    Session = scoped(db)
    logger = logging.getLogger("greenscope")

    def orphan_logged() -> bool:
        caplog.clear()
        gevent.spawn(insert, Session, "orphan").join()
        assert greenscope.wait_reaped(10)
        return any("left open by" in r.getMessage() for r in caplog.records)

    greenscope._registry._orphan_warnings.flush(force=True)  # a fresh rate-limit window
    caplog.set_level(logging.WARNING, logger="greenscope")  # restored after the test
    assert orphan_logged()
    logger.setLevel(logging.ERROR)
    assert not orphan_logged()
    logger.setLevel(logging.WARNING)
    assert orphan_logged()
    logger.disabled = True
    try:
        assert not orphan_logged()
    finally:
        logger.disabled = False
    logging.disable(logging.WARNING)
    try:
        assert not orphan_logged()
    finally:
        logging.disable(logging.NOTSET)
    assert orphan_logged()
    assert Session.registry.stats().reaped == 6  # type: ignore[attr-defined]


def test_failing_close_is_logged_counted_and_forgotten(
    db: CountingEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A close() that raises is logged and counted, never raised elsewhere or kept."""

    class BrokenClose(orm.Session):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    Session = greenscope.scoped_session(sessionmaker(db.engine, class_=BrokenClose))
    g = gevent.spawn(insert, Session, "broken")
    g.join()
    with caplog.at_level(logging.WARNING, logger="greenscope"):
        assert greenscope.wait_reaped(10)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "close failed" in str(errors[0].exc_info[1])
    assert Session.registry.stats() == greenscope.RegistryStats(created=1, reaped=1, failed=1)  # type: ignore[attr-defined]
    assert db.checkedout() == 0
    # The reaper survives: a later orphan is still cleaned.
    gevent.spawn(insert, Session, "after").join()
    with caplog.at_level(logging.CRITICAL, logger="greenscope"):
        assert greenscope.wait_reaped(10)
    assert Session.registry.stats().reaped == 2  # type: ignore[attr-defined]


def test_threadpool_sessions_close_on_their_own_thread(db: CountingEngine) -> None:
    """An orphan of a gevent thread-pool thread is closed on that thread, not on ours."""
    Session = scoped(db)
    threads: list[int] = []

    def task() -> None:
        threads.append(_cleanup.get_ident())
        g = gevent.spawn(insert, Session, "pooled")
        g.join()
        assert greenscope.wait_reaped(10)

    pool = gevent.threadpool.ThreadPool(1)
    pool.spawn(task).get(timeout=10)
    pool.kill()
    assert [c["thread"] for c in RecordingSession.closes] == threads
    assert threads != [_cleanup.get_ident()]
    assert db.checkedout() == 0


def test_close_all_closes_live_sessions(db: CountingEngine) -> None:
    """close_all() closes Sessions whose greenlets still run, and counts them as removed."""
    Session = scoped(db)
    parked = Event()
    started = [0]

    def work() -> None:
        Session.execute(text("SELECT count(*) FROM items"))  # SQLite: one writer, many readers
        started[0] += 1
        parked.wait()

    greenlets = [gevent.spawn(work) for _ in range(3)]
    gevent.sleep(0)
    assert started[0] == 3
    assert db.checkedout() == 3
    assert greenscope.close_all() >= 3
    assert db.checkedout() == 0
    assert Session.registry.stats() == greenscope.RegistryStats(created=3, removed=3)  # type: ignore[attr-defined]
    parked.set()
    gevent.joinall(greenlets)


def test_close_all_and_wait_refuse_to_run_in_the_hub() -> None:
    """Both do I/O or wait, so inside the hub they raise an error that says what to do."""
    errors = errors_in_hub(greenscope.close_all, greenscope.wait_reaped)
    assert len(errors) == 2
    assert all(isinstance(e, RuntimeError) and "gevent.spawn" in str(e) for e in errors)


def test_other_threads_values_are_not_closed_by_close_all_on_this_thread() -> None:
    """close_all() hands another thread's values to that thread's cleanup path."""
    registry = greenscope.GreenletRegistry(RecordingSession)
    RecordingSession.closes = []
    ready, done = threading.Event(), threading.Event()
    thread_id: list[int] = []

    def hold() -> None:
        thread_id.append(_cleanup.get_ident())
        registry()
        ready.set()
        done.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    ready.wait(10)
    greenscope.close_all()
    assert greenscope.wait_reaped(10)
    done.set()
    t.join(10)
    [close] = RecordingSession.closes
    assert close["thread"] != _cleanup.get_ident()


def test_close_all_can_leave_running_owners_alone(db: CountingEngine) -> None:
    """include_running=False closes finished owners' Sessions, never a running greenlet's."""
    Session = scoped(db)
    parked = Event()

    def running() -> None:
        Session.execute(text("SELECT 1"))
        parked.wait()

    finished = RawGreenlet(lambda: Session.execute(text("SELECT 2")))
    finished.switch()  # a raw greenlet that ended, still referenced: not reaped yet
    g = gevent.spawn(running)
    gevent.sleep(0)
    assert db.checkedout() == 2
    assert greenscope.close_all(include_running=False) == 1
    assert db.checkedout() == 1
    parked.set()
    g.join()
    assert greenscope.wait_reaped(10)
    assert db.checkedout() == 0


def test_remove_current_touches_only_the_current_greenlet(
    db: CountingEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Request-end removal closes this greenlet's Sessions in every registry, no one else's."""
    first, second = scoped(db), scoped(db)
    other_done = Event()

    def other() -> None:
        first.execute(text("SELECT 1"))
        other_done.wait()

    g = gevent.spawn(other)
    gevent.sleep(0)
    first.execute(text("SELECT 1"))
    second.execute(text("SELECT 1"))
    assert greenscope.current_sessions() == [first(), second()]
    assert greenscope.remove_current() == 2
    assert not first.registry.has()
    assert not second.registry.has()
    assert db.checkedout() == 1, "the other greenlet keeps its Session"
    assert greenscope.remove_current() == 0
    other_done.set()
    g.join()


def test_remove_current_clears_every_registry_even_if_a_close_fails(
    db: CountingEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing close is logged and counted; the other registries are still removed."""

    class Failing(orm.Session):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    broken = greenscope.scoped_session(sessionmaker(db.engine, class_=Failing))
    fine = scoped(db)
    broken()
    fine.execute(text("SELECT 1"))
    with caplog.at_level(logging.ERROR, logger="greenscope"):
        assert greenscope.remove_current() == 2
    assert not broken.registry.has()
    assert not fine.registry.has()
    assert broken.registry.stats().failed == 1  # type: ignore[attr-defined]
    assert db.checkedout() == 0
    assert any("close failed" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
