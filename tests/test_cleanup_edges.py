"""Cleanup at the edges: GC passes, failing closes, destroyed hubs, fork, the hub itself."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import gevent
import gevent.threadpool
import pytest
from greenlet import greenlet as RawGreenlet
from sqlalchemy import orm, text
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope import _cleanup

from conftest import CountingEngine, errors_in_hub, run_scenario


class GCWatch:
    """Tracks which thread is inside a cyclic GC pass (gc.callbacks: start/stop)."""

    def __init__(self) -> None:
        self.collecting: int | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        self.collecting = _cleanup.get_ident() if phase == "start" else None

    def inside(self) -> bool:
        """True on the very thread that runs the pass, while it runs (its callbacks'
        stack); a reaper thread that runs meanwhile is not inside it."""
        return self.collecting == _cleanup.get_ident()


def test_close_never_runs_inside_a_gc_pass(sqlite_db: CountingEngine) -> None:
    """A greenlet freed by cyclic GC has its Session closed after the pass, not during it."""
    watch = GCWatch()
    closed_during_gc: list[bool] = []

    class Recording(orm.Session):
        def close(self) -> None:
            closed_during_gc.append(watch.inside())
            super().close()

    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine, class_=Recording))

    def work() -> None:
        Session.execute(text("SELECT 1"))

    g = RawGreenlet(work)
    g.cycle = g  # type: ignore[attr-defined]  # only cyclic GC can free it now
    g.switch()
    del g
    assert sqlite_db.checkedout() == 1
    gc.callbacks.append(watch)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(watch)
    assert greenscope.wait_reaped(10)
    assert closed_during_gc == [False]
    assert sqlite_db.checkedout() == 0


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, gevent.GreenletExit])
def test_close_raising_a_base_exception_does_not_escape_the_reaper(
    exc_type: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """A close() raising KeyboardInterrupt & co is logged and counted; the reaper lives on."""
    calls: list[str] = []

    class Value:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def close(self) -> None:
            calls.append("fail" if self.fail else "ok")
            if self.fail:
                raise exc_type

    fails = iter([True, False])
    registry = greenscope.GreenletRegistry(lambda: Value(next(fails)))
    for _ in range(2):
        g = gevent.spawn(registry)
        g.join()
        del g
        with caplog.at_level(logging.CRITICAL, logger="greenscope"):
            assert greenscope.wait_reaped(10)
    assert calls == ["fail", "ok"]
    assert registry.stats() == greenscope.RegistryStats(created=2, reaped=2, failed=1)


def test_thread_reaper_survives_a_base_exception(caplog: pytest.LogCaptureFixture) -> None:
    """Without a hub, a close raising SystemExit neither kills the reaper thread nor leaks."""
    result = run_scenario(
        """
        import sys
        sys.modules["gevent"] = None
        import json, logging
        from greenlet import greenlet
        import greenscope
        logging.disable(logging.CRITICAL)

        closed = []
        class Value:
            def __init__(self, fail): self.fail = fail
            def close(self):
                closed.append(self.fail)
                if self.fail:
                    raise SystemExit(3)

        fails = iter([True, False, False])
        registry = greenscope.GreenletRegistry(lambda: Value(next(fails)))
        for _ in range(3):
            g = greenlet(registry)
            g.switch()
            del g
        ok = greenscope.wait_reaped(10)
        print(json.dumps({"ok": ok, "closed": closed, "stats": registry.stats().__dict__}))
        """
    )
    assert result == {
        "ok": True,
        "closed": [True, False, False],
        "stats": {
            "created": 3,
            "removed": 0,
            "reaped": 3,
            "failed": 1,
            "live": 0,
            "timed_out": 0,
            "rescued": 0,
        },
    }


def test_jobs_of_a_destroyed_hub_are_rescued(sqlite_db: CountingEngine) -> None:
    """Orphans queued on a thread-pool worker's hub when the pool is killed still get closed."""
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine))

    def task() -> None:
        g = gevent.spawn(Session.execute, text("SELECT 1"))
        g.join()
        gevent.sleep(0)  # the rawlink runs and queues the close on this worker's hub...
        # ...and the task returns before that hub runs the reaper.

    pool = gevent.threadpool.ThreadPool(1)
    pool.spawn(task).get(timeout=10)
    pool.kill()  # destroys the worker's hub with the close still queued
    assert greenscope.wait_reaped(10)
    assert sqlite_db.checkedout() == 0
    assert Session.registry.stats() == greenscope.RegistryStats(created=1, reaped=1)  # type: ignore[attr-defined]


def test_forked_child_forgets_inherited_sessions_without_closing(tmp_path: Path) -> None:
    """After fork the child never closes, nor lets GC roll back, a Session the parent uses."""
    result = run_scenario(
        f"""
        import gc, json, os, sys
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import Session as BaseSession, sessionmaker
        import greenscope

        marker = {str(tmp_path / "closed-in-child")!r}
        class Recording(BaseSession):
            def close(self):
                if os.getpid() != parent:
                    open(marker, "w").close()
                super().close()

        parent = os.getpid()
        engine = create_engine("sqlite:///{tmp_path / "fork.db"}")
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
        Session = greenscope.scoped_session(sessionmaker(engine, class_=Recording))
        Session.execute(text("INSERT INTO t VALUES (1)"))   # open transaction in the parent

        pid = os.fork()
        if pid == 0:
            child = {{
                "live": greenscope.stats().live,
                "has": Session.registry.has(),
                "closed_all": greenscope.close_all(),
            }}
            gc.collect()  # dropped, the inherited Session's connection would roll back now
            with open(marker + ".json", "w") as f:
                json.dump(child, f)
            sys.exit(0)  # a normal exit, finalization included
        os.waitpid(pid, 0)
        Session.commit()
        rows = Session.execute(text("SELECT count(*) FROM t")).scalar_one()
        Session.remove()
        child = json.load(open(marker + ".json"))
        closed = os.path.exists(marker)
        print(json.dumps({{"child": child, "rows": rows, "closed_in_child": closed}}))
        """
    )
    assert result == {
        "child": {"live": 0, "has": False, "closed_all": 0},
        "rows": 1,
        "closed_in_child": False,
    }


