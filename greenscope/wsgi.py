"""WSGI middleware: remove the request's Sessions when its unit of work ends.

For any WSGI server that runs each request in a greenlet or thread: gevent's
``pywsgi.WSGIServer``, uWSGI with gevent, waitress, gunicorn with a worker or hooks of
your choice.

Usage::

    from greenscope.wsgi import GreenscopeMiddleware

    app = GreenscopeMiddleware(app)                      # rollback + remove
    app = GreenscopeMiddleware(app, commit_on_success=True)

When removal happens. It follows the *request*, not the thread that happens to call
``close()``:

* a body produced whole (a list, or a ``wsgi.file_wrapper``): when the application
  returns, since no application code runs while it is sent. Some servers (waitress)
  send a file from their main thread and call its ``close()`` there, after the task
  thread moved on to the next request;
* a streamed body (an iterator): when it is exhausted, in the greenlet or thread that
  iterates it; and at its ``close()`` when that runs in the request's own greenlet
  (always, under gunicorn and gevent's pywsgi): a body abandoned half-way (the client
  hung up) or failing is rolled back then. A ``close()`` from another thread never
  touches that thread's Sessions: the abandoned request's are removed at the start of
  the next request its greenlet serves through this middleware.

``commit_on_success=True`` commits the request's Sessions **once**, before anything is
sent, if the response succeeds so far (status below 500, no exception):

* a list or file body: when the application returns;
* a streamed body: when it has produced its first chunk (or ended empty), before that
  chunk is handed to the server; a body whose first chunk raises commits nothing;
* the legacy ``write()`` callable: before the first ``write()``.

A failing commit raises there, which the server turns into a 500: the client is never
told "success" for a write that is then lost. Writes the body makes *after* that point
can no longer be acknowledged honestly: they are rolled back at the end, with a WARNING
(flushes and ORM DML are detected; a write through ``session.connection()`` is rolled
back all the same, without the warning). A body that fails after the commit cannot
undo it: the client sees a broken response for committed work. Exceptions and 5xx
responses are rolled back. Several Sessions are committed one after the other (no
two-phase commit). It is off by default: committing is the application's decision.

Not with Flask apps whose teardown removes the Session (``greenscope.flask``): Flask
removes it before the first chunk exists. That combination is refused.

.. versionadded:: 0.1
.. versionchanged:: 0.2 One commit, at the first chunk; removal follows the request.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Protocol

from greenlet import getcurrent
from sqlalchemy import TextClause, event
from sqlalchemy.orm import ORMExecuteState, Session

import greenscope

__all__ = ["GreenscopeMiddleware"]

logger = logging.getLogger("greenscope")

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class StartResponse(Protocol):
    def __call__(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: _ExcInfo | None = ...,
        /,
    ) -> Callable[[bytes], object]: ...


WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


_WROTE = "greenscope.wrote"  # in Session.info: a write since the last commit point
_MARK = "greenscope:commit_on_success"  # in a greenlet's dict: see greenscope.flask
_OPEN = "greenscope:wsgi-request"  # in a greenlet's dict: its unfinished request


def _note_flush(session: Session, flush_context: Any) -> None:
    session.info[_WROTE] = True


_READS = ("SELECT", "SHOW", "EXPLAIN", "VALUES", "PRAGMA", "DESCRIBE")


def _note_execute(state: ORMExecuteState) -> None:
    statement = state.statement
    if state.is_insert or state.is_update or state.is_delete:
        state.session.info[_WROTE] = True
    elif isinstance(statement, TextClause):  # text("INSERT ..."): judge by its verb
        verb = statement.text.lstrip().split(None, 1)[:1]
        if not verb or verb[0].upper() not in _READS:
            state.session.info[_WROTE] = True


def _listen_for_writes() -> None:
    """Class-level listeners (once per process) so late writes can be reported."""
    if not event.contains(Session, "after_flush", _note_flush):
        event.listen(Session, "after_flush", _note_flush)
        event.listen(Session, "do_orm_execute", _note_execute)


def _commit_all(sessions: list[Any]) -> None:
    for session in sessions:
        commit = getattr(session, "commit", None)
        if commit is not None:
            commit()
            if isinstance(session, Session):
                session.info.pop(_WROTE, None)


class _Request:
    """One request's state. The commit point passes once; removal may run again."""

    __slots__ = (
        "closed_elsewhere",
        "commit",
        "committed",
        "did_commit",
        "failed",
        "finished",
        "nested",
        "owner",
        "snapshot",
        "status",
        "wrote",
    )

    def __init__(self, commit: bool) -> None:
        self.commit = commit
        self.status: int | None = None
        self.failed = False
        self.committed = False  # the commit point has passed (committed or not)
        self.did_commit = False  # ...and the request's Sessions were committed there
        self.finished = False
        self.closed_elsewhere = False
        self.wrote = False  # the app used the write() callable
        self.snapshot: list[Any] = []  # the request's Sessions when the app returned
        self.nested = False
        g = getcurrent()
        self.owner = weakref.ref(g)
        d = g.__dict__
        previous: _Request | None = d.get(_OPEN)
        if previous is not None and not previous.finished:
            if previous.closed_elsewhere:
                # Its close() ran in another thread, which could not remove what it left
                # in this greenlet: that request is over, so nothing of it may reach this.
                previous.finish()
            else:
                # Called inside a request this middleware already serves (a second
                # GreenscopeMiddleware, or a sub-request through it): the outer request
                # owns the unit of work, its commit and its removal.
                self.nested = True
                if commit and not previous.commit:
                    logger.warning(
                        "greenscope: a GreenscopeMiddleware(commit_on_success=True) runs "
                        "inside another GreenscopeMiddleware without it; the outer one owns "
                        "the request and does not commit. Wrap the app once."
                    )
                return
        d[_OPEN] = self
        if commit:
            d[_MARK] = True

    def succeeded(self) -> bool:
        return not self.failed and self.status is not None and self.status < 500

    def commit_point(self) -> None:
        """Nothing has been sent yet: commit if the response succeeded so far. Once.

        Only the request's own Sessions: those of its greenlet, or, when another greenlet
        iterates the body, those it held when the app returned.
        """
        if self.committed or self.nested:
            return
        self.committed = True
        if self.commit and self.succeeded():
            try:
                _commit_all(greenscope.current_sessions() if self.in_owner() else self.snapshot)
            except BaseException:
                self.failed = True
                raise
            self.did_commit = True

    def finish(self) -> None:
        """Remove the request's Sessions. In the request's greenlet only; idempotent."""
        if self.nested:
            return
        d = getcurrent().__dict__
        try:
            if self.did_commit:
                self._report_late_writes()
        finally:
            if not self.finished:
                self.finished = True
                if d.get(_OPEN) is self:
                    del d[_OPEN]
                if self.commit:
                    d.pop(_MARK, None)
            greenscope.remove_current()

    def _report_late_writes(self) -> None:
        for session in greenscope.current_sessions():
            if not isinstance(session, Session):
                continue
            late = session.info.pop(_WROTE, False) or session.new or session.dirty
            if late or session.deleted:
                logger.warning(
                    "greenscope: the response body wrote to the database after the "
                    "request was committed and its status sent; that write is rolled "
                    "back, since it can no longer be acknowledged. Write before returning "
                    "the body (or before its first chunk)."
                )
                return

    def in_owner(self) -> bool:
        return self.owner() is getcurrent()

    def closed(self) -> None:
        """The server called the body's close(), after its original close()."""
        if self.in_owner():
            self.finish()
        elif not self.finished:
            self.closed_elsewhere = True


