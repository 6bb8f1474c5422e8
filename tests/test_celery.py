"""greenscope.celery under real workers: every pool, RabbitMQ and Redis, on PostgreSQL.

Each case starts ``celery worker`` on ``tests/celery_apps/tasks.py`` with one pool, sends
a batch of tasks that write and commit, forget to commit, raise and retry, waits for
their results, then checks the database while the worker idles (nothing idle in
transaction), stops the worker (warm shutdown) and reads what each worker process
reported at exit (nothing live, nothing checked out, no orphan warning).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from conftest import CountingEngine, pg_url, run_scenario

TESTS = Path(__file__).resolve().parent
AMQP_VAR, REDIS_VAR = "GREENSCOPE_TEST_AMQP_URL", "GREENSCOPE_TEST_REDIS_URL"


def broker_url(kind: str) -> str:
    var = AMQP_VAR if kind == "rabbitmq" else REDIS_VAR
    url = os.environ.get(var)
    if not url:
        pytest.skip(
            f"Celery tests on {kind} need {var} "
            "(e.g. amqp://guest:guest@127.0.0.1:5672// or redis://127.0.0.1:6379/0)"
        )
    return url


def redis_backend() -> str:
    url = os.environ.get(REDIS_VAR)
    if not url:
        pytest.skip(f"Celery tests keep task results in Redis: set {REDIS_VAR}")
    return url.rsplit("/", 1)[0] + "/1"


class Worker:
    """One ``celery worker`` process and the batch it ran."""

    def __init__(self, tmp: Path, broker: str, pool: str, **env: str) -> None:
        self.queue = f"gs_{uuid.uuid4().hex[:10]}"
        self.table = self.queue
        self.report_dir = tmp / "reports"
        self.report_dir.mkdir(parents=True)
        self.db = create_engine(pg_url())
        with self.db.begin() as conn:
            conn.execute(text(f"CREATE TABLE {self.table} (id serial, owner text)"))
            conn.execute(text(f"CREATE TABLE {self.table}_parent (id int PRIMARY KEY)"))
            conn.execute(
                text(
                    f"CREATE TABLE {self.table}_child (parent int REFERENCES "
                    f"{self.table}_parent (id) DEFERRABLE INITIALLY DEFERRED)"
                )
            )
        self.env = {
            **os.environ,
            "GS_BROKER": broker,
            "GS_BACKEND": redis_backend(),
            "GS_DB": pg_url(),
            "GS_TABLE": self.table,
            "GS_QUEUE": self.queue,
            "GS_REPORT": str(self.report_dir),
            "PYTHONPATH": str(TESTS),
            **env,
        }
        concurrency = "2" if pool == "prefork" else "4"
        self.log = (tmp / "worker.log").open("w")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "celery_apps.tasks", "worker"),
                *("-P", pool, "-c", concurrency, "-Q", self.queue, "-l", "WARNING"),
                *("--without-heartbeat", "--without-mingle", "--without-gossip"),
            ],
            cwd=TESTS,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def app(self) -> Any:
        """The same Celery app, in this process, to send tasks (never to run them)."""
        from celery import Celery  # noqa: PLC0415

        app = Celery("greenscope_tests", broker=self.env["GS_BROKER"], backend=redis_backend())
        app.conf.task_default_queue = self.queue
        return app

    def send(self, key: str, mode: str, **options: Any) -> Any:
        return self.app().send_task("celery_apps.tasks.write", (key, mode), **options)

    def run(self, batch: list[tuple[str, str]], **options: Any) -> dict[str, Any]:
        app = self.app()
        results = [app.send_task("celery_apps.tasks.write", (k, m), **options) for k, m in batch]
        outcome = {}
        deadline = time.monotonic() + 60
        for (key, _), result in zip(batch, results, strict=True):
            while not result.ready():
                assert self.proc.poll() is None, f"the worker died: see {self.log.name}"
                assert time.monotonic() < deadline, f"tasks did not finish: see {self.log.name}"
                time.sleep(0.02)
            outcome[key] = (result.state, result.get(propagate=False))
        app.close()
        return outcome

    def stored(self) -> list[str]:
        with self.db.connect() as conn:
            return list(conn.execute(text(f"SELECT owner FROM {self.table}")).scalars())

    def idle_in_transaction(self) -> int:
        query = text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = :q AND state = 'idle in transaction'"
        )
        with self.db.connect() as conn:
            return int(conn.execute(query, {"q": self.queue}).scalar_one())

    def stop(self) -> list[dict[str, Any]]:
        self.proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            self.proc.wait(60)
        finally:
            self.log.close()
        return [json.loads(p.read_text()) for p in self.report_dir.glob("*.json")]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        with self.db.begin() as conn:
            for suffix in ("", "_child", "_parent"):
                conn.execute(text(f"DROP TABLE IF EXISTS {self.table}{suffix}"))
        self.db.dispose()


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Any]:
    workers: list[Worker] = []

    def start(broker: str, pool: str, **env: str) -> Worker:
        worker = Worker(tmp_path / f"w{len(workers)}", broker_url(broker), pool, **env)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.close()


BATCH = [
    (f"{mode}-{i}", mode) for i in range(6) for mode in ("commit", "forget", "raise", "retry")
]


def wait_idle(worker: Worker, seconds: float = 5) -> int:
    """Idle-in-transaction backends once the batch is done (give closes a moment)."""
    deadline = time.monotonic() + seconds
    while (count := worker.idle_in_transaction()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


@pytest.mark.postgres
@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", ["rabbitmq", "redis"])
@pytest.mark.parametrize("pool", ["gevent", "prefork", "threads", "solo"])
def test_each_task_gets_its_own_session_and_leaves_nothing(
    worker_factory: Any, pool: str, broker: str
) -> None:
    """Commits stay, forgotten and failed writes roll back, no task sees another's Session."""
    worker = worker_factory(broker, pool)
    outcome = worker.run(BATCH)
    states = {key: state for key, (state, _) in outcome.items()}
    assert {k: s for k, s in states.items() if not k.startswith("raise")} == {
        k: "SUCCESS" for k, _ in BATCH if not k.startswith("raise")
    }
    assert all(states[k] == "FAILURE" for k, _ in BATCH if k.startswith("raise"))
    saw_foreign = [k for k, (state, value) in outcome.items() if value is True]
    assert saw_foreign == [], "a task saw another task's Session"
    stored = sorted(worker.stored())
    assert stored == sorted(k for k, m in BATCH if m in ("commit", "retry"))
    assert wait_idle(worker) == 0, "nothing is idle in transaction while the worker idles"
    reports = worker.stop()
    assert reports, "every worker process reported at exit"
    for report in reports:
        assert report["live"] == 0
        assert report["checked_out"] == 0
        assert report["orphan_warnings"] == 0, "task Sessions are removed, not reaped"
        assert report["created"] == report["removed"] + report["reaped"]


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_stock_control_shares_sessions_between_tasks(worker_factory: Any) -> None:
    """Without greenscope, a threads pool hands one task's Session to the next."""
    worker = worker_factory("redis", "threads", GS_STOCK="1")
    outcome = worker.run(BATCH)
    saw_foreign = [k for k, (state, value) in outcome.items() if value is True]
    stored = worker.stored()
    worker.stop()
    assert saw_foreign, "the control must show tasks inheriting Sessions"
    assert any(k.startswith("forget") for k in stored), "a forgotten write got committed"


