"""Behaviour that depends on the process: patched after construction, or no gevent at all."""

from __future__ import annotations

from pathlib import Path

from conftest import run_scenario


def test_built_before_patch_all_still_one_session_per_greenlet() -> None:
    """Built before monkey.patch_all(), SQLAlchemy's registry is shared; greenscope's is not."""
    result = run_scenario(
        """
        import json
        import sqlalchemy.orm
        from sqlalchemy.orm import sessionmaker
        import greenscope

        stock = sqlalchemy.orm.scoped_session(sessionmaker())   # captures threading.local
        ours = greenscope.scoped_session(sessionmaker())

        from gevent import monkey
        monkey.patch_all()
        import gevent
        from gevent.event import Event

        both_in = Event()
        seen = {"stock": [], "ours": []}

        def work():
            seen["stock"].append(stock())
            seen["ours"].append(ours())
            if len(seen["ours"]) == 2:
                both_in.set()
            both_in.wait()   # both greenlets hold their Session at the same time
            ours.remove()

        gevent.joinall([gevent.spawn(work), gevent.spawn(work)], raise_error=True)
        print(json.dumps({k: len({id(s) for s in v}) for k, v in seen.items()}))
        """
    )
    assert result == {"stock": 1, "ours": 2}


def test_without_gevent_the_package_imports_and_cleans_up(tmp_path: Path) -> None:
    """With gevent unimportable, raw greenlets and threads still get their orphans closed."""
    db = tmp_path / "nogevent.db"
    result = run_scenario(
        f"""
        import sys
        sys.modules["gevent"] = None   # any `import gevent...` now raises ImportError
        import gc, json, threading
        from greenlet import greenlet
        from sqlalchemy import create_engine, text
        from sqlalchemy.orm import sessionmaker
        from sqlalchemy.pool import QueuePool
        import greenscope

        engine = create_engine("sqlite:///{db}", poolclass=QueuePool)
        Session = greenscope.scoped_session(sessionmaker(engine))

        def work():
            Session.execute(text("SELECT 1"))      # checks a connection out

        for _ in range(5):
            g = greenlet(work)
            g.switch()
            del g
        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()
        assert greenscope.wait_reaped(10)
        print(json.dumps({{
            "gevent_loaded": any(m.startswith("gevent.") for m in sys.modules),
            "checkedout": engine.pool.checkedout(),
            "stats": Session.registry.stats().__dict__,
        }}))
        """
    )
    assert result == {
        "gevent_loaded": False,
        "checkedout": 0,
        "stats": {
            "created": 8,
            "removed": 0,
            "reaped": 8,
            "failed": 0,
            "live": 0,
            "timed_out": 0,
            "rescued": 0,
        },
    }


def test_gunicorn_integration_without_gunicorn_says_what_to_install() -> None:
    """Importing greenscope.gunicorn without gunicorn or gevent names the extra to install."""
    result = run_scenario(
        """
        import json, sys
        messages = {}
        for missing in ("gunicorn", "gevent"):
            for name in [m for m in sys.modules if m.startswith(("greenscope", missing))]:
                del sys.modules[name]
            sys.modules[missing] = None
            try:
                import greenscope.gunicorn
            except ImportError as exc:
                messages[missing] = str(exc)
            del sys.modules[missing]
        print(json.dumps(messages))
        """
    )
    assert set(result) == {"gunicorn", "gevent"}
    for message in result.values():
        assert "pip install 'greenscope[gunicorn]'" in message


def test_flask_integration_without_flask_says_what_to_install() -> None:
    """greenscope.flask names the extra to install when Flask or Flask-SQLAlchemy is missing."""
    result = run_scenario(
        """
        import json, sys
        sys.modules["flask"] = None
        try:
            import greenscope.flask
        except ImportError as exc:
            without_flask = str(exc)
        del sys.modules["flask"]
        sys.modules["flask_sqlalchemy"] = None
        from greenscope.flask import SQLAlchemy, remove_at_teardown  # plain Flask still works
        try:
            SQLAlchemy()
        except ImportError as exc:
            without_extension = str(exc)
        print(json.dumps([without_flask, without_extension]))
        """
    )
    for message in result:
        assert "pip install 'greenscope[flask]'" in message
