"""The hardening cases: each test failed before its fix (see CHANGELOG 0.2)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
from greenlet import greenlet as RawGreenlet
from sqlalchemy import create_engine, orm, text
from sqlalchemy.orm import sessionmaker

import greenscope
from greenscope import _cleanup
from greenscope.wsgi import GreenscopeMiddleware

from conftest import CountingEngine, run_scenario

Scoped = greenscope.scoped_session[orm.Session]


@pytest.fixture
def Session(sqlite_db: CountingEngine) -> Scoped:
    return greenscope.scoped_session(sessionmaker(sqlite_db.engine))


@pytest.fixture
def short_deadline() -> Iterator[None]:
    previous = greenscope.configure_cleanup(close_timeout=0.3)
    yield
    greenscope.configure_cleanup(close_timeout=previous.close_timeout)


def insert(Session: greenscope.scoped_session[Any], owner: str) -> None:
    Session.execute(text("INSERT INTO items (owner) VALUES (:o)"), {"o": owner})


class Closable:
    """A registry value whose close() blocks until ``release`` is set (or is cut)."""

    def __init__(self, name: str, release: Any, closed: list[str]) -> None:
        self.name, self.release, self.closed = name, release, closed
        self.entered = False

    def close(self) -> None:
        self.entered = True
        if self.release is not None:
            self.release.wait()
        self.closed.append(self.name)


# -- 1. one hung close must not stall the others ----------------------------------------------


def test_a_hung_orphan_close_does_not_hold_up_the_next_in_its_hub(short_deadline: None) -> None:
    """In one hub, a close that never returns neither blocks later closes nor lives forever."""
    closed: list[str] = []
    never = gevent.event.Event()
    values = iter([Closable("hung", never, closed), Closable("next", None, closed)])
    registry = greenscope.GreenletRegistry(lambda: next(values))
    gevent.spawn(registry).join()  # its close blocks forever
    gevent.spawn(registry).join()  # must be closed anyway, at once
    with gevent.Timeout(0.2):  # well before the hung one's deadline
        while closed != ["next"]:
            gevent.sleep(0.001)
    assert greenscope.wait_reaped(5), "the hung close is cut at its deadline"
    stats = registry.stats()
    assert (stats.reaped, stats.timed_out, stats.failed, stats.live) == (2, 1, 1, 0)
    assert closed == ["next"], "the hung close was interrupted, not completed"


def test_wait_reaped_waits_for_a_hub_close_cut_at_its_deadline_to_count(
    short_deadline: None,
) -> None:
    """A close cut in a hub is pending until it has counted its failure, not just cut."""
    value = Closable("hung", gevent.event.Event(), [])  # never released
    registry = greenscope.GreenletRegistry(lambda: value)
    gevent.spawn(registry).join()
    with gevent.Timeout(5):
        while not value.entered:  # its close runs in the hub's reaper, and blocks
            gevent.sleep(0.001)
    deadline = time.monotonic() + 5
    while registry.stats().timed_out == 0:  # the watchdog thread cuts it; the hub must
        assert time.monotonic() < deadline  # not run meanwhile, so no gevent.sleep here
        time.sleep(0.01)
    assert registry.stats().failed == 0, "the hub cannot have run the interruption yet"
    assert _cleanup.pending() == 1, "a cut hub close stopped counting before it settled"
    assert greenscope.wait_reaped(5)
    stats = registry.stats()
    assert (stats.reaped, stats.timed_out, stats.failed, stats.live) == (1, 1, 1, 0)


def test_a_hub_destroyed_before_it_interrupts_a_cut_close_does_not_hold_up_the_wait(
    short_deadline: None,
) -> None:
    """A cut hub close whose hub is destroyed first stops counting: wait_reaped returns."""
    value = Closable("hung", gevent.event.Event(), [])
    registry = greenscope.GreenletRegistry(lambda: value)
    errors: list[BaseException] = []

    def thread() -> None:
        try:
            gevent.spawn(registry).join()  # this thread's hub runs the close, which blocks
            with gevent.Timeout(5):
                while not value.entered:
                    gevent.sleep(0.001)
            deadline = time.monotonic() + 5
            while registry.stats().timed_out == 0:  # cut by the watchdog; the hub idles
                assert time.monotonic() < deadline
                time.sleep(0.01)
            hub = _cleanup.hub_if_exists()
            assert hub is not None
            hub.destroy(destroy_loop=True)  # before it ran the interruption
        except BaseException as exc:  # reported by the test, not by threading
            errors.append(exc)

    t = threading.Thread(target=thread, daemon=True)
    t.start()
    t.join(10)
    assert not errors, errors
    assert greenscope.wait_reaped(5), "a destroyed hub's cut close is waited for forever"
    assert registry.stats().timed_out == 1


class _LoopDestroyedMidCut:
    """A hub's loop that refuses threadsafe callbacks: the hub destroyed mid-cut."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def run_callback_threadsafe(self, *args: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute 'run_callback_threadsafe'")


