"""Misuse gets a clear error that says what to do, never silent corruption."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gevent
import pytest
import sqlalchemy.orm
from sqlalchemy import String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import greenscope

from conftest import CountingEngine, run_scenario


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(50))


ScopedSession = greenscope.scoped_session[sqlalchemy.orm.Session]


@pytest.fixture
def Session(sqlite_db: CountingEngine) -> ScopedSession:
    Base.metadata.create_all(sqlite_db.engine)
    return greenscope.scoped_session(sessionmaker(sqlite_db.engine))


@pytest.fixture
def debug() -> Iterator[None]:
    previous = greenscope.set_debug(True)
    yield
    greenscope.set_debug(previous)


def _in_greenlet(func: Callable[[], object]) -> BaseException | None:
    """Run ``func`` in a new greenlet; return what it raised."""
    g = gevent.spawn(func)
    g.join(10)
    assert g.ready()
    error: BaseException | None = g.exception
    return error


# -- a Session used from a greenlet other than its owner (debug mode) ------------------


@pytest.mark.usefixtures("debug")
def test_debug_mode_refuses_a_statement_from_another_greenlet(Session: ScopedSession) -> None:
    """A Session handed to another greenlet fails there, naming both and the fix."""
    session = Session()
    error = _in_greenlet(lambda: session.execute(text("SELECT 1")))
    assert isinstance(error, RuntimeError)
    message = str(error)
    assert "used for a statement" in message
    assert "(running)" in message  # the owner, this test's greenlet
    assert "Call the scoped_session in each greenlet" in message
    assert session.execute(text("SELECT 1")).scalar_one() == 1  # the owner still can
    Session.remove()


@pytest.mark.usefixtures("debug")
def test_debug_mode_refuses_add_flush_and_commit_from_another_greenlet(
    Session: ScopedSession,
) -> None:
    """Adding an object, flushing and committing are checked too."""
    session = Session()
    session.add(Note(text="mine"))  # something to flush
    errors = [
        _in_greenlet(lambda: session.add(Note(text="x"))),
        _in_greenlet(session.flush),
        _in_greenlet(session.commit),
    ]
    assert [type(e) for e in errors] == [RuntimeError] * 3
    assert "adding Note" in str(errors[0])
    Session.remove()


@pytest.mark.usefixtures("debug")
def test_debug_mode_catches_a_lazy_load_through_a_passed_object(Session: ScopedSession) -> None:
    """An ORM object passed to a child greenlet would load through the parent's Session."""
    Session.add(Note(text="hello"))
    Session.commit()  # expires the object: its next attribute read runs a SELECT
    note = Session.scalars(select(Note)).one()
    Session.expire(note)
    error = _in_greenlet(lambda: note.text)
    assert isinstance(error, RuntimeError)
    assert "pass ids rather than ORM objects" in str(error)
    Session.remove()


@pytest.mark.usefixtures("debug")
def test_debug_mode_names_a_dead_owner(Session: ScopedSession) -> None:
    """A Session kept after its greenlet ended (and was reaped) is refused, saying so."""
    kept: list[sqlalchemy.orm.Session] = []
    gevent.spawn(lambda: kept.append(Session())).join()
    assert greenscope.wait_reaped(10)
    error = _in_greenlet(lambda: kept[0].execute(text("SELECT 1")))
    assert isinstance(error, RuntimeError)
    assert "a greenlet that has ended" in str(error)


@pytest.mark.usefixtures("debug")
def test_debug_mode_allows_each_greenlet_its_own_session(Session: ScopedSession) -> None:
    """The scoped_session used as intended, from many greenlets, raises nothing."""

    def work(i: int) -> None:
        Session.add(Note(text=str(i)))
        Session.commit()
        Session.execute(text("SELECT 1"))
        Session.remove()

    greenlets = [gevent.spawn(work, i) for i in range(5)]
    gevent.joinall(greenlets, raise_error=True)


def test_debug_mode_is_off_by_default_and_costs_nothing(Session: ScopedSession) -> None:
    """Off, nothing is recorded on Sessions and no listener is installed."""
    assert greenscope.set_debug(False) is False
    session = Session()
    assert "greenscope.owner" not in session.info
    assert _in_greenlet(lambda: session.execute(text("SELECT 1"))) is None
    Session.remove()


def test_debug_mode_from_the_environment() -> None:
    """GREENSCOPE_DEBUG=1 turns the check on at import."""
    result = run_scenario(
        """
        import json, gevent
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        import greenscope

        engine = create_engine("sqlite://")
        Session = greenscope.scoped_session(sessionmaker(engine))
        session = Session()
        g = gevent.spawn(session.execute, text("SELECT 1"))
        g.join()
        Session.remove()
        engine.dispose()
        print(json.dumps({"error": type(g.exception).__name__, "on": greenscope.set_debug()}))
        """,
        env={"GREENSCOPE_DEBUG": "1"},
    )
    assert result == {"error": "RuntimeError", "on": True}


