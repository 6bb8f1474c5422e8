"""What an adversarial review of the 0.2 hardening found: each test failed before its fix."""

from __future__ import annotations

import textwrap
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope import _cleanup
from greenscope.wsgi import GreenscopeMiddleware

from conftest import CountingEngine, ProbeJob, pg_url, run_scenario

TESTS = str(Path(__file__).resolve().parent)


class Blocking:
    """A value whose close() waits for ``release`` (a real threading.Event)."""

    def __init__(self, name: str, release: threading.Event | None, closed: dict[str, float]):
        self.name, self.release, self.closed = name, release, closed

    def close(self) -> None:
        if self.release is not None:
            self.release.wait()
        self.closed[self.name] = time.monotonic()


def end_thread_holding(registry: greenscope.GreenletRegistry[Any]) -> None:
    t = threading.Thread(target=registry)
    t.start()
    t.join()


def test_a_queued_close_never_waits_behind_a_hung_one_in_the_reaper_threads() -> None:
    """With every reaper thread busy, a new close gets a new thread, not a wait in line."""
    previous = greenscope.configure_cleanup(close_timeout=30)
    release, closed = threading.Event(), dict[str, float]()
    values = iter([Blocking("hung", release, closed), Blocking("second", None, closed)])
    registry = greenscope.GreenletRegistry(lambda: next(values))
    try:
        end_thread_holding(registry)
        deadline = time.monotonic() + 10
        while _cleanup._thread_reaper.idle:  # the hung close occupies the idle worker
            assert time.monotonic() < deadline
            time.sleep(0.005)
        end_thread_holding(registry)
        while "second" not in closed:
            assert time.monotonic() < deadline, "the second close waited behind the first"
            time.sleep(0.005)
    finally:
        release.set()
        greenscope.configure_cleanup(close_timeout=previous.close_timeout)
    assert greenscope.wait_reaped(10)


def test_reaper_threads_restart_once_stuck_closes_return() -> None:
    """At the cap of stuck threads the queue waits; a stuck close's return resumes it."""
    previous = greenscope.configure_cleanup(close_timeout=0.1, max_concurrent_closes=1)
    release, closed = threading.Event(), dict[str, float]()
    names = ["hung1", "hung2", "hung3", "hung4", "normal"]
    values = iter([Blocking(n, None if n == "normal" else release, closed) for n in names])
    registry = greenscope.GreenletRegistry(lambda: next(values))
    try:
        for _ in names:
            end_thread_holding(registry)
        deadline = time.monotonic() + 10
        while _cleanup._thread_reaper.stuck < 4:
            assert time.monotonic() < deadline, "four closes should be stuck at the cap"
            time.sleep(0.01)
        assert "normal" not in closed
        release.set()
        assert greenscope.wait_reaped(10), "the queue resumed when a stuck close returned"
        assert "normal" in closed
    finally:
        release.set()
        greenscope.configure_cleanup(
            close_timeout=previous.close_timeout,
            max_concurrent_closes=previous.max_concurrent_closes,
        )


def test_greenscope_imported_in_a_thread_still_reaps_threads_that_reuse_its_ident(
    tmp_path: Path,
) -> None:
    """No "main thread" guess: a thread reusing the importer's ident is reaped at its end."""
    result = run_scenario(
        f"""
        import json, threading
        def importer():
            global greenscope, sa, orm
            import greenscope, sqlalchemy as sa
            from sqlalchemy import orm
        t = threading.Thread(target=importer); t.start(); t.join()
        engine = sa.create_engine("sqlite:///{tmp_path / "t.db"}", pool_size=2, max_overflow=0)
        Session = greenscope.scoped_session(orm.sessionmaker(engine))
        def worker():
            import gevent
            gevent.sleep(0)  # a hub for this thread
            Session.execute(sa.text("SELECT 1"))
        for _ in range(3):  # idents are reused at once
            w = threading.Thread(target=worker); w.start(); w.join()
        ok = greenscope.wait_reaped(5)
        print(json.dumps({{"reaped": ok, "live": greenscope.stats().live,
                          "checked_out": engine.pool.checkedout()}}))
        """
    )
    assert result == {"reaped": True, "live": 0, "checked_out": 0}


def test_fork_during_a_running_close_leaves_the_childs_bookkeeping_alone() -> None:
    """A close running in a hub at fork() is the parent's: the child's counts stay exact."""
    result = run_scenario(
        """
        import json, os, time
        import gevent
        import greenscope
        from greenscope import _cleanup
        class V:
            def close(self):
                gevent.sleep(0.3)  # a close in progress at fork
        registry = greenscope.GreenletRegistry(V)
        gevent.spawn(registry).join()
        gevent.sleep(0.05)
        read, write = os.pipe()
        pid = gevent.fork()
        if pid == 0:
            gevent.sleep(0.5)  # long enough for an inherited job to resume
            pending_before = _cleanup.pending()
            gevent.spawn(registry).join()  # the child's own orphan
            ok = greenscope.wait_reaped(5)
            report = {"pending_before": pending_before, "reaped": ok,
                      "pending_after": _cleanup.pending(), "reaped_count": registry.stats().reaped}
            os.write(write, json.dumps(report).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(read, 1000).decode())
        """
    )
    assert result["pending_before"] == 0
    assert result["reaped"] is True
    assert result["pending_after"] == 0
    assert result["reaped_count"] >= 1


def test_in_memory_sqlite_engines_are_not_disposed_in_a_forked_child() -> None:
    """A forked child reads its own copy of an in-memory database, as without greenscope."""
    result = run_scenario(
        """
        import json, os
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        from sqlalchemy.pool import StaticPool
        import greenscope
        seen = []
        for kw in ({}, {"poolclass": StaticPool}):
            engine = create_engine("sqlite://", **kw)
            Session = greenscope.scoped_session(sessionmaker(engine))
            Session.execute(text("CREATE TABLE t (x int)"))
            Session.execute(text("INSERT INTO t VALUES (42)"))
            Session.commit()
            read, write = os.pipe()
            if os.fork() == 0:
                value = Session.execute(text("SELECT x FROM t")).scalar_one()
                os.write(write, str(value).encode())
                os._exit(0)
            os.wait()
            seen.append(int(os.read(read, 10)))
            Session.remove()
        print(json.dumps(seen))
        """
    )
    assert result == [42, 42]


