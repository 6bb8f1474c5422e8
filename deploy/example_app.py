r"""A complete, small greenscope app in plain WSGI: copy it and start from here.

The rule: **you commit; anything uncommitted is rolled back when the request ends.**

Each request gets its own Session from ``Session`` below (one per greenlet, or per
thread under a threaded server). When the response is finished, ``GreenscopeMiddleware``
removes that Session: it is rolled back and closed, and its connection goes back to the
pool. So a write you forgot to commit, or one that a failing request left half done,
never reaches the database, and nothing of one request leaks into the next one on the
same keep-alive connection.

Routes::

    GET  /notes                      the stored notes, as JSON
    POST /notes?text=hello           insert a note and commit: 201
    POST /notes?text=oops&fail=1     insert, then fail before the commit: 500, nothing stored
    POST /drafts?text=later          insert and forget to commit: 200, nothing stored

Run it from the repository root (``DATABASE_URL`` selects the database; the default is
``example.db`` next to this file)::

    gunicorn -k greenscope.gunicorn.GeventWorker --chdir deploy example_app:app

then ``curl -X POST '127.0.0.1:8000/notes?text=hello'`` and ``curl 127.0.0.1:8000/notes``.
greenscope's worker removes each request's Sessions by itself too; the middleware makes
the same app safe under any WSGI server, such as gevent's own (patch first, then import
the app, so that the database driver is imported patched)::

    cd deploy && python -c "from gevent import monkey; monkey.patch_all(); \
        from gevent.pywsgi import WSGIServer; import example_app; \
        WSGIServer(('127.0.0.1', 8000), example_app.app).serve_forever()"

or waitress, which runs requests in threads (greenscope scopes Sessions per thread the
same way)::

    cd deploy && waitress-serve --listen=127.0.0.1:8000 example_app:app

With Flask and Flask-SQLAlchemy, see ``flask_app.py`` next to this file: the same rule,
with ``greenscope.flask.SQLAlchemy`` in place of the middleware. For production settings
(workers, pool sizing, timeouts), see ``gunicorn.conf.py`` and ``README.md`` here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import greenscope
from greenscope.wsgi import GreenscopeMiddleware

DATABASE_URL = os.environ.get(
    "DATABASE_URL", f"sqlite:///{Path(__file__).resolve().parent / 'example.db'}"
)
engine = create_engine(DATABASE_URL)

# One Session per greenlet: Session() anywhere in a request returns that request's
# Session, and Session.add(), Session.commit() ... act on it.
Session = greenscope.scoped_session(sessionmaker(engine))


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "example_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


# Fine for an example; a real app creates its tables (migrations) before the server
# starts, not in every worker at import.
Base.metadata.create_all(engine)

Query = dict[str, list[str]]


def list_notes(query: Query) -> tuple[str, Any]:
    notes = Session.scalars(select(Note).order_by(Note.id))
    return "200 OK", [{"id": n.id, "text": n.text} for n in notes]


def create_note(query: Query) -> tuple[str, Any]:
    note = Note(text=query.get("text", [""])[0])
    Session.add(note)
    Session.flush()  # the INSERT runs now, inside this request's transaction
    if query.get("fail"):  # a bug after the write: the request ends without a commit
        raise RuntimeError("failed after the insert, before the commit")
    note_id = note.id  # read before the commit, which expires the object
    Session.commit()  # the one line that makes the write stay
    return "201 Created", {"id": note_id}


def save_draft(query: Query) -> tuple[str, Any]:
    Session.add(Note(text=query.get("text", [""])[0]))
    Session.flush()
    # ... and no Session.commit(): the middleware rolls the insert back at the end.
    return "200 OK", {"stored": False}


ROUTES: dict[tuple[str, str], Callable[[Query], tuple[str, Any]]] = {
    ("GET", "/notes"): list_notes,
    ("POST", "/notes"): create_note,
    ("POST", "/drafts"): save_draft,
}


def notes_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The application itself: route, call, answer JSON. An exception is a 500."""
    route = ROUTES.get((environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")))
    if route is None:
        status, body = "404 Not Found", {"error": "no such route"}
    else:
        status, body = route(parse_qs(environ.get("QUERY_STRING", "")))
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


# The outermost layer: removes the request's Session once the response is finished, and
# also when the app raised (the server then answers 500). GreenscopeMiddleware(notes_app,
# commit_on_success=True) would commit for you; here committing stays explicit.
app = GreenscopeMiddleware(notes_app)
