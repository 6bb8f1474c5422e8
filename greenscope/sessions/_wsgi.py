"""``SessionMiddleware``: server-side HTTP sessions for any WSGI app.

The cookie holds a random id, signed (itsdangerous), never the data; the data lives in a
:class:`SQLAlchemyStore`. ``environ["greenscope.session"]`` is a dict-like
:class:`HTTPSession`, loaded from the store on first use, saved only when modified.

When it is saved, and when not:

* The app's ``start_response`` is held back until the response's first chunk exists: a
  body produced whole (a list, a ``wsgi.file_wrapper``) when the app returns, a streamed
  one when it yields its first chunk, the legacy ``write()`` at its first call. Only
  then, if the status is below 500 and no ``exc_info`` was given, is a modified session
  saved and its ``Set-Cookie`` added, and the server's ``start_response`` called. A
  failing save fails the request before anything is sent.
* A 5xx response, an app that raises before its first chunk (also after calling
  ``start_response``), or one that calls ``start_response`` again with ``exc_info``,
  saves nothing: what a failed request changed in the session is not kept.
* A streamed body that changes the session *after* its first chunk can no longer be
  saved honestly (the headers are gone, and the request may still fail): those changes
  are dropped with a WARNING, like greenscope.wsgi's late writes.
* A session that ended while the request ran (logged out by another request, expired)
  is not brought back by saving it: the change is dropped and the cookie expired. An id
  whose session is gone when it is loaded is never reused: the next save takes a new id.
* Concurrent requests of one session each save the whole session: the last save wins,
  and a key the other request added is lost (see the sessions guide).

A response that read or set the session carries ``Vary: Cookie``, so that no shared
cache serves one user's page to another.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from http.cookies import SimpleCookie
from typing import Any

from greenscope.sessions._model import utcnow
from greenscope.sessions._store import SQLAlchemyStore

__all__ = ["HTTPSession", "SessionMiddleware"]

logger = logging.getLogger("greenscope")

ENVIRON_KEY = "greenscope.session"
_SALT = "greenscope.sessions"
_SAMESITE = {"Strict", "Lax", "None"}
# RFC 6265's cookie-name: an RFC 7230 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def new_id() -> str:
    """A random session id: 32 bytes, url-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def signer(secret_key: str | bytes | list[Any], salt: str = _SALT) -> Any:
    """An itsdangerous Signer; with a list of keys, it verifies with any, signs with the
    last."""
    try:
        from itsdangerous import Signer  # noqa: PLC0415 - the sessions extra
    except ImportError as exc:
        raise ImportError(
            "greenscope.sessions needs itsdangerous to sign its cookies; install it with: "
            "pip install 'greenscope[sessions]'"
        ) from exc
    return Signer(secret_key, salt=salt)


class HTTPSession(MutableMapping[str, Any]):
    """One request's HTTP session: a dict of JSON-serializable values.

    Loaded from the store on first access (a request that never touches it costs no
    query). ``modified`` is set by every change; :meth:`regenerate` gives the session a
    new id and keeps its data, against session fixation (call it at log-in).
    """

    def __init__(self, load: Callable[[], Loaded | None], session_id: str | None) -> None:
        self._load = load  # None: the cookie's session is gone (ended, expired)
        self._data: dict[str, Any] | None = None
        self.expires_at: dt.datetime | None = None  # the stored expiry, once loaded
        self.session_id = session_id  # None: no live session; a new id on the first save
        self.modified = False
        self.regenerated = False
        self.accessed = False  # read or loaded: the response depends on the cookie

    @property
    def new(self) -> bool:
        """True when the request brought no cookie of a live session."""
        self._d()
        return self.session_id is None

    def _d(self) -> dict[str, Any]:
        if self._data is None:
            self.accessed = True
            loaded = self._load()
            if loaded is None:
                # Its session ended (logged out, expired): never bring that id back.
                self.session_id = None
                loaded = ({}, None)
            self._data, self.expires_at = loaded
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._d()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._d()[key] = value
        self.modified = True

    def __delitem__(self, key: str) -> None:
        del self._d()[key]
        self.modified = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._d())

    def __len__(self) -> int:
        return len(self._d())

    def __repr__(self) -> str:
        return f"<HTTPSession {self.session_id and self.session_id[:6]}...: {self._data!r}>"

    def regenerate(self) -> None:
        """A new id for the same data, saved with this response; the old id is deleted."""
        self._d()
        self.regenerated = True
        self.modified = True

    def data(self) -> dict[str, Any]:
        return dict(self._d())