def test_register_engine_starts_the_cleanup_watchdog() -> None:
    """The guard's rescues have deadlines even when no registry value was ever stored."""
    result = run_scenario(
        """
        import json
        from sqlalchemy import create_engine
        import greenscope
        from greenscope import _cleanup
        before = _cleanup._watchdog.started
        greenscope.register_engine(create_engine("sqlite://"))
        print(json.dumps([before, _cleanup._watchdog.started]))
        """
    )
    assert result == [False, True]


def test_nested_middleware_leaves_the_request_to_the_outer_one(
    sqlite_db: CountingEngine,
) -> None:
    """A GreenscopeMiddleware inside another never removes before the outer one commits."""
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        Session.execute(text("INSERT INTO items (owner) VALUES ('acknowledged')"))
        start_response("200 OK", [])
        return [b"saved"]

    wrapped = GreenscopeMiddleware(GreenscopeMiddleware(app), commit_on_success=True)
    result = wrapped({}, lambda *a: lambda data: None)
    assert list(result) == [b"saved"]
    result.close()  # type: ignore[attr-defined]
    assert sqlite_db.count_rows() == 1
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0


def test_scopes_ending_out_of_order_commit_what_they_handed_out(
    sqlite_db: CountingEngine,
) -> None:
    """Two generators' scopes in one greenlet: each commits its own writes; nothing stays out."""
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine))

    def writer(name: str) -> Generator[None, None, None]:
        with greenscope.session_scope(Session, commit=True) as s:
            yield
            s.execute(text("INSERT INTO items (owner) VALUES (:n)"), {"n": name})

    first, second = writer("one"), writer("two")
    next(first)
    next(second)
    for gen in (first, second):
        for _ in gen:
            pass
    with sqlite_db.engine.connect() as conn:
        owners = conn.execute(text("SELECT owner FROM items ORDER BY owner")).scalars().all()
    assert owners == ["one", "two"]
    assert sqlite_db.checkedout() == 0


@pytest.mark.postgres
def test_the_commit_point_commits_the_requests_sessions_not_the_iterating_greenlets(
    pg_table: tuple[str, str],
) -> None:
    """A body iterated by another greenlet commits the request's write, never the other's."""
    from sqlalchemy import create_engine  # noqa: PLC0415

    url, table = pg_table
    engine = create_engine(url)
    Session = greenscope.scoped_session(sessionmaker(engine))

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        Session.execute(text(f"INSERT INTO {table} (owner) VALUES ('request')"))
        start_response("200 OK", [])
        return iter([b"ok"])

    wrapped = GreenscopeMiddleware(app, commit_on_success=True)
    result = gevent.spawn(wrapped, {}, lambda *a: lambda data: None).get()

    def other() -> None:  # another unit of work, uncommitted, that sends the body
        Session.execute(text(f"INSERT INTO {table} (owner) VALUES ('other')"))
        list(result)
        result.close()
        Session.remove()

    gevent.spawn(other).join()
    assert greenscope.wait_reaped(10)
    with engine.connect() as conn:
        owners = conn.execute(text(f"SELECT owner FROM {table}")).scalars().all()
    assert owners == ["request"]
    engine.dispose()


CUT_RACE = """
from gevent import monkey; monkey.patch_all()
import json, os, sys, time
sys.path.insert(0, {tests!r})
import gevent
import sqlalchemy as sa
from sqlalchemy import orm
import greenscope
from faultproxy import FaultProxy

real_sleep = monkey.get_original("time", "sleep")
main = monkey.get_original("_thread", "get_ident")()
real_dup = os.dup
def slow_dup(fd):  # widen the window between "still the job's" and the shutdown
    if monkey.get_original("_thread", "get_ident")() != main:
        real_sleep(0.3)
    return real_dup(fd)
os.dup = slow_dup

greenscope.configure_cleanup(close_timeout=0.3)
url = sa.engine.make_url({url!r})
proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
engine = sa.create_engine(proxy.url_for({url!r}), pool_size=1, max_overflow=0)
S = greenscope.scoped_session(orm.sessionmaker(engine))

def orphan():
    S.execute(sa.text("SELECT 1"))
    proxy.stall()  # its ROLLBACK hangs past the deadline

def victim():  # another request, waiting for the pool's only connection
    gevent.sleep(0.05)
    try:
        with engine.connect() as c:
            c.execute(sa.text("SELECT pg_sleep(0.5)"))
        return "ok"
    except Exception as exc:
        return "failed: " + str(exc).splitlines()[0]

gevent.spawn(orphan).join()
v = gevent.spawn(victim)
gevent.sleep(0.4)  # the cut has begun; the peer comes back, the close completes
proxy.resume()
outcome = v.get()
greenscope.wait_reaped(10)
engine.dispose()
proxy.close()
print(json.dumps(outcome))
"""


@pytest.mark.postgres
def test_a_cut_never_reaches_a_connection_back_in_the_pool() -> None:
    """A close that completes while its cut is under way: the next user's query survives."""
    assert run_scenario(CUT_RACE.format(tests=TESTS, url=pg_url()), timeout=60) == "ok"


CLOSE_ALL_STALLED = """
from gevent import monkey; monkey.patch_all()
import json, sys, time
sys.path.insert(0, {tests!r})
import gevent
import sqlalchemy as sa
from sqlalchemy import orm
import greenscope
from faultproxy import FaultProxy

greenscope.configure_cleanup(close_timeout=0.3)
url = sa.engine.make_url({url!r})
with FaultProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
    engine = sa.create_engine(proxy.url_for({url!r}), pool_size=3, max_overflow=0)
    registries = [greenscope.scoped_session(orm.sessionmaker(engine)) for _ in range(3)]
    for S in registries:
        S.execute(sa.text("SELECT 1"))  # three Sessions of this greenlet, in transactions
    proxy.stall()
    started = time.monotonic()
    greenscope.close_all(shutdown=False)
    took = time.monotonic() - started
    stats = greenscope.stats()
    engine.dispose()
print(json.dumps({{"fast": took < 2.0, "timed_out": stats.timed_out, "live": stats.live}}))
"""