def test_a_hub_destroyed_while_a_close_is_cut_is_counted_once(short_deadline: None) -> None:
    """The cut cannot reach the hub: the close stops counting once, never twice."""
    value = Closable("hung", gevent.event.Event(), [])
    registry = greenscope.GreenletRegistry(lambda: value)
    errors: list[BaseException] = []
    hub_ref: list[Any] = []

    def thread() -> None:
        try:
            gevent.spawn(registry).join()
            with gevent.Timeout(5):
                while not value.entered:
                    gevent.sleep(0.001)
            hub = _cleanup.hub_if_exists()
            assert hub is not None
            hub_ref.append(hub)
            real = hub.loop
            hub.loop = _LoopDestroyedMidCut(real)  # the watchdog's callback will fail
            deadline = time.monotonic() + 5
            while registry.stats().timed_out == 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert greenscope.wait_reaped(5)  # from a native thread: no yield to this hub
            hub.loop = real
            hub.destroy(destroy_loop=True)
        except BaseException as exc:  # reported by the test, not by threading
            errors.append(exc)

    t = threading.Thread(target=thread, daemon=True)
    t.start()
    t.join(15)
    assert not errors, errors
    deadline = time.monotonic() + 3  # a sweep (every second) settles what is left over
    while _cleanup._watchdog.settling and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _cleanup._watchdog.settling
    assert _cleanup.pending() == 0, "the cut was counted twice"


def test_a_hung_close_in_a_reaper_thread_does_not_hold_up_the_next(short_deadline: None) -> None:
    """Without a hub: a close stuck in a reaper thread is replaced; the queue moves on."""
    closed: list[str] = []
    release = threading.Event()
    values = iter([Closable("hung", release, closed), Closable("next", None, closed)])
    registry = greenscope.GreenletRegistry(lambda: next(values))
    for _ in range(2):  # each native thread ends holding a value: the reaper threads close
        t = threading.Thread(target=registry)
        t.start()
        t.join()
    try:
        assert greenscope.wait_reaped(5), "the hung close is cut at its deadline"
        assert closed == ["next"]
        assert registry.stats().timed_out == 1
    finally:
        release.set()  # a thread blocked in a close cannot be interrupted: let it return
    assert greenscope.wait_reaped(5)


def test_close_timeout_is_validated() -> None:
    """Bad settings are refused with the argument's name and what is allowed."""
    with pytest.raises(ValueError, match=r"configure_cleanup\(close_timeout=...\) must be more"):
        greenscope.configure_cleanup(close_timeout=0)
    with pytest.raises(TypeError, match=r"close_timeout=...\) takes a number"):
        greenscope.configure_cleanup(close_timeout="10")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_concurrent_closes=...\) must be at least 1"):
        greenscope.configure_cleanup(max_concurrent_closes=0)
    assert greenscope.configure_cleanup() == greenscope.CleanupSettings()