def test_the_hub_cannot_hold_a_session() -> None:
    """Creating a Session inside the hub raises an error that says where to do the work."""
    registry = greenscope.GreenletRegistry(object)
    [error] = errors_in_hub(registry)
    assert isinstance(error, RuntimeError)
    assert "gevent.spawn" in str(error)
    assert registry.stats().live == 0


def test_close_must_be_callable() -> None:
    """A non-callable close= is refused at construction, not at the first reap."""
    with pytest.raises(TypeError, match="close"):
        greenscope.GreenletRegistry(object, close=None)  # type: ignore[arg-type]


def test_remove_counts_a_failing_close(sqlite_db: CountingEngine) -> None:
    """scoped_session.remove() whose close() raises is counted as failed (and removed)."""

    class Failing(orm.Session):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine, class_=Failing))
    Session()
    with pytest.raises(RuntimeError):
        Session.remove()
    assert Session.registry.stats() == greenscope.RegistryStats(created=1, removed=1, failed=1)  # type: ignore[attr-defined]


class _FailingRollbackOnce:
    """An engine listener whose first rollback raises, as a dying connection's can."""

    def __init__(self) -> None:
        self.armed = True

    def __call__(self, conn: Any) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("rollback failed")


@pytest.mark.parametrize("how", ["remove", "remove_current", "orphan"])
def test_a_failed_close_returns_the_connection_at_once(
    sqlite_db: CountingEngine, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A close that raises part-way still frees the pool slot, without waiting for GC."""
    from sqlalchemy import event  # noqa: PLC0415 - only this test listens

    event.listen(sqlite_db.engine, "rollback", _FailingRollbackOnce())
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine))
    gc.disable()  # a GC pass would return the connection too, and hide a leak
    try:
        if how == "remove":
            Session.execute(text("SELECT 1"))
            with pytest.raises(RuntimeError, match="rollback failed"):
                Session.remove()
        elif how == "remove_current":
            Session.execute(text("SELECT 1"))
            with caplog.at_level(logging.ERROR, logger="greenscope"):
                assert greenscope.remove_current() == 1
        else:
            gevent.spawn(lambda: Session.execute(text("SELECT 1"))).join()
            with caplog.at_level(logging.ERROR, logger="greenscope"):
                assert greenscope.wait_reaped(10)
        assert sqlite_db.checkedout() == 0
    finally:
        gc.enable()
    stats = Session.registry.stats()  # type: ignore[attr-defined]
    assert stats.failed == 1
    assert stats.live == 0
    assert Session.execute(text("SELECT 1")).scalar_one() == 1  # the pool opens a fresh one
    Session.remove()


def test_a_failed_close_never_invalidates_the_applications_own_connection(
    sqlite_db: CountingEngine,
) -> None:
    """Session(bind=connection) joins the caller's connection: a failed close leaves it."""

    class Failing(orm.Session):
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    with sqlite_db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))  # the caller's own transaction
        Session = greenscope.scoped_session(sessionmaker(bind=conn, class_=Failing))
        Session.execute(text("SELECT 2"))
        with pytest.raises(RuntimeError, match="close failed"):
            Session.remove()
        assert not conn.invalidated
        assert conn.execute(text("SELECT 3")).scalar_one() == 3


def test_forked_child_never_frees_a_close_queued_before_fork(tmp_path: Path) -> None:
    """An orphan whose close was queued, not yet run, at fork is pinned in the child too."""
    result = run_scenario(
        f"""
        import gc, json, os, sys
        import gevent
        from greenlet import greenlet
        from sqlalchemy import create_engine, event, text
        from sqlalchemy.orm import sessionmaker
        import greenscope

        marker = {str(tmp_path / "reset-in-child")!r}
        parent = os.getpid()
        engine = create_engine("sqlite:///{tmp_path / "queued.db"}")

        @event.listens_for(engine.pool, "reset")
        def on_reset(*args):
            if os.getpid() != parent:
                open(marker, "w").close()

        Session = greenscope.scoped_session(sessionmaker(engine))
        gevent.get_hub()
        g = greenlet(lambda: Session.execute(text("SELECT 1")))
        g.switch()
        del g  # freed: its close is queued in the hub's reaper, which has not run yet
        queued = greenscope._cleanup.pending()
        pid = os.fork()
        if pid == 0:
            gc.collect()
            sys.exit(0)  # a normal exit, finalization included
        os.waitpid(pid, 0)
        assert greenscope.wait_reaped(10)
        engine.dispose()
        print(json.dumps({{"queued": queued, "reset_in_child": os.path.exists(marker)}}))
        """
    )
    assert result == {"queued": 1, "reset_in_child": False}
