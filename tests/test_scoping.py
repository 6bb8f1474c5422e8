"""greenscope.scoped_session is SQLAlchemy's, keyed on greenlets, with a safe remove()."""

from __future__ import annotations

import inspect

import gevent
import pytest
import sqlalchemy.orm
from greenlet import GreenletExit, getcurrent
from greenlet import greenlet as RawGreenlet
from sqlalchemy import ForeignKey, String, exc, select, text
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    sessionmaker,
)
from sqlalchemy.util import ScopedRegistry

import greenscope

from conftest import CountingEngine


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    addresses: Mapped[list[Address]] = relationship(back_populates="user")


class Address(Base):
    __tablename__ = "addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    user: Mapped[User] = relationship(back_populates="addresses")


@pytest.fixture
def Session(sqlite_db: CountingEngine) -> greenscope.scoped_session[sqlalchemy.orm.Session]:
    Base.metadata.create_all(sqlite_db.engine)
    return greenscope.scoped_session(sessionmaker(sqlite_db.engine))


def test_is_a_sqlalchemy_scoped_session() -> None:
    """isinstance checks and type hints written for SQLAlchemy's class keep working."""
    Session = greenscope.scoped_session(sessionmaker())
    assert isinstance(Session, sqlalchemy.orm.scoped_session)
    assert isinstance(Session.registry, greenscope.GreenletRegistry)


def test_same_constructor_signature() -> None:
    """The constructor takes what SQLAlchemy's takes, under the same names and defaults."""
    ours = inspect.signature(greenscope.scoped_session.__init__).parameters
    theirs = inspect.signature(sqlalchemy.orm.scoped_session.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]


def test_every_public_attribute_of_sqlalchemy_is_there() -> None:
    """Every proxied method and attribute of SQLAlchemy's scoped_session is inherited."""
    theirs = {n for n in dir(sqlalchemy.orm.scoped_session) if not n.startswith("_")}
    ours = set(dir(greenscope.scoped_session))
    assert theirs <= ours
    overridden = {
        n
        for n in theirs
        if inspect.getattr_static(greenscope.scoped_session, n)
        is not inspect.getattr_static(sqlalchemy.orm.scoped_session, n)
    }
    assert overridden == {"configure", "remove"}  # remove() is the compiled base's


def test_with_scopefunc_it_is_sqlalchemy(sqlite_db: CountingEngine) -> None:
    """With scopefunc, the registry is SQLAlchemy's ScopedRegistry, keyed on its result."""
    scope = ["a"]
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine), scopefunc=lambda: scope[0])
    assert type(Session.registry) is ScopedRegistry
    a = Session()
    scope[0] = "b"
    assert Session() is not a
    scope[0] = "a"
    assert Session() is a
    Session.remove()
    scope[0] = "b"
    Session.remove()


def test_orm_round_trip_through_the_proxy(
    Session: greenscope.scoped_session[sqlalchemy.orm.Session],
) -> None:
    """add/commit/execute/get/scalars behave as on SQLAlchemy's scoped_session."""
    Session.add(User(name="ann", addresses=[Address()]))
    Session.commit()
    user = Session.scalars(select(User).where(User.name == "ann")).one()
    assert Session.get(User, user.id) is user
    assert user in Session
    assert len(user.addresses) == 1
    assert Session.is_active
    Session.remove()
    assert user not in Session


def test_sessions_differ_per_greenlet(
    Session: greenscope.scoped_session[sqlalchemy.orm.Session],
) -> None:
    """Objects loaded in one greenlet are not in another's identity map."""
    Session.add(User(name="bob"))
    Session.commit()
    mine = Session.scalars(select(User)).one()

    def other() -> bool:
        theirs = Session.scalars(select(User)).one()
        result = theirs is not mine and mine not in Session
        Session.remove()
        return result

    assert gevent.spawn(other).get(timeout=10)
    Session.remove()


def test_query_property(Session: greenscope.scoped_session[sqlalchemy.orm.Session]) -> None:
    """query_property() queries through the current greenlet's Session."""

    query = Session.query_property()  # what `User.query = ...` installs
    Session.add(User(name="cy"))
    Session.commit()
    assert [u.name for u in query.__get__(None, User).all()] == ["cy"]
    Session.remove()


def test_call_with_arguments_uses_them_once(
    Session: greenscope.scoped_session[sqlalchemy.orm.Session],
) -> None:
    """Session(**kw) builds the Session with kw; a second call raises as in SQLAlchemy."""
    session = Session(autoflush=False)
    assert session.autoflush is False
    assert Session() is session
    with pytest.raises(exc.InvalidRequestError, match="already present"):
        Session(autoflush=True)
    Session.remove()


