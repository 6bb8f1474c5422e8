"""Per-greenlet storage for SQLAlchemy's registry protocol, with orphan cleanup.

The data structure, for one greenlet ``g`` with values in two registries R1 and R2::

    g.__dict__ ──"greenscope:R1"──> value1        (the hit path reads only this)
               ──"greenscope:R2"──> value2
               ──"greenscope:watch"──> _Watch ──ref──> weakref ┄┄> g   (callback: the watch)
                                          ├─r1, v1──> R1, value1       (strong: the first)
                                          └─more───> {R2: value2}      (strong: any others)
    _LIVE: {watch, ...}             only while the watch holds a value
    R1._counts.live: int            how many watches hold a value of R1

The watch's fields are those of :class:`greenscope._hot.Watch`, an extension type where
compiled: the per-greenlet paths (the first store, ``clear()``, ``remove()``, the
completion callback) run there in C and read its fields directly (the instructions a
greenlet costs: benchmarks/). Its weakref's callback is the watch itself, which needs
no back pointer; the cycle it makes is broken once the callback has run. Most greenlets
use one registry: its pair sits in two fields of the watch, and a dict is made only for
a second registry (memory per live entry).

Invariants:

* No strong reference to a greenlet is ever held: values live in the greenlet's own
  ``__dict__``, watches point back with a weakref only. So a lookup can only return what
  the *current* greenlet stored: a new greenlet that reuses a dead one's ``id()`` starts
  with an empty ``__dict__``. Contexts (``contextvars``) play no part, so a greenlet or
  thread running in a copied context never sees another's value.
* The watch's values (``r1``/``v1`` and ``more``) mirror the ``greenscope:R*`` keys while
  the greenlet lives. They are what cleanup closes after the greenlet's dict is gone;
  ``_LIVE`` keeps the watch (and thus its callback) alive for exactly as long as there is
  something to close. Membership of ``_LIVE`` is the claim on the values: ``take()``
  removes the watch from it, and of two racing callers only one succeeds.
* A greenlet ends in one of three ways we hear of: a ``gevent.Greenlet`` notifies its
  ``rawlink`` callbacks at completion (even if the object is still referenced); any
  greenlet's weakref callback runs when it is freed; and a native thread's main
  greenlet is declared dead when its OS thread ends (a real thread-local is freed then),
  since a gevent hub and its loop form a cycle that can keep that greenlet alive for
  good. The first one detaches the values; the others find nothing left. All run where
  I/O is forbidden, so closing is handed to :mod:`greenscope._cleanup`.

Thread/greenlet safety: a greenlet's values (its dict's ``greenscope:R*`` keys, its
watch's values, the watch's ``_LIVE`` membership and the registries' ``_live`` counts)
are changed by the greenlet itself (a store, a clear) or by a ``take()`` from anywhere
else (``close_all()`` in another thread, a weakref callback in a GC pass, the hub at a
completion). A ``take()`` runs under ``_values_lock``, and so does every change by the
owner but the two that a greenlet makes once each, which are ordered instead (with the
GIL, bytecodes run one at a time): the first store into an empty watch lists the watch
last, so a take() sees all of it or none of it, and ``take()`` empties a watch last, so
an empty watch is never one being taken; clearing a watch's only value claims the watch
by removing it from ``_LIVE``, one atomic operation, as take() does. The lock is
re-entrant (a GC pass inside a critical section may free another greenlet, whose
callback takes that greenlet's watch), so it does not keep out a greenlet of the same
thread that runs while a take() is switched out (a finalizer doing gevent I/O in that
GC pass, in ``close_all()``'s greenlet): a take() lists its watch in ``_TAKING``, and
the owner's locked changes leave a watch found there alone (a store goes into a new
watch; a clear leaves the value to the take(), which closes and counts it); the other
way round, the owner's locked changes list the watch in ``_CHANGING``, and a take()
that finds it there leaves it alone (its values stay the owner's, reaped at its end).
So a value stored, replaced or cleared while ``close_all()`` takes the greenlet's
others, from another thread or from a greenlet switch inside either, is neither lost
nor counted twice. On a free-threaded build the lock is always taken. The hit path reads
the greenlet's own dict and takes no lock. Not prevented: ``close_all()`` closing a
running greenlet's Session while its owner closes it too (``include_running=False``
leaves running greenlets alone). The other counters are exact on GIL builds,
approximate on free-threaded ones.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from greenlet import getcurrent
from greenlet import greenlet as RawGreenlet
from sqlalchemy.orm import Session
from sqlalchemy.util import ScopedRegistry

from greenscope import _cleanup, _debug, _engines, _guard, _hot, _pool  # noqa: F401 - _pool listens
from greenscope._hot import RegistryHit
from greenscope._log import RateLimited

_get_ident = _cleanup.get_ident  # the OS thread's id, even when gevent patched _thread
_MISSING: Any = object()

__all__ = [
    "GreenletRegistry",
    "RegistryStats",
    "close_all",
    "close_or_release",
    "current_sessions",
    "registries",
    "remove_current",
    "sessions_in",
    "stats",
    "wait_reaped",
]

_T = TypeVar("_T")

logger = logging.getLogger("greenscope")

_WATCH_KEY = "greenscope:watch"
_keys = count(1)

try:
    from gevent import Greenlet as _GeventGreenlet
    from gevent._hub_local import get_hub_if_exists as _get_hub_if_exists
except ImportError:  # pragma: no cover - exercised by a subprocess test
    _GeventGreenlet = None
    _get_hub_if_exists = None

# Every GreenletRegistry of the process, weakly: for stats() and close_all().
_REGISTRIES: weakref.WeakSet[GreenletRegistry[Any]] = weakref.WeakSet()
# Watches holding at least one value (alive while listed). A set of the watches
# themselves: keyed by id() of their weakref, each entry also held an int.
_LIVE: set[_Watch] = set()
# Watches a take() is emptying, and watches whose owner is changing them, both under
# _values_lock: the lock is re-entrant, so these keep the two apart when a greenlet
# switch inside one lets the other in, in the same thread (see the module's docstring).
_TAKING: set[_Watch] = set()
_CHANGING: set[_Watch] = set()


class _Changing:
    """``with _Changing(watch):``, under ``_values_lock``: the owner changes ``watch``
    (None: nothing to mark), and a take() switched in meanwhile leaves it alone. Nested
    (a finalizer of the same greenlet changing it too), the outermost one unlists it."""

    __slots__ = ("outer", "watch")

    def __init__(self, watch: _Watch | None) -> None:
        self.watch = watch

    def __enter__(self) -> None:
        self.outer = self.watch is not None and self.watch not in _CHANGING
        if self.outer:
            _CHANGING.add(self.watch)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        if self.outer:
            _CHANGING.discard(self.watch)


# Held by take() and by a greenlet's own changes to its values but the two ordered ones
# (see the module's docstring; an acquire and release cost about 1,000 instructions,
# which those two, once per greenlet each, do without). Re-entrant: a GC pass inside a
# critical section may free another greenlet, whose weakref callback takes that
# greenlet's watch. An OS lock even under monkey-patching: greenscope's own code under
# it never switches greenlets or does I/O (a finalizer in a GC pass may: _TAKING and
# _CHANGING cover that). Made anew in a forked child (_forget_inherited).
_values_lock = _cleanup.allocate_rlock()
# Whether bytecodes run one at a time, which the ordered changes rely on. A free-threaded
# build may enable its GIL later (for an extension), never disable it once enabled.
# Read as ``_ORDERED.done`` here and in greenscope._hot (tests turn it off to run the
# lock-only paths a free-threaded build takes).
_ORDERED = _hot.Flag()
_ORDERED.done = getattr(sys, "_is_gil_enabled", lambda: True)()


class _Shutdown:
    """Process-wide: set by close_all(), so registries made afterwards are shut down too."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False