def test_orphans_close_concurrently_up_to_the_limit() -> None:
    """Closes in one hub run side by side, at most max_concurrent_closes at once."""
    previous = greenscope.configure_cleanup(max_concurrent_closes=3)
    gate = gevent.event.Event()
    running: list[int] = [0]
    peak: list[int] = [0]

    class Slow:
        def close(self) -> None:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            gate.wait()
            running[0] -= 1

    try:
        registry = greenscope.GreenletRegistry(Slow)
        for _ in range(6):
            gevent.spawn(registry).join()
        with gevent.Timeout(5):
            while running[0] < 3:
                gevent.sleep(0.001)
        gevent.sleep(0.01)
        assert peak[0] == 3
        gate.set()
        assert greenscope.wait_reaped(5)
        assert registry.stats().reaped == 6
    finally:
        greenscope.configure_cleanup(max_concurrent_closes=previous.max_concurrent_closes)


class _BlockingHandler(logging.Handler):
    """A log handler that does gevent I/O for each orphan WARNING: it waits for ``go``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.go = gevent.event.Event()
        self.blocked = gevent.event.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "left open by" in record.getMessage():
            self.blocked.set()
            self.go.wait(10)


def test_a_blocked_log_handler_never_delays_an_orphans_close(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """An orphan's connection is back in the pool while its WARNING's handler still blocks."""
    handler = _BlockingHandler()
    logger = logging.getLogger("greenscope")
    logger.addHandler(handler)
    try:
        greenscope._registry._orphan_warnings.flush(force=True)  # a fresh rate-limit window
        gevent.spawn(insert, Session, "orphan").join()  # its connection is checked out
        assert handler.blocked.wait(5)
        assert sqlite_db.checkedout() == 0
        assert sqlite_db.count_rows() == 0, "the orphan's transaction was rolled back"
        handler.go.set()
        assert greenscope.wait_reaped(5)
    finally:
        handler.go.set()
        logger.removeHandler(handler)
    stats = Session.registry.stats()  # type: ignore[attr-defined]
    assert (stats.reaped, stats.live, stats.failed) == (1, 0, 0)


# -- 2. a native thread that used gevent --------------------------------------------------------


def test_a_thread_that_made_a_hub_has_its_session_closed_when_it_ends(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A native thread's main-greenlet Session is closed when the thread ends, hub or not."""

    def work() -> None:
        gevent.sleep(0)  # this thread now has a hub, whose cycle keeps its main greenlet
        insert(Session, "thread")

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert greenscope.wait_reaped(5)
    stats = Session.registry.stats()  # type: ignore[attr-defined]
    assert (stats.live, stats.reaped) == (0, 1)
    assert sqlite_db.checkedout() == 0
    assert sqlite_db.count_rows() == 0


# -- 3. session_scope exits in another greenlet -------------------------------------------------


