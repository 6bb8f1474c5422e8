"""The engine guard: leaked connections freed in the hub are never reset there (gevent#1937).

Every scenario runs in a fresh, monkey-patched interpreter against PostgreSQL: it leaks
Sessions and Connections into reference cycles, lets the garbage collector free them
(in the hub, as a hub callback, or in an ordinary greenlet), then reports what the pool,
the logs, stderr and ``pg_stat_activity`` show. Each guarded run has a stock control
that shows the failure.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from conftest import pg_url, run_scenario

pytestmark = pytest.mark.postgres

SCENARIO = """
from gevent import monkey; monkey.patch_all()
import gc, io, json, logging, sys
import gevent
from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker
import greenscope

captured = io.StringIO()
sys.stderr = captured  # gevent prints errors raised in the hub here
handler = logging.StreamHandler(captured)
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
gc.disable()  # only the collections the scenario runs

tag = {tag!r}
engine = create_engine(
    {url!r}, pool_size=3, max_overflow=0, pool_timeout=5,
    connect_args={{"application_name": tag}}, **{engine_kw}
)
invalidated, connects = [], []
event.listen(engine, "invalidate", lambda *a: invalidated.append(1))
event.listen(engine, "connect", lambda *a: connects.append(1))
resets = []
if {user_listener}:
    event.listen(engine, "reset", lambda dbapi, rec, state: resets.append(1))
mode = {mode!r}
if mode == "explicit":
    greenscope.guard_engine(engine)
elif mode == "registry":
    Scoped = greenscope.scoped_session(sessionmaker(engine))  # guards its engine
elif mode == "opted-out":
    greenscope.guard_engine(engine, enabled=False)

with engine.begin() as conn:
    conn.execute(text("CREATE TABLE IF NOT EXISTS " + tag + " (id serial, owner text)"))

class Cycle:
    def __init__(self, obj):
        self.obj, self.me = obj, self

def leak():
    s = Session(engine)  # made directly: no registry holds it
    s.execute(text("INSERT INTO " + tag + " (owner) VALUES ('session')"))
    Cycle(s)
    c = engine.connect()
    c.execute(text("INSERT INTO " + tag + " (owner) VALUES ('connection')"))
    Cycle(c)

gevent.spawn(leak).join()
assert engine.pool.checkedout() == 2
if {in_hub}:
    gevent.get_hub().loop.run_callback(gc.collect)
    gevent.sleep(0)
else:
    gevent.spawn(gc.collect).join()
ok = greenscope.wait_reaped(10)

def busy(i):
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_sleep(0.05)"))

served = gevent.joinall([gevent.spawn(busy, i) for i in range(3)], raise_error=False)
with create_engine({url!r}).connect() as other:
    idle_in_tx = other.execute(text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = :t AND state = 'idle in transaction'"), {{"t": tag}}
    ).scalar_one()
    stored = other.execute(text("SELECT count(*) FROM " + tag)).scalar_one()
    other.execute(text("DROP TABLE " + tag))
    other.commit()
log = captured.getvalue()
result = {{
    "reaped": ok,
    "checked_out": engine.pool.checkedout(),
    "reset_errors": log.count("Exception during reset"),
    "blocking_switch": log.count("BlockingSwitchOutError"),
    "invalidated": len(invalidated),
    "served": all(g.successful() for g in served),
    "idle_in_transaction": idle_in_tx,
    "stored": stored,
    "rescued": greenscope.stats().rescued,
    "rescue_warnings": log.count("returned to its pool inside the gevent hub"),
    "user_resets": len(resets),
    "connects": len(connects),
}}
engine.dispose()
sys.__stdout__.write(json.dumps(result) + "\\n")
"""


def scenario(
    mode: str,
    *,
    in_hub: bool = True,
    driver: str = "psycopg",
    engine_kw: dict[str, Any] | None = None,
    user_listener: bool = False,
) -> dict[str, Any]:
    url = pg_url().replace("+psycopg", f"+{driver}")
    code = SCENARIO.format(
        tag=f"guard_{uuid.uuid4().hex[:10]}",
        url=url,
        mode=mode,
        in_hub=in_hub,
        engine_kw=repr(engine_kw or {}),
        user_listener=user_listener,
    )
    return run_scenario(code, timeout=60)  # type: ignore[no-any-return]


CLEAN = {
    "reaped": True,
    "checked_out": 0,
    "reset_errors": 0,
    "blocking_switch": 0,
    "invalidated": 0,
    "served": True,
    "idle_in_transaction": 0,
    "stored": 0,
}


@pytest.mark.parametrize("mode", ["explicit", "registry"])
def test_leaks_collected_in_the_hub_are_rescued_not_failed(mode: str) -> None:
    """A guarded engine's leaked Session and Connection, freed in the hub: no error, no leak."""
    result = scenario(mode)
    assert {k: result[k] for k in CLEAN} == CLEAN
    assert result["rescued"] == 2
    assert result["rescue_warnings"] == 2


def test_stock_control_fails_in_the_hub() -> None:
    """Without the guard the same leaks fail with BlockingSwitchOutError (gevent#1937)."""
    result = scenario("opted-out")
    assert result["reset_errors"] >= 1
    assert result["blocking_switch"] >= 1
    assert result["invalidated"] >= 1
    assert result["rescued"] == 0


def test_a_pure_python_driver_is_left_with_no_half_written_state() -> None:
    """pg8000, whose close() itself writes through gevent's sockets: rescued cleanly."""
    result = scenario("explicit", driver="pg8000")
    assert {k: result[k] for k in CLEAN} == CLEAN
    assert result["rescued"] == 2


def test_outside_the_hub_the_reset_is_sqlalchemys_own() -> None:
    """Freed in an ordinary greenlet: rolled back and kept in the pool, nothing rescued."""
    guarded = scenario("explicit", in_hub=False)
    assert {k: guarded[k] for k in CLEAN} == CLEAN
    assert guarded["rescued"] == 0
    assert guarded["connects"] == 3, "the two leaked connections were kept, not replaced"
    assert guarded == scenario("opted-out", in_hub=False)


@pytest.mark.parametrize("reset", ["commit", None])
def test_reset_on_return_and_user_listeners_behave_as_without_the_guard(reset: str | None) -> None:
    """pool_reset_on_return="commit" / None and a user's reset listener, guard or not."""
    kw = {"pool_reset_on_return": reset}
    guarded = scenario("explicit", in_hub=False, engine_kw=kw, user_listener=True)
    stock = scenario("opted-out", in_hub=False, engine_kw=kw, user_listener=True)
    assert guarded == stock
    assert guarded["user_resets"] >= 2
    if reset == "commit":
        assert guarded["stored"] == 2, "commit-on-return committed both leaked writes"
