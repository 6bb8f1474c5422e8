"""Debug mode: catch a Session used from a greenlet other than the one it belongs to.

A ``Session`` (and its connection) is not safe to share between greenlets: two greenlets
that interleave statements on one connection mix their transactions, and each sees the
other's pending objects. It happens by accident, typically by passing an ORM object (or
the Session itself) to ``gevent.spawn()``: the child's lazy load or flush runs on the
parent's Session. Nothing fails at once; the data is wrong later.

With debug mode on, every Session a greenscope registry makes or is given records its
owner greenlet (a weakref in ``session.info``), and class-level Session event listeners
raise :class:`RuntimeError` when another greenlet executes a statement, flushes, commits
or adds an object through it. Off (the default), nothing is recorded or listened to:
production pays nothing. On, each checked operation costs one ``getcurrent()`` and a
dict lookup; a Session made while debug mode was off is never checked.

Not guaranteed: only operations that reach those events are checked (``Session.get()``
answered from the identity map, attribute reads and ``close()`` are not); Sessions of
registries with a custom ``scopefunc`` (SQLAlchemy's) are not tagged.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from greenlet import getcurrent
from greenlet import greenlet as RawGreenlet
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session

from greenscope._hot import Flag

__all__ = ["set_debug"]

_OWNER = "greenscope.owner"

# On or off; read on the slow paths, and as a C field by greenscope._hot's compiled
# paths, which then step aside.
debugging = Flag()


def set_debug(enabled: bool = True) -> bool:
    """Turn greenscope's debug checks on or off; return the previous setting.

    On, a greenscope Session used from a greenlet other than its owner raises
    :class:`RuntimeError` naming both greenlets. Setting the environment variable
    ``GREENSCOPE_DEBUG=1`` turns it on at import. Meant for development and tests;
    it checks Sessions made after it was turned on.

    .. versionadded:: 0.1
    """
    previous, active = debugging.done, bool(enabled)
    debugging.done = active
    for name, listener in _LISTENERS.items():
        if active and not event.contains(Session, name, listener):
            event.listen(Session, name, listener)
        elif not active and event.contains(Session, name, listener):
            event.remove(Session, name, listener)
    return previous


def tag(value: object, owner: RawGreenlet) -> None:
    """Record ``owner`` on ``value`` if it is a Session (called only when active)."""
    if isinstance(value, Session):
        value.info[_OWNER] = weakref.ref(owner)


def untag(value: object) -> object | None:
    """Stop checking ``value`` (greenscope itself closes it); return what :func:`retag`
    needs to start again, or None if it was not checked."""
    if isinstance(value, Session):
        owner: object | None = value.info.pop(_OWNER, None)
        return owner
    return None


def retag(value: object, owner: object) -> None:
    """Undo :func:`untag`."""
    if isinstance(value, Session):
        value.info[_OWNER] = owner


def _describe(g: RawGreenlet | None) -> str:
    if g is None:
        return "a greenlet that has ended (greenscope closed the Session for it then)"
    name = getattr(g, "name", None)  # gevent.Greenlet
    label = f"{type(g).__qualname__} {name!r}" if name else type(g).__qualname__
    state = "dead" if g.dead else "running"
    return f"{label} at {id(g):#x} ({state})"


def _check(session: Session, operation: str) -> None:
    ref: weakref.ref[RawGreenlet] | None = session.info.get(_OWNER)
    if ref is None:
        return
    owner = ref()
    current = getcurrent()
    if owner is current:
        return
    raise RuntimeError(
        f"greenscope: a Session owned by {_describe(owner)} was used for {operation} from "
        f"{_describe(current)}. A Session must stay in the greenlet that made it: two "
        "greenlets on one Session interleave statements on one connection and see each "
        "other's objects. Call the scoped_session in each greenlet (Session.execute(), "
        "Session.add(), ...) so each gets its own, and pass ids rather than ORM objects "
        "to other greenlets. (Checked because greenscope debug mode is on.)"
    )


def _on_execute(state: ORMExecuteState) -> None:
    _check(state.session, "a statement")


def _on_flush(session: Session, flush_context: Any, instances: Any) -> None:
    _check(session, "a flush")


def _on_commit(session: Session) -> None:
    _check(session, "a commit")


def _on_attach(session: Session, instance: Any) -> None:
    _check(session, f"adding {type(instance).__name__}")


_LISTENERS: dict[str, Any] = {
    "do_orm_execute": _on_execute,
    "before_flush": _on_flush,
    "before_commit": _on_commit,
    "before_attach": _on_attach,
}

if os.environ.get("GREENSCOPE_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}:
    set_debug(True)