_shutdown = _Shutdown()

_warn_enabled = logger.isEnabledFor  # cached by logging; reset when levels change
_orphan_warnings = RateLimited(
    "orphaned Sessions", lambda: _cleanup.settings().orphan_warnings_per_minute
)


@dataclass(frozen=True)
class RegistryStats:
    """A snapshot of a registry's counters (or of every registry's, summed).

    ``created == removed + reaped + live`` holds whenever no greenlet is in the middle of
    an operation: ``created`` counts values made by the registry or stored with ``set()``,
    ``removed`` those taken away by ``clear()`` (``scoped_session.remove()``), replaced by
    ``set()`` or closed by :func:`close_all`, ``reaped`` those closed because their greenlet
    ended first, and ``live`` those held now. ``failed`` counts closes that raised (a
    subset of ``reaped`` and ``removed``); the error was logged. ``timed_out`` counts
    closes greenscope stopped waiting for at their deadline
    (:attr:`greenscope.CleanupSettings.close_timeout`): their connections were cut and
    invalidated, and the database rolls their transactions back (also among
    ``reaped``/``removed``, and usually ``failed``). ``rescued``, in
    :func:`greenscope.stats` only (a registry's own is 0): connections the engine guard
    took out of a pool inside the gevent hub (:func:`greenscope.guard_engine`).

    .. versionchanged:: 0.2 ``timed_out`` and ``rescued``.
    """

    created: int = 0
    removed: int = 0
    reaped: int = 0
    failed: int = 0
    live: int = 0
    timed_out: int = 0
    rescued: int = 0

    def __add__(self, other: RegistryStats) -> RegistryStats:
        return RegistryStats(
            self.created + other.created,
            self.removed + other.removed,
            self.reaped + other.reaped,
            self.failed + other.failed,
            self.live + other.live,
            self.timed_out + other.timed_out,
            self.rescued + other.rescued,
        )


