"""WSGI middleware: remove the request's Sessions when the response is closed.

For any WSGI server that runs each request in a greenlet or thread: gevent's
``pywsgi.WSGIServer``, uWSGI with gevent, waitress, gunicorn with a worker or hooks of
your choice. Removal happens at the response iterable's ``close()`` (PEP 3333), i.e.
after the body was sent, not when the application returns: a streaming body still has
its Session while it is being iterated.

Usage::

    from greenscope.wsgi import GreenscopeMiddleware

    app = GreenscopeMiddleware(app)                      # rollback + remove
    app = GreenscopeMiddleware(app, commit_on_success=True)

With ``commit_on_success=True`` the request's Sessions are committed when the response
succeeds (status below 500, no exception): *before anything is sent* when the status is
known by then (the application returned, or called ``write()``; a failing commit then
becomes the exception the server turns into a 500), and again at ``close()`` for what
the body wrote while it was produced, but only if it was produced to the end: a client
that hung up mid-body, or a body that raised, gets nothing committed past that point.
Exceptions and 5xx responses are rolled back. Several Sessions are committed one after the other
(no two-phase commit). It is off by default: committing is the application's decision.

.. versionadded:: 0.1
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Protocol

import greenscope

__all__ = ["GreenscopeMiddleware"]

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


def _commit_all() -> None:
    sessions = greenscope.current_sessions()
    for session in sessions:
        commit = getattr(session, "commit", None)
        if commit is not None:
            commit()


class _Request:
    """One request's state; ``finish()`` runs exactly once."""

    __slots__ = ("commit", "completed", "failed", "finished", "status", "wrote")

    def __init__(self, commit: bool) -> None:
        self.commit = commit
        self.status: int | None = None
        self.failed = False
        self.completed = False  # the whole body was produced (not abandoned mid-way)
        self.finished = False
        self.wrote = False  # the app used the write() callable

    def succeeded(self) -> bool:
        return not self.failed and self.status is not None and self.status < 500

    def commit_before_sending(self) -> None:
        # Status known, nothing sent yet (PEP 3333: headers wait for the first chunk):
        # a failing commit still becomes the server's error response.
        if self.commit and self.succeeded():
            _commit_all()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            # Writes made while the body was produced; nothing if the client went away
            # or the body failed half-way (those are rolled back by the removal).
            if self.commit and self.completed and self.succeeded():
                _commit_all()
        finally:
            greenscope.remove_current()


class _ClosingIterator:
    """Wraps a response iterable: notes failure and completion, finishes at ``close()``."""

    __slots__ = ("_close", "_iterator", "_request")

    def __init__(self, result: Iterable[bytes], request: _Request) -> None:
        self._iterator: Iterator[bytes] = iter(result)
        self._close: Callable[[], object] | None = getattr(result, "close", None)
        self._request = request

    def __iter__(self) -> _ClosingIterator:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._iterator)
        except StopIteration:
            self._request.completed = True
            raise
        except BaseException:
            self._request.failed = True
            raise

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
        request.finish()


def _wrap(result: Iterable[bytes], request: _Request, environ: dict[str, Any]) -> Iterable[bytes]:
    original: Callable[[], object] | None = getattr(result, "close", None)
    if isinstance(result, (list, tuple)):
        request.completed = True
        body = _ClosingList(result)
        body._close, body._request = original, request
        return body
    file_wrapper = environ.get("wsgi.file_wrapper")
    if isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
        # Returned as is, so the server can still use sendfile(); only close() is ours.
        request.completed = True
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
                    request.commit_before_sending()
                return write(data)

            return _write

        result: Iterable[bytes] | None = None
        try:
            result = self.app(environ, _start_response)
            if not request.wrote:
                request.commit_before_sending()
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