def encode(data: dict[str, Any]) -> bytes:
    try:
        return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    except TypeError as exc:
        raise TypeError(
            f"greenscope.sessions: the session holds a value JSON cannot store ({exc}); "
            "store str, numbers, bools, None, lists and dicts of those"
        ) from exc


def decode(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        logger.warning("greenscope.sessions: unreadable session data; starting empty")
        return {}
    return value if isinstance(value, dict) else {}


Loaded = tuple[dict[str, Any], "dt.datetime | None"]


def loader(store: SQLAlchemyStore[Any], sid: str | None) -> Callable[[], Loaded | None]:
    """What :class:`HTTPSession` loads: the data and expiry, None if its row is gone."""

    def load() -> Loaded | None:
        if sid is None:
            return {}, None
        row = store._get(sid)
        return None if row is None else (decode(row[0]), row[1])

    return load


def refresh_due(store: SQLAlchemyStore[Any], session: HTTPSession) -> bool:
    """A live session this request read but did not change, with less than nine tenths
    of its life left: extend it (at most one write per tenth of ``max_age``)."""
    if session.modified or session.session_id is None or session.expires_at is None:
        return False
    return session.expires_at - utcnow() < store.max_age * 0.9


def save(store: SQLAlchemyStore[Any], session: HTTPSession) -> tuple[str | None, bool]:
    """Write a modified session to the store; return (the id for the cookie, expire it).

    An emptied session is deleted and its cookie expired; a regenerated (or new) one
    gets a new id (the old row deleted). A known id is only updated while its row is
    live: a session another request ended meanwhile (a log-out) is not brought back, its
    change is dropped and its cookie expired.
    """
    data = session.data()
    old = session.session_id
    if not data:
        if old is not None:
            store.delete(old)
        return None, old is not None
    if old is not None and not session.regenerated:
        if store.update(old, encode(data)):
            return old, False
        logger.info(
            "greenscope.sessions: a request changed a session that ended while it ran "
            "(logged out or expired); the change is dropped and the cookie expired"
        )
        session.session_id = None
        return None, True
    sid = new_id()
    store.set(sid, encode(data))
    if old is not None:
        store.delete(old)
    session.session_id = sid
    return sid, False


def write_back(
    store: SQLAlchemyStore[Any], session: HTTPSession, extend: bool
) -> tuple[str | None, bool]:
    """What a response that succeeded writes: a modified session saved (:func:`save`),
    else, with ``extend``, a read one extended. Returns (the id for the cookie, expire
    it); (None, False) when there is nothing to send. Shared by the WSGI middleware and
    the Flask interface."""
    if session.modified:
        return save(store, session)
    if not extend or session.session_id is None:
        return None, False
    if store.touch(session.session_id):
        return session.session_id, False
    session.session_id = None  # it ended meanwhile: not extended, its cookie expired
    return None, True


def cookie_value(raw: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, or None.

    Not ``SimpleCookie``: it stops at the first cookie it cannot parse, and another
    site's or framework's cookie (JSON, spaces, a stray quote) would then hide ours.
    """
    for part in raw.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def add_vary_cookie(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` with ``Cookie`` in their ``Vary`` (merged into one already there)."""
    for i, (name, value) in enumerate(headers):
        if name.lower() == "vary":
            fields = {f.strip().lower() for f in value.split(",")}
            if "cookie" in fields or "*" in fields:
                return headers
            return [*headers[:i], (name, f"{value}, Cookie"), *headers[i + 1 :]]
    return [*headers, ("Vary", "Cookie")]


def cookie_header(
    name: str,
    value: str,
    *,
    max_age: int,
    path: str,
    domain: str | None,
    secure: bool,
    httponly: bool,
    samesite: str | None,
) -> str:
    cookie: SimpleCookie = SimpleCookie()
    cookie[name] = value
    morsel = cookie[name]
    morsel["path"] = path
    morsel["max-age"] = str(max_age)
    if domain:
        morsel["domain"] = domain
    if secure:
        morsel["secure"] = True
    if httponly:
        morsel["httponly"] = True
    if samesite:
        morsel["samesite"] = samesite
    return morsel.OutputString()


StartResponse = Callable[..., Any]


class SessionMiddleware:
    """Server-side HTTP sessions in ``store`` for the WSGI ``app``.

    ``secret_key`` signs the cookie (keep it secret; rotate it and every session ends).
    Cookie attributes: ``cookie_name`` (``session``), ``secure`` (True: HTTPS only; set
    False for plain-HTTP development), ``httponly`` (True), ``samesite`` (``"Lax"``;
    ``"Strict"``, ``"None"`` or None), ``path`` (``/``), ``domain`` (None); its
    ``Max-Age`` is the store's ``max_age``. A cookie whose signature does not match (a
    tampered or foreign id) is ignored: the request gets a new, empty session.

    ``refresh_each_request`` (True): a session a request reads without changing it is
    extended (expiry and cookie reset to ``max_age``) once it has lived a tenth of
    ``max_age``, so an active user is not logged out; at most one write per tenth of
    ``max_age``, and none for a request that never reads the session. False: a session
    expires ``max_age`` after its last change.

    .. versionadded:: 0.3
    """

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        store: SQLAlchemyStore[Any],
        *,
        secret_key: str | bytes,
        cookie_name: str = "session",
        secure: bool = True,
        httponly: bool = True,
        samesite: str | None = "Lax",
        path: str = "/",
        domain: str | None = None,
        refresh_each_request: bool = True,
    ) -> None:
        if not callable(app):
            raise TypeError(f"SessionMiddleware(app, ...) takes a WSGI app; got {app!r}")
        if not isinstance(store, SQLAlchemyStore):
            raise TypeError(
                f"SessionMiddleware(app, store, ...) takes a SQLAlchemyStore; got {store!r}"
            )
        if not isinstance(secret_key, (str, bytes)) or len(secret_key) < 16:
            raise ValueError(
                "SessionMiddleware(secret_key=...) takes a secret of at least 16 characters "
                "(e.g. secrets.token_urlsafe(32), kept out of the code)"
            )
        if samesite is not None and samesite not in _SAMESITE:
            raise ValueError(
                f"SessionMiddleware(samesite=...) takes 'Strict', 'Lax', 'None' or None; "
                f"got {samesite!r}"
            )
        if samesite == "None" and not secure:
            raise ValueError("SessionMiddleware: browsers refuse SameSite=None without Secure")
        if not isinstance(cookie_name, str) or not _TOKEN.fullmatch(cookie_name):
            raise ValueError(
                "SessionMiddleware(cookie_name=...) takes a cookie name: letters, digits "
                f"and !#$%&'*+-.^_`|~, no spaces or separators; got {cookie_name!r}"
            )
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"SessionMiddleware(path=...) takes a path such as '/'; got {path!r}")
        if domain is not None and (not isinstance(domain, str) or not domain):
            raise ValueError(
                f"SessionMiddleware(domain=...) takes a domain name or None; got {domain!r}"
            )
        self.app = app
        self.store = store
        self.signer = signer(secret_key)
        self.cookie_name = cookie_name
        self.refresh_each_request = bool(refresh_each_request)
        self.cookie = {
            "path": path,
            "domain": domain,
            "secure": secure,
            "httponly": httponly,
            "samesite": samesite,
        }

    def _session_id(self, environ: dict[str, Any]) -> str | None:
        raw = environ.get("HTTP_COOKIE")
        if not raw:
            return None
        value = cookie_value(raw, self.cookie_name)
        if not value:
            return None
        try:
            sid: str = self.signer.unsign(value.encode()).decode()
        except Exception:  # itsdangerous.BadSignature and friends: a tampered cookie
            return None
        return sid

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        sid = self._session_id(environ)
        session = HTTPSession(loader(self.store, sid), sid)
        environ[ENVIRON_KEY] = session
        response = _Response(self, session, start_response)
        body = self.app(environ, response.start_response)
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(body, (list, tuple)) or (
            isinstance(file_wrapper, type) and isinstance(body, file_wrapper)
        ):
            # Produced whole (no app code runs while it is sent), or a file returned as
            # is so the server can still use sendfile(): the response starts now.
            try:
                response.flush()
            except BaseException:
                close = getattr(body, "close", None)  # the server never sees this body
                if close is not None:
                    close()
                raise
            return body
        return _Body(body, response)

    def headers_for(
        self, session: HTTPSession, headers: list[tuple[str, str]], failed: bool
    ) -> list[tuple[str, str]]:
        """Save a modified session (or extend a read one); ``headers`` with its
        ``Set-Cookie`` and ``Vary``. A failed response writes nothing."""
        sid: str | None = None
        expire = False
        if not failed:
            extend = self.refresh_each_request and refresh_due(self.store, session)
            sid, expire = write_back(self.store, session, extend)
        if sid is not None:
            signed = self.signer.sign(sid.encode()).decode()
            age = int(self.store.max_age.total_seconds())
            headers = [*headers, ("Set-Cookie", self._cookie(signed, age))]
        elif expire:
            headers = [*headers, ("Set-Cookie", self._cookie("", 0))]
        if session.accessed:
            headers = add_vary_cookie(headers)
        return headers

    def _cookie(self, value: str, max_age: int) -> str:
        c = self.cookie
        return cookie_header(
            self.cookie_name,
            value,
            max_age=max_age,
            path=str(c["path"]),
            domain=c["domain"],  # type: ignore[arg-type]
            secure=bool(c["secure"]),
            httponly=bool(c["httponly"]),
            samesite=c["samesite"],  # type: ignore[arg-type]
        )