class _Lazy:
    """A log argument built only if the line is logged (``%s`` calls ``str()``)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], str]) -> None:
        self.make = make

    def __str__(self) -> str:
        return self.make()

    __repr__ = __str__  # handlers and filters that read record.args see the text too


def _describe(kind: str, gid: int, name: str | None = None) -> str:
    """A name for log lines: built only when a line is logged (it costs microseconds)."""
    label = f"{kind} {name!r}" if name else kind
    return f"{label} at {gid:#x}"


class _Watch(_hot.Watch):
    """What greenscope holds for one greenlet, shared by every registry (see above).

    The fields are :class:`greenscope._hot.Watch`'s; this adds the logic. Made by
    :func:`greenscope._hot.new_watch` (a gevent.Greenlet's) or :func:`_new_watch` (any
    other greenlet's), without an ``__init__`` (a Python frame per greenlet is a
    measurable part of a greenlet's cost): every field is assigned there, ``name`` and
    ``how`` to None until the greenlet completes. Hashed and compared by identity:
    ``_LIVE`` must find a watch whose greenlet is gone. Called (by its weakref, with
    it) when the greenlet is freed.
    """

    __slots__ = ()

    ref: weakref.ref[Any]  # to the greenlet; its callback is this watch
    r1: GreenletRegistry[Any] | None  # the first registry's value...
    v1: Any
    more: dict[GreenletRegistry[Any], Any] | None  # ...and the others'
    # For log lines, kept raw: formatting them (and gevent's lazy Greenlet.name) would
    # cost more than the rest of the watch; see owner.
    gtype: type
    gid: int
    name: str | None
    how: str | None
    main: bool  # a thread's main greenlet: freed after its thread ends
    # Where cleanup must run: the owner's thread, in its hub's greenlets if it has one
    # by then (submit() looks again, since a hub may be created after this).
    thread: int
    hub: weakref.ref[Any] | None  # hubs are greenlets too
    rawlinked: bool

    @property
    def owner(self) -> str:
        """The greenlet, for log lines: "Greenlet 'Greenlet-3' at 0x... (killed)"."""
        if self.main:
            return f"the main greenlet of thread {self.thread:#x}"
        # Both None until the greenlet completes.
        return _describe(self.gtype.__qualname__, self.gid, self.name) + (self.how or "")

    # -- the values: one registry in slots, more in a dict --------------------------------

    def put(self, registry: GreenletRegistry[Any], value: Any) -> bool:
        """Hold ``value`` for ``registry``; True if the watch held none for it before."""
        if self.r1 is None or self.r1 is registry:
            new = self.r1 is None
            self.r1, self.v1 = registry, value
            return new
        more = self.more
        if more is None:
            more = self.more = {}
        new = registry not in more
        more[registry] = value
        return new

    def drop(self, registry: GreenletRegistry[Any]) -> bool:
        """Let go of ``registry``'s value; False if the watch held none (taken meanwhile)."""
        if self.r1 is registry:
            if self.more:  # keep the oldest first: the next one moves into the slots
                first = next(iter(self.more))
                self.r1, self.v1 = first, self.more.pop(first)
            else:
                self.r1 = self.v1 = None
            return True
        if self.more is not None:
            return self.more.pop(registry, _MISSING) is not _MISSING
        return False

    def empty(self) -> bool:
        # put() fills the slots first and drop() refills them from ``more``: the slots
        # are empty only when everything is.
        return self.r1 is None

    def items(self) -> list[tuple[GreenletRegistry[Any], Any]]:
        """(registry, value) pairs, oldest registry first. Any thread: ``more`` is read
        once, and a take() elsewhere replaces it rather than emptying it."""
        pairs = [] if self.r1 is None else [(self.r1, self.v1)]
        more = self.more
        if more:
            pairs.extend(more.items())
        return pairs

    def _completed(self, g: Any) -> None:
        # In the hub: no I/O, no logging, must not raise. Only for a watch that holds
        # values (_on_completion tests that).
        _hot.record_end(self, g)
        values = self.take()  # detach(), inline: once per orphan
        if values:
            hub = self.hub() if self.hub is not None else None
            for registry, value in values:
                _cleanup.submit(_Reap(registry, value, self, True), self.thread, hub)

    def _thread_ended(self) -> None:
        # In the ending thread, during its teardown: no I/O, no logging, must not raise.
        self.how = " (thread ended)"
        self.detach(thread_gone=True)

    def owner_hub(self) -> Any | None:
        return self.hub() if self.hub is not None else None

    def take(self) -> list[tuple[GreenletRegistry[Any], Any]]:
        """Unregister every value (from ``_LIVE``, the registries and the greenlet's dict
        while it exists) and return them, (registry, value) pairs, one per registry;
        empty if another caller took them first. Any context: dict and set operations
        only, under ``_values_lock``."""
        if self not in _LIVE:
            return []  # the usual case, tested first and without the lock
        lock = _values_lock  # against the owner storing or clearing meanwhile
        lock.acquire()  # not ``with``: an orphan's path, and ``with`` costs twice as much
        try:
            if self in _CHANGING:
                # Its owner is changing it under this lock, switched out in this thread
                # (a finalizer's gevent I/O, see the module's docstring): its values stay
                # its own, closed when it ends, or by a later close_all().
                return []
            try:
                _LIVE.remove(self)  # the claim: the owner's clear claims it the same way
            except KeyError:
                return []  # another caller took them first
            # The lock is re-entrant, so it does not keep out the owner if a greenlet
            # switch happens in here (a GC pass whose finalizer does gevent I/O, in
            # close_all()'s greenlet): the owner's locked changes find the watch in
            # _TAKING and leave it alone (see _create and _forget).
            _TAKING.add(self)
            values = self.items()
            g = self.ref()
            d = g.__dict__ if g is not None else {}
            for registry, value in values:
                registry._counts.live -= 1
                if d.get(registry._key, _MISSING) is value:  # not one stored since
                    del d[registry._key]
            # Emptied last, r1 after the rest: an owner that finds r1 None stores without
            # the lock, and must find nothing of this take() still to be written.
            self.more = None
            self.v1 = None
            self.r1 = None
        finally:
            _TAKING.discard(self)  # no greenlet switch can come between these and r1
            lock.release()
        return values

    def detach(self, thread_gone: bool = False) -> None:
        """Hand every value to cleanup. Only for a dead owner; any context; idempotent."""
        values = self.take()
        if not values:
            return
        owner_thread = None if thread_gone else self.thread
        hub = None if thread_gone else self.owner_hub()
        for registry, value in values:
            _cleanup.submit(_Reap(registry, value, self, True), owner_thread, hub)


# gevent's rawlink, at a Greenlet's completion, in the hub (see _Watch._completed).
_on_completion = _hot.on_completion


def _new_watch(g: RawGreenlet) -> _Watch:
    """A watch for ``g``, the current greenlet, which has none yet."""
    found: _Watch | None = _hot.new_watch(g)  # a gevent.Greenlet in its thread's hub
    if found is not None:
        return found
    hub = _get_hub_if_exists() if _get_hub_if_exists is not None else None
    if g is hub:  # never true later: the hub gets no watch
        raise RuntimeError(
            "greenscope: the gevent hub cannot hold a Session: it never ends (so "
            "the Session would never be cleaned up) and cannot block (so it cannot "
            "do I/O). Do database work in a greenlet, e.g. gevent.spawn(func)."
        )
    watch = _Watch()
    watch.ref = weakref.ref(g, watch)
    watch.r1 = watch.v1 = watch.more = watch.how = watch.name = None
    watch.gtype = type(g)
    watch.gid = id(g)
    watch.thread = _get_ident()
    if hub is None:
        watch.hub = None
    else:
        watch.hub = weakref.ref(hub)
    if _GeventGreenlet is not None and isinstance(g, _GeventGreenlet):
        # Completion, not deallocation: a kept spawn() handle or a Pool must not keep a
        # finished greenlet's Session (and its pool connection) open.
        g.rawlink(_on_completion)  # a function, not a bound method: no allocation per
        watch.rawlinked = True  # greenlet; it finds the watch in g
        watch.main = False  # a gevent Greenlet runs in a hub: never a main greenlet
    else:
        watch.rawlinked = False
        watch.main = g.parent is None
        if watch.main:
            # A thread's main greenlet may outlive its thread (kept by a hub's cycle):
            # its thread's end is its death.
            _cleanup.at_thread_end(watch._thread_ended)
    return watch


# A cleanup job: close one value, log, count; where blocking is allowed. All of it is
# greenscope._hot.Reap's (compiled where possible) but what only a rare case needs:
# a log line, a value that is not a Session, a cut. Those are these functions.
_Reap = _hot.Reap


def _reap_warn(job: _Reap) -> None:
    """The WARNING of an orphan's close (rate-limited)."""
    owner = _Lazy(lambda: job.owner)
    _orphan_warnings.warn(
        owner,
        "greenscope: closing %s left open by %s, which ended without remove(); "
        "its transaction is rolled back. Call remove() when each unit of work "
        "ends, or wrap it in greenscope.session_scope().",
        type(job.value).__name__,
        owner,
    )


def _claims_of(value: Any) -> list[Any]:
    """Claims on the connections of a value that is not a Session (a container)."""
    return _cleanup.claim(
        [c for s in sessions_in(value) for c in _opened_dbapi_connections(s.get_transaction())]
    )


def _reap_cut(job: _Reap) -> None:
    """The close passed its deadline (the watchdog thread): cut its connections.

    Shuts down the sockets of the connections the value's Sessions opened and the job
    claimed, which makes the blocked close fail and invalidate them."""
    job.registry._counts.timed_out += 1
    cut = _cleanup.cut_claimed(job.claims)
    what = (
        f"shut down {cut} connection socket(s) from outside, so the close fails and "
        "invalidates them (their pool slots are freed; the database rolls the "
        "transaction back when it sees the connection go)"
        if cut
        else "found no connection socket to cut: the close stays blocked in its "
        "worker until it returns"
    )
    logger.error(
        "greenscope: closing %s of %s took longer than close_timeout=%ss; greenscope "
        "stopped waiting and %s. No other close waits for it.",
        type(job.value).__name__,
        job.owner,
        _cleanup.settings().close_timeout,
        what,
    )


def _close_counted(
    registry: GreenletRegistry[Any], value: Any, which: str
) -> BaseException | None:
    """Close ``value``; on failure log it with its traceback, count it, and return it."""
    try:
        registry._close_one(value, False)
    except BaseException as exc:
        _close_failed(registry, value, which, exc)
        return exc
    return None


def _close_failed(
    registry: GreenletRegistry[Any], value: Any, which: str | _Reap, exc: BaseException
) -> None:
    """Count and log a close that failed; ``which`` says whose it was (or is its job)."""
    registry._counts.failed += 1
    logger.error(
        "greenscope: closing %s %s failed; its connections were invalidated and it was dropped",
        type(value).__name__,
        which if isinstance(which, str) else f"of {which.owner}",
        exc_info=exc,
    )


def _close_value(value: Any) -> None:
    close = getattr(value, "close", None)
    if close is not None:
        close()


def close_or_release(value: Any, close: Callable[[Any], object] = _close_value) -> None:
    """``close(value)``; if that raises, invalidate the connections ``value`` opened.

    A ``Session`` whose rollback fails part-way forgets its transaction but leaves the
    connection checked out; dropped, it then sits in a reference cycle until the cyclic
    GC, whose rollback may run in the hub and fail with ``BlockingSwitchOutError``
    (gevent#1937): the very leak greenscope exists to prevent. Invalidating closes the
    connections without a round trip and returns them to the pool at once, which opens
    fresh ones as needed. The error is re-raised. On success this costs one
    ``get_transaction()``: the transaction is kept only to look at if the close fails.
    """
    session = isinstance(value, Session)
    tx = value.get_transaction() if session else None
    # Debug mode: greenscope closes from wherever it runs (the reaper, close_all), which
    # is no misuse; the owner is restored after, so a later use elsewhere is caught.
    owner = _debug.untag(value) if _debug.debugging.done else None
    try:
        if session and close is _close_value:
            value.close()  # a Session, the default close: one Python call fewer
        else:
            close(value)
    except BaseException:
        _invalidate_opened(tx)
        raise
    finally:
        if owner is not None:
            _debug.retag(value, owner)


def _opened_connections(tx: Any) -> list[Any]:
    """The ``Connection`` objects a Session transaction opened itself (kept after close).

    ``_connections`` is private, but stable across SQLAlchemy 2.0 and 2.1: bind ->
    (Connection, transaction, should_commit, autoclose). autoclose is False for a
    Connection the application passed as ``bind=`` (joining an external transaction):
    that one is not ours to drop. Any thread (plain dict reads).
    """
    if tx is None:
        return []  # no transaction, no connection (the usual orphan that never queried)
    entries = getattr(tx, "_connections", None) or {}
    opened = {id(e[0]): e[0] for e in list(entries.values()) if len(e) > 3 and e[3]}
    return list(opened.values())


def _opened_dbapi_connections(tx: Any) -> list[Any]:
    """The DBAPI connections behind :func:`_opened_connections` still checked out."""
    found = []
    for conn in _opened_connections(tx):
        fairy = getattr(conn, "_dbapi_connection", None)  # None once closed
        dbapi = getattr(fairy, "dbapi_connection", None)  # None once checked in
        if dbapi is not None and not conn.closed:
            found.append(dbapi)
    return found


def sessions_in(value: Any) -> list[Session]:
    """The Sessions a registry value holds: itself, or a container's (greenscope.flask)."""
    if isinstance(value, Session):
        return [value]
    inner = getattr(value, "greenscope_sessions", None)
    if inner is not None:
        return list(inner())
    return []


def _invalidate_opened(tx: Any) -> None:
    """Invalidate what a failed close left of ``tx``'s connections (see above)."""
    for conn in _opened_connections(tx):
        if not conn.closed and not conn.invalidated:
            try:
                conn.invalidate()
            except Exception:
                logger.exception("greenscope: invalidating a connection failed too")


_Self = TypeVar("_Self")


class CallSignature:
    """``inspect.signature()`` of an instance: its ``__call__`` as written in Python.

    A compiled ``__call__`` (greenscope/_hot.py) is a C slot, which ``inspect`` reports as
    ``(*args, **kwargs)``: tools that read the signature (``mock.create_autospec``,
    dependency injectors) would see the wrong one. The class itself gets None: its
    signature stays its constructor's.
    """

    def __init__(self, like: Callable[..., object]) -> None:
        self.signature = inspect.signature(like)  # annotations as written: strings

    def __get__(self, obj: object, cls: type | None = None) -> inspect.Signature | None:
        return None if obj is None else self.signature

    def __repr__(self) -> str:
        return f"<CallSignature {self.signature}>"


class GreenletRegistry(RegistryHit, ScopedRegistry[_T], Generic[_T]):
    """SQLAlchemy's registry protocol keyed on the current greenlet.

    ``registry()`` returns the current greenlet's value, creating it with ``createfunc``
    on first use; ``has()``, ``set(obj)`` and ``clear()`` act on the current greenlet
    only. Every native thread has its own greenlets (its main greenlet at least), so
    threads are covered too, monkey-patched or not, whenever the registry was built.

    When a greenlet ends still holding a value, the value is *closed* (``close()`` is
    called if it has one; a ``Session`` rolls back and returns its connection): at
    completion for a ``gevent.Greenlet``, when it is freed for any other greenlet. The
    close runs in a greenlet of the owner's hub, or in a reaper thread without gevent,
    never in a hub or GC callback. Its failure is logged and counted, never raised.

    Not guaranteed: a raw greenlet that has finished but is still referenced keeps its
    value until it is freed; a greenlet that never ends (the hub, a thread pool's worker
    greenlet, a keep-alive connection's greenlet) keeps its value until ``clear()``:
    bracket such units of work with :func:`greenscope.session_scope`.

    ``clear()`` discards without closing, as in SQLAlchemy; ``set(obj)`` replaces without
    closing the previous value. ``scoped_session.remove()`` closes, then clears.

    Across ``fork()``, the child forgets every value it inherited, without closing it:
    those Sessions' connections share their sockets with the parent, so closing them
    would roll back or end the parent's transactions.

    ``request_scoped`` (default True): whether request-end removal
    (:func:`greenscope.remove_current`, the gunicorn worker and hooks, the WSGI
    middleware) removes this registry's value. Set it to False for a registry whose
    value must outlive a request in the same greenlet.

    .. versionadded:: 0.1
    """

    __slots__ = (
        "__weakref__",
        "_close_fn",
        "_counts",
        "_key",
        "request_scoped",
    )

    def __init__(
        self,
        createfunc: Callable[[], _T],
        *,
        close: Callable[[_T], object] = _close_value,
    ) -> None:
        if not callable(createfunc):
            raise TypeError(
                f"GreenletRegistry(createfunc) needs a callable that makes a value, "
                f"such as a sessionmaker; got {createfunc!r}"
            )
        if not callable(close):
            raise TypeError(f"GreenletRegistry(close=...) must be callable; got {close!r}")
        self.createfunc = createfunc
        self.scopefunc = getcurrent
        self._close_fn = close
        self._key = f"greenscope:{next(_keys)}"
        # The counters (live: watches holding a value of this registry) and whether
        # close_all() shut greenscope down already: C fields, for greenscope._hot.
        counts = self._counts = _hot.Counts(_shutdown.active)
        counts.key = self._key
        counts.default_close = close is _close_value
        self.request_scoped = True
        _REGISTRIES.add(self)
        for engine in _engines.engines_of(createfunc):  # the engine guard, by default
            _guard.auto_guard(engine)

    # -- the hit path: keep it to one dict lookup ------------------------------------

    # The hit is RegistryHit.__call__: the current greenlet's dict, read once, compiled
    # where possible (greenscope/_hot.py); a miss calls _create().
    if TYPE_CHECKING:

        def __call__(self) -> _T: ...

    def _signature() -> _T: ...  # type: ignore[empty-body,misc]

    __signature__ = CallSignature(_signature)
    del _signature

    def __new__(cls: type[_Self], *args: Any, **kwargs: Any) -> _Self:
        # Compiled, RegistryHit is an extension type with a tp_new of its own, which
        # copy.copy(), deepcopy() and a subclass's super().__new__(cls) would reach and
        # CPython refuses ("is not safe"); the instance needs nothing from it.
        return object.__new__(cls)

    def has(self) -> bool:
        """True if the current greenlet holds a value."""
        return self._key in getcurrent().__dict__

    # -- the slow paths -----------------------------------------------------------------

    def _create(self, value: Any = _MISSING) -> _T:
        """Make (or, from ``set()``, take) the current greenlet's value and store it.

        One method for both, and the store inline: this runs once per greenlet, and a
        Python call is a measurable part of a greenlet's cost (benchmarks/).
        """
        creating = value is _MISSING
        if creating:
            if self._counts.shut_down:
                self._check_open()  # raises
            value = self.createfunc()  # first: if it raises, nothing is registered
        g = getcurrent()
        d = g.__dict__
        if not _cleanup.prepared.done:  # every store, not only a new watch: a watch
            _cleanup.prepare()  # inherited across fork() finds no cleanup threads
        if _debug.debugging.done:
            _debug.tag(value, g)
        # Read after what may switch greenlets (prepare() starts threads; a finalizer in
        # a GC pass may do gevent I/O, and this greenlet's or close_all()'s code runs
        # meanwhile): the dict and watch read here are the ones stored into.
        if creating and self._key in d:  # createfunc (or a finalizer) used the registry
            return d[self._key]  # type: ignore[no-any-return]
        watch: _Watch | None = d.get(_WATCH_KEY)
        if watch is None:  # first value of this greenlet, in any registry
            watch = d[_WATCH_KEY] = _new_watch(g)
        if watch.r1 is None and _ORDERED.done:
            # The usual case, inline and without the lock: the watch's first value. Empty,
            # the watch is unlisted and no take() is emptying it (see the module's
            # docstring); listed last, a take() elsewhere sees all of this or none of it.
            d[self._key] = value
            watch.r1, watch.v1 = self, value
            self._counts.live += 1
            _LIVE.add(watch)
        else:
            self._store_locked(g, d, watch, value, creating)
        self._counts.created += 1
        return value  # type: ignore[no-any-return]

    def _store_locked(
        self, g: RawGreenlet, d: dict[str, Any], watch: _Watch, value: Any, creating: bool
    ) -> None:
        """_create()'s store under the lock: a take() elsewhere (close_all) sees all of
        it or none."""
        # A value replaced here (set()) is kept until the lock is released: freed inside,
        # its finalizers would run under the lock.
        replaced = d.get(self._key)  # noqa: F841
        with _values_lock:
            # The one the greenlet holds now: a store while this one was switched out
            # (a finalizer's, while a take() was emptying the watch) may have replaced it.
            watch = d.get(_WATCH_KEY, watch)
            if watch in _TAKING:  # re-entered inside a take() of this greenlet's watch
                # That take() empties the watch when it resumes: what is stored now goes
                # into a new one, which the greenlet's end reaps as usual.
                watch = d[_WATCH_KEY] = _new_watch(g)
            with _Changing(watch):
                d[self._key] = value
                if watch.put(self, value):
                    self._counts.live += 1
                elif not creating:  # set() replaced this registry's value: it is removed
                    self._counts.removed += 1
                _LIVE.add(watch)

    def set(self, obj: _T) -> None:
        """Store ``obj`` for the current greenlet, replacing (not closing) any value."""
        self._check_open()
        self._create(obj)

    @property
    def _close(self) -> Callable[[_T], object]:
        """The ``close=`` given at construction. Read-only: the cleanup jobs decide once,
        at construction, whether it is greenscope's own (``Counts.default_close``), and
        close such values inline."""
        return self._close_fn

    def _close_one(self, value: _T, orphan: bool) -> None:
        """Close one value (``orphan``: its greenlet ended first). Raises what close raises."""
        close_or_release(value, self._close_fn)

    def _check_open(self) -> None:
        if self._counts.shut_down:
            raise RuntimeError(
                "greenscope: a new Session was asked for after greenscope.close_all() shut "
                "greenscope down (worker or process exit; this registry makes "
                f"{self.createfunc!r}): it would never be closed, and would hold its "
                "connection until the process ends. Finish database work before calling "
                "close_all(); to go on using Sessions (a test suite's teardown), call "
                "greenscope.close_all(shutdown=False) instead."
            )

    def clear(self) -> None:
        """Forget the current greenlet's value, if any, without closing it."""
        _hot.forget(self, getcurrent().__dict__)  # the inline case compiled, see there

    def _forget(self, d: dict[str, Any]) -> None:
        """clear(), given the current greenlet's dict (scoped_session.remove has it)."""
        _hot.forget(self, d)

    def _forget_locked(self, watch: _Watch) -> None:
        """What clear() does under the lock: the watch holds another value too, or this
        is a free-threaded build (greenscope._hot.forget did the rest)."""
        with _values_lock:
            # Being taken (a take() switched out in this thread, see _Watch.take): the
            # take() closes the value and counts it.
            if watch in _TAKING:
                return
            with _Changing(watch):
                if not watch.drop(self):
                    return
                if watch.r1 is None:  # empty (see _Watch.empty)
                    _LIVE.discard(watch)
                self._counts.removed += 1
                self._counts.live -= 1

    @property
    def shut_down(self) -> bool:
        """True once :func:`close_all` shut this registry down: it makes no new values."""
        return self._counts.shut_down

    # -- observability ------------------------------------------------------------------

    def stats(self) -> RegistryStats:
        """This registry's counters; see :class:`RegistryStats`."""
        return RegistryStats(
            self._counts.created,
            self._counts.removed,
            self._counts.reaped,
            self._counts.failed,
            self._counts.live,
            self._counts.timed_out,
        )

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<GreenletRegistry {self._key} of {self.createfunc!r}: live={s.live} "
            f"created={s.created} removed={s.removed} reaped={s.reaped} failed={s.failed}>"
        )


