"""``FlaskSessionInterface``: Flask's ``session`` kept server-side in a ``SQLAlchemyStore``.

``app.session_interface = FlaskSessionInterface(store)``. The cookie (Flask's
``SESSION_COOKIE_*`` settings) holds a random id signed with ``app.secret_key``; the data
is in the store, written only when the session was modified, in the store's own Session:
the view's ``db.session`` is neither committed nor rolled back by saving it.

Flask saves the session after the view, also for a response its error handler made. A
response with a status of 500 or more saves nothing here: what a failed request changed
in the session is not kept. A change made while a streamed response is sent comes after
Flask saved the session: it is not saved, and no warning says so.

Settings: ``SESSION_COOKIE_NAME``, ``_DOMAIN``, ``_PATH``, ``_HTTPONLY``, ``_SECURE``,
``_SAMESITE`` and ``_PARTITIONED`` shape the cookie; ``SECRET_KEY_FALLBACKS`` (Flask
3.1) still verifies cookies signed with an older key. Not used: every session is
permanent and lives the store's ``max_age``
(``PERMANENT_SESSION_LIFETIME`` and ``session.permanent`` change nothing).
``SESSION_REFRESH_EACH_REQUEST`` (True by default) extends a session that a request read
without changing it, once it has lived a tenth of ``max_age`` (one write at most per
tenth, not one per request); a request that never reads the session extends nothing.
"""

from __future__ import annotations

from typing import Any

try:
    from flask.sessions import SessionInterface, SessionMixin
except ImportError as exc:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError(
        "greenscope.sessions.FlaskSessionInterface needs Flask; install it with: "
        "pip install 'greenscope[flask,sessions]'"
    ) from exc

from greenscope.sessions._store import SQLAlchemyStore
from greenscope.sessions._wsgi import HTTPSession, loader, refresh_due, signer, write_back

__all__ = ["FlaskSessionInterface"]


class FlaskHTTPSession(HTTPSession, SessionMixin):  # type: ignore[override]  # new: a property
    """Flask's ``session``: an :class:`HTTPSession` Flask can use."""

    @property
    def permanent(self) -> bool:
        return True  # the store's max_age decides: the cookie always carries it

    @permanent.setter
    def permanent(self, value: bool) -> None:
        pass


class FlaskSessionInterface(SessionInterface):
    """Server-side Flask sessions in ``store`` (see the module docstring).

    .. versionadded:: 0.3
    """

    def __init__(self, store: SQLAlchemyStore[Any]) -> None:
        if not isinstance(store, SQLAlchemyStore):
            raise TypeError(f"FlaskSessionInterface(store) takes a SQLAlchemyStore; got {store!r}")
        self.store = store

    def _signer(self, app: Any) -> Any:
        if not app.secret_key:
            raise RuntimeError(
                "greenscope.sessions.FlaskSessionInterface signs its cookie with "
                "app.secret_key: set app.secret_key (SECRET_KEY) first"
            )
        return signer(app.secret_key)

    def _verifier(self, app: Any) -> Any:
        # itsdangerous tries every key, newest last, as Flask 3.1's own interface does.
        fallbacks = app.config.get("SECRET_KEY_FALLBACKS") or []
        if not fallbacks:
            return self._signer(app)
        self._signer(app)  # the missing-key error first
        return signer([*fallbacks, app.secret_key])

    def open_session(self, app: Any, request: Any) -> FlaskHTTPSession:
        sid: str | None = None
        raw = request.cookies.get(self.get_cookie_name(app))
        if raw:
            try:
                sid = self._verifier(app).unsign(raw.encode()).decode()
            except Exception:  # a tampered or foreign cookie: a new session
                sid = None
        return FlaskHTTPSession(loader(self.store, sid), sid)

    def save_session(self, app: Any, session: Any, response: Any) -> None:
        if not isinstance(session, FlaskHTTPSession):
            return
        if session.accessed:
            response.vary.add("Cookie")
        if response.status_code >= 500:
            session.modified = False  # a failed request keeps nothing
            return
        refresh = (
            not session.modified
            and app.config.get("SESSION_REFRESH_EACH_REQUEST", True)
            and refresh_due(self.store, session)
        )
        if not session.modified and not refresh:
            return
        sign = self._signer(app).sign  # before saving: a missing key fails with nothing kept
        name = self.get_cookie_name(app)
        cookie: dict[str, Any] = {
            "domain": self.get_cookie_domain(app),
            "path": self.get_cookie_path(app),
            "secure": self.get_cookie_secure(app),
            "httponly": self.get_cookie_httponly(app),
            "samesite": self.get_cookie_samesite(app),
        }
        partitioned = getattr(self, "get_cookie_partitioned", None)  # Flask 3.1
        if partitioned is not None and partitioned(app):
            cookie["partitioned"] = True
        new_sid, expire = write_back(self.store, session, refresh)
        session.modified = session.regenerated = False
        response.vary.add("Cookie")
        if new_sid is None:
            if expire:
                response.delete_cookie(name, **cookie)
            return
        response.set_cookie(
            name,
            sign(new_sid.encode()).decode(),
            max_age=int(self.store.max_age.total_seconds()),
            **cookie,
        )
