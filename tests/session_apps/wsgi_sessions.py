"""A WSGI app with server-side sessions, for tests/test_sessions_servers.py.

Environment: DATABASE_URL, GREENSCOPE_SESSION_TABLE.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase

import greenscope
from greenscope.sessions import SessionMiddleware, SQLAlchemyStore, create_session_model


class Base(DeclarativeBase):
    pass


Model = create_session_model(Base, table_name=os.environ["GREENSCOPE_SESSION_TABLE"])
engine = create_engine(os.environ["DATABASE_URL"], pool_size=10, max_overflow=10)
store = SQLAlchemyStore(engine, Model, max_age=dt.timedelta(hours=1))


def create_schema() -> None:
    Base.metadata.create_all(engine)


def _json(start_response: Any, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    start_response("200 OK", headers)
    return [data]


def inner(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    path = environ.get("PATH_INFO", "/")
    session = environ["greenscope.session"]
    if path == "/set":
        session["who"] = parse_qs(environ.get("QUERY_STRING", ""))["who"][0]
    return _json(start_response, {"session": dict(session), "pid": os.getpid()})


sessions = SessionMiddleware(inner, store, secret_key="k" * 32, secure=False)


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    if environ.get("PATH_INFO") == "/stats":  # no session, no database
        return _json(
            start_response,
            {
                "pid": os.getpid(),
                "checkedout": engine.pool.checkedout(),  # type: ignore[attr-defined]
                "live": greenscope.stats().live,
            },
        )
    return sessions(environ, start_response)  # type: ignore[return-value]
