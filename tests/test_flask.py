"""greenscope.flask: Flask-SQLAlchemy's documented usage, with greenscope's guarantees."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import gevent
import pytest
from flask_sqlalchemy import SQLAlchemy as FlaskSQLAlchemy
from sqlalchemy import String, select, text
from sqlalchemy.orm import Mapped, mapped_column

import greenscope
from greenscope.flask import AppContextRegistry, SQLAlchemy, remove_at_teardown

from conftest import pg_url, run_scenario


@pytest.fixture
def app_db(tmp_path: Path) -> Iterator[tuple[flask.Flask, Any, Any]]:
    """A Flask app with two binds, a model on each, and a few views."""
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'main.db'}"
    app.config["SQLALCHEMY_BINDS"] = {"audit": f"sqlite:///{tmp_path / 'audit.db'}"}
    db = SQLAlchemy(app)

    class User(db.Model):  # type: ignore[name-defined, misc]
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50), unique=True)

    class Event(db.Model):  # type: ignore[name-defined, misc]
        __bind_key__ = "audit"
        id: Mapped[int] = mapped_column(primary_key=True)
        what: Mapped[str] = mapped_column(String(50))

    @app.post("/users/<name>")
    def create(name: str) -> tuple[str, int]:
        db.session.add(User(name=name))
        db.session.add(Event(what=f"created {name}"))
        db.session.commit()
        return name, 201

    @app.get("/users/<int:user_id>")
    def show(user_id: int) -> str:
        return str(db.get_or_404(User, user_id).name)

    @app.get("/users")
    def index() -> dict[str, Any]:
        page = db.paginate(db.select(User).order_by(User.id), per_page=2)
        return {"names": [u.name for u in page.items], "total": page.total}

    @app.post("/broken/<name>")
    def broken(name: str) -> str:
        db.session.add(User(name=name))
        db.session.flush()
        raise RuntimeError("after flush")

    with app.app_context():
        db.create_all()
    yield app, db, (User, Event)
    with app.app_context():
        db.engine.dispose()
        db.engines["audit"].dispose()


def test_one_changed_import() -> None:
    """greenscope.flask.SQLAlchemy is Flask-SQLAlchemy's class with a greenscope session."""
    assert issubclass(SQLAlchemy, FlaskSQLAlchemy)
    db = SQLAlchemy()
    assert isinstance(db.session, greenscope.scoped_session)
    assert isinstance(db.session.registry, AppContextRegistry)


def test_documented_usage_works(app_db: tuple[flask.Flask, Any, Any]) -> None:
    """Views, binds, get_or_404, paginate and Model.query behave as in Flask-SQLAlchemy."""
    app, db, (User, Event) = app_db
    client = app.test_client()
    for name in ("ann", "bob", "cy"):
        assert client.post(f"/users/{name}").status_code == 201
    assert client.get("/users/2").text == "bob"
    assert client.get("/users/99").status_code == 404
    assert client.get("/users").json == {"names": ["ann", "bob"], "total": 3}
    with app.app_context():
        assert [u.name for u in User.query.order_by(User.id)] == ["ann", "bob", "cy"]
        assert db.session.scalar(select(db.func.count()).select_from(Event)) == 3
    stats = db.session.registry.stats()
    assert stats.live == 0
    assert stats.created == stats.removed  # teardown_appcontext removed every one


def test_failed_request_is_rolled_back(app_db: tuple[flask.Flask, Any, Any]) -> None:
    """A view that raises after flushing leaves nothing behind, as with Flask-SQLAlchemy."""
    app, db, (User, _) = app_db
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert app.test_client().post("/broken/dan").status_code == 500
    with app.app_context():
        assert User.query.filter_by(name="dan").first() is None
    assert db.session.registry.stats().live == 0


def test_each_app_context_has_its_own_session(app_db: tuple[flask.Flask, Any, Any]) -> None:
    """Nested app contexts get distinct Sessions; the inner teardown leaves the outer one."""
    app, db, _ = app_db
    with app.app_context():
        outer = db.session()
        with app.app_context():
            inner = db.session()
            assert inner is not outer
        assert db.session() is outer
    with app.app_context():
        assert db.session() is not outer