def registries() -> list[GreenletRegistry[Any]]:
    """Every live :class:`GreenletRegistry` of the process."""
    return list(_REGISTRIES)


def stats() -> RegistryStats:
    """The counters of every registry of the process, summed, and the engine guard's."""
    total = RegistryStats(rescued=_guard.rescued())
    for registry in registries():
        total += registry.stats()
    return total


def _forget_inherited() -> None:
    """In a forked child: forget, never close, every value inherited from the parent.

    Forgetting is not enough: dropped, an inherited ``Session`` would be freed by the
    child's cyclic GC (or at its exit), and SQLAlchemy's pool rolls back a checked-out
    connection it finds garbage, on a socket (or SQLite file) the parent still uses:
    the parent's transaction would be rolled back or its journal replayed under it.
    So the values are kept, never freed and never finalized, for the child's lifetime.
    """
    global _values_lock  # noqa: PLW0603 - a thread that held it at fork() is gone
    _values_lock = _cleanup.allocate_rlock()
    # A take() or a change in progress in another thread at fork() never finishes here:
    # what a half-done take() left in its watch is listed again, to be kept below (what
    # it had copied out stays referenced by that thread's frames, never freed).
    _LIVE.update(w for w in _TAKING if not w.empty())
    _TAKING.clear()
    _CHANGING.clear()
    kept: list[Any] = []
    for watch in list(_LIVE):
        for registry, value in watch.take():
            registry._counts.removed += 1
            kept.append(value)
    _cleanup.pin_forever(kept)


