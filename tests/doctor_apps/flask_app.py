"""Flask-SQLAlchemy through greenscope.flask: Flask removes db.session at teardown."""

from flask import Flask

from greenscope.flask import SQLAlchemy

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg://app@db.invalid/app"
app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 20, "max_overflow": 80}
db = SQLAlchemy(app)