@pytest.mark.postgres
def test_close_all_closes_the_callers_sessions_side_by_side_under_the_deadline() -> None:
    """close_all() on a stalled database returns after about one close_timeout, not never."""
    result = run_scenario(CLOSE_ALL_STALLED.format(tests=TESTS, url=pg_url()), timeout=60)
    assert result == {"fast": True, "timed_out": 3, "live": 0}


# -- the review of the memory and speed work (0.3) ---------------------------------------


def _pause_at(func: Any, needle: str) -> tuple[Any, threading.Event, threading.Event]:
    """A tracer that stops the calling thread at the line of ``func`` containing ``needle``."""
    import inspect  # noqa: PLC0415

    lines, first = inspect.getsourcelines(func)
    [line] = [first + i for i, text_ in enumerate(lines) if needle in text_]
    paused, resume = threading.Event(), threading.Event()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not func.__code__:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == line:
                paused.set()
                resume.wait(10)
            return local

        return local

    return tracer, paused, resume


def test_a_clear_racing_close_all_from_another_thread_counts_the_value_once() -> None:
    """clear() and close_all() on one value at once: live never negative, removed once."""
    import sys  # noqa: PLC0415

    from greenscope import _hot  # noqa: PLC0415

    if _hot.compiled:
        pytest.skip("compiled, clear() is C code: no other thread runs between its steps")
    registry = greenscope.GreenletRegistry(Closable)
    tracer, paused, resume = _pause_at(_hot._forget, "_take_live(watch)")  # clear()'s body

    def owner() -> None:
        registry()
        sys.settrace(tracer)
        try:
            registry.clear()  # stops after taking the value out of the greenlet's dict
        finally:
            sys.settrace(None)

    t = threading.Thread(target=owner)
    t.start()
    assert paused.wait(10)
    greenscope.close_all(shutdown=False)  # takes the same value from the watch
    resume.set()
    t.join(10)
    assert greenscope.wait_reaped(5)
    stats = registry.stats()
    assert (stats.created, stats.removed, stats.live) == (1, 1, 0), stats


class Closable:
    closed = 0

    def close(self) -> None:
        Closable.closed += 1


def test_a_store_racing_close_all_leaves_no_empty_watch_listed() -> None:
    """A value stored while close_all() takes the greenlet's others: nothing stays listed."""
    import sys  # noqa: PLC0415

    from greenscope import _registry  # noqa: PLC0415

    first = greenscope.GreenletRegistry(Closable)
    second = greenscope.GreenletRegistry(Closable)
    store = greenscope.GreenletRegistry._store_locked  # the store of a second value
    tracer, paused, resume = _pause_at(store, "with _values_lock:")

    stored, checked = threading.Event(), threading.Event()

    def work() -> None:
        first()
        sys.settrace(tracer)
        try:
            second()  # stops just before it stores the value
        finally:
            sys.settrace(None)
        stored.set()
        checked.wait(10)  # alive while checked: its end would unlist the watch anyway

    def owner() -> None:
        from greenlet import greenlet  # noqa: PLC0415

        greenlet(work).switch()  # a raw greenlet, freed when it ends: only its weakref tells

    t = threading.Thread(target=owner)
    t.start()
    assert paused.wait(10)
    greenscope.close_all(shutdown=False)
    resume.set()
    assert stored.wait(10)
    stuck = [w for w in list(_registry._LIVE) if w.empty()]
    checked.set()
    t.join(10)
    assert greenscope.wait_reaped(5)
    assert not stuck, "an empty watch stays listed while its greenlet lives"
    assert first.stats().live == second.stats().live == 0


def _owner_acts(owner_does: str, first: Any, second: Any) -> dict[Any, Any]:
    """Do what ``owner_does`` says; return what the owner stored, by registry."""
    stored: dict[Any, Any] = {}
    if owner_does.startswith("clear"):
        first.clear()
        if owner_does.endswith("again"):
            stored[first] = first()
    elif owner_does == "replace it with set()":
        stored[first] = Closable()
        first.set(stored[first])
    else:
        stored[second] = second()
    return stored