class _ClosingIterator:
    """Wraps a streamed body: commits at its first chunk, removes when it ends."""

    __slots__ = ("_close", "_iterator", "_request")

    def __init__(self, result: Iterable[bytes], request: _Request) -> None:
        self._iterator: Iterator[bytes] = iter(result)
        self._close: Callable[[], object] | None = getattr(result, "close", None)
        self._request = request

    def __iter__(self) -> _ClosingIterator:
        return self

    def __next__(self) -> bytes:
        request = self._request
        try:
            chunk = next(self._iterator)
        except StopIteration:
            if request.in_owner():
                request.commit_point()  # an empty body: nothing was sent yet
                request.finish()
            raise
        except BaseException:
            request.failed = True
            raise
        if not request.committed:
            request.commit_point()
        return chunk

    def close(self) -> None:
        _close(self._close, self._request)


class _ClosingList(list[bytes]):
    """A body the app produced whole: stays a list, so servers still set Content-Length."""

    __slots__ = ("_close", "_request")
    _close: Callable[[], object] | None
    _request: _Request

    def close(self) -> None:
        _close(self._close, self._request)


def _close(original: Callable[[], object] | None, request: _Request) -> None:
    try:
        if original is not None:
            original()
    except BaseException:
        request.failed = True
        raise
    finally:
        request.closed()