# inspect.signature(GreenletRegistry) reads __new__ first: show __init__'s there.
GreenletRegistry.__new__.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    GreenletRegistry.__init__
)

os.register_at_fork(after_in_child=_forget_inherited)

_hot.bind(
    live=_LIVE,
    watch_type=_Watch,
    registry_type=GreenletRegistry,
    session_type=Session,
    invalidate_opened=_invalidate_opened,
    gevent_greenlet=_GeventGreenlet,
    get_hub=_get_hub_if_exists,
    get_ident=_get_ident,
    prepared=_cleanup.prepared,
    debugging=_debug.debugging,
    watch_key=_WATCH_KEY,
    ordered=_ORDERED,
    changing=_CHANGING,
    submit=_cleanup.submit,
    warn_enabled=_warn_enabled,
    claim=_cleanup.claim,
    release=_cleanup.release,
    opened_dbapi=_opened_dbapi_connections,
    close_failed=_close_failed,
    close_deadline=_cleanup.CloseDeadline,
    reap_warn=_reap_warn,
    reap_cut=_reap_cut,
    claims_of=_claims_of,
)


def _at_exit() -> None:
    # A script that ends right after its greenlets did would otherwise exit with their
    # orphans' closes still queued, leaving the rollback to the database server.
    try:
        _orphan_warnings.flush(force=True)
        if not _LIVE and _cleanup.pending() == 0:
            return
        _cleanup.wait_idle(2.0, _death_pending)
    except Exception:  # interpreter shutdown: never fail the exit
        logger.debug("greenscope: waiting for orphans at exit failed", exc_info=True)


