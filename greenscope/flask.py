"""Flask and Flask-SQLAlchemy: greenscope's guarantees for ``db.session``, in one line.

Flask-SQLAlchemy 3.x::

    from greenscope.flask import SQLAlchemy   # was: from flask_sqlalchemy import SQLAlchemy

    db = SQLAlchemy(app)

Plain Flask with a :class:`greenscope.scoped_session`::

    from greenscope.flask import remove_at_teardown

    remove_at_teardown(app, Session)

Flask-SQLAlchemy 3 keys ``db.session`` on ``id()`` of the current app context and
removes it in ``teardown_appcontext``. That leaves the gaps greenscope closes: an app
context pushed in a greenlet that ends without popping it (a background job, a spawned
greenlet) keeps its Session and connection until garbage collection, and a new context
that reuses a dead one's ``id()`` is handed its stale Session. Here ``db.session`` is
keyed on the current greenlet *and* the current app context (checked by identity, held
by weak reference): every app context still gets its own Session, as in
Flask-SQLAlchemy, and when a greenlet ends, the Sessions of every context it left
behind are closed (rolled back) by greenscope's reaper. Everything else is
Flask-SQLAlchemy's: models, ``Model.query``, ``db.paginate``, ``db.get_or_404``, binds,
removal at ``teardown_appcontext``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

try:
    import flask
    from flask.globals import app_ctx
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "greenscope.flask needs Flask (and Flask-SQLAlchemy for its SQLAlchemy class); "
        "install them with: pip install 'greenscope[flask]'"
    ) from exc

from greenlet import getcurrent
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as _sa_scoped_session
from sqlalchemy.util import ScopedRegistry

import greenscope
from greenscope import _debug, _registry
from greenscope._registry import GreenletRegistry, RegistryStats, close_or_release
from greenscope._scoping import scoped_session

__all__ = ["AppContextRegistry", "SQLAlchemy", "remove_at_teardown"]

# Set in a greenlet's dict by GreenscopeMiddleware(commit_on_success=True) while it serves
# a request (the same string lives in greenscope.wsgi, which must not import Flask).
COMMIT_ON_SUCCESS_MARK = "greenscope:commit_on_success"

logger = logging.getLogger("greenscope")


def _current_app_context() -> Any:
    # Outside an app context this raises Flask's own "Working outside of application
    # context" RuntimeError, exactly as Flask-SQLAlchemy's scope function does.
    return app_ctx._get_current_object()  # type: ignore[attr-defined]


class AppContextSessions:
    """One greenlet's Sessions: app context id -> (weakref to the context, Session)."""

    __slots__ = ("entries", "registry")

    def __init__(self, registry: AppContextRegistry) -> None:
        self.registry = registry
        # Changed by the owner and by close(), which may run in another thread
        # (close_all): both under greenscope's values lock (see AppContextRegistry._store).
        self.entries: dict[int, tuple[weakref.ref[Any], Session]] = {}

    def greenscope_sessions(self) -> list[Session]:
        """The Sessions held (for :func:`greenscope.current_sessions` and cleanup)."""
        return [session for _, session in list(self.entries.values())]

    def close(self, orphan: bool = True) -> None:
        """Close every Session left: the greenlet ended (``orphan``) or its request did.

        Every one is closed even if a close is killed (``GreenletExit``): the first such
        error is re-raised once all are handled, as :func:`greenscope.remove_current`
        does, so no Session is dropped unclosed with its connection checked out.
        """
        with _registry._values_lock:  # against the owner's _pop() and _store()
            entries, self.entries = self.entries, {}
        fatal: BaseException | None = None
        for _, session in entries.values():
            try:
                self.registry._reap(session, orphan)
            except BaseException as exc:  # _reap swallows Exceptions: a kill
                fatal = fatal or exc
        if fatal is not None:
            raise fatal


class _ContainerRegistry(GreenletRegistry[AppContextSessions]):
    """The per-greenlet containers: tells a container how its close is counted."""

    __slots__ = ()

    def _close_one(self, value: AppContextSessions, orphan: bool) -> None:
        value.close(orphan)


