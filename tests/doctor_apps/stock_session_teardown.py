"""SQLAlchemy's own scoped_session, removed by the app at Flask's teardown: correct."""

from typing import Any

from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

engine = create_engine("postgresql+psycopg://app@db.invalid/app", pool_size=100)
Session = scoped_session(sessionmaker(engine))
app = Flask(__name__)


@app.teardown_appcontext
def remove_session(exc: BaseException | None) -> Any:
    Session.remove()
