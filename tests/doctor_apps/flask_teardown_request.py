"""greenscope's scoped_session removed in Flask's teardown_request: correct."""

from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from greenscope import scoped_session

engine = create_engine("postgresql+psycopg://app@db.invalid/app", pool_size=100)
Session = scoped_session(sessionmaker(engine))
app = Flask(__name__)


@app.teardown_request
def shutdown_session(exc: BaseException | None = None) -> None:
    Session.remove()