def test_a_scope_finalized_by_another_greenlet_leaves_that_greenlets_session_alone(
    Session: Scoped, sqlite_db: CountingEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A generator's scope closed elsewhere neither raises nor touches the closer's Session."""
    scope = greenscope.session_scope(Session)

    def rows() -> Generator[int, None, None]:
        with scope:
            yield Session.execute(text("SELECT count(*) FROM items")).scalar_one()

    gen = rows()
    hold = gevent.event.Event()
    generator_session: list[orm.Session] = []

    def reader() -> None:
        next(gen)
        generator_session.append(Session())
        hold.wait()

    a = gevent.spawn(reader)
    gevent.sleep(0)
    assert not a.dead
    outcome: dict[str, Any] = {}

    def finalizer() -> None:
        mine = Session()
        Session.execute(text("SELECT 1"))  # a transaction of this greenlet's own
        gen.close()  # the generator's `with` exits here, in another greenlet
        outcome["same"] = Session() is mine
        outcome["open"] = mine.in_transaction()
        Session.remove()

    gevent.spawn(finalizer).join()
    assert outcome == {"same": True, "open": True}, "the finalizer's Session was not touched"
    assert generator_session[0].in_transaction(), "nor the generator owner's, still running"
    assert "exited here" in caplog.text
    hold.set()
    a.join()
    assert greenscope.wait_reaped(5)
    assert sqlite_db.checkedout() == 0, "the generator's Session went with its greenlet"


def test_one_scope_object_entered_by_many_greenlets_closes_each_its_own(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A shared session_scope object matches every exit to its own entry."""
    scope = greenscope.session_scope(Session, commit=True)
    order = [gevent.event.Event() for _ in range(3)]
    sessions: dict[int, orm.Session] = {}
    open_after: dict[int, bool] = {}

    def work(i: int) -> None:
        with scope as session:
            sessions[i] = session
            Session.execute(text("SELECT 1"))
            order[i].wait()
        open_after[i] = Session.registry.has()

    greenlets = [gevent.spawn(work, i) for i in range(3)]
    gevent.sleep(0)
    for i in (1, 0, 2):  # exits out of entry order
        order[i].set()
        greenlets[i].join()
    assert len({id(s) for s in sessions.values()}) == 3
    assert open_after == {0: False, 1: False, 2: False}
    assert sqlite_db.checkedout() == 0


# -- 4. engines behind greenscope get fresh pools after fork -------------------------------------


FORK_SCENARIO = """
import json, os
from sqlalchemy import create_engine, text
import greenscope
{setup}
before = id(engine.pool)
with engine.connect() as conn:  # a pooled connection the child must never use
    conn.execute(text("SELECT 1"))
pid = os.fork()
if pid == 0:
    os.write(1, (json.dumps({{"fresh": id(engine.pool) != before}}) + "\\n").encode())
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize(
    ("setup", "fresh"),
    [
        (
            "from flask import Flask\n"
            "from greenscope.flask import SQLAlchemy\n"
            "app = Flask('t'); app.config['SQLALCHEMY_DATABASE_URI'] = 'sqlite:///{db}'\n"
            "db = SQLAlchemy(app)\n"
            "with app.app_context(): engine = db.engine",
            True,
        ),
        (
            "engine = greenscope.register_engine(create_engine('sqlite:///{db}'))",
            True,
        ),
        ("engine = create_engine('sqlite:///{db}')", False),
    ],
    ids=["flask-sqlalchemy", "register_engine", "unknown-engine-control"],
)
def test_known_engines_get_a_fresh_pool_in_a_forked_child(
    tmp_path: Any, setup: str, fresh: bool
) -> None:
    """Flask-SQLAlchemy's and registered engines are disposed in a child; others are not."""
    code = FORK_SCENARIO.format(setup=setup.format(db=tmp_path / "f.db"))
    assert run_scenario(code) == {"fresh": fresh}


def test_register_engine_refuses_what_is_not_an_engine() -> None:
    """register_engine() names what it got, and the fix for an AsyncEngine."""
    with pytest.raises(TypeError, match="takes an Engine made by"):
        greenscope.register_engine("sqlite://")

    class FakeAsync:
        sync_engine = create_engine("sqlite://")

    with pytest.raises(TypeError, match=r"pass FakeAsync\.sync_engine"):
        greenscope.register_engine(FakeAsync())


# -- 6 and 7. commit_on_success: once, before anything is sent -----------------------------------


def _serve(app: Callable[..., Any]) -> tuple[list[str], list[bytes], BaseException | None]:
    """Like a server: iterate, send each chunk, always close; report what was sent."""
    statuses: list[str] = []
    sent: list[bytes] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return sent.append

    result = app({}, start_response)
    error: BaseException | None = None
    try:
        for chunk in result:
            sent.append(chunk)
    except Exception as exc:
        error = exc
    finally:
        result.close()
    return statuses, sent, error


def test_a_body_whose_first_chunk_raises_commits_nothing(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A 200 whose body fails before its first chunk is a 500 for the client: no commit."""

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        insert(Session, "x")
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            yield from ()  # a generator whose first step fails
            raise RuntimeError("template error")

        return body()

    _, sent, error = _serve(GreenscopeMiddleware(app, commit_on_success=True))
    assert isinstance(error, RuntimeError)
    assert sent == []
    assert sqlite_db.count_rows() == 0
    assert sqlite_db.checkedout() == 0


def test_a_failing_commit_is_raised_before_the_first_chunk_is_sent(
    sqlite_db: CountingEngine,
) -> None:
    """A generator app's commit runs before its first chunk: a failure is never acknowledged."""

    class FailingCommit(orm.Session):
        def commit(self) -> None:
            raise RuntimeError("serialization failure")

    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine, class_=FailingCommit))

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        insert(Session, "x")
        start_response("201 Created", [])
        yield b"created"

    _, sent, error = _serve(GreenscopeMiddleware(app, commit_on_success=True))
    assert isinstance(error, RuntimeError)
    assert sent == [], "nothing was sent: the server answers 500, not 201"
    assert sqlite_db.count_rows() == 0
    assert sqlite_db.checkedout() == 0


