"""Against real PostgreSQL through psycopg 3, in a monkey-patched process (cooperative I/O).

Each scenario runs in a subprocess that calls ``monkey.patch_all()`` first, as gunicorn's
gevent worker does; that is where a close in the hub fails with BlockingSwitchOutError.
"""

from __future__ import annotations

import pytest

from conftest import run_scenario

pytestmark = pytest.mark.postgres

SCENARIO = """
from gevent import monkey
monkey.patch_all()

import io, json, logging, sys, uuid
import gevent, gevent.pool
from greenlet import getcurrent
from sqlalchemy import create_engine, event, text
import sqlalchemy.orm
from sqlalchemy.orm import sessionmaker
import greenscope

url, table, variant = sys.argv[1], sys.argv[2], sys.argv[3]
app = "greenscope-test-" + uuid.uuid4().hex[:8]

errors = []
class Collect(logging.Handler):
    def emit(self, record):
        errors.append(record.getMessage())
logging.getLogger().addHandler(Collect(level=logging.ERROR))
hub_errors = gevent.get_hub().exception_stream = io.StringIO()  # errors the hub swallowed

engine = create_engine(
    url, pool_size=5, max_overflow=5, pool_timeout=POOL_TIMEOUT,
    connect_args={"application_name": app},
)
invalidated = []
event.listen(engine, "invalidate", lambda *a: invalidated.append(1))

if variant == "greenscope":
    Session = greenscope.scoped_session(sessionmaker(engine))
elif variant == "getcurrent":  # the usual hand-rolled fix: keyed on the greenlet
    Session = sqlalchemy.orm.scoped_session(sessionmaker(engine), scopefunc=getcurrent)
else:  # SQLAlchemy's default, built after patching: a gevent.local per greenlet
    Session = sqlalchemy.orm.scoped_session(sessionmaker(engine))

failed_requests = []
def work(i):
    try:
        Session.execute(text(f"INSERT INTO {table} (owner) VALUES (:o)"), {"o": str(i)})
        Session.execute(text("SELECT pg_sleep(0.005)"))
    except Exception as exc:
        failed_requests.append(type(exc).__name__)
    # ends mid-transaction: no commit, no remove()

pool = gevent.pool.Pool(50)
for i in range(50):
    pool.spawn(work, i)   # unreferenced: freed in the hub when it finishes
pool.join(timeout=60)
reaped_in_time = greenscope.wait_reaped(30)
checkedout = engine.pool.checkedout()

probe = create_engine(url, poolclass=__import__("sqlalchemy.pool").pool.NullPool)
with probe.connect() as conn:
    idle_in_tx = conn.execute(text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = :a AND state LIKE 'idle in transaction%'"), {"a": app}
    ).scalar_one()
    rows = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
print(json.dumps({
    "reaped_in_time": reaped_in_time, "checkedout": checkedout, "idle_in_tx": idle_in_tx,
    "rows": rows, "invalidated": len(invalidated), "errors": errors,
    "hub_errors": hub_errors.getvalue(), "failed_requests": len(failed_requests),
}))
"""


def scenario(url: str, table: str, variant: str, pool_timeout: int) -> dict[str, object]:
    code = SCENARIO.replace("POOL_TIMEOUT", str(pool_timeout))
    wrapper = f"import sys; sys.argv[1:] = {[url, table, variant]!r}\n" + code
    result: dict[str, object] = run_scenario(wrapper, timeout=120)
    return result


def test_fifty_pool_greenlets_ending_mid_transaction_leave_nothing(
    pg_table: tuple[str, str],
) -> None:
    """50 unreferenced Pool greenlets end mid-transaction: no error, no invalidation, no leak."""
    url, table = pg_table
    result = scenario(url, table, "greenscope", pool_timeout=30)
    assert result == {
        "reaped_in_time": True,
        "checkedout": 0,
        "idle_in_tx": 0,
        "rows": 0,  # every transaction was rolled back
        "invalidated": 0,
        "errors": [],
        "hub_errors": "",
        "failed_requests": 0,  # 10 connections served 50 greenlets: orphans came back in time
    }


def test_without_greenscope_the_same_load_exhausts_the_pool(pg_table: tuple[str, str]) -> None:
    """The control: a getcurrent-keyed scoped_session keeps every connection checked out."""
    url, table = pg_table
    result = scenario(url, table, "getcurrent", pool_timeout=1)
    assert result["checkedout"] == 10  # pool_size + max_overflow, held by dead greenlets
    assert result["idle_in_tx"] == 10
    assert result["failed_requests"] == 40  # QueuePool limit ... reached


def test_sqlalchemy_default_registry_leaves_cleanup_to_the_gc(pg_table: tuple[str, str]) -> None:
    """The other control: SQLAlchemy's default registry, built after patching, is per
    greenlet, but nobody closes a dead greenlet's Session: greenlets wait for connections
    that only garbage collection gives back, and many fail."""
    url, table = pg_table
    result = scenario(url, table, "default", pool_timeout=1)
    assert isinstance(result["failed_requests"], int)
    assert result["failed_requests"] > 0
    assert result["rows"] == 0