atexit.register(_at_exit)


def current_sessions() -> list[Any]:
    """The current greenlet's Sessions in every request-scoped registry, oldest first.

    What request-end removal would close: for a commit-on-success policy, or to inspect.
    Containers of Sessions (``greenscope.flask``'s per-app-context Sessions) are
    flattened: the list holds the Sessions themselves.

    .. versionchanged:: 0.2 Containers are flattened.

    .. versionadded:: 0.1
    """
    d = getcurrent().__dict__
    watch: _Watch | None = d.get(_WATCH_KEY)
    if watch is None:
        return []
    found: list[Any] = []
    for registry, value in watch.items():
        if registry.request_scoped:
            inner = getattr(value, "greenscope_sessions", None)  # greenscope.flask's
            found.extend(inner() if inner is not None else [value])
    return found


def remove_current() -> int:
    """End the current greenlet's unit of work in every request-scoped registry.

    Each value is closed (a ``Session`` rolls back whatever was not committed and
    returns its connection), then forgotten, as ``scoped_session.remove()`` does; return
    how many. Only the current greenlet's values are touched, never another in-flight
    request's. Every registry is cleared even if a close fails: an ``Exception`` is
    logged and counted as ``failed``; a ``BaseException`` (``GreenletExit`` from a kill)
    is re-raised once every value is handled. Must run where blocking is allowed (not
    in the hub): the request's greenlet, as gunicorn's ``post_request`` is.

    .. versionadded:: 0.1
    """
    d = getcurrent().__dict__
    watch: _Watch | None = d.get(_WATCH_KEY)
    if watch is None or watch.empty():
        return 0
    removed = 0
    fatal: BaseException | None = None
    for registry in [r for r, _ in watch.items() if r.request_scoped]:
        value = d.get(registry._key, _MISSING)
        if value is _MISSING:
            continue
        try:
            exc = _close_counted(registry, value, "when its request or task ended")
            if fatal is None and exc is not None and not isinstance(exc, Exception):
                fatal = exc
        finally:
            registry.clear()
        removed += 1
    if fatal is not None:
        raise fatal
    return removed