def test_commit_on_success_commits_exactly_once(sqlite_db: CountingEngine) -> None:
    """One commit per request, at the first chunk, however long the body is."""
    commits: list[int] = []

    class Counting(orm.Session):
        def commit(self) -> None:
            commits.append(1)
            super().commit()

    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine, class_=Counting))

    def app(environ: Any, start_response: Any) -> Iterator[bytes]:
        insert(Session, "x")
        start_response("200 OK", [])
        yield b"a"
        yield b"b"

    _serve(GreenscopeMiddleware(app, commit_on_success=True))
    assert commits == [1]
    assert sqlite_db.count_rows() == 1


# -- 8. greenscope.flask with a commit-on-success middleware --------------------------------------


def test_commit_on_success_refuses_greenscope_flask(sqlite_db: CountingEngine) -> None:
    """The combination that rolled back every write is refused, with what to do instead."""
    from flask import Flask  # noqa: PLC0415 - Flask is only needed here

    from greenscope.flask import SQLAlchemy  # noqa: PLC0415

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = str(sqlite_db.engine.url)
    SQLAlchemy(app)
    targets: list[Any] = [app, app.wsgi_app]
    for target in targets:
        with pytest.raises(ValueError, match="Commit in your views"):
            GreenscopeMiddleware(target, commit_on_success=True)
    GreenscopeMiddleware(targets[0])  # without commit_on_success it is fine


def test_commit_on_success_fails_loudly_when_the_flask_app_is_hidden(
    sqlite_db: CountingEngine,
) -> None:
    """Behind a wrapper the middleware cannot see into, the first request fails, not the data."""
    from flask import Flask  # noqa: PLC0415

    from greenscope.flask import SQLAlchemy  # noqa: PLC0415

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = str(sqlite_db.engine.url)
    db = SQLAlchemy(app)

    @app.route("/")
    def index() -> str:
        db.session.execute(text("SELECT 1"))
        return "ok"

    def opaque(environ: Any, start_response: Any) -> Any:
        return app(environ, start_response)

    middleware = GreenscopeMiddleware(opaque, commit_on_success=True)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    with pytest.raises(RuntimeError, match="before GreenscopeMiddleware"):
        _serve_raising(middleware, environ)
    with app.app_context():
        assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined,unused-ignore]
        db.engine.dispose()


def _serve_raising(app: Any, environ: dict[str, Any]) -> None:
    result = app(environ, lambda *a: lambda data: None)
    try:
        list(result)
    finally:
        result.close()


# -- smaller ones -------------------------------------------------------------------------------


