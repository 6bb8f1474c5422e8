"""The table of server-side HTTP sessions: a mixin, and two ways to map it.

One row per HTTP session: its id (the random part of the signed cookie), its data (bytes,
whatever the caller serialized) and when it expires, stored in UTC. ``expired`` works on
a row and in a query (``select(Model).where(Model.expired)``), against the time at which
the expression is built.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, TypeVar

from sqlalchemy import DateTime, LargeBinary, String
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import Mapped, mapped_column, registry
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = ["SessionModelMixin", "UTCDateTime", "create_session_model", "register_session_model"]

UTC = dt.timezone.utc
_NAIVE_DIALECTS = {"mysql", "mariadb", "sqlite"}  # no time zone in the stored value


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware ``datetime`` in, the same instant in UTC out, on every dialect.

    PostgreSQL keeps ``timestamptz``. MySQL, MariaDB and SQLite have no time zone in the
    column: values are stored as naive UTC (microseconds kept: ``DATETIME(6)`` on MySQL
    and MariaDB) and come back timezone-aware. A naive ``datetime`` is refused: its
    meaning would depend on the server's or the process's time zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"greenscope.sessions: expires_at needs a timezone-aware datetime; got the "
                f"naive {value!r} (use datetime.now(timezone.utc))"
            )
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name in _NAIVE_DIALECTS else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


class SessionModelMixin:
    """The columns of a server-side HTTP session, to mix into a mapped class.

    ``session_id`` (up to 255 visible ASCII characters, the primary key; compared
    case-sensitively on MySQL and MariaDB too), ``data`` (bytes;
    up to 16 MB on MySQL and MariaDB, ``MEDIUMBLOB``) and ``expires_at`` (timezone-aware,
    stored in UTC, indexed for :meth:`SQLAlchemyStore.delete_expired`). Map it with
    :func:`create_session_model`, or subclass it yourself (to add columns or table
    arguments) and map that with :func:`register_session_model`.

    .. versionadded:: 0.3
    """

    # Binary on MySQL and MariaDB: their default collations compare case-insensitively,
    # and another user's id differing only in case must not match.
    session_id: Mapped[str] = mapped_column(
        String(255).with_variant(
            mysql.VARCHAR(255, charset="ascii", collation="ascii_bin"), "mysql", "mariadb"
        ),
        primary_key=True,
    )
    data: Mapped[bytes] = mapped_column(
        LargeBinary().with_variant(mysql.MEDIUMBLOB(), "mysql", "mariadb")
    )
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)

    @hybrid_property
    def expired(self) -> bool:
        """True once ``expires_at`` has passed; in a query, as of the query's building."""
        return self.expires_at <= utcnow()

    @expired.inplace.expression
    @classmethod
    def _expired_expression(cls) -> ColumnElement[bool]:
        return cls.expires_at <= utcnow()


_Model = TypeVar("_Model", bound=SessionModelMixin)


def _registry_of(base: Any, call: str) -> registry:
    if isinstance(base, registry):
        return base
    found = getattr(base, "registry", None)
    if isinstance(base, type) and isinstance(found, registry):
        return found  # a DeclarativeBase subclass, or a declarative_base() / db.Model
    raise TypeError(
        f"greenscope.sessions.{call} takes a DeclarativeBase subclass (or any declarative "
        f"base, such as Flask-SQLAlchemy's db.Model) or a sqlalchemy.orm.registry; got "
        f"{base!r}"
    )


def create_session_model(base: Any, table_name: str = "session") -> type[SessionModelMixin]:
    """A mapped class of :class:`SessionModelMixin` in table ``table_name``, on ``base``.

    ``base`` is a ``DeclarativeBase`` subclass (the model's table joins its metadata; create
    it with ``base.metadata.create_all(engine)``) or a ``registry``.

    .. versionadded:: 0.3
    """
    if not isinstance(table_name, str) or not table_name:
        raise ValueError(
            "greenscope.sessions.create_session_model(base, table_name=...) takes a "
            f"non-empty table name; got {table_name!r}"
        )
    reg = _registry_of(base, "create_session_model(base)")
    name = "HTTPSession_" + "".join(c if c.isalnum() else "_" for c in table_name)
    namespace = {"__tablename__": table_name, "__module__": __name__}
    if isinstance(base, registry):
        model = type(name, (SessionModelMixin,), namespace)
        reg.map_declaratively(model)
        return model
    mapped: type[SessionModelMixin] = type(name, (SessionModelMixin, base), namespace)
    return mapped


def register_session_model(base: Any, model: type[_Model]) -> type[_Model]:
    """Map ``model``, your own subclass of :class:`SessionModelMixin`, on ``base``.

    For a model that needs more than the mixin: extra columns, ``__table_args__`` (a
    schema), another ``__tablename__`` (the default is ``session``). Returns ``model``.

    .. versionadded:: 0.3
    """
    if not (isinstance(model, type) and issubclass(model, SessionModelMixin)):
        raise TypeError(
            "greenscope.sessions.register_session_model(base, model) takes a subclass of "
            f"greenscope.sessions.SessionModelMixin; got {model!r}"
        )
    reg = _registry_of(base, "register_session_model(base, model)")
    if "__mapper__" in model.__dict__:
        if model.__mapper__.registry is reg:  # type: ignore[attr-defined]
            return model  # already mapped there: nothing to do
        raise ValueError(
            f"greenscope.sessions.register_session_model: {model.__qualname__} is mapped "
            "on another registry already"
        )
    if "__tablename__" not in model.__dict__ and "__table__" not in model.__dict__:
        model.__tablename__ = "session"  # type: ignore[attr-defined]
    reg.map_declaratively(model)
    return model