def test_greenlet_leaving_its_app_context_open_is_cleaned(
    app_db: tuple[flask.Flask, Any, Any],
) -> None:
    """A background greenlet that pushes an app context and never pops it is reaped."""
    app, db, _ = app_db

    def job() -> None:
        app.app_context().push()  # and never popped: a classic background-job leak
        db.session.execute(text("SELECT 1"))

    gevent.spawn(job).join()
    assert greenscope.wait_reaped(10)
    with app.app_context():
        assert db.engine.pool.checkedout() == 0
    assert db.session.registry.stats().live == 0
    assert db.session.registry.stats().reaped == 1


def test_outside_an_app_context_fails_as_flask_sqlalchemy_does() -> None:
    """Using db.session with no app context raises Flask's own error."""
    db = SQLAlchemy()
    with pytest.raises(RuntimeError, match="application context"):
        db.session()


def test_plain_flask_removes_at_teardown(tmp_path: Path) -> None:
    """remove_at_teardown() removes a greenscope.scoped_session when the context ends."""
    from sqlalchemy import create_engine  # noqa: PLC0415
    from sqlalchemy.orm import sessionmaker  # noqa: PLC0415

    engine = create_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    Session = greenscope.scoped_session(sessionmaker(engine))
    app = flask.Flask(__name__)
    remove_at_teardown(app, Session)

    @app.get("/")
    def view() -> str:
        return str(Session.execute(text("SELECT 1")).scalar_one())

    assert app.test_client().get("/").text == "1"
    assert not Session.registry.has()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="scoped_session"):
        remove_at_teardown(app, engine)  # type: ignore[arg-type]
    engine.dispose()


SCENARIO = """
from gevent import monkey
monkey.patch_all()
import json, sys, uuid
import gevent
import flask
from sqlalchemy import String, text
from sqlalchemy.orm import Mapped, mapped_column
import greenscope
from greenscope.flask import SQLAlchemy

url = sys.argv[1]
app_name = "greenscope-flask-" + uuid.uuid4().hex[:8]
app = flask.Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = url
app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 20, "max_overflow": 20}
if url.startswith("postgresql"):
    app.config["SQLALCHEMY_ENGINE_OPTIONS"]["connect_args"] = {"application_name": app_name}
db = SQLAlchemy(app)

class Note(db.Model):
    __tablename__ = "flask_notes_" + app_name.rsplit("-", 1)[1]
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)

foreign = []
background = []

@app.post("/notes/<key>")
def create(key):
    session = db.session()
    if session.new or len(session.identity_map) or session.in_transaction():
        foreign.append(key)
    db.session.add(Note(key=key))
    db.session.commit()

    @flask.copy_current_request_context
    def later():
        db.session.add(Note(key=key + "-bg"))
        db.session.commit()

    background.append(gevent.spawn(later))
    return key, 201

with app.app_context():
    db.create_all()
client = app.test_client()
responses = [gevent.spawn(client.post, f"/notes/k{i}") for i in range(200)]
gevent.joinall(responses, raise_error=True)
gevent.joinall(background, raise_error=True)
reaped = greenscope.wait_reaped(30)
with app.app_context():
    checkedout = db.engine.pool.checkedout()
    keys = db.session.scalars(db.select(Note.key)).all()
    idle = None
    if url.startswith("postgresql"):
        idle = db.session.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :a "
            "AND state LIKE 'idle in transaction%'"), {"a": app_name}).scalar_one()
    db.session.remove()  # our own read holds a lock that DROP TABLE would wait for
    db.drop_all()
print(json.dumps({
    "statuses": sorted({r.value.status_code for r in responses}), "reaped": reaped,
    "checkedout": checkedout, "rows": len(keys), "idle_in_tx": idle,
    "foreign": len(foreign), "live": db.session.registry.stats().live,
}))
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_hundred_concurrent_requests_with_background_writes(
    backend: str, tmp_path: Path
) -> None:
    """Under gevent, 200 requests each spawning a writing greenlet leave nothing behind."""
    url = pg_url() if backend == "postgres" else f"sqlite:///{tmp_path / 'concurrent.db'}"
    code = f"import sys; sys.argv[1:] = [{url!r}]\n" + SCENARIO
    result = run_scenario(code, timeout=120)
    assert result == {
        "statuses": [201],
        "reaped": True,
        "checkedout": 0,
        "rows": 400,
        "idle_in_tx": 0 if backend == "postgres" else None,
        "foreign": 0,
        "live": 0,
    }


def test_a_reused_app_context_id_never_gets_the_dead_contexts_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If a dead context's id comes back, its Session is closed, never handed out."""
    import greenscope.flask as gflask  # noqa: PLC0415

    class Ctx:  # stands in for Flask's AppContext: weakly referenceable
        pass

    closed: list[object] = []

    class Recording:
        def close(self) -> None:
            closed.append(self)

    registry = AppContextRegistry(Recording)  # type: ignore[arg-type]
    current = [Ctx()]
    monkeypatch.setattr(gflask, "_current_app_context", lambda: current[0])
    stale = registry()
    # What id() reuse looks like from the registry: the entry for the current id now
    # points to a context object that is gone.
    dead = Ctx()
    sessions = registry._greenlets()
    sessions.entries[id(current[0])] = (weakref.ref(dead), stale)
    del dead
    fresh = registry()
    assert fresh is not stale
    assert closed == [stale]
    assert registry.stats() == greenscope.RegistryStats(created=2, reaped=1, live=1)
    registry.clear()
    assert registry.stats().live == 0


