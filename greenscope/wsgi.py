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
succeeded (status below 500, no exception): *before the body is sent* when the
application set the status before returning (the usual case; a failing commit then
becomes the exception the server turns into a 500), or at ``close()`` for a body that
starts the response lazily (then the client may already have the status). Exceptions
and 5xx responses are rolled back. Several Sessions are committed one after the other
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

    __slots__ = ("committed", "failed", "finished", "status")

    def __init__(self) -> None:
        self.status: int | None = None
        self.failed = False
        self.committed = False
        self.finished = False

    def succeeded(self) -> bool:
        return not self.failed and self.status is not None and self.status < 500

    def finish(self, commit: bool) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            if commit and not self.committed and self.succeeded():
                self.committed = True
                _commit_all()
        finally:
            greenscope.remove_current()


class _ClosingIterator:
    """Wraps the response iterable: notes failures, finishes the request at ``close()``."""

    __slots__ = ("_close", "_commit", "_iterator", "_request")

    def __init__(self, result: Iterable[bytes], request: _Request, commit: bool) -> None:
        self._iterator: Iterator[bytes] = iter(result)
        self._close: Callable[[], object] | None = getattr(result, "close", None)
        self._request = request
        self._commit = commit

    def __iter__(self) -> _ClosingIterator:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except BaseException:
            self._request.failed = True
            raise

    def close(self) -> None:
        try:
            if self._close is not None:
                self._close()
        except BaseException:
            self._request.failed = True
            raise
        finally:
            self._request.finish(self._commit)


class GreenscopeMiddleware:
    """Remove (and optionally commit) the request's Sessions at the response's close()."""

    def __init__(self, app: WSGIApp, *, commit_on_success: bool = False) -> None:
        if not callable(app):
            raise TypeError(f"GreenscopeMiddleware wraps a WSGI application; got {app!r}")
        self.app = app
        self.commit_on_success = commit_on_success

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request = _Request()

        def _start_response(
            status: str, headers: list[tuple[str, str]], exc_info: _ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            try:
                request.status = int(status.split(None, 1)[0])
            except ValueError:
                request.status = 500
            if exc_info is not None:
                request.failed = True
            return start_response(status, headers, exc_info)

        result: Iterable[bytes] | None = None
        try:
            result = self.app(environ, _start_response)
            if self.commit_on_success and request.succeeded():
                # Status known, body not sent yet (PEP 3333: headers wait for the first
                # chunk): a failing commit still becomes an error response.
                request.committed = True
                _commit_all()
        except BaseException:
            request.failed = True
            try:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            finally:
                request.finish(commit=False)
            raise
        return _ClosingIterator(result, request, self.commit_on_success)
