"""Shared fixtures: databases with pool counters, and a runner for subprocess scenarios.

The pytest process itself is never monkey-patched (patching is global and one-way);
scenarios that need ``patch_all()`` or a missing gevent run in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.pool import QueuePool

import greenscope
from greenscope import _cleanup, _registry

PG_URL_VAR = "GREENSCOPE_TEST_PG_URL"


@pytest.fixture(autouse=True)
def _isolate_registries() -> Iterator[None]:
    """Leave no value of one test to the next: wait for the reaper, then close the rest."""
    yield
    assert greenscope.wait_reaped(10), "the reaper did not finish within 10 s"
    greenscope.close_all(shutdown=False)
    _registry._shutdown.active = False  # a test's close_all() shuts later registries down


class CountingEngine:
    """An engine plus what its pool did: invalidations and checked-out connections."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.invalidated = 0
        event.listen(engine, "invalidate", self._on_invalidate)

    def _on_invalidate(self, *args: Any) -> None:
        self.invalidated += 1

    def checkedout(self) -> int:
        return self.engine.pool.checkedout()  # type: ignore[attr-defined, no-any-return]

    def count_rows(self, table: str = "items") -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[CountingEngine]:
    """A file SQLite database behind a QueuePool, with an empty ``items`` table."""
    engine = create_engine(
        f"sqlite:///{tmp_path / 'test.db'}", poolclass=QueuePool, pool_size=5, max_overflow=5
    )
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, owner TEXT)"))
    yield CountingEngine(engine)
    # Sessions still open return their connections first: dispose() only closes the
    # connections that are checked in (Python 3.13 warns about any left unclosed).
    greenscope.wait_reaped(10)
    greenscope.close_all(shutdown=False)
    engine.dispose()


def _server_url(var: str, what: str, example: str) -> str:
    """The URL in ``var``, checked to answer; skip when unset (``.ci/run`` sets it)."""
    url = os.environ.get(var)
    if not url:
        pytest.skip(f"{what} tests need {var}, e.g. {example}")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # set but unreachable: fail, never skip silently in CI
        pytest.fail(f"{var}={url} is set but {what} is unreachable: {exc}")
    finally:
        engine.dispose()
    return url


def pg_url() -> str:
    """The PostgreSQL URL for tests, or skip: set it to run them (``.ci/run`` does)."""
    return _server_url(PG_URL_VAR, "PostgreSQL", "postgresql+psycopg://postgres@127.0.0.1/test")


MYSQL_URL_VAR = "GREENSCOPE_TEST_MYSQL_URL"


def mysql_url() -> str:
    """The MySQL/MariaDB URL for tests, or skip: set it to run them (``.ci/run`` does)."""
    return _server_url(MYSQL_URL_VAR, "MySQL/MariaDB", "mysql+pymysql://root@127.0.0.1/test")


@pytest.fixture
def pg_table() -> Iterator[tuple[str, str]]:
    """(url, table): a fresh table in PostgreSQL, dropped afterwards."""
    url = pg_url()
    table = f"greenscope_{uuid.uuid4().hex[:12]}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id SERIAL PRIMARY KEY, owner TEXT)"))
    yield url, table
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


def errors_in_hub(*funcs: Callable[[], object]) -> list[BaseException]:
    """Call each of ``funcs`` inside the gevent hub; return the errors they raised."""
    import gevent  # noqa: PLC0415 - only the gevent tests need it

    errors: list[BaseException] = []

    def in_hub() -> None:
        for func in funcs:
            try:
                func()
            except Exception as exc:
                errors.append(exc)

    gevent.get_hub().loop.run_callback(in_hub)
    gevent.sleep(0)
    return errors


def run_scenario(code: str, *, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run ``code`` in a fresh interpreter (warnings are errors); return its last line as JSON.

    The script reports by printing one JSON document as its last line of output.
    """
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"scenario exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
            f"--- stderr\n{proc.stderr}"
        )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"scenario printed nothing; stderr:\n{proc.stderr}"
    return json.loads(lines[-1])


class ProbeJob:
    """A cleanup job that notes, as it runs, how many seconds its deadline left it."""

    def __init__(self) -> None:
        self.left: list[float] = []

    def __call__(self) -> None:
        (deadline, _) = _cleanup._watchdog.running[self]
        self.left.append(deadline - time.monotonic())

    def cut(self) -> None:  # pragma: no cover - never cut: it returns at once
        raise AssertionError("cut")

    def run(self) -> bool:
        """Run it under the watchdog, counted as submit() counts it; True if in time."""
        _cleanup._pending.count += 1  # run_job uncounts it
        return _cleanup._run_job(self, lambda entry: False)