def test_configure_after_a_session_exists_warns(
    Session: greenscope.scoped_session[sqlalchemy.orm.Session],
) -> None:
    """configure() warns, as SQLAlchemy does, when a Session already exists."""
    Session()
    with pytest.warns(exc.SAWarning, match="configure\\(\\) can not affect") as seen:
        Session.configure(autoflush=False)
    assert len(seen) == 1  # one warning, saying what to do
    assert "call configure() at startup" in str(seen[0].message)
    Session.remove()
    Session.configure(autoflush=True)  # no Session: no warning


def test_configure_warns_about_other_greenlets_sessions(
    Session: greenscope.scoped_session[sqlalchemy.orm.Session],
) -> None:
    """configure() also warns when another greenlet holds a Session it cannot affect."""
    other = RawGreenlet(lambda: (Session(), getcurrent().parent.switch()))  # type: ignore[union-attr]
    other.switch()  # holds its Session, suspended
    assert not Session.registry.has()
    with pytest.warns(exc.SAWarning, match="configure\\(\\) can not affect"):
        Session.configure(autoflush=False)
    other.throw(GreenletExit)


def test_remove_closes_and_returns_the_connection(
    Session: greenscope.scoped_session[sqlalchemy.orm.Session], sqlite_db: CountingEngine
) -> None:
    """remove() rolls back and checks the connection in; the next call is a new Session."""
    first = Session()
    Session.add(User(name="dan"))
    Session.flush()
    assert sqlite_db.checkedout() == 1
    Session.remove()
    assert sqlite_db.checkedout() == 0
    assert Session() is not first
    assert Session.scalars(select(User)).all() == []
    Session.remove()


def test_remove_forgets_the_session_when_close_is_killed(sqlite_db: CountingEngine) -> None:
    """A GreenletExit raised during close() still leaves a fresh Session next time."""

    class KilledDuringClose(sqlalchemy.orm.Session):
        def close(self) -> None:
            super().close()
            raise GreenletExit

    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine, class_=KilledDuringClose))
    first = Session()
    with pytest.raises(GreenletExit):
        Session.remove()
    assert not Session.registry.has()
    assert Session() is not first
    with pytest.raises(GreenletExit):
        Session.remove()


def test_remove_forgets_the_session_when_close_raises(sqlite_db: CountingEngine) -> None:
    """An exception from close() propagates, and the Session is forgotten anyway."""

    class FailingClose(sqlalchemy.orm.Session):
        def close(self) -> None:
            super().close()
            raise RuntimeError("lost connection")

    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine, class_=FailingClose))
    Session()
    with pytest.raises(RuntimeError, match="lost connection"):
        Session.remove()
    assert not Session.registry.has()


def test_remove_without_a_session_is_a_no_op() -> None:
    """remove() when the greenlet has no Session creates none and closes nothing."""
    Session = greenscope.scoped_session(sessionmaker())
    Session.remove()
    assert Session.registry.stats() == greenscope.RegistryStats()  # type: ignore[attr-defined]


def test_orphan_of_a_raw_greenlet_is_rolled_back(
    Session: greenscope.scoped_session[sqlalchemy.orm.Session], sqlite_db: CountingEngine
) -> None:
    """A raw greenlet that wrote and ended without commit leaves nothing behind when freed."""

    def work() -> None:
        Session.add(User(name="eve"))
        Session.flush()
        getcurrent().parent.switch()  # type: ignore[union-attr]

    g = RawGreenlet(work)
    g.switch()
    assert sqlite_db.checkedout() == 1
    del g  # a suspended greenlet freed: greenlet throws GreenletExit into it first
    assert greenscope.wait_reaped(10)
    assert sqlite_db.checkedout() == 0
    assert sqlite_db.count_rows("users") == 0
    with sqlite_db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM users")).scalar_one() == 0


def test_remove_calls_a_registry_subclass_own_clear() -> None:
    """scoped_session.remove() goes through an overridden GreenletRegistry.clear()."""
    calls: list[str] = []

    class Counting(greenscope.GreenletRegistry[sqlalchemy.orm.Session]):
        def clear(self) -> None:
            calls.append("clear")
            super().clear()

    scoped = greenscope.scoped_session(sessionmaker())
    scoped.registry = Counting(sessionmaker())
    scoped()
    scoped.remove()
    assert calls == ["clear"]
    assert scoped.registry.stats().live == 0