@pytest.mark.parametrize(
    "owner_does",
    ["store a second value", "clear", "clear, then store again", "replace it with set()"],
)
@pytest.mark.parametrize(
    "take_paused_at",
    [
        "values = self.items()",
        "for registry, value in values:",
        "self.more = None",
    ],
    ids=["after its claim", "as it unregisters", "before it empties the watch"],
)
@pytest.mark.parametrize("ordered", [True, False], ids=["GIL", "locks only"])
def test_the_owner_changing_its_values_waits_for_a_take_from_another_thread(
    owner_does: str, take_paused_at: str, ordered: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close_all() paused inside take(): the owner's store, clear or set() neither loses
    nor double-counts a value, and the owner then holds what it stored."""
    import sys  # noqa: PLC0415

    from greenscope import _registry  # noqa: PLC0415

    # "locks only": what a free-threaded build does, where no change goes without the lock.
    monkeypatch.setattr(_registry._ORDERED, "done", ordered)
    first = greenscope.GreenletRegistry(Closable)
    second = greenscope.GreenletRegistry(Closable)
    tracer, paused, resume = _pause_at(_registry._Watch.take, take_paused_at)
    ready, go, done, taken, finish = (threading.Event() for _ in range(5))
    holds: list[bool] = []

    def work() -> None:
        first()
        ready.set()
        go.wait(10)
        stored = _owner_acts(owner_does, first, second)
        done.set()
        taken.wait(10)  # close_all() took the value it found: the owner's own are left
        for registry in (first, second):
            holds.append(
                registry() is stored[registry] if registry in stored else not registry.has()
            )
        finish.wait(10)  # alive until checked: its end would reap what it holds

    def owner() -> None:
        from greenlet import greenlet  # noqa: PLC0415

        greenlet(work).switch()  # a raw greenlet: freed (and reaped) when it ends

    def taker() -> None:
        sys.settrace(tracer)
        try:
            greenscope.close_all(shutdown=False)
        finally:
            sys.settrace(None)

    closed_before = Closable.closed
    t_owner = threading.Thread(target=owner)
    t_owner.start()
    assert ready.wait(10)
    t_taker = threading.Thread(target=taker)
    t_taker.start()
    assert paused.wait(10)
    go.set()
    # Fixed, the owner waits for take() to finish: this times out. Unfixed, it finishes
    # inside take()'s window. Either way the outcome is checked after both are done.
    done.wait(1)
    resume.set()
    t_taker.join(10)
    taken.set()
    assert done.wait(10)
    finish.set()
    t_owner.join(10)
    assert greenscope.wait_reaped(5)
    assert holds == [True, True]
    for registry in (first, second):
        s = registry.stats()
        assert s.live == 0, (registry, s)
        assert s.created == s.removed + s.reaped, (registry, s)
    # take() copied the value before the clear: it closes it; the clear finds it gone.
    assert Closable.closed - closed_before == first.stats().created + second.stats().created


@pytest.mark.parametrize(
    "owner_does",
    ["store a second value", "clear", "clear, then store again", "replace it with set()"],
)
@pytest.mark.parametrize(
    "take_paused_at",
    ["values = self.items()", "for registry, value in values:", "self.more = None"],
    ids=["after its claim", "as it unregisters", "before it empties the watch"],
)
@pytest.mark.parametrize("ordered", [True, False], ids=["GIL", "locks only"])
def test_the_owner_changing_its_values_while_a_take_in_its_thread_is_switched_out(
    owner_does: str, take_paused_at: str, ordered: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A greenlet switch inside close_all()'s take() (a GC pass whose finalizer does
    gevent I/O) lets the owner, in the same thread, past the re-entrant lock: its store,
    clear or set() is neither lost nor counted twice."""
    import inspect  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from greenlet import getcurrent  # noqa: PLC0415
    from greenlet import greenlet as RawGreenlet  # noqa: PLC0415

    from greenscope import _registry  # noqa: PLC0415

    monkeypatch.setattr(_registry._ORDERED, "done", ordered)
    first = greenscope.GreenletRegistry(Closable)
    second = greenscope.GreenletRegistry(Closable)
    take = _registry._Watch.take
    lines, start = inspect.getsourcelines(take)
    [line] = [start + i for i, text_ in enumerate(lines) if take_paused_at in text_]
    stored: dict[Any, Any] = {}
    greenlets: dict[str, Any] = {}
    holds: list[bool] = []

    def work() -> None:
        first()
        taker.switch()  # holds a value: close_all() may start
        stored.update(_owner_acts(owner_does, first, second))
        taker.switch()  # back into take(), which goes on from where it was switched out
        for registry in (first, second):
            holds.append(
                registry() is stored[registry] if registry in stored else not registry.has()
            )
        # Ends holding what it stored: reaped at its end.

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not take.__code__:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == line and getcurrent() is taker:
                sys.settrace(None)
                greenlets["owner"].switch()  # as a finalizer doing gevent I/O would
            return local

        return local

    def take_all() -> None:
        greenlets["owner"].switch()  # the owner stores, then comes back here
        sys.settrace(tracer)
        try:
            greenscope.close_all(shutdown=False)
        finally:
            sys.settrace(None)
        greenlets["owner"].switch()  # the owner checks what it holds, then ends

    closed_before = Closable.closed
    taker = RawGreenlet(take_all)
    greenlets["owner"] = RawGreenlet(work, taker)  # its end goes back to take_all()
    taker.switch()
    assert taker.dead
    assert greenlets.pop("owner").dead  # freed: a raw greenlet's values are reaped then
    assert greenscope.wait_reaped(5)
    assert holds == [True, True]
    for registry in (first, second):
        s = registry.stats()
        assert s.live == 0, (registry, s)
        assert s.created == s.removed + s.reaped, (registry, s)
    assert Closable.closed - closed_before == first.stats().created + second.stats().created


def _switch_inside(func: Any, needle: str, greenlets: dict[str, Any], who: str, to: str) -> Any:
    """A tracer: when ``greenlets[who]`` reaches the line of ``func`` containing
    ``needle``, it switches to ``greenlets[to]``, once, as a finalizer doing gevent I/O
    in a GC pass there would."""
    import inspect  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from greenlet import getcurrent  # noqa: PLC0415

    lines, start = inspect.getsourcelines(func)
    [line] = [start + i for i, text_ in enumerate(lines) if needle in text_]

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not func.__code__:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == line and getcurrent() is greenlets[who]:
                sys.settrace(None)
                greenlets[to].switch()
            return local

        return local

    return tracer


@pytest.mark.parametrize(
    ("owner_does", "paused_in", "paused_at"),
    [
        ("store a second value", "put", "new = registry not in more"),
        ("store a second value", "put", "more[registry] = value"),
        ("clear the first of two", "drop", "if self.more:"),
        ("clear the first of two", "drop", "self.r1, self.v1 = first, self.more.pop(first)"),
        ("clear the second of two", "drop", "if self.more is not None:"),
    ],
)
@pytest.mark.parametrize("ordered", [True, False], ids=["GIL", "locks only"])
def test_close_all_switched_in_while_the_owner_changes_its_values_leaves_them_alone(
    owner_does: str, paused_in: str, paused_at: str, ordered: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A greenlet switch inside the owner's locked change (a GC pass whose finalizer does
    gevent I/O) lets close_all() of the same thread past the re-entrant lock: it leaves
    that watch to its owner, which loses nothing, and every value is closed once."""
    import sys  # noqa: PLC0415

    from greenlet import greenlet as RawGreenlet  # noqa: PLC0415

    from greenscope import _registry  # noqa: PLC0415

    monkeypatch.setattr(_registry._ORDERED, "done", ordered)
    first = greenscope.GreenletRegistry(Closable)
    second = greenscope.GreenletRegistry(Closable)
    greenlets: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    tracer = _switch_inside(
        getattr(_registry._Watch, paused_in), paused_at, greenlets, "owner", "taker"
    )

    def work() -> None:
        first()
        if owner_does != "store a second value":
            second()
        greenlets["taker"].switch()  # holds its values: the taker arms the switch
        sys.settrace(tracer)
        try:
            if owner_does == "store a second value":
                second()
            elif owner_does == "clear the first of two":
                first.clear()
            else:
                second.clear()
        finally:
            sys.settrace(None)
        seen["holds"] = (first.has(), second.has())

    def take_all() -> None:
        greenlets["owner"].switch()  # the owner stores, then comes back here
        greenlets["owner"].switch()  # the owner starts its change: back from inside it
        seen["closed by close_all"] = greenscope.close_all(shutdown=False)
        greenlets["owner"].switch()  # the owner finishes its change, then ends

    closed_before = Closable.closed
    greenlets["taker"] = RawGreenlet(take_all)
    greenlets["owner"] = RawGreenlet(work, greenlets["taker"])
    greenlets["taker"].switch()
    assert greenlets.pop("taker").dead
    assert greenlets.pop("owner").dead  # freed: a raw greenlet's values are reaped then
    assert greenscope.wait_reaped(5)
    expected = {
        "store a second value": (True, True),
        "clear the first of two": (False, True),
        "clear the second of two": (True, False),
    }
    assert seen == {"holds": expected[owner_does], "closed by close_all": 0}
    for registry in (first, second):
        s = registry.stats()
        assert s.live == 0, (registry, s)
        assert s.created == s.removed + s.reaped, (registry, s)
    cleared = 0 if owner_does == "store a second value" else 1  # clear() does not close
    created = first.stats().created + second.stats().created
    assert Closable.closed - closed_before == created - cleared


def test_a_registry_subclass_makes_every_value_with_its_own_create() -> None:
    """A GreenletRegistry subclass's _create() runs for each new value, in gevent and raw
    greenlets alike, once the cleanup threads run (the compiled miss skipped it)."""
    from greenlet import getcurrent  # noqa: PLC0415
    from greenlet import greenlet as RawGreenlet  # noqa: PLC0415

    from greenscope._registry import _MISSING  # noqa: PLC0415

    made: list[str] = []

    class Counting(greenscope.GreenletRegistry[Closable]):
        def _create(self, value: Any = _MISSING) -> Closable:
            made.append(type(getcurrent()).__name__)
            return super()._create(value)

    registry = Counting(Closable)
    registry()  # starts the cleanup threads
    registry.clear()
    made.clear()
    gevent.joinall([gevent.spawn(registry) for _ in range(3)])
    RawGreenlet(registry).switch()
    assert greenscope.wait_reaped(5)
    assert sorted(made) == ["Greenlet", "Greenlet", "Greenlet", "greenlet"]


def test_a_fork_while_another_thread_is_inside_take_keeps_what_it_left() -> None:
    """fork() while close_all() in another thread is inside take(): the child keeps the
    value still in the watch (never freed, so never rolled back on the parent's
    connection) and can store and clear again."""
    result = run_scenario(
        """
        import gc, json, os, signal, threading, warnings
        import greenscope
        from greenscope import _cleanup, _registry
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)

        class V:
            def close(self):
                pass

        registry = greenscope.GreenletRegistry(V)
        value = registry()
        inside, go = threading.Event(), threading.Event()
        items = _registry._Watch.items

        def paused_items(self):  # take() after its claim, as a thread switch could be
            inside.set()
            go.wait(10)
            return items(self)

        _registry._Watch.items = paused_items
        t = threading.Thread(target=greenscope.close_all, kwargs={"shutdown": False})
        t.start()
        inside.wait(10)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)
            _registry._Watch.items = items
            pinned = any(value in kept for kept in _cleanup._PINNED)
            stale = len(_registry._TAKING) + len(_registry._CHANGING)
            registry.clear()
            again = registry() is not value
            registry.clear()
            gc.collect()
            report = {"pinned": pinned, "stale": stale, "again": again,
                      "live": registry.stats().live}
            os.write(write, json.dumps(report).encode())
            os._exit(0)
        go.set()
        t.join()
        _, status = os.waitpid(pid, 0)
        os.close(write)
        child = json.loads(os.read(read, 1000) or b"null")
        print(json.dumps({"status": status, "child": child}))
        """
    )
    assert result == {
        "status": 0,
        "child": {"pinned": True, "stale": 0, "again": True, "live": 0},
    }


def test_a_store_switched_out_before_its_watch_is_read_stores_into_the_current_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store that switches out before it stores (here in the debug hook; a finalizer's
    gevent I/O would), while a finalizer of the same greenlet stores into a new watch
    and close_all() empties the old one: the value goes into the greenlet's current
    watch, and request-end removal closes it."""
    import sys  # noqa: PLC0415

    from greenlet import getcurrent  # noqa: PLC0415
    from greenlet import greenlet as RawGreenlet  # noqa: PLC0415

    from greenscope import _hot, _registry  # noqa: PLC0415

    first = greenscope.GreenletRegistry(Closable)
    second = greenscope.GreenletRegistry(Closable)
    third = greenscope.GreenletRegistry(Closable)
    greenlets: dict[str, Any] = {}
    seen: dict[str, Any] = {}

    class Hook:  # _create() calls tag() on its way to the store
        debugging = _hot.Flag()
        debugging.done = True
        armed = False

        @staticmethod
        def tag(value: Any, g: Any) -> None:
            if Hook.armed and getcurrent() is greenlets["owner"] and value is not seen.get("F"):
                Hook.armed = False
                greenlets["taker"].switch()  # close_all() starts, switches back mid-take
                seen["F"] = third()  # the finalizer's store: into a new watch
                greenlets["taker"].switch()  # the take() finishes, emptying the old one

        untag = staticmethod(lambda value: None)
        retag = staticmethod(lambda value, owner: None)

    monkeypatch.setattr(_registry, "_debug", Hook)
    tracer = _switch_inside(
        _registry._Watch.take,
        "for registry, value in values:",
        greenlets,
        "taker",
        "owner",
    )

    def work() -> None:
        first()
        Hook.armed = True  # the next store, second's, switches out on its way
        x = second()
        seen["current"] = set(map(id, greenscope.current_sessions())) == {id(x), id(seen["F"])}
        seen["removed"] = greenscope.remove_current()
        seen["fresh"] = second() is not x
        second.clear()

    def take_all() -> None:
        sys.settrace(tracer)
        try:
            seen["closed by close_all"] = greenscope.close_all(shutdown=False)
        finally:
            sys.settrace(None)
        greenlets["owner"].switch()

    greenlets["taker"] = RawGreenlet(take_all)
    greenlets["owner"] = RawGreenlet(work, greenlets["taker"])
    greenlets["owner"].switch()
    greenlets.clear()
    assert greenscope.wait_reaped(5)
    del seen["F"]
    assert seen == {"closed by close_all": 1, "current": True, "removed": 2, "fresh": True}
    for registry in (first, second, third):
        stats = registry.stats()
        assert (stats.live, stats.created) == (0, stats.removed + stats.reaped), stats


