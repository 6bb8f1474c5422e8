"""``FlaskSessionInterface``: Flask's ``session`` kept server-side in a ``SQLAlchemyStore``.

``app.session_interface = FlaskSessionInterface(store)``. The cookie (Flask's
``SESSION_COOKIE_*`` settings) holds a random id signed with ``app.secret_key``; the data
is in the store, written only when the session was modified, in the store's own Session:
the view's ``db.session`` is neither committed nor rolled back by saving it.

Flask saves the session after the view, also for a response its error handler made. A
response with a status of 500 or more saves nothing here: what a failed request changed
in the session is not kept.
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
from greenscope.sessions._wsgi import HTTPSession, decode, save, signer

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

    def open_session(self, app: Any, request: Any) -> FlaskHTTPSession:
        sid: str | None = None
        raw = request.cookies.get(self.get_cookie_name(app))
        if raw:
            try:
                sid = self._signer(app).unsign(raw.encode()).decode()
            except Exception:  # a tampered or foreign cookie: a new session
                sid = None
        store = self.store
        return FlaskHTTPSession(lambda: decode(store.get(sid)) if sid else {}, sid)

    def save_session(self, app: Any, session: Any, response: Any) -> None:
        if not isinstance(session, FlaskHTTPSession) or not session.modified:
            return
        if response.status_code >= 500:
            session.modified = False  # a failed request keeps nothing
            return
        name = self.get_cookie_name(app)
        domain = self.get_cookie_domain(app)
        path = self.get_cookie_path(app)
        new_sid, expire = save(self.store, session)
        session.modified = session.regenerated = False
        if new_sid is None:
            if expire:
                response.delete_cookie(name, domain=domain, path=path)
            return
        response.vary.add("Cookie")
        response.set_cookie(
            name,
            self._signer(app).sign(new_sid.encode()).decode(),
            max_age=int(self.store.max_age.total_seconds()),
            httponly=self.get_cookie_httponly(app),
            domain=domain,
            path=path,
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
        )
