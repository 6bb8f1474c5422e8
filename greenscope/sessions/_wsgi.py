"""``SessionMiddleware``: server-side HTTP sessions for any WSGI app.

The cookie holds a random id, signed (itsdangerous), never the data; the data lives in a
:class:`SQLAlchemyStore`. ``environ["greenscope.session"]`` is a dict-like
:class:`HTTPSession`, loaded from the store on first use, saved only when modified.

When it is saved, and when not:

* Saved when the app calls ``start_response`` with a status below 500, before the
  response is sent, so the ``Set-Cookie`` header can go with it. A failing save fails
  the request (the app sees the error from ``start_response``).
* A 5xx response, or an app that raises before ``start_response``, saves nothing: what a
  failed request changed in the session is not kept.
* A streamed body that changes the session *after* ``start_response`` can no longer be
  saved honestly (the headers are gone, and the request may still fail): those changes
  are dropped with a WARNING, like greenscope.wsgi's late writes.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any

from greenscope.sessions._store import SQLAlchemyStore

__all__ = ["HTTPSession", "SessionMiddleware"]

logger = logging.getLogger("greenscope")

ENVIRON_KEY = "greenscope.session"
_SALT = "greenscope.sessions"
_SAMESITE = {"Strict", "Lax", "None"}


def new_id() -> str:
    """A random session id: 32 bytes, url-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def signer(secret_key: str | bytes, salt: str = _SALT) -> Any:
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

    def __init__(self, load: Callable[[], dict[str, Any]], session_id: str | None) -> None:
        self._load = load
        self._data: dict[str, Any] | None = None
        self.session_id = session_id  # None: no valid cookie; made on the first save
        self.modified = False
        self.regenerated = False

    @property
    def new(self) -> bool:
        """True when the request brought no valid session cookie."""
        return self.session_id is None

    def _d(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._load()
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


def save(store: SQLAlchemyStore[Any], session: HTTPSession) -> tuple[str | None, bool]:
    """Write a modified session to the store; return (the id for the cookie, expire it).

    An emptied session is deleted and its cookie expired; a regenerated one moves to a
    new id (the old row deleted).
    """
    data = session.data()
    old = session.session_id
    if not data:
        if old is not None:
            store.delete(old)
        return None, old is not None
    sid = new_id() if old is None or session.regenerated else old
    store.set(sid, encode(data))
    if old is not None and sid != old:
        store.delete(old)
    session.session_id = sid
    return sid, False


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
        self.app = app
        self.store = store
        self.signer = signer(secret_key)
        self.cookie_name = cookie_name
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
        try:
            morsel = SimpleCookie(raw).get(self.cookie_name)
        except CookieError:
            return None
        if morsel is None:
            return None
        try:
            value = self.signer.unsign(morsel.value.encode())
        except Exception:  # itsdangerous.BadSignature and friends: a tampered cookie
            return None
        sid: str = value.decode()
        return sid

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        sid = self._session_id(environ)
        store = self.store
        session = HTTPSession(lambda: decode(store.get(sid)) if sid else {}, sid)
        environ[ENVIRON_KEY] = session
        started: list[bool] = []

        def session_start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            code = int(status[:3]) if status[:3].isdigit() else 500
            if session.modified and code < 500 and not exc:
                new_sid, expire = save(store, session)
                if new_sid is not None:
                    signed = self.signer.sign(new_sid.encode()).decode()
                    age = int(store.max_age.total_seconds())
                    headers = [*headers, ("Set-Cookie", self._cookie(signed, age))]
                elif expire:
                    headers = [*headers, ("Set-Cookie", self._cookie("", 0))]
            # Saved, or (a 5xx, an error) dropped: from here on a change is too late.
            session.modified = session.regenerated = False
            started.append(True)
            return start_response(status, headers, *exc)

        body = self.app(environ, session_start_response)
        return _Watched(body, session, started)

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


class _Watched:
    """The app's body, passed through; at ``close()``, warn about changes made too late."""

    def __init__(self, body: Iterable[bytes], session: HTTPSession, started: list[bool]) -> None:
        self.body = body
        self.session = session
        self.started = started

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            if self.started and self.session.modified:
                logger.warning(
                    "greenscope.sessions: the session was changed after start_response "
                    "(in a streamed body); the change is not saved. Change the session "
                    "before the response starts."
                )