@pytest.mark.postgres
@pytest.mark.timeout(180)
@pytest.mark.parametrize("pool", ["gevent", "prefork"])
def test_commit_on_success_commits_before_success_is_recorded(
    worker_factory: Any, pool: str
) -> None:
    """commit_on_success: forgotten commits of successful tasks are stored, once; failures not."""
    worker = worker_factory("rabbitmq", pool, GS_COMMIT="1")
    outcome = worker.run(BATCH)
    stored = sorted(worker.stored())
    assert stored == sorted(k for k, m in BATCH if m != "raise")
    assert all(
        state == "SUCCESS" for k, (state, _) in outcome.items() if not k.startswith("raise")
    )
    assert wait_idle(worker) == 0
    for report in worker.stop():
        assert report["live"] == 0
        assert report["orphan_warnings"] == 0


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_a_task_killed_at_its_hard_time_limit_is_rolled_back_and_removed(
    worker_factory: Any,
) -> None:
    """gevent pool: time_limit kills the task mid-transaction; its Session is removed."""
    worker = worker_factory("redis", "gevent")
    outcome = worker.run([("hang-0", "hang"), ("hang-1", "hang")], time_limit=1)
    assert {state for state, _ in outcome.values()} == {"FAILURE"}
    assert worker.stored() == []
    assert wait_idle(worker) == 0
    for report in worker.stop():
        assert report["live"] == 0
        assert report["checked_out"] == 0
        assert report["orphan_warnings"] == 0


