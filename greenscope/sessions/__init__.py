"""Server-side HTTP sessions in SQL, for the greenlet world.

The data of each HTTP session lives in a table (:class:`SessionModelMixin`, mapped with
:func:`create_session_model` or :func:`register_session_model`), reached through a
:class:`SQLAlchemyStore` that runs every call in its own greenscope Session and commits
its own transaction: never the application's. The cookie holds a signed random id.
:class:`SessionMiddleware` serves any WSGI app; ``FlaskSessionInterface`` is
Flask's ``app.session_interface`` (importing it needs Flask).

Needs the ``sessions`` extra (itsdangerous, to sign cookies).

.. versionadded:: 0.3
"""

from typing import TYPE_CHECKING, Any

from greenscope.sessions._model import (
    SessionModelMixin,
    create_session_model,
    register_session_model,
)
from greenscope.sessions._store import SQLAlchemyStore
from greenscope.sessions._wsgi import HTTPSession, SessionMiddleware

if TYPE_CHECKING:
    from greenscope.sessions._flask import FlaskSessionInterface

__all__ = [
    "FlaskSessionInterface",
    "HTTPSession",
    "SQLAlchemyStore",
    "SessionMiddleware",
    "SessionModelMixin",
    "create_session_model",
    "register_session_model",
]


def __getattr__(name: str) -> Any:
    # Flask is optional: importing greenscope.sessions for a plain WSGI app must not need it.
    if name == "FlaskSessionInterface":
        from greenscope.sessions._flask import FlaskSessionInterface  # noqa: PLC0415

        return FlaskSessionInterface
    raise AttributeError(f"module 'greenscope.sessions' has no attribute {name!r}")