class _Response:
    """One response: the app's ``start_response`` held until its first chunk exists.

    Greenlet and thread safety: used by the request's greenlet, and by whoever iterates
    its body (one at a time, as WSGI servers do).
    """

    __slots__ = (
        "exc_info",
        "headers",
        "middleware",
        "server_start_response",
        "session",
        "started",
        "status",
        "write",
    )

    def __init__(
        self, middleware: SessionMiddleware, session: HTTPSession, start_response: StartResponse
    ) -> None:
        self.middleware = middleware
        self.session = session
        self.server_start_response = start_response
        self.write: Callable[[bytes], object] | None = None  # the server's, once started
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.exc_info: Any = None
        self.started = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        """The app's ``start_response``: recorded, not sent yet (see the module)."""
        if self.started:
            # Headers already sent: only an error may call again, and the server raises.
            return self.server_start_response(status, headers, exc_info)  # type: ignore[no-any-return]
        if exc_info is not None:
            self.exc_info = exc_info  # a failure: nothing of this request is kept
        self.status, self.headers = status, list(headers)
        return self._legacy_write

    def _legacy_write(self, data: bytes) -> object:
        # The legacy write() callable sends at once: the response starts here.
        self.flush()
        if self.write is None:
            raise AssertionError("write() before start_response()")
        return self.write(data)

    def flush(self) -> None:
        """The first chunk exists: save the session if the response succeeded so far,
        then call the server's ``start_response``. Once; before it, nothing is sent."""
        if self.started or self.status is None:
            return  # no status: the server reports the app's error itself
        session = self.session
        headers = self.headers
        code = int(self.status[:3]) if self.status[:3].isdigit() else 500
        failed = code >= 500 or self.exc_info is not None  # keeps nothing
        headers = self.middleware.headers_for(session, headers, failed)
        # Saved, or dropped: from here on a change is too late.
        session.modified = session.regenerated = False
        self.started = True
        self.write = self.server_start_response(self.status, headers, self.exc_info)


class _Body:
    """A streamed body: the response starts at its first chunk; at ``close()``, warn
    about session changes made too late."""

    __slots__ = ("_close", "_iterator", "_response")

    def __init__(self, body: Iterable[bytes], response: _Response) -> None:
        self._close: Callable[[], object] | None = getattr(body, "close", None)
        self._iterator: Iterator[bytes] = iter(body)
        self._response = response

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        response = self._response
        try:
            chunk = next(self._iterator)
        except StopIteration:
            response.flush()  # an empty body: the response starts now
            raise
        except BaseException:
            response.session.modified = False  # failed before (or while) sending
            raise
        response.flush()
        return chunk

    def close(self) -> None:
        try:
            if self._close is not None:
                self._close()
        finally:
            response = self._response
            if response.started and response.session.modified:
                logger.warning(
                    "greenscope.sessions: the session was changed after the response "
                    "started (in a streamed body); the change is not saved. Change the "
                    "session before the body's first chunk."
                )
