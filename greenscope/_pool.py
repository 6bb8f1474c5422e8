"""Pool-level repairs: what greenscope makes sure of when a connection is checked in.

One class-level ``reset`` listener, installed once at import, does two things:

* a connection a cleanup job held while the watchdog cut its socket never re-enters the
  pool (:func:`greenscope._cleanup.checking_in`: the claim check and the cut share a
  lock, so a cut can never reach a connection the pool handed to someone else);
* it rolls back SQLite transactions left open after a failed COMMIT (below).

After a COMMIT that fails on SQLite (``database is locked``, a deferred foreign key),
SQLAlchemy deactivates the transaction without rolling it back, then believes the
connection was reset and skips its reset-on-return ROLLBACK
(``RootTransaction._do_commit`` deactivates in its ``finally``; ``Connection.close``
then checks in with ``transaction_was_reset=True``). SQLite keeps the transaction open,
so the pooled connection goes back *inside the failed transaction, still holding the
write lock*: every other writer gets ``database is locked``, and the next checkout
commits the failed request's writes with its own. The same happens to a Core
``Connection`` after a failed ``commit()``. PostgreSQL ends a transaction whose COMMIT
failed, so psycopg is not affected. (zope.sqlalchemy#75 reports the same symptom.)

:func:`_rollback_leftover` runs on every pool's ``reset`` event (a class-level
listener, installed once at import): when SQLAlchemy says the transaction was reset but
the driver itself reports one open (``dbapi_connection.in_transaction`` is True:
sqlite3 and pg8000 keep that flag locally, so checking costs no round trip), it rolls
back. A failing rollback is handled by SQLAlchemy's pool like any failed reset: logged
and the connection invalidated, never returned inside a transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.pool import Pool

from greenscope import _cleanup

__all__: list[str] = []


def _rollback_leftover(dbapi_connection: Any, record: Any, reset_state: Any) -> None:
    _cleanup.checking_in(dbapi_connection, record)  # a cleanup job's cut connection
    if record is not None and record.dbapi_connection is None:
        return  # taken out of the pool (cut): nothing to reset
    if (
        reset_state.transaction_was_reset
        and reset_state.asyncio_safe
        and getattr(dbapi_connection, "in_transaction", False) is True
    ):
        dbapi_connection.rollback()


if not event.contains(Pool, "reset", _rollback_leftover):
    event.listen(Pool, "reset", _rollback_leftover)