def test_close_all_switched_in_while_a_flask_session_is_stored_leaves_it_alone() -> None:
    """A greenlet switch inside the Flask registry's store (a finalizer's gevent I/O) lets
    close_all() of the same thread in: it leaves that greenlet's container alone, the
    Session is handed out again, and is closed once in the end."""
    import sys  # noqa: PLC0415

    import flask  # noqa: PLC0415
    from greenlet import greenlet as RawGreenlet  # noqa: PLC0415
    from sqlalchemy import orm  # noqa: PLC0415

    from greenscope.flask import AppContextRegistry  # noqa: PLC0415

    closed: list[int] = []

    class Tracked(orm.Session):
        def close(self) -> None:
            closed.append(id(self))
            super().close()

    app = flask.Flask(__name__)
    registry = AppContextRegistry(Tracked)
    greenlets: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    tracer = _switch_inside(
        AppContextRegistry._store, "sessions.entries[key] = entry", greenlets, "owner", "taker"
    )

    def work() -> None:
        with app.app_context():
            sys.settrace(tracer)
            try:
                session = registry()
            finally:
                sys.settrace(None)
            seen["same"] = registry() is session
            seen["id"] = id(session)

    def take_all() -> None:
        seen["closed by close_all"] = greenscope.close_all(shutdown=False)
        greenlets["owner"].switch()

    greenlets["taker"] = RawGreenlet(take_all)
    greenlets["owner"] = RawGreenlet(work, greenlets["taker"])
    greenlets["owner"].switch()
    greenlets.clear()
    greenscope.close_all(shutdown=False)  # whatever the greenlet still holds
    assert greenscope.wait_reaped(5)
    assert (seen["closed by close_all"], seen["same"]) == (0, True)
    assert closed.count(seen["id"]) == 1
    stats = registry.stats()
    assert (stats.live, stats.created) == (0, stats.removed + stats.reaped), stats


