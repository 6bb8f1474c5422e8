"""The drop-in ``scoped_session`` and the explicit ``session_scope``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

from greenlet import getcurrent
from sqlalchemy import util as sa_util
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as _sa_scoped_session

from greenscope._registry import GreenletRegistry, close_or_release

__all__ = ["scoped_session", "session_scope"]

_S = TypeVar("_S", bound=Session)
_P = ParamSpec("_P")
_R = TypeVar("_R")


class scoped_session(_sa_scoped_session[_S]):
    """:class:`sqlalchemy.orm.scoped_session` with one ``Session`` per greenlet.

    Without ``scopefunc`` the registry is a :class:`~greenscope.GreenletRegistry`: every
    greenlet (and every thread) gets its own ``Session``, whether or not gevent had
    patched ``threading`` when this object was built, and a ``Session`` whose greenlet
    ends without :meth:`remove` is closed (rolled back) for it. With ``scopefunc`` the
    registry is SQLAlchemy's ``ScopedRegistry``, keyed on what ``scopefunc`` returns.

    Everything else is SQLAlchemy's: the proxied ``Session`` methods and attributes,
    ``query_property()``, ``configure()``, ``__call__(**kw)`` and their errors and
    warnings. One difference, with or without ``scopefunc``: :meth:`remove` forgets the
    ``Session`` even when its ``close()`` raises, so a kill during ``close()`` cannot
    hand the same ``Session`` out again.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        session_factory: sessionmaker[_S],
        scopefunc: Callable[[], Any] | None = None,
    ) -> None:
        if scopefunc:
            super().__init__(session_factory, scopefunc)
            self._greenscope_key: str | None = None
            return
        self.session_factory = session_factory
        registry = GreenletRegistry(session_factory)
        self.registry = registry
        self._greenscope_key = registry._key

    @property
    def _proxied(self) -> _S:
        # Every proxied call (Session.execute, .add, ...) goes through here: read the
        # registry's slot in the current greenlet's dict directly rather than through
        # registry(), which saves a Python call (see benchmarks/). Same semantics.
        key = self._greenscope_key
        if key is not None:
            try:
                return getcurrent().__dict__[key]  # type: ignore[no-any-return]
            except KeyError:
                pass
        return self.registry()

    def configure(self, **kwargs: Any) -> None:
        """Reconfigure the ``sessionmaker``; warn if Sessions it cannot affect exist.

        SQLAlchemy warns when the *current* scope has a ``Session``; with one scope per
        greenlet that misses the Sessions other greenlets hold, which this change will
        not reach either. This warns when any greenlet holds one, with SQLAlchemy's
        message (so warning filters written for it still match) and what to do.
        """
        registry = self.registry
        if not isinstance(registry, GreenletRegistry):
            super().configure(**kwargs)
            return
        live = registry.stats().live
        if live:
            sa_util.warn(
                "At least one scoped session is already present.  configure() can not "
                f"affect sessions that have already been created. greenscope: {live} "
                "greenlet(s) hold a Session made with the old configuration until they "
                "remove() it; call configure() at startup, before any greenlet makes a "
                "Session, or pass options per Session with Session(**kw)."
            )
        self.session_factory.configure(**kwargs)

    def remove(self) -> None:
        """Close the current greenlet's ``Session``, if any, then forget it.

        The transaction is rolled back and the connection returned to the pool. The
        ``Session`` is forgotten even if ``close()`` raises (the error propagates), so
        the next call makes a fresh one, and its connections are then invalidated, so
        none stays checked out until garbage collection. SQLAlchemy's own ``remove()``
        has no ``try/finally`` and would hand out the half-closed ``Session`` again.
        """
        try:
            if self.registry.has():
                close_or_release(self.registry())
        except BaseException:
            if isinstance(self.registry, GreenletRegistry):
                self.registry._failed += 1
            raise
        finally:
            self.registry.clear()


class session_scope(Generic[_S]):
    """Bracket one unit of work: a context manager and a decorator.

    For work whose greenlet does not end with it: a gevent thread-pool task (its worker
    thread, and the greenlet running the task, outlive each task), a loop in a
    long-lived background greenlet, a job runner. On entry it provides the current
    ``Session`` of ``session``; on exit it removes it (rollback, connection back to the
    pool). With ``commit=True`` it commits first when the block succeeds; a failing
    commit still removes, and its error propagates.

    Entered while the greenlet already has a ``Session`` (an outer scope, or a request
    served by the gunicorn worker), it uses that ``Session`` and leaves its removal to
    whoever opened it. ``commit=True`` still commits when the block succeeds: it is a
    commit, not a vote, so an outer block's pending work is committed with it. Use it
    on the outermost unit of work when the whole must be atomic.

    Usage::

        with session_scope(Session, commit=True) as session:
            session.add(obj)

        @session_scope(Session)
        def task() -> None: ...

    .. versionadded:: 0.1
    """

    __slots__ = ("_commit", "_owned", "_session")

    def __init__(self, session: _sa_scoped_session[_S], *, commit: bool = False) -> None:
        if not isinstance(session, _sa_scoped_session):
            raise TypeError(
                "session_scope() takes a scoped_session (the object you call to get the "
                f"current Session), not {type(session).__name__}"
            )
        self._session = session
        self._commit = commit
        # Per greenlet (by id: unique while it is inside the block), a stack: one object
        # may be entered by many greenlets at once, and again within one greenlet.
        self._owned: dict[int, list[bool]] = {}

    def __enter__(self) -> _S:
        owned = not self._session.registry.has()
        session = self._session()
        self._owned.setdefault(id(getcurrent()), []).append(owned)
        return session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        key = id(getcurrent())
        stack = self._owned[key]
        owned = stack.pop()
        if not stack:
            del self._owned[key]
        try:
            if self._commit and exc_type is None:
                self._session().commit()
        finally:
            if owned:
                self._session.remove()

    def __call__(self, func: Callable[_P, _R]) -> Callable[_P, _R]:
        if (
            inspect.isgeneratorfunction(func)
            or inspect.iscoroutinefunction(func)
            or inspect.isasyncgenfunction(func)
        ):
            raise TypeError(
                f"@session_scope cannot wrap {func.__qualname__}: calling a generator or "
                "async function returns before its body runs, so the scope would end "
                "first. Use `with session_scope(...)` inside the function instead."
            )
        session, commit = self._session, self._commit

        @functools.wraps(func)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            # A fresh scope per call: calls may run at once in many greenlets.
            with session_scope(session, commit=commit):
                return func(*args, **kwargs)

        return wrapper