def _death_pending() -> bool:
    """True while an owner is known dead but its callback has not run yet.

    Two cases: a finished gevent.Greenlet whose rawlink callbacks are still queued in
    its hub, and the main greenlet of a thread that has ended: greenlet frees it shortly
    after, from another thread (a pending call), not at ``join()``.
    """
    threads: set[int] | None = None
    for watch in list(_LIVE):
        if watch.main:
            if threads is None:
                threads = set(sys._current_frames())
            if watch.thread not in threads:
                return True
        elif watch.rawlinked:
            g = watch.ref()
            if g is not None and g.dead:
                return True
    return False


def wait_reaped(timeout: float | None = None) -> bool:
    """Wait until every Session orphaned so far has been closed; False on timeout.

    "So far" covers greenlets already freed, ``gevent.Greenlet`` objects that have
    finished and threads that have ended. A hub runs its callbacks only while its thread
    runs it: an orphan of a gevent thread-pool worker that went idle is closed when that
    worker next yields to its hub, and until then this waits (use ``session_scope`` in
    thread-pool tasks). A raw greenlet that finished but is still
    referenced is not waited for (it is reaped when freed). Under gevent it yields to
    the hub; call it from a greenlet, not from the hub. Meant for tests, health checks
    and shutdown.

    .. versionadded:: 0.1
    """
    return _cleanup.wait_idle(timeout, _death_pending)


