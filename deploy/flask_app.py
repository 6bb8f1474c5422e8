"""A small Flask + Flask-SQLAlchemy service using greenscope, with background greenlets.

    gunicorn -k greenscope.gunicorn.GeventWorker --chdir deploy flask_app:app

``DATABASE_URL`` selects the database (default: ``flask-demo.db`` next to this file).
The switch from Flask-SQLAlchemy is the one import below; nothing else changes.

Endpoints: ``POST /notes/<key>`` stores a note and has a background greenlet store
``<key>-bg`` (a spawned greenlet that uses the database, with the request's context);
``GET /notes`` pages through them; ``GET /notes/<id>`` is ``db.get_or_404``; ``GET
/stats`` shows this worker's Session counters and checked-out connections.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flask
import gevent
from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from greenscope.flask import SQLAlchemy  # was: from flask_sqlalchemy import SQLAlchemy

app = flask.Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get(
    "DATABASE_URL", f"sqlite:///{Path(__file__).resolve().parent / 'flask-demo.db'}"
)
db = SQLAlchemy(app)


class Note(db.Model):  # type: ignore[name-defined, misc]
    __tablename__ = os.environ.get("GREENSCOPE_DEMO_TABLE", "flask_notes")
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)


@app.post("/notes/<key>")
def create(key: str) -> tuple[dict[str, Any], int]:
    note = Note(key=key)
    db.session.add(note)
    db.session.commit()

    @flask.copy_current_request_context
    def also_later() -> None:  # its own Session: greenscope scopes by greenlet
        db.session.add(Note(key=f"{key}-bg"))
        db.session.commit()

    gevent.spawn(also_later)
    return {"id": note.id}, 201


@app.get("/notes")
def index() -> dict[str, Any]:
    page = db.paginate(db.select(Note).order_by(Note.id), per_page=20)
    return {"keys": [n.key for n in page.items], "total": page.total}


@app.get("/notes/<int:note_id>")
def show(note_id: int) -> dict[str, Any]:
    return {"key": db.get_or_404(Note, note_id).key}


@app.get("/stats")
def stats() -> dict[str, Any]:
    return {
        "sessions": db.session.registry.stats().__dict__,
        "checkedout": db.engine.pool.checkedout(),
        "notes": db.session.scalar(db.select(db.func.count()).select_from(Note)),
    }


def create_schema() -> None:
    with app.app_context():
        db.create_all()