# -- a registry used after close_all() ---------------------------------------------------


def test_registry_refuses_new_sessions_after_close_all(Session: ScopedSession) -> None:
    """close_all() is a shutdown: a Session made after it would never be closed."""
    Session.execute(text("SELECT 1"))
    assert greenscope.close_all() == 1
    assert Session.registry.shut_down  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match=r"close_all\(\) shut greenscope down") as info:
        Session.execute(text("SELECT 1"))
    assert "close_all(shutdown=False)" in str(info.value)
    with pytest.raises(RuntimeError, match="shut greenscope down"):
        Session(bind=None)  # the set() path: Session(**kw)
    Session.remove()  # nothing held: still fine
    assert greenscope.stats().live == 0


def test_close_all_shutdown_false_keeps_registries_usable(Session: ScopedSession) -> None:
    """shutdown=False closes the Sessions and lets the registries make new ones."""
    Session.execute(text("SELECT 1"))
    assert greenscope.close_all(shutdown=False) == 1
    assert not Session.registry.shut_down  # type: ignore[attr-defined]
    assert Session.execute(text("SELECT 1")).scalar_one() == 1
    Session.remove()


def test_registries_made_after_close_all_are_shut_down_too(sqlite_db: CountingEngine) -> None:
    """close_all() shuts greenscope down: a registry made afterwards refuses Sessions too."""
    greenscope.close_all()
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine))
    with pytest.raises(RuntimeError, match=r"close_all\(\) shut greenscope down"):
        Session.execute(text("SELECT 1"))
    assert Session.registry.shut_down  # type: ignore[attr-defined]
    assert sqlite_db.checkedout() == 0


def test_close_all_without_shutdown_leaves_later_registries_open(
    sqlite_db: CountingEngine,
) -> None:
    """close_all(shutdown=False), a test suite's teardown, shuts nothing down."""
    greenscope.close_all(shutdown=False)
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine))
    assert Session.execute(text("SELECT 1")).scalar_one() == 1
    Session.remove()


def test_running_request_keeps_its_session_after_close_all_include_running_false(
    Session: ScopedSession,
) -> None:
    """A greenlet still running at a worker's exit keeps its Session, but cannot make one."""
    started, release = gevent.event.Event(), gevent.event.Event()
    seen: list[object] = []

    def request() -> None:
        Session.execute(text("SELECT 1"))
        started.set()
        release.wait()
        seen.append(Session.execute(text("SELECT 2")).scalar_one())
        Session.remove()
        try:
            Session.execute(text("SELECT 3"))
        except RuntimeError as exc:
            seen.append(type(exc))

    g = gevent.spawn(request)
    started.wait(10)
    assert greenscope.close_all(include_running=False) == 0
    release.set()
    g.join(10)
    assert seen == [2, RuntimeError]


@pytest.mark.usefixtures("debug")
def test_debug_mode_lets_greenscope_close_from_another_greenlet(
    sqlite_db: CountingEngine,
) -> None:
    """The reaper and close_all() close Sessions where they run: never a misuse."""
    Base.metadata.create_all(sqlite_db.engine)

    def commit_then_close(session: sqlalchemy.orm.Session) -> None:
        session.commit()  # a close= that does database work, in the reaper's greenlet
        session.close()

    registry = greenscope.GreenletRegistry(sessionmaker(sqlite_db.engine), close=commit_then_close)

    def orphan() -> None:
        registry().add(Note(text="kept by the custom close"))

    gevent.spawn(orphan).join()
    assert greenscope.wait_reaped(10)
    assert registry.stats().failed == 0
    assert registry.stats().reaped == 1


def test_gunicorn_worker_exit_leaves_registries_usable(Session: ScopedSession) -> None:
    """At worker exit greenscope closes what is left, and a later worker_exit hook may
    still use a Session: only an explicit close_all() shuts registries down."""
    from greenscope import gunicorn as greenscope_gunicorn  # noqa: PLC0415 - needs gunicorn

    Session.execute(text("SELECT 1"))
    greenscope_gunicorn.worker_exit(None, None)
    assert not Session.registry.shut_down  # type: ignore[attr-defined]
    assert greenscope.stats().live == 0
    assert Session.execute(text("SELECT 2")).scalar_one() == 2
    Session.remove()


@pytest.mark.parametrize("factory", [42, "sessionmaker"])
def test_scoped_session_names_its_own_argument(factory: object) -> None:
    """scoped_session(42) says what scoped_session takes, not an internal class's name."""
    with pytest.raises(TypeError, match=r"greenscope\.scoped_session\(session_factory\) takes"):
        greenscope.scoped_session(factory)  # type: ignore[arg-type]
