"""deploy/example_app.py: you commit; anything uncommitted is rolled back at request end.

In process, through a minimal WSGI call (no server): each request's Session is gone
afterwards and its connection back in the pool. Then under a real
``gunicorn -k greenscope.gunicorn.GeventWorker`` over a keep-alive connection.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
sys.path.insert(0, str(DEPLOY))
import loadgen  # noqa: E402 - lives in deploy/, shared with `make demo`

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """A fresh copy of the example app on its own SQLite file."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'example.db'}")
    name = f"example_app_{uuid.uuid4().hex[:8]}"  # its own engine and registry per test
    spec = importlib.util.spec_from_file_location(name, DEPLOY / "example_app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs: SQLAlchemy resolves the models' annotations through it.
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    yield module
    module.engine.dispose()


def call(example: ModuleType, method: str, path: str, query: str = "") -> tuple[str, Any]:
    """One request as a WSGI server makes it: call, read the body, close it."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    result = example.app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return statuses[-1], json.loads(body)


def stored(example: ModuleType) -> list[str]:
    """The notes in the table, read through a connection of our own."""
    engine = create_engine(example.DATABASE_URL, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(text("SELECT text FROM example_notes ORDER BY id")))
    finally:
        engine.dispose()


def assert_cleaned_up(example: ModuleType) -> None:
    """No Session left in this greenlet, none live anywhere, no connection checked out."""
    registry = example.Session.registry
    assert not registry.has()
    stats = registry.stats()
    assert stats.live == 0
    assert stats.created == stats.removed
    assert example.engine.pool.checkedout() == 0


def test_create_commits_and_is_listed(example: ModuleType) -> None:
    """POST /notes commits: the note is stored and listed; the Session is removed."""
    assert call(example, "POST", "/notes", "text=hello") == ("201 Created", {"id": 1})
    assert_cleaned_up(example)
    assert stored(example) == ["hello"]
    assert call(example, "GET", "/notes") == ("200 OK", [{"id": 1, "text": "hello"}])
    assert_cleaned_up(example)


def test_forgotten_commit_stores_nothing(example: ModuleType) -> None:
    """POST /drafts never commits: nothing is stored, and the next request starts clean."""
    assert call(example, "POST", "/drafts", "text=later") == ("200 OK", {"stored": False})
    assert_cleaned_up(example)
    assert stored(example) == []
    # The next request in the same greenlet (a keep-alive connection) commits its own
    # note: without removal, it would have committed the draft along with it.
    assert call(example, "POST", "/notes", "text=kept")[0] == "201 Created"
    assert stored(example) == ["kept"]
    assert_cleaned_up(example)


def test_failing_request_rolls_back(example: ModuleType) -> None:
    """A request that raises after its insert stores nothing; its Session is removed."""
    with pytest.raises(RuntimeError, match="before the commit"):
        call(example, "POST", "/notes", "text=oops&fail=1")
    assert_cleaned_up(example)
    assert stored(example) == []
    assert call(example, "GET", "/notes") == ("200 OK", [])
    assert_cleaned_up(example)


def test_unknown_route_is_404(example: ModuleType) -> None:
    """A path the app does not know answers 404 and uses no Session at all."""
    assert call(example, "GET", "/nowhere") == ("404 Not Found", {"error": "no such route"})
    assert example.Session.registry.stats().created == 0


def test_under_gunicorn_with_greenscopes_worker(tmp_path: Path) -> None:
    """Under gunicorn's greenscope worker, keep-alive: only the committed note is stored."""
    url = f"sqlite:///{tmp_path / 'example.db'}"
    env = {**os.environ, "DATABASE_URL": url}
    port = loadgen.free_port()
    argv = [sys.executable, "-m", "gunicorn", "--chdir", str(DEPLOY), "-w", "1"]
    argv += ["-b", f"127.0.0.1:{port}", "-k", "greenscope.gunicorn.GeventWorker"]
    # loadgen.Server waits until GET /stats answers JSON: the app's 404 does.
    server = loadgen.Server([*argv, "example_app:app"], port, env, str(tmp_path))
    client = loadgen.Client(port)  # one keep-alive connection, one greenlet
    try:
        answers = [
            client.request("POST", "/notes?text=hello")[0],
            client.request("POST", "/drafts?text=later")[0],
            client.request("POST", "/notes?text=oops&fail=1")[0],
            client.request("POST", "/notes?text=world")[0],
        ]
        status, body, _ = client.request("GET", "/notes")
    finally:
        client.close()
        code = server.stop()
    log = server.log()
    assert answers == [201, 200, 500, 201], log
    assert status == 200
    assert [n["text"] for n in json.loads(body)] == ["hello", "world"]
    assert log.count("Traceback") == log.count("RuntimeError: failed after the insert") == 1
    assert "greenscope:" not in log, log  # no orphan warning, no failed close
    assert code == 0, log
