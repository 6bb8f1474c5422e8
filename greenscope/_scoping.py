"""The drop-in ``scoped_session`` and the explicit ``session_scope``."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import weakref
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from greenlet import getcurrent
from greenlet import greenlet as RawGreenlet
from sqlalchemy import util as sa_util
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as _sa_scoped_session

from greenscope._hot import ScopedHit
from greenscope._registry import CallSignature, GreenletRegistry, close_or_release

__all__ = ["scoped_session", "session_scope"]

logger = logging.getLogger("greenscope")

_S = TypeVar("_S", bound=Session)
_P = ParamSpec("_P")
_R = TypeVar("_R")


_MISSING: object = object()
_CLEAR = GreenletRegistry.clear


class scoped_session(ScopedHit, _sa_scoped_session[_S]):
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
        if not callable(session_factory):
            raise TypeError(
                "greenscope.scoped_session(session_factory) takes a sessionmaker (or any "
                f"callable that returns a Session); got {session_factory!r}. For example: "
                "scoped_session(sessionmaker(engine))"
            )
        if scopefunc is not None and not callable(scopefunc):
            raise TypeError(
                "greenscope.scoped_session(session_factory, scopefunc) takes a callable "
                f"scopefunc, or none at all for one Session per greenlet; got {scopefunc!r}"
            )
        if scopefunc:
            super().__init__(session_factory, scopefunc)  # its registry: no key (__setattr__)
            if type(self) is scoped_session:
                # SQLAlchemy's own fast paths, unwrapped. A subclass keeps its class (and
                # its overrides): its hits miss the greenlet's dict (no key there) and
                # take SQLAlchemy's path, at the cost of one lookup.
                self.__class__ = _KeyedByScopefunc
            return
        self.session_factory = session_factory
        self.registry = GreenletRegistry(session_factory)  # sets _greenscope_key too

    if not TYPE_CHECKING:  # hidden from type checkers, which would then allow any name

        def __setattr__(self, name: str, value: Any) -> None:
            # The hit paths read the greenlet's dict under the registry's key: a registry
            # assigned later (a test double, another GreenletRegistry) must change that
            # key, or Session() would keep returning the old registry's Sessions. Any
            # other registry gets no key: its hits take SQLAlchemy's path through
            # registry(). Attribute reads stay plain (only assignments come here, and a
            # scoped_session is assigned to when it is built).
            super().__setattr__(name, value)
            if name == "registry":
                key = value._key if isinstance(value, GreenletRegistry) else None
                super().__setattr__("_greenscope_key", key)

    # Session() is ScopedHit's: the current greenlet's Session read straight from its
    # dict, compiled where possible (greenscope/_hot.py). With a scopefunc the object is a
    # _KeyedByScopefunc, whose __call__ and _proxied are SQLAlchemy's.
    if TYPE_CHECKING:

        def __call__(self, **kw: Any) -> _S: ...

    @property
    def _proxied(self) -> _S:
        # Every proxied call (Session.execute, .add, ...) goes through here: read the
        # registry's slot in the current greenlet's dict directly rather than through
        # registry(), which saves a Python call (see benchmarks/). Same semantics. Not
        # compiled: the interpreter inlines a Python property's getter (3.12+'s
        # LOAD_ATTR_PROPERTY), and a C one measured slower (docs/benchmarks.md).
        try:
            return getcurrent().__dict__[self._greenscope_key]  # type: ignore[index,no-any-return]
        except KeyError:
            return self.registry()

    # inspect.signature(Session): this __call__'s, not the compiled slot's (*args, **kwargs).
    def _signature(**kw: Any) -> _S: ...  # type: ignore[empty-body]

    __signature__ = CallSignature(_signature)
    del _signature

    def _greenscope_miss(self, kw: dict[str, Any]) -> _S:
        # A miss or keyword arguments: the next __call__ after ScopedHit's in the MRO
        # (SQLAlchemy's, or a cooperative mixin's before it), with its checks and warnings.
        return super(ScopedHit, self).__call__(**kw)

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

    # ScopedHit's: the usual case (greenscope's registry, a Session) compiled where
    # possible (greenscope/_hot.py), everything else in _greenscope_remove, with the
    # same semantics. Named here too, so the API docs list it.
    remove = ScopedHit.remove

    def _greenscope_remove(self) -> None:
        registry = self.registry
        if isinstance(registry, GreenletRegistry):
            # One lookup in the greenlet's dict instead of has(), registry() and clear().
            d = getcurrent().__dict__
            value = d.get(registry._key, _MISSING)
            if value is _MISSING:
                return
            try:
                close_or_release(value)
            except BaseException:
                registry._counts.failed += 1
                raise
            finally:
                if type(registry).clear is _CLEAR:
                    registry._forget(d)  # clear() with the dict already read
                else:
                    registry.clear()  # a subclass's own clear()
            return
        try:
            if registry.has():
                close_or_release(registry())
        finally:
            registry.clear()


def _claims(session: Session) -> list[_Entry]:
    """The open ``session_scope`` entries that handed ``session`` out, oldest first.

    Kept on the Session itself (a plain attribute: ``Session`` has a ``__dict__``), so
    that every ``session_scope`` object over one registry sees the same claims. An entry
    adds itself at ``__enter__`` and takes itself off at its exit, whichever greenlet runs
    it; an entry never exited (a generator kept alive, never finalized) keeps its claim
    until the generator goes.
    """
    claims: list[_Entry] | None = session.__dict__.get("_greenscope_claims")
    if claims is None:
        claims = session.__dict__["_greenscope_claims"] = []
    return claims


def _made_by_another_scope(session: Session, exiting: _Entry) -> bool:
    """Whether another open scope of this greenlet and registry made ``session``: its unit
    of work, which an exit of a scope it is not nested in must leave alone."""
    me = getcurrent()
    return any(
        e is not exiting and e.owned and e.registry is exiting.registry and e.owner() is me
        for e in _claims(session)
    )


def _has_work(session: Session) -> bool:
    """Whether ``close()`` would do anything: a transaction, or objects to expunge."""
    return session.in_transaction() or bool(session.identity_map) or bool(session.new)


_STALE = "_greenscope_stale"  # in a Session's __dict__: left by a scope exited elsewhere


class _Entry:
    """One entry into a :class:`session_scope`: what its exit needs, whoever runs it.

    ``frame`` is the frame that ran the ``with`` statement: the same frame runs the exit,
    even when a generator holding the block is finalized by another greenlet. ``owned``:
    the registry held no Session at entry, so this entry made one and its exit ends it.
    """

    __slots__ = ("frame", "owned", "owner", "registry", "session")

    def __init__(
        self,
        frame: FrameType | None,
        owner: RawGreenlet,
        owned: bool,
        session: Session,
        registry: object,
    ) -> None:
        self.frame = frame
        self.owner = weakref.ref(owner)
        self.owned = owned
        self.session = session  # what the entry handed out: what its exit commits
        self.registry = registry


def _exited_elsewhere(entry: _Entry, session: Session, *, shutting_down: bool) -> None:
    """Another greenlet finalizes the block (an abandoned generator): the Session is its
    owner's, which may still be using it. Leave it alone; if the scope made it, mark it
    so that the owner's next scope does not inherit it."""
    if entry.owned:
        session.__dict__[_STALE] = True
    if shutting_down:
        return  # at interpreter shutdown: nothing to warn about any more
    logger.warning(
        "greenscope: a session_scope entered in another greenlet was exited here "
        "(a generator abandoned by its greenlet and finalized elsewhere); its Session is "
        "left to its own greenlet, neither committed nor closed here"
    )


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
    whoever opened it. ``commit=True`` still commits that ``Session`` when the block
    succeeds: it is a commit, not a vote, so an outer block's pending work is committed
    with it. Use it on the outermost unit of work when the whole must be atomic.

    What an exit does, in the greenlet that entered. A scope that made its ``Session`` (the
    greenlet had none) owns the unit of work: the ``Session`` it made, and any ``Session``
    made inside the block after a ``remove()``, unless another open scope of the greenlet
    made that one (two generators ending out of order). Its exit commits them
    (``commit=True``, no exception) and removes them, so nothing made inside the block
    outlives it: the next task on a thread-pool worker starts clean. A scope nested inside
    it that outlives it (a generator) loses its ``Session`` with it. A ``Session`` the
    block removed or replaced is closed once, never twice. A scope that did not make its
    ``Session`` commits only the one it handed out, and never removes.

    An exit that runs in another greenlet than its entry (a generator holding the block,
    abandoned by its greenlet and finalized by another, or by the garbage collector)
    neither commits nor closes: the Session belongs to the entry's greenlet, which may
    still be using it. If the scope owned it, it is marked stale: the next
    ``session_scope`` entered in that greenlet rolls it back and starts with a fresh one
    (a WARNING says so); otherwise it is left to that greenlet's removal, or to orphan
    cleanup when that greenlet ends.

    Usage::

        with session_scope(Session, commit=True) as session:
            session.add(obj)

        @session_scope(Session)
        def task() -> None: ...

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 Exits are matched to their entries, whichever greenlet runs them.
    """

    __slots__ = ("_commit", "_entries", "_session")

    def __init__(self, session: _sa_scoped_session[_S], *, commit: bool = False) -> None:
        if not isinstance(session, _sa_scoped_session):
            raise TypeError(
                "greenscope.session_scope(session) takes a scoped_session (the object you "
                f"call to get the current Session), not {type(session).__name__}"
            )
        self._session = session
        self._commit = commit
        # Entries not exited yet, oldest first: usually one (a fresh object per `with`).
        self._entries: list[_Entry] = []

    def __enter__(self) -> _S:
        registry = self._session.registry
        if registry.has():
            current = registry()
            if current.__dict__.get(_STALE) and not any(
                e.owned and e.registry is registry for e in _claims(current)
            ):
                logger.warning(
                    "greenscope: a session_scope whose generator was finalized in another "
                    "greenlet left its Session in this one; it is rolled back and removed "
                    "before this scope starts, so that no unit of work inherits it"
                )
                self._session.remove()
        owned = not registry.has()
        session = self._session()
        entry = _Entry(sys._getframe(1), getcurrent(), owned, session, registry)
        _claims(session).append(entry)
        self._entries.append(entry)
        return session

    def _pop_entry(self, frame: FrameType | None, me: RawGreenlet | None) -> _Entry | None:
        entries = self._entries
        for i in range(len(entries) - 1, -1, -1):  # the `with` statement's own frame
            if entries[i].frame is frame:
                return entries.pop(i)
        for i in range(len(entries) - 1, -1, -1):  # entered elsewhere (an ExitStack)
            if entries[i].owner() is me:
                return entries.pop(i)
        if len(entries) == 1:
            return entries.pop()
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            me: RawGreenlet | None = getcurrent()
        except RuntimeError:  # a generator finalized while the interpreter shuts down
            me = None
        entry = self._pop_entry(sys._getframe(1), me)
        if entry is None:
            raise RuntimeError(
                "greenscope.session_scope: __exit__() without a matching __enter__(); "
                "enter each scope once per exit (use `with session_scope(...)`)"
            )
        entry.frame = None  # no reference cycle through the frame
        session, entry.session = entry.session, None  # type: ignore[assignment]
        claims = _claims(session)
        if entry in claims:
            claims.remove(entry)
        if me is None or entry.owner() is not me:
            _exited_elsewhere(entry, session, shutting_down=me is None)
            return
        registry = self._session.registry
        current = registry() if registry.has() else None
        # What this exit ends: the current Session if the block made it (this entry, or
        # after a remove() in the block), not if another open scope did.
        ours = (
            current is not None
            and entry.owned
            and (current is session or not _made_by_another_scope(current, entry))
        )
        try:
            if self._commit and exc_type is None:
                session.commit()  # the Session this entry handed out, even if replaced
                if ours and current is not None and current is not session:
                    current.commit()  # made in the block after a remove(): its work too
        finally:
            if entry.owned:
                try:
                    if ours:
                        self._session.remove()
                finally:
                    # Replaced inside the block (set(), clear()): still ours to close, or
                    # its connection would stay out until GC. Removed: nothing left to do.
                    if session is not current and _has_work(session):
                        close_or_release(session)

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


class _KeyedByScopefunc(scoped_session[_S]):
    """A greenscope ``scoped_session`` built with a ``scopefunc``: SQLAlchemy's registry.

    Its ``__call__`` and ``_proxied`` are SQLAlchemy's, without greenscope's greenlet fast
    path in front (which could only miss): ``greenscope.flask``'s per-app-context
    sessions are built this way, and called on every request. ``remove()`` stays
    greenscope's.
    """

    __call__ = _sa_scoped_session.__call__
    _proxied = _sa_scoped_session._proxied
