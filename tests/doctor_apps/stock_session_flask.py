"""SQLAlchemy's own scoped_session in a Flask app that never removes it: broken."""

from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

engine = create_engine("postgresql+psycopg://app@db.invalid/app", pool_size=100)
Session = scoped_session(sessionmaker(engine))
app = Flask(__name__)