def test_a_scopefunc_scoped_session_uses_sqlalchemys_own_lookup() -> None:
    """With a scopefunc there is no greenlet fast path to try (and miss) first."""
    from sqlalchemy.orm import scoped_session as sa_scoped_session  # noqa: PLC0415

    keyed = greenscope.scoped_session(sessionmaker(), scopefunc=lambda: 1)
    assert isinstance(keyed, greenscope.scoped_session)
    assert type(keyed).__call__ is sa_scoped_session.__call__
    assert keyed() is keyed()
    keyed.remove()


def test_a_watch_inherited_across_fork_still_gets_its_cleanup_threads() -> None:
    """A greenlet that forked and stores again in the child is reaped there when it ends."""
    result = run_scenario(
        """
        import gc, json, os
        from greenlet import greenlet
        import greenscope

        class V:
            def close(self):
                pass

        registry = greenscope.GreenletRegistry(V)

        def body():
            registry()
            registry.clear()  # the watch stays in this greenlet's dict
            pid = os.fork()
            if pid == 0:
                registry()  # in the child: no new watch, so no new watch's set-up
                return "child"
            return pid

        g = greenlet(body)
        res = g.switch()
        if res == "child":
            del g
            gc.collect()
            ok = greenscope.wait_reaped(5)
            print(json.dumps({"reaped": ok, "live": registry.stats().live}), flush=True)
            os._exit(0)
        os.waitpid(res, 0)
        """
    )
    assert result == {"reaped": True, "live": 0}


def test_a_fork_while_another_thread_changes_its_values_leaves_the_child_usable() -> None:
    """The lock a thread held at fork() is made anew in the child: it stores and clears."""
    result = run_scenario(
        """
        import json, os, signal, threading, warnings
        from greenscope import GreenletRegistry, _registry
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        registry = GreenletRegistry(object)
        held, release = threading.Event(), threading.Event()

        def hold():
            with _registry._values_lock:  # as a store in another thread would, at fork()
                held.set()
                release.wait(10)

        t = threading.Thread(target=hold)
        t.start()
        held.wait(10)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a deadlocked child dies instead of hanging the test
            registry()
            registry.clear()
            os.write(write, json.dumps(registry.stats().live).encode())
            os._exit(0)
        release.set()
        t.join()
        _, status = os.waitpid(pid, 0)
        os.close(write)
        child_live = json.loads(os.read(read, 100) or b"null")
        print(json.dumps({"status": status, "child_live": child_live}))
        """
    )
    assert result == {"status": 0, "child_live": 0}


