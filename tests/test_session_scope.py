"""session_scope brackets a unit of work where the greenlet outlives it."""

from __future__ import annotations

from collections.abc import Generator, Iterator

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
) -> Generator[None, None, None]:
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


def owners(db: CountingEngine) -> list[str]:
    with db.engine.connect() as conn:
        return [r[0] for r in conn.execute(text("SELECT owner FROM items ORDER BY id"))]


def test_a_scope_nested_in_one_that_ended_loses_its_session_with_it(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A generator scope that outlives the scope it was entered in keeps nothing of its work."""
    outer = scoped_block(greenscope.session_scope(Session), ["remove", "write"], Session)
    next(outer)  # entered: owns its Session
    next(outer)  # removed it
    next(outer)  # wrote with a new one: made in the outer block, so the outer block's
    inner = scoped_block(greenscope.session_scope(Session), [], Session)
    next(inner)  # entered with that Session, nested in the outer block
    next(outer, None)  # the outer scope ends first: it ends its whole unit of work
    assert not Session.registry.has(), "the outer scope left a Session it made"
    assert sqlite_db.checkedout() == 0
    next(inner, None)
    assert not Session.registry.has()
    assert sqlite_db.count_rows() == 0


def test_a_task_that_caches_a_generator_scope_leaves_nothing_to_the_next_task(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A thread-pool task's scope ends its Session even if a generator it started holds it."""
    pool = gevent.threadpool.ThreadPool(1)  # one worker greenlet runs every task
    cache: list[Generator[None, None, None]] = []

    def first() -> orm.Session:
        with greenscope.session_scope(Session) as session:
            add(session, "first, never committed")
            pages = scoped_block(greenscope.session_scope(Session), [], Session)
            next(pages)
            cache.append(pages)  # kept for later: outlives the task
            return session

    def second() -> orm.Session:
        with greenscope.session_scope(Session, commit=True) as session:
            add(session, "second")
            return session

    def finish() -> None:
        for pages in cache:
            next(pages, None)

    try:
        a = pool.spawn(first).get(timeout=10)
        b = pool.spawn(second).get(timeout=10)
        pool.spawn(finish).get(timeout=10)
        assert a is not b, "the second task got the first task's Session"
        assert owners(sqlite_db) == ["second"], "the first task's uncommitted write was kept"
        assert sqlite_db.checkedout() == 0
        assert not pool.spawn(Session.registry.has).get(timeout=10)
    finally:
        pool.kill()


def test_a_generator_closed_after_its_scope_ended_does_not_roll_back_later_work(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """Work done after a helper scope ended is the caller's: a late exit never removes it."""
    with greenscope.session_scope(Session):  # a helper scope at the start of a request
        stream = scoped_block(greenscope.session_scope(Session), [""], Session)
        next(stream)  # a stream it started and hands back to the caller
    add(Session(), "request")  # the caller's own work, in a new Session
    stream.close()
    Session.commit()  # the request reports success
    Session.remove()
    assert owners(sqlite_db) == ["request"]


def test_a_scope_finalized_in_another_greenlet_leaves_no_session_to_the_next_scope(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """An owned scope exited elsewhere marks its Session stale; the next scope starts fresh."""
    gen = scoped_block(greenscope.session_scope(Session), ["write"], Session)
    next(gen)  # owned: made this greenlet's Session
    next(gen)  # wrote, uncommitted
    left = Session()
    gevent.spawn(gen.close).join()  # a consumer greenlet finalizes the generator
    assert Session() is left, "an exit in another greenlet must not touch the Session"
    with greenscope.session_scope(Session, commit=True) as session:
        assert session is not left, "the next scope inherited an abandoned scope's Session"
        add(session, "next")
    assert owners(sqlite_db) == ["next"]
    assert not Session.registry.has()
    assert sqlite_db.checkedout() == 0


def test_scopes_of_another_registry_do_not_keep_a_session_in_this_one(
    Session: Scoped, sqlite_db: CountingEngine
) -> None:
    """A claim counts only for its own registry: sharing a Session keeps nothing alive."""
    Other = greenscope.scoped_session(sessionmaker(sqlite_db.engine))
    with greenscope.session_scope(Session) as session:
        Other.registry.set(session)  # a library's own scoped_session shares it
        other = scoped_block(greenscope.session_scope(Other), [], Other)
        next(other)
        add(session, "uncommitted")
    assert not Session.registry.has(), "a scope of another registry kept the Session"
    with greenscope.session_scope(Session) as fresh:
        assert fresh is not session
    next(other, None)
    Other.registry.clear()
    assert sqlite_db.checkedout() == 0
    assert sqlite_db.count_rows() == 0