def test_close_all_counts_flask_sessions_as_removed(sqlite_db: CountingEngine) -> None:
    """Sessions greenscope.flask holds, closed by close_all(), count as removed, not reaped."""
    from flask import Flask  # noqa: PLC0415

    from greenscope.flask import SQLAlchemy  # noqa: PLC0415

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = str(sqlite_db.engine.url)
    db = SQLAlchemy(app)
    with app.app_context():
        db.session.execute(text("SELECT 1"))
        greenscope.close_all(shutdown=False)
        stats = db.session.registry.stats()  # type: ignore[attr-defined,unused-ignore]
        db.engine.dispose()
    assert (stats.removed, stats.reaped, stats.live) == (1, 0, 0)


def test_orphan_warnings_are_rate_limited_and_counters_stay_exact(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ten orphan warnings a minute in full, then one summary; every orphan is counted."""
    greenscope._registry._orphan_warnings.flush(force=True)  # a fresh window for this test
    caplog.set_level(logging.WARNING, logger="greenscope")

    class Value:
        def close(self) -> None:
            pass

    registry = greenscope.GreenletRegistry(Value)
    for _ in range(30):
        RawGreenlet(registry).switch()  # finished and freed: an orphan each
    assert greenscope.wait_reaped(5)
    greenscope.close_all(shutdown=False)  # flushes the summary
    full = [r for r in caplog.records if "left open by" in r.getMessage()]
    summaries = [r for r in caplog.records if "more orphaned Sessions" in r.getMessage()]
    assert len(full) == 10
    assert len(summaries) == 1
    assert "20 more" in summaries[0].getMessage()
    assert registry.stats().reaped == 30


def test_the_watchdog_and_reapers_are_real_threads() -> None:
    """Cleanup threads never depend on a hub: they are OS threads even after patching."""
    code = """
    from gevent import monkey; monkey.patch_all()
    import json, threading
    import greenscope
    from greenscope import _cleanup
    greenscope.GreenletRegistry(object)()
    print(json.dumps({"watchdog": _cleanup._watchdog.started,
                      "reapers": _cleanup._thread_reaper.workers}))
    """
    assert run_scenario(code) == {"watchdog": True, "reapers": 1}
    assert _cleanup._watchdog.started


# -- 1, on PostgreSQL: a partition during an orphan's ROLLBACK ----------------------------------

PARTITION_SCENARIO = """
from gevent import monkey; monkey.patch_all()
import json, sys, time
sys.path.insert(0, {tests!r})
import gevent
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker
import greenscope
from faultproxy import FaultProxy

greenscope.configure_cleanup(close_timeout=2.0)
url, table = {url!r}, {table!r}
host_port = create_engine(url).url
with FaultProxy(host_port.host or "127.0.0.1", host_port.port or 5432) as proxy:
    cut_off = create_engine(proxy.url_for(url), pool_size=1, max_overflow=0, pool_timeout=5)
    healthy = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=5)
    Partitioned = greenscope.scoped_session(sessionmaker(cut_off))
    Healthy = greenscope.scoped_session(sessionmaker(healthy))

    def partitioned() -> None:
        Partitioned.execute(text(f"INSERT INTO {{table}} (owner) VALUES ('partitioned')"))
        proxy.stall()  # the network goes away; the greenlet ends without remove()

    def later() -> None:
        Healthy.execute(text(f"INSERT INTO {{table}} (owner) VALUES ('healthy')"))

    gevent.spawn(partitioned).join()
    gevent.sleep(0.05)  # the hung ROLLBACK has started
    started = time.monotonic()
    gevent.spawn(later).join()
    while healthy.pool.checkedout():  # closed behind the hung one? (bounded below)
        gevent.sleep(0.01)
        if time.monotonic() - started > 10:
            break
    healthy_closed_after = time.monotonic() - started
    reaped = greenscope.wait_reaped(15)
    result = {{
        "healthy_closed_before_deadline": healthy_closed_after < 1.5,
        "reaped": reaped,
        "cut_off_checked_out": cut_off.pool.checkedout(),
        "timed_out": Partitioned.registry.stats().timed_out,
    }}
    proxy.resume()
    with cut_off.connect() as conn:  # the pool serves again: a fresh connection
        result["serves_again"] = conn.execute(text("SELECT 1")).scalar_one() == 1
    with healthy.connect() as conn:
        result["stored"] = conn.execute(text(f"SELECT count(*) FROM {{table}}")).scalar_one()
    cut_off.dispose(); healthy.dispose()