def test_eager_tasks_leave_the_callers_session_alone(sqlite_db: CountingEngine) -> None:
    """Eager tasks run in the caller's greenlet: nothing is removed or committed there."""
    from celery import Celery  # noqa: PLC0415

    import greenscope  # noqa: PLC0415
    import greenscope.celery  # noqa: PLC0415

    app = Celery("eager", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True
    greenscope.celery.install(app, commit_on_success=True)
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine))

    @app.task  # type: ignore[untyped-decorator]  # Celery is untyped
    def touch() -> int:
        return int(Session.execute(text("SELECT count(*) FROM items")).scalar_one())

    Session.execute(text("INSERT INTO items (owner) VALUES ('request')"))
    mine = Session()
    assert touch.delay().get() == 1, "the task used the caller's Session, as eager tasks do"
    assert touch() == 1  # called as a plain function
    assert Session() is mine, "not removed"
    assert mine.in_transaction()
    Session.rollback()
    assert sqlite_db.count_rows() == 0, "not committed"
    Session.remove()


def test_install_refuses_what_is_not_a_celery_app() -> None:
    """install() names what it got."""
    import greenscope.celery  # noqa: PLC0415

    with pytest.raises(TypeError, match="takes your Celery application"):
        greenscope.celery.install("proj.celery:app")


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_a_failing_commit_fails_the_task(worker_factory: Any) -> None:
    """commit_on_success: a COMMIT that fails (deferred foreign key) is a FAILURE."""
    worker = worker_factory("redis", "gevent", GS_COMMIT="1")
    outcome = worker.run([("doomed", "deferred"), ("fine", "forget")])
    assert outcome["doomed"][0] == "FAILURE"
    assert "ForeignKeyViolation" in repr(outcome["doomed"][1])
    assert outcome["fine"][0] == "SUCCESS"
    assert worker.stored() == ["fine"]
    for report in worker.stop():
        assert report["live"] == 0


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_a_revoked_and_terminated_task_is_rolled_back_and_removed(worker_factory: Any) -> None:
    """gevent pool: revoke(terminate=True) kills the task mid-transaction; nothing stays."""
    worker = worker_factory("rabbitmq", "gevent")
    result = worker.send("revoked", "hang")
    deadline = time.monotonic() + 30
    while worker.idle_in_transaction() == 0:  # the task has written and sleeps
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    app = worker.app()
    app.control.revoke(result.id, terminate=True)
    while not result.ready():
        assert time.monotonic() < deadline, "the task was not terminated"
        time.sleep(0.05)
    assert result.state == "REVOKED"  # stored as the kill is issued: it lands just after
    assert wait_idle(worker, 20) == 0, "rolled back long before its 30 s sleep would end"
    assert worker.stored() == []
    for report in worker.stop():
        assert report["live"] == 0
        assert report["checked_out"] == 0
        assert report["orphan_warnings"] == 0


def test_importing_without_celery_names_the_extra() -> None:
    """Without Celery installed, importing greenscope.celery says what to install."""
    result = run_scenario(
        """
        import json, sys
        sys.modules["celery"] = None  # as if not installed
        try:
            import greenscope.celery
        except ImportError as exc:
            print(json.dumps(str(exc)))
        """
    )
    assert "pip install 'greenscope[celery]'" in result