class AppContextRegistry(ScopedRegistry[Session]):
    """SQLAlchemy's registry protocol keyed on (current greenlet, current app context).

    Per greenlet the Sessions live in a :class:`~greenscope.GreenletRegistry` value, so a
    greenlet's Sessions are closed when it ends; within it, the app context is checked by
    identity,
    so a context reusing a dead one's ``id()`` gets a new Session (the dead one's is
    closed on the spot).
    """

    __slots__ = (
        "__weakref__",
        "_created",
        "_failed",
        "_greenlets",
        "_live",
        "_reaped",
        "_removed",
    )

    def __init__(self, createfunc: Callable[[], Session]) -> None:
        self.createfunc = createfunc
        self.scopefunc = _current_app_context
        self._greenlets: GreenletRegistry[AppContextSessions] = _ContainerRegistry(
            lambda: AppContextSessions(self)
        )
        self._created = self._removed = self._reaped = self._failed = self._live = 0
        _APP_CONTEXT_REGISTRIES.add(self)

    def _entry(self, create: bool) -> tuple[AppContextSessions | None, Any, Session | None]:
        ctx = _current_app_context()
        if not create and not self._greenlets.has():
            return None, ctx, None  # never create a container just to look
        sessions = self._greenlets()
        entry = sessions.entries.get(id(ctx))
        if entry is None:
            return sessions, ctx, None
        ref, session = entry
        if ref() is ctx:
            return sessions, ctx, session
        # A dead context's Session under a reused id: never hand it out; close it here
        # (this is its own greenlet, where blocking is allowed).
        if self._pop(sessions, ctx) is not None:  # else close_all() took it, and closes it
            self._reap(session)
        return sessions, ctx, None

    def _pop(self, sessions: AppContextSessions, ctx: Any) -> Session | None:
        """Take ``ctx``'s entry out of ``sessions``; None if close() took it first."""
        with _registry._values_lock:
            entry = sessions.entries.pop(id(ctx), None)
        return entry[1] if entry is not None else None

    def _reap(self, session: Session, orphan: bool = True) -> None:
        """Close a Session whose app context or greenlet is gone (``orphan``), or whose
        request ended (removal); log, never raise an ``Exception``."""
        self._live -= 1
        if orphan:
            self._reaped += 1
        else:
            self._removed += 1
        try:
            close_or_release(session)
        except Exception:
            self._failed += 1
            logger.exception("greenscope: closing a Flask-SQLAlchemy Session failed")
        except BaseException:
            self._failed += 1
            raise

    def __call__(self) -> Session:
        sessions, ctx, session = self._entry(create=True)
        if session is None:
            self._greenlets._check_open()  # shut down by close_all(): refuse, as it does
            session = self.createfunc()
            assert sessions is not None
            self._store(sessions, ctx, session)
        return session

    def has(self) -> bool:
        return self._entry(create=False)[2] is not None

    def set(self, obj: Session) -> None:
        self._greenlets._check_open()
        sessions, ctx, _ = self._entry(create=True)
        assert sessions is not None
        if self._store(sessions, ctx, obj) is not None:  # replaced, not closed
            self._live -= 1
            self._removed += 1

    def _store(
        self, sessions: AppContextSessions, ctx: Any, session: Session
    ) -> tuple[Any, Session] | None:
        """Store ``session`` for ``ctx``; return the entry it replaced, if any. Into a new
        container if close_all() took this one meanwhile: the greenlet's own dict no
        longer holds it (take() unregisters it under the same lock), and its close would
        never see the new Session.

        The lock is re-entrant, so a greenlet switch in here (a GC pass whose finalizer
        does gevent I/O) could let close_all() of this thread in: the greenlet's watch
        is listed as being changed first, and a take() then leaves it alone; a take()
        switched out in the middle of this greenlet's watch gets a new container stored
        beside it (see greenscope._registry)."""
        key, entry = id(ctx), (weakref.ref(ctx), session)
        while True:
            with _registry._values_lock:
                d = getcurrent().__dict__
                watch = d.get(_registry._WATCH_KEY)  # there: the container is stored
                taking = watch in _registry._TAKING
                with _registry._Changing(watch):
                    if not taking and d.get(self._greenlets._key) is sessions:
                        old: tuple[Any, Session] | None = sessions.entries.get(key)
                        sessions.entries[key] = entry
                        break
            if taking:  # the greenlet's dict still holds the container being taken
                sessions = AppContextSessions(self)
                self._greenlets.set(sessions)  # into a new watch (see _store_locked)
            else:
                sessions = self._greenlets()  # a new container (or one stored meanwhile)
        if _debug.debugging.done:
            _debug.tag(session, getcurrent())
        self._created += 1
        self._live += 1
        return old

    def clear(self) -> None:
        sessions, ctx, session = self._entry(create=False)
        if sessions is None:
            return
        if session is not None and self._pop(sessions, ctx) is not None:
            self._live -= 1
            self._removed += 1
        if not sessions.entries:
            self._greenlets.clear()

    def stats(self) -> RegistryStats:
        """Counters of Sessions (not of greenlets); see :class:`greenscope.RegistryStats`."""
        return RegistryStats(self._created, self._removed, self._reaped, self._failed, self._live)