def close_all(*, include_running: bool = True, shutdown: bool = True) -> int:
    """Close every value held by any registry of the process; return how many.

    For worker or process exit: with ``shutdown=True`` (the default) every registry is
    also shut down, and making a new value in one raises :class:`RuntimeError`, since
    nothing would close it any more; so does a registry created afterwards.
    ``shutdown=False`` closes the values and leaves the registries usable: for a test
    suite's teardown. Values of the calling thread are closed here, one by one
    (errors logged and counted, never raised); values owned by other threads are handed
    to their owner's cleanup path. With ``include_running=False`` a value whose owner
    greenlet is still running (other than the caller) is left alone: closing it would
    wait for that greenlet's query to finish, and pull the Session from under it. The
    gunicorn integration exits that way, so an immediate shutdown is not held up by
    requests still in flight. Must be called from a greenlet, not from inside the hub.

    Thread safety: a greenlet of another thread that stores, replaces or clears a value
    meanwhile loses nothing, and each value is counted once: close_all() takes what it
    finds, and what is stored after is the owner's. So does a greenlet of this thread
    when a greenlet switch (a finalizer's gevent I/O in a GC pass) interleaves the two:
    a greenlet switched out in the middle of changing its values keeps them all (they
    are closed when it ends). With ``include_running=True``, a
    running greenlet's Session may be closed while its owner still uses it (or closes
    it too): that is what ``include_running=False`` avoids.

    .. versionadded:: 0.1
    """
    if _cleanup.in_hub():
        raise RuntimeError(
            "greenscope.close_all() does I/O and cannot run inside the gevent hub; "
            "call it from a greenlet, e.g. gevent.spawn(greenscope.close_all).join()"
        )
    if shutdown:
        _shutdown.active = True
        for registry in registries():
            registry._counts.shut_down = True
    me = _cleanup.get_ident()
    jobs: list[_Reap] = []
    total = 0
    me_greenlet = getcurrent()
    for watch in list(_LIVE):
        g = watch.ref()
        if not include_running and g is not None and not g.dead and g is not me_greenlet:
            continue
        for registry, value in watch.take():
            job = _Reap(registry, value, watch, False, reraise=True)
            total += 1
            if watch.thread == me:
                jobs.append(job)
            else:
                _cleanup.submit(job, watch.thread, watch.owner_hub())
    _close_own(jobs, me)
    _orphan_warnings.flush(force=True)
    return total


def _close_own(jobs: list[_Reap], me: int) -> None:
    """close_all()'s closes of the calling thread's values."""
    hub = _cleanup.hub_if_exists()
    if jobs and hub is not None:
        # Side by side in this hub's reaper greenlets, each under its deadline; we wait.
        # Killed while waiting, we re-raise and the reaper closes the rest.
        for job in jobs:
            job.reraise = False
            _cleanup.submit(job, me, hub)
        _cleanup.wait_for(lambda: all(job.done for job in jobs))
    else:
        for i, job in enumerate(jobs):
            try:
                # One by one, each under the watchdog's deadline; a job logs and counts
                # its own failure and only re-raises GreenletExit and the like.
                _cleanup.run_here(job)
            except BaseException:
                for rest in jobs[i + 1 :]:  # killed while closing: the reaper closes the rest
                    rest.reraise = False
                    _cleanup.submit(rest, me, None)
                raise