def test_a_flask_session_stored_while_close_all_takes_its_container_is_kept() -> None:
    """close_all() in another thread between a Flask registry's lookup and its store:
    the new Session goes to a new container, is handed out again, and is closed."""
    import sys  # noqa: PLC0415

    import flask  # noqa: PLC0415
    from sqlalchemy import orm  # noqa: PLC0415

    from greenscope.flask import AppContextRegistry  # noqa: PLC0415

    app = flask.Flask(__name__)
    registry = AppContextRegistry(orm.Session)
    tracer, paused, resume = _pause_at(
        AppContextRegistry._entry, "entry = sessions.entries.get(id(ctx))"
    )
    seen: dict[str, Any] = {}

    def owner() -> None:
        with app.app_context():
            sys.settrace(tracer)
            try:
                first = registry()  # stops after it read (made) the greenlet's container
            finally:
                sys.settrace(None)
            seen["same"] = registry() is first

    t = threading.Thread(target=owner)
    t.start()
    assert paused.wait(10)
    greenscope.close_all(shutdown=False)  # takes (and closes) the empty container
    assert greenscope.wait_reaped(5)
    resume.set()
    t.join(10)
    assert greenscope.wait_reaped(5)
    stats = registry.stats()
    assert seen == {"same": True}
    assert (stats.created, stats.reaped, stats.live) == (1, 1, 0), stats


def test_take_empties_the_first_slot_after_the_rest() -> None:
    """take()'s last stores write r1 last: an owner that finds r1 None finds nothing of the
    take still to be written (checked on the bytecode: the window is one instruction)."""
    import dis  # noqa: PLC0415

    from greenscope import _registry  # noqa: PLC0415

    stores = [
        i.argval
        for i in dis.get_instructions(_registry._Watch.take)
        if i.opname == "STORE_ATTR" and i.argval in {"r1", "v1", "more"}
    ]
    assert stores[-3:] == ["more", "v1", "r1"], stores


def test_a_flask_session_used_while_its_container_closes_at_request_end_does_not_hang() -> None:
    """A Session's close that asks the Flask registry for a Session (an event handler's
    use) during request-end removal gets one: no store loops on the closing container."""
    import flask  # noqa: PLC0415
    from sqlalchemy import orm  # noqa: PLC0415

    from greenscope.flask import AppContextRegistry  # noqa: PLC0415

    app = flask.Flask(__name__)
    used: list[bool] = []

    class UsesTheRegistryOnClose(orm.Session):
        def close(self) -> None:
            super().close()
            if not used:
                used.append(registry() is not self)  # a new Session, in the same context

    registry = AppContextRegistry(UsesTheRegistryOnClose)
    done = threading.Event()

    def request() -> None:
        with app.app_context():
            registry()
            greenscope.remove_current()
            registry.clear()
        done.set()

    threading.Thread(target=request, daemon=True).start()
    assert done.wait(10), "the store looped on the closing container"
    assert used == [True]


def test_a_log_handler_that_raises_ends_no_cleanup_thread_or_job_greenlet() -> None:
    """With a handler raising on every line, every later orphan is closed, every hung one cut."""
    result = run_scenario(
        """
        import json, logging
        import gevent, gevent.event
        import greenscope

        class Down(logging.Handler):
            def emit(self, record):
                raise OSError("log shipper down")

        log = logging.getLogger("greenscope")
        log.addHandler(Down())
        log.propagate = False
        greenscope.configure_cleanup(close_timeout=0.3)

        class Value:
            def __init__(self, hang):
                self.hang, self.closed = hang, False
            def close(self):
                if self.hang:
                    gevent.event.Event().wait()  # never set: cut at the deadline
                self.closed = True

        rounds = []
        for hang in (True, True, False, False):
            value = Value(hang)
            registry = greenscope.GreenletRegistry(lambda: value)
            gevent.spawn(registry).join()  # an orphan: its WARNING raises, a cut's ERROR too
            reaped = greenscope.wait_reaped(5)
            s = registry.stats()
            rounds.append([reaped, s.reaped, s.timed_out, value.closed])
        print(json.dumps(rounds))
        """
    )
    assert result == [
        [True, 1, 1, False],
        [True, 1, 1, False],
        [True, 1, 0, True],
        [True, 1, 0, True],
    ], result


def test_configure_cleanup_refusing_a_value_changes_no_setting() -> None:
    """A max_concurrent_closes beyond sys.maxsize is refused, and every setting stays as it was."""
    before = _cleanup.settings()
    with pytest.raises(
        ValueError, match=r"max_concurrent_closes=\.\.\.\) must be at least 1 and at most"
    ):
        greenscope.configure_cleanup(close_timeout=0.25, max_concurrent_closes=2**63)
    assert _cleanup.settings() == before
    job = ProbeJob()
    job.run()
    assert before.close_timeout - 1 < job.left[0] <= before.close_timeout


def test_a_registrys_close_cannot_be_replaced_after_construction() -> None:
    """Assigning registry._close raises, rather than being ignored by the compiled cleanup."""
    registry = greenscope.GreenletRegistry(object)
    with pytest.raises(AttributeError):
        registry._close = lambda value: None  # type: ignore[misc]