print(json.dumps(result))
"""


@pytest.mark.postgres
def test_a_partition_during_an_orphans_rollback_holds_up_nothing(
    pg_table: tuple[str, str],
) -> None:
    """A ROLLBACK stuck behind a partition is cut at its deadline; others close meanwhile."""
    url, table = pg_table
    code = PARTITION_SCENARIO.format(tests=str(Path(__file__).parent), url=url, table=table)
    assert run_scenario(code, timeout=60) == {
        "healthy_closed_before_deadline": True,
        "reaped": True,
        "cut_off_checked_out": 0,
        "timed_out": 1,
        "serves_again": True,
        "stored": 0,
    }


# -- a failed COMMIT on SQLite ------------------------------------------------------------------


def test_a_failed_sqlite_commit_never_goes_back_to_the_pool_in_its_transaction(
    tmp_path: Path,
) -> None:
    """After COMMIT fails ("database is locked"), removal leaves no pooled transaction behind."""
    import sqlite3  # noqa: PLC0415

    from sqlalchemy.pool import QueuePool  # noqa: PLC0415

    path = tmp_path / "locked.db"
    engine = create_engine(
        f"sqlite:///{path}", poolclass=QueuePool, pool_size=1, connect_args={"timeout": 0}
    )
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, owner TEXT)"))
    Session = greenscope.scoped_session(sessionmaker(engine))
    reader = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM items").fetchall()  # a SHARED lock: COMMIT fails
        insert(Session, "failed request")
        with pytest.raises(Exception, match="database is locked"):
            Session.commit()
        Session.remove()
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    with engine.connect() as conn:  # the same pooled connection (pool_size=1)
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        assert dbapi.in_transaction is False, "no transaction was left open in the pool"
        conn.execute(text("INSERT INTO items (owner) VALUES ('next request')"))
        conn.commit()
        owners = conn.execute(text("SELECT owner FROM items")).scalars().all()
    assert owners == ["next request"], "the failed request's write was not committed later"
    engine.dispose()


FLASK_FORK_PG = """
import json, os
from flask import Flask
from sqlalchemy import text
from greenscope.flask import SQLAlchemy

app = Flask("t")
app.config["SQLALCHEMY_DATABASE_URI"] = {url!r}
db = SQLAlchemy(app)
with app.app_context():  # the database touched at import, as db.create_all() does
    parent = db.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    db.session.remove()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    with app.app_context():
        child = db.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        db.session.remove()
    os.write(write, str(child).encode())
    os._exit(0)
os.waitpid(pid, 0)
child = int(os.read(read, 100))
with app.app_context():  # the parent's pooled connection still works
    again = db.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    db.session.remove()
    db.engine.dispose()
print(json.dumps({{"shared": child == parent, "parent_kept": again == parent}}))
"""


@pytest.mark.postgres
def test_a_forked_flask_worker_never_uses_the_parents_connection() -> None:
    """greenscope.flask under --preload: the child gets its own backend; the parent keeps its."""
    from conftest import pg_url  # noqa: PLC0415

    assert run_scenario(FLASK_FORK_PG.format(url=pg_url())) == {
        "shared": False,
        "parent_kept": True,
    }


def test_a_server_error_logs_no_late_write_warning(
    Session: Scoped, sqlite_db: CountingEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A 5xx is rolled back quietly: nothing was committed, so no write was "late"."""

    def app(environ: Any, start_response: Any) -> list[bytes]:
        insert(Session, "x")
        start_response("500 Internal Server Error", [])
        return [b"error"]

    _serve(GreenscopeMiddleware(app, commit_on_success=True))
    assert sqlite_db.count_rows() == 0
    assert "after the request was committed" not in caplog.text
