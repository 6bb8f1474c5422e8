"""session_scope brackets a unit of work where the greenlet outlives it."""

from __future__ import annotations

from collections.abc import Iterator

import gevent
import gevent.threadpool
import pytest
from gevent.event import Event
from sqlalchemy import exc, orm, text
from sqlalchemy.orm import sessionmaker

import greenscope

from conftest import CountingEngine

Scoped = greenscope.scoped_session[orm.Session]


@pytest.fixture
def Session(sqlite_db: CountingEngine) -> Scoped:
    return greenscope.scoped_session(sessionmaker(sqlite_db.engine))


def add(session: orm.Session, owner: str) -> None:
    session.execute(text("INSERT INTO items (owner) VALUES (:o)"), {"o": owner})


def test_removes_at_exit_without_committing_by_default(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """By default the block's work is rolled back and the connection returned at exit."""
    with greenscope.session_scope(Session) as session:
        assert session is Session()
        add(session, "a")
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0
    assert sqlite_db.count_rows() == 0


def test_commit_on_success_when_asked(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """commit=True commits a block that succeeds."""
    with greenscope.session_scope(Session, commit=True) as session:
        add(session, "a")
    assert sqlite_db.count_rows() == 1
    assert sqlite_db.checkedout() == 0


def test_exception_rolls_back_even_with_commit(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """A block that raises is rolled back and removed; the error propagates."""
    with (  # noqa: PT012 - the block is the unit of work under test
        pytest.raises(ValueError, match="bad"),
        greenscope.session_scope(Session, commit=True) as s,
    ):
        add(s, "a")
        raise ValueError("bad")
    assert sqlite_db.count_rows() == 0
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0


def test_failing_commit_still_removes(sqlite_db: CountingEngine) -> None:
    """If the commit itself fails, the Session is still removed and the error propagates."""

    class FailingCommit(orm.Session):
        def commit(self) -> None:
            raise exc.OperationalError("COMMIT", {}, RuntimeError("connection lost"))

    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine, class_=FailingCommit))
    with (
        pytest.raises(exc.OperationalError, match="connection lost"),
        greenscope.session_scope(Session, commit=True) as session,
    ):
        add(session, "a")
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0
    assert sqlite_db.count_rows() == 0


def test_nested_scope_leaves_removal_to_the_outer_one(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """An inner scope uses the outer Session; only the scope that opened it removes it."""
    with greenscope.session_scope(Session) as outer:
        with greenscope.session_scope(Session) as inner:
            assert inner is outer
            add(inner, "inner")
        assert Session.registry.has()
        assert Session() is outer
    assert not Session.registry.has()
    assert sqlite_db.count_rows() == 0, "nobody asked for a commit"


def test_inner_commit_is_a_commit_not_a_vote(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """commit=True commits at the end of its block even inside another scope or Session."""
    session = Session()  # e.g. the request's Session, opened before the unit of work
    add(session, "before")
    with greenscope.session_scope(Session, commit=True):
        add(Session(), "unit")
    assert Session.registry.has(), "the scope did not open it, so it does not remove it"
    assert sqlite_db.count_rows() == 2
    Session.remove()


def test_decorating_a_generator_or_coroutine_is_refused(Session: Scoped) -> None:
    """The scope would end before the body runs, so wrapping one raises a TypeError."""

    def gen() -> Iterator[int]:
        yield 1

    async def coro() -> None:
        pass

    for func in (gen, coro):
        with pytest.raises(TypeError, match="with session_scope"):
            greenscope.session_scope(Session)(func)


def test_killed_inside_a_committing_scope_commits_nothing(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A greenlet killed inside session_scope(commit=True) rolls back and removes."""
    inside = Event()

    def work() -> None:
        with greenscope.session_scope(Session, commit=True) as session:
            add(session, "killed")
            inside.set()
            gevent.sleep(10)

    g = gevent.spawn(work)
    inside.wait(5)
    g.kill(block=True, timeout=5)
    assert sqlite_db.count_rows() == 0
    assert sqlite_db.checkedout() == 0
    assert Session.registry.stats().removed == 1  # type: ignore[attr-defined]


def test_decorator_scopes_each_call(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """As a decorator, every call gets its own scope and keeps the function's metadata."""

    @greenscope.session_scope(Session, commit=True)
    def task(owner: str) -> None:
        """Doc."""
        add(Session(), owner)

    task("a")
    task("b")
    assert task.__doc__ == "Doc."
    assert task.__name__ == "task"
    assert sqlite_db.count_rows() == 2
    assert not Session.registry.has()
    assert Session.registry.stats() == greenscope.RegistryStats(created=2, removed=2)  # type: ignore[attr-defined]


def test_one_scope_object_in_many_greenlets(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """A shared scope object entered by many greenlets at once keeps each one's state apart."""
    scope = greenscope.session_scope(Session)
    release = Event()
    entered: list[orm.Session] = []

    def work() -> None:
        with scope as session:
            session.execute(text("SELECT 1"))
            entered.append(session)
            release.wait()

    greenlets = [gevent.spawn(work) for _ in range(5)]
    gevent.sleep(0)
    assert len({id(s) for s in entered}) == 5
    release.set()
    gevent.joinall(greenlets, raise_error=True)
    assert sqlite_db.checkedout() == 0
    assert Session.registry.stats().removed == 5  # type: ignore[attr-defined]


def test_threadpool_tasks_are_scoped(Session: Scoped, sqlite_db: CountingEngine) -> None:
    """Tasks of a gevent thread pool, whose worker greenlet never dies, release per task."""

    @greenscope.session_scope(Session, commit=True)
    def task(owner: str) -> None:
        add(Session(), owner)

    pool = gevent.threadpool.ThreadPool(2)
    try:
        for i in range(6):
            pool.spawn(task, str(i)).get(timeout=10)
    finally:
        pool.kill()
    assert sqlite_db.count_rows() == 6
    assert sqlite_db.checkedout() == 0
    assert Session.registry.stats().live == 0  # type: ignore[attr-defined]


def test_refuses_what_is_not_a_scoped_session(sqlite_db: CountingEngine) -> None:
    """Passing a plain Session or sessionmaker raises an error that says what to pass."""
    with pytest.raises(TypeError, match="takes a scoped_session"):
        greenscope.session_scope(sessionmaker(sqlite_db.engine))  # type: ignore[arg-type]


def scoped_block(
    scope: greenscope.session_scope[orm.Session], steps: list[str], Session: Scoped
) -> Iterator[None]:
    """A generator holding a scope: entered at the first next(), then one step per next()."""
    with scope:
        yield
        for step in steps:
            if step == "remove":
                Session.remove()
            elif step == "write":
                add(Session(), "gen")
            yield


def test_a_scope_made_after_remove_survives_an_earlier_scope_ending_first(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """Two generators ending out of order: an exit never closes what an open scope made."""
    first = scoped_block(greenscope.session_scope(Session), ["remove"], Session)
    next(first)  # entered
    next(first)  # removed its own Session
    second = scoped_block(greenscope.session_scope(Session, commit=True), ["write"], Session)
    next(second)  # entered with no Session: made its own
    next(second)  # wrote with it
    made = Session()
    next(first, None)  # the first scope ends before the second
    assert Session() is made, "the first scope's exit removed the second scope's Session"
    assert made.in_transaction(), "the second scope's write was rolled back"
    next(second, None)  # commits its own write, then removes
    assert sqlite_db.count_rows() == 1
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0


def test_a_scope_takes_over_removal_when_the_scope_that_made_it_ends_first(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """An owned exit that leaves a Session to an open scope leaves its removal to it too."""
    outer = scoped_block(greenscope.session_scope(Session), ["remove", "write"], Session)
    next(outer)  # entered: owns its Session
    next(outer)  # removed it
    next(outer)  # wrote with a new one, which no scope made
    inner = scoped_block(greenscope.session_scope(Session), [], Session)
    next(inner)  # entered with that Session: not its own to remove, until...
    next(outer, None)  # ...the outer scope ends first, and leaves the Session to it
    assert Session.registry.has(), "the outer exit closed a Session an open scope uses"
    next(inner, None)
    assert not Session.registry.has(), "nobody removed the Session the scopes left behind"
    assert sqlite_db.checkedout() == 0
    assert sqlite_db.count_rows() == 0