def test_forked_child_counts_inherited_sessions_as_forgotten(tmp_path: Path) -> None:
    """After fork the child's stats() hold no phantom live Sessions of the parent's."""
    result = run_scenario(
        f"""
        import json, os
        import flask
        from sqlalchemy import text
        from greenscope.flask import SQLAlchemy

        app = flask.Flask(__name__)
        app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///{tmp_path / "fork.db"}"
        db = SQLAlchemy(app)
        with app.app_context():
            db.session.execute(text("SELECT 1"))
            out = {str(tmp_path / "child.json")!r}
            pid = os.fork()
            if pid == 0:
                s = db.session.registry.stats()
                with open(out, "w") as f:
                    json.dump({{"live": s.live, "removed": s.removed}}, f)
                os._exit(0)
            os.waitpid(pid, 0)
            parent_live = db.session.registry.stats().live
        with app.app_context():
            db.engine.dispose()
        print(json.dumps({{"child": json.load(open(out)), "parent_live": parent_live}}))
        """
    )
    assert result == {"child": {"live": 0, "removed": 1}, "parent_live": 1}


def test_db_session_refuses_new_sessions_after_close_all(
    app_db: tuple[flask.Flask, Any, Any],
) -> None:
    """After close_all() (worker exit) db.session refuses, saying what to do, as the core does."""
    app, db, _ = app_db
    with app.app_context():
        db.session.execute(text("SELECT 1"))
        assert greenscope.close_all() >= 1
        with pytest.raises(RuntimeError, match=r"close_all\(shutdown=False\)"):
            db.session.execute(text("SELECT 1"))


def test_a_kill_while_closing_one_context_still_closes_the_others(tmp_path: Path) -> None:
    """A GreenletExit in one Session's close never drops another context's Session unclosed."""
    from flask_sqlalchemy.session import Session as FlaskSession  # noqa: PLC0415
    from greenlet import GreenletExit  # noqa: PLC0415

    killed = [False]

    class KilledOnce(FlaskSession):
        def close(self) -> None:
            super().close()
            if not killed[0]:
                killed[0] = True
                raise GreenletExit

    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'kill.db'}"
    db = SQLAlchemy(app, session_options={"class_": KilledOnce})
    with app.app_context():
        db.session.execute(text("SELECT 1"))
        with app.app_context():  # a second context in the same greenlet
            db.session.execute(text("SELECT 2"))
            assert db.engine.pool.checkedout() == 2
            with pytest.raises(GreenletExit):
                greenscope.remove_current()
            assert db.engine.pool.checkedout() == 0
        db.engine.dispose()