# For the fork hook below: every AppContextRegistry of the process, weakly.
_APP_CONTEXT_REGISTRIES: weakref.WeakSet[AppContextRegistry] = weakref.WeakSet()


def _forget_inherited() -> None:
    # greenscope forgets (never closes) the per-greenlet containers a forked child
    # inherits; the Sessions in them are forgotten with them, and counted so.
    for registry in list(_APP_CONTEXT_REGISTRIES):
        registry._removed += registry._live
        registry._live = 0


os.register_at_fork(after_in_child=_forget_inherited)


def _app_context_scoped_session(factory: sessionmaker[Any]) -> scoped_session[Any]:
    session: scoped_session[Any] = scoped_session(factory, scopefunc=_current_app_context)
    session.registry = AppContextRegistry(factory)
    return session


class _FlaskSQLAlchemyMissing:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError(
            "greenscope.flask.SQLAlchemy needs Flask-SQLAlchemy 3: pip install 'greenscope[flask]'"
        )


_base: Any
try:
    import flask_sqlalchemy

    _base = flask_sqlalchemy.SQLAlchemy
except ImportError:  # plain Flask users only need remove_at_teardown
    _base = _FlaskSQLAlchemyMissing


class SQLAlchemy(_base):
    """Flask-SQLAlchemy's extension with ``db.session`` backed by greenscope.

    A ``scopefunc`` in ``session_options`` is honoured as in Flask-SQLAlchemy (and then
    greenscope's per-greenlet scoping does not apply). Every engine it makes is
    registered with :func:`greenscope.register_engine`, so forked workers (gunicorn's
    ``--preload``, Celery's prefork pool) get fresh pools.

    Not with :class:`greenscope.wsgi.GreenscopeMiddleware` ``(commit_on_success=True)``:
    Flask tears the app context down (removing ``db.session``) before the middleware
    could commit, so every write would be rolled back. That combination raises
    :class:`RuntimeError`; commit in the view (``db.session.commit()``).
    """

    def _make_engine(self, bind_key: str | None, options: dict[str, Any], app: Any) -> Any:
        engine = super()._make_engine(bind_key, options, app)
        greenscope.register_engine(engine)
        return engine

    def _teardown_session(self, exc: BaseException | None) -> None:
        _refuse_commit_on_success("greenscope.flask.SQLAlchemy")
        super()._teardown_session(exc)

    def _make_scoped_session(self, options: dict[str, Any]) -> _sa_scoped_session[Any]:
        scope = options.pop("scopefunc", None)
        factory = self._make_session_factory(options)
        if scope is not None:
            return scoped_session(factory, scope)
        return _app_context_scoped_session(factory)


def remove_at_teardown(app: flask.Flask, session: _sa_scoped_session[Any]) -> None:
    """Remove ``session``'s current Session whenever an app context of ``app`` ends.

    For plain Flask apps using :class:`greenscope.scoped_session` directly; Flask runs
    ``teardown_appcontext`` after the request, also when it failed.
    """
    if not isinstance(session, _sa_scoped_session):
        raise TypeError(
            "remove_at_teardown(app, session) takes the scoped_session you call to get the "
            f"current Session, not {type(session).__name__}"
        )

    app.extensions["greenscope.remove_at_teardown"] = True

    @app.teardown_appcontext
    def _remove_session(exc: BaseException | None) -> None:
        _refuse_commit_on_success("greenscope.flask.remove_at_teardown")
        session.remove()


def _refuse_commit_on_success(what: str) -> None:
    if getcurrent().__dict__.get(COMMIT_ON_SUCCESS_MARK):
        raise RuntimeError(
            f"greenscope: {what} removes the request's Session when Flask tears down the "
            "app context, before GreenscopeMiddleware(commit_on_success=True) could commit "
            "it, so every write would be rolled back. Commit in your view "
            "(session.commit()) and use GreenscopeMiddleware(app) without "
            "commit_on_success."
        )