def _wrap(result: Iterable[bytes], request: _Request, environ: dict[str, Any]) -> Iterable[bytes]:
    original: Callable[[], object] | None = getattr(result, "close", None)
    if request.commit:
        request.snapshot = greenscope.current_sessions()  # the owner's, for commit_point
    if isinstance(result, (list, tuple)):
        request.commit_point()
        request.finish()  # complete: no app code runs while it is sent
        body = _ClosingList(result)
        body._close, body._request = original, request
        return body
    file_wrapper = environ.get("wsgi.file_wrapper")
    if isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
        # Returned as is, so the server can still use sendfile(); only close() is ours.
        # The server may send it (and close it) from another thread: finish now.
        request.commit_point()
        request.finish()
        try:
            setattr(result, "close", lambda: _close(original, request))  # noqa: B010 - typed as Iterable
        except (AttributeError, TypeError):
            return _ClosingIterator(result, request)
        return result
    return _ClosingIterator(result, request)


class GreenscopeMiddleware:
    """Remove (and optionally commit) the request's Sessions at the response's close().

    Make it the outermost middleware: code that runs after its ``close()`` (an outer
    middleware's own ``close()``) and uses a Session would create a new one, which the
    next keep-alive request on the same greenlet would inherit.
    """

    def __init__(self, app: WSGIApp, *, commit_on_success: bool = False) -> None:
        if not callable(app):
            raise TypeError(f"GreenscopeMiddleware wraps a WSGI application; got {app!r}")
        if commit_on_success:
            flask_app = _flask_app_removing_at_teardown(app)
            if flask_app is not None:
                raise ValueError(
                    f"GreenscopeMiddleware(commit_on_success=True) cannot commit for "
                    f"{flask_app!r}: its teardown (greenscope.flask) removes the Session "
                    "when the app returns, before the middleware's commit point, so "
                    "every write would be rolled back. Commit in your views "
                    "(db.session.commit()) and wrap the app with "
                    "GreenscopeMiddleware(app) alone."
                )
            _listen_for_writes()
        self.app = app
        self.commit_on_success = commit_on_success

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request = _Request(self.commit_on_success)

        def _start_response(
            status: str, headers: list[tuple[str, str]], exc_info: _ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            try:
                request.status = int(status.split(None, 1)[0])
            except (ValueError, IndexError):
                request.status = 500
            if exc_info is not None:
                request.failed = True
            write = start_response(status, headers, exc_info)
            if not request.commit:
                return write

            def _write(data: bytes) -> object:
                # The legacy write() callable sends at once: commit before the first one.
                if not request.wrote:
                    request.wrote = True
                    request.commit_point()
                return write(data)

            return _write

        result: Iterable[bytes] | None = None
        try:
            result = self.app(environ, _start_response)
            return _wrap(result, request, environ)
        except BaseException:
            request.failed = True
            try:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            finally:
                request.finish()
            raise


def _flask_app_removing_at_teardown(app: Any) -> Any | None:
    """The Flask app inside ``app`` whose teardown removes greenscope Sessions, if any.

    Follows bound methods (``app.wsgi_app``) and the usual wrapper attributes; a chain
    it cannot see into is caught at the first request instead (greenscope.flask's
    teardown raises while a commit-on-success request is running).
    """
    seen: set[int] = set()
    todo = [app]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        extensions = getattr(obj, "extensions", None)
        if isinstance(extensions, dict) and callable(getattr(obj, "wsgi_app", None)):
            ext = extensions.get("sqlalchemy")
            if extensions.get("greenscope.remove_at_teardown") or (
                type(ext).__module__ == "greenscope.flask"
            ):
                return obj
        todo.extend(getattr(obj, attr, None) for attr in ("__self__", "app", "__wrapped__"))
    return None