_RAISING_HANDLER = """
import json, logging, time
import greenlet
import greenscope
from greenscope import _cleanup

class Custom(BaseException):
    pass

def timeout():
    import gevent
    return gevent.Timeout(0.01)  # a handler's send under gevent.Timeout, expired

EXC = {
    "SystemExit": lambda: SystemExit(3),
    "GreenletExit": greenlet.GreenletExit,
    "Custom": Custom,
    "gevent.Timeout": timeout,
}[KIND]

class Down(logging.Handler):
    def emit(self, record):
        raise EXC()

log = logging.getLogger("greenscope")
log.addHandler(Down())
log.propagate = False
greenscope.configure_cleanup(close_timeout=0.3)
"""


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("SystemExit", "threads"),
        ("Custom", "threads"),
        ("SystemExit", "hub"),
        ("GreenletExit", "hub"),
        ("gevent.Timeout", "hub"),
    ],
)
def test_a_log_handler_raising_a_base_exception_ends_no_cleanup_or_reaches_the_app(
    kind: str, where: str
) -> None:
    """A handler raising SystemExit or gevent.Timeout: every orphan closed, every hang cut."""
    if where == "threads":  # no gevent: the closes run in reaper threads
        body = """
        import threading

        class Value:
            def __init__(self, hang):
                self.hang, self.closed = hang, False
            def close(self):
                time.sleep(self.hang)  # a thread cannot be interrupted: it returns late
                self.closed = True

        def orphan(registry):
            t = threading.Thread(target=registry)
            t.start()
            t.join()
        hangs, settle = (1.0, 1.0, 0, 0), 1.2
        """
    else:
        body = """
        import gevent, gevent.event

        class Value:
            def __init__(self, hang):
                self.hang, self.closed = hang, False
            def close(self):
                if self.hang:
                    gevent.event.Event().wait()  # never set: cut at the deadline
                self.closed = True

        def orphan(registry):
            gevent.spawn(registry).join()
        hangs, settle = (1, 1, 0, 0), 0
        """
    run = """
        rounds = []
        for hang in hangs:
            value = Value(hang)
            registry = greenscope.GreenletRegistry(lambda: value)
            orphan(registry)  # its WARNING raises, and a cut's ERROR
            reaped = greenscope.wait_reaped(5)
            s = registry.stats()
            rounds.append([reaped, s.reaped + s.removed, s.timed_out, value.closed])
        time.sleep(settle)  # the hung threads return
        print(json.dumps({"rounds": rounds, "pending": _cleanup.pending()}))
        """
    code = f"KIND = {kind!r}\n" + _RAISING_HANDLER + textwrap.dedent(body) + textwrap.dedent(run)
    result = run_scenario(code)
    closed = where == "hub"  # a cut hub close is interrupted; a thread's returns late
    assert result["rounds"] == [
        [True, int(closed), 1, False],
        [True, int(closed), 1, False],
        [True, 1, 0, True],
        [True, 1, 0, True],
    ], result
    assert result["pending"] == 0, result


def test_a_cleanup_thread_that_fails_to_start_leaves_its_slot_free() -> None:
    """While threads cannot start, no slot is lost and no job: each later orphan is closed."""
    result = run_scenario(
        """
        import json, logging, threading, time
        import greenscope
        from greenscope import _cleanup

        logging.getLogger("greenscope").addHandler(logging.NullHandler())
        logging.getLogger("greenscope").propagate = False
        greenscope.configure_cleanup(close_timeout=30, max_concurrent_closes=8)  # > startup 1-3

        class Value:
            def __init__(self, hang):
                self.hang, self.closed = hang, False
            def close(self):
                time.sleep(self.hang)
                self.closed = True

        def orphan(value):
            registry = greenscope.GreenletRegistry(lambda: value)
            t = threading.Thread(target=registry)
            t.start()
            t.join()

        orphan(Value(0))
        assert greenscope.wait_reaped(5)  # the watchdog and one reaper thread run
        workers_before = _cleanup._thread_reaper.workers  # 1 to 3: startup races
        real, failing = _cleanup._start_new_thread, [True]

        def start(fn, args):
            if failing[0] and getattr(fn, "__func__", None) is _cleanup._ThreadReaper._run:
                raise RuntimeError("can't start new thread")
            return real(fn, args)

        _cleanup._start_new_thread = start
        slow = [Value(0.5) for _ in range(workers_before)]
        for v in slow:
            orphan(v)  # occupy every reaper thread
        while _cleanup._thread_reaper.idle:
            time.sleep(0.005)
        quick = [Value(0) for _ in range(3)]
        for v in quick:
            orphan(v)  # each asks for another thread, which fails to start
        done_while_failing = greenscope.wait_reaped(5)
        no_slot_lost = _cleanup._thread_reaper.workers == workers_before
        failing[0] = False
        slow2, quick2 = Value(2), Value(0)
        orphan(slow2)
        orphan(quick2)  # must get a thread of its own, not wait behind slow2
        t0 = time.monotonic()
        while not quick2.closed and time.monotonic() - t0 < 1.5:
            time.sleep(0.01)
        print(json.dumps([done_while_failing, no_slot_lost, quick2.closed,
                          all(v.closed for v in quick + slow)]))
        """
    )
    assert result == [True, True, True, True], result


def test_configure_cleanup_refuses_a_close_timeout_that_is_no_deadline() -> None:
    """close_timeout=inf, NaN or an int beyond a float is refused with ValueError, like 0."""
    before = _cleanup.settings()
    for value in (float("inf"), float("nan"), 10**400):
        with pytest.raises(ValueError, match=r"must be more than 0 seconds, and finite"):
            greenscope.configure_cleanup(close_timeout=value)
    assert _cleanup.settings() == before


def test_a_cut_while_a_job_logs_its_failure_gives_its_slot_back_once() -> None:
    """A cut landing inside a job's fallback log line stays in cleanup; its slot is freed once."""
    result = run_scenario(
        """
        import json, logging
        import gevent
        import greenscope

        class Flaky(logging.Handler):
            # Refuses the orphan's WARNING, then reconnects (cooperatively) while
            # logging the job's failure, past close_timeout: the cut lands in there.
            def emit(self, record):
                msg = record.getMessage()
                if "left open by" in msg:
                    raise OSError("connection refused")
                if "a cleanup job failed" in msg:
                    gevent.sleep(2)

        handler = Flaky()
        # The cut's own ERROR is not shipped: it would wait for the lock this job holds.
        handler.addFilter(lambda record: "took longer" not in record.getMessage())
        log = logging.getLogger("greenscope")
        log.addHandler(handler)
        log.propagate = False
        greenscope.configure_cleanup(close_timeout=0.3)

        class Value:
            def close(self):
                pass

        hub = gevent.get_hub()
        errors = []
        handle_error = hub.handle_error

        def noted(context, kind, value, tb):
            errors.append(kind.__name__)
            handle_error(context, kind, value, tb)

        hub.handle_error = noted
        registry = greenscope.GreenletRegistry(Value)
        gevent.spawn(registry).join()
        reaped = greenscope.wait_reaped(5)
        reaper = hub.__dict__["_greenscope_reaper"]
        with gevent.Timeout(5):
            while reaper.running > 0:  # the interrupted job greenlet ends
                gevent.sleep(0.01)
        gevent.sleep(0)
        s = registry.stats()
        print(json.dumps([reaped, reaper.running, errors, s.reaped, s.timed_out]))
        """
    )
    assert result == [True, 0, [], 1, 1], result
