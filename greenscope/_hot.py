"""The hit paths, compiled by Cython where it can be, plain Python where it cannot.

Two calls run on every use of a Session, so they decide much of greenscope's
overhead: ``registry()`` and ``Session()`` (``scoped_session.__call__``). Each is one
dict lookup in the current greenlet's ``__dict__``. In Python, most of their cost is the
call itself: an instance call goes through ``type(obj).__call__`` (``slot_tp_call``),
an argument tuple and a new frame. Compiled, these classes are extension types: the call
is their ``tp_call`` slot, a C function, and the lookup runs in C as well (see
docs/benchmarks.md for the instruction counts). ``scoped_session._proxied`` stays in
Python: the interpreter inlines a Python property's getter, and a compiled one counted
more instructions.

This file is both the source Cython compiles (pure-Python mode: ``setup.py`` builds
``greenscope._hot`` as an optional extension, and skips it where there is no compiler,
on PyPy, or with ``GREENSCOPE_NO_EXTENSIONS=1``) and the fallback Python imports when
no compiled module sits beside it. Both behave the same; the test suite runs on each
(``tests/test_compiled.py`` checks which one is loaded). Typing is in ``_hot.pyi``.

The bases hold no fields of their own (``_key`` is in their subclass's
``__slots__``, ``_greenscope_key`` in its instance dict), so they combine with
SQLAlchemy's slotted ``ScopedRegistry`` and its ``scoped_session`` without a layout
conflict, and ``__class__`` assignment between their subclasses stays possible (not
between ``greenscope.scoped_session`` and SQLAlchemy's own, whose layouts differ now).
Compiled, the bases are extension types: ``GreenletRegistry.__new__`` is
``object.__new__`` (so ``copy`` and subclasses' ``super().__new__`` work), and
``__signature__`` gives ``inspect.signature()`` the Python signature of ``__call__``.

The hit reads this module's ``getcurrent`` (greenlet's): patching
``greenscope._registry.getcurrent`` in a test does not reach it; patch this one too.

Greenlet safety: each method reads the current greenlet's own dict once and never
switches; a miss runs the subclass's Python slow path, unchanged.

The per-greenlet paths live here too, for the same reason: a greenlet's first value in
a registry (its watch made and listed), ``clear()``, ``scoped_session.remove()`` and a
gevent.Greenlet's completion callback run once per greenlet each, and in Python their
frames and attribute accesses were most of what greenscope adds to a greenlet's life.
Compiled, the watch (:class:`Watch`) is an extension type whose fields are C fields:
C code reads and writes them directly, where it would go through the generic attribute
protocol on a Python object, which costs what the interpreter's specialized bytecodes
do (measured: docs/benchmarks.md). Only the usual cases run here; the rest (a raw
greenlet's first value, a second registry's, debug mode, a free-threaded build, a
registry shut down or subclassed) goes to greenscope._registry's Python slow paths,
which hold the invariants' full statement. The changes made here are the two ordered
ones of greenscope._registry (the first store into an empty watch, and the clear of a
watch's only value), in the same order; compiled, they run without releasing the GIL.
"""

try:
    # Cython needs this very import to compile the decorators away (SQLAlchemy 2.1's
    # compiled modules do the same); without Cython installed, the stand-ins do nothing.
    import cython
except ModuleNotFoundError:  # pragma: no cover - depends on the environment
    from greenscope import _cython as cython

from weakref import ref as _weakref

from greenlet import getcurrent

if cython.compiled:  # the C API's own: no type call (compiled, these imports are cimports)
    from cython.cimports.cpython.object import PyObject, PyObject_GenericGetDict
    from cython.cimports.cpython.ref import Py_XDECREF
    from cython.cimports.cpython.set import PySet_Discard
    from cython.cimports.cpython.time import monotonic as _clock
    from cython.cimports.cpython.weakref import PyWeakref_GetRef, PyWeakref_NewRef

__all__ = [
    "Counts",
    "Flag",
    "HubQueue",
    "Reap",
    "RegistryHit",
    "ScopedHit",
    "Tally",
    "Watch",
    "WatchTable",
    "bind",
    "bind_cleanup",
    "bind_settings",
    "compiled",
    "drain",
    "forget",
    "hub_submit",
    "new_watch",
    "on_completion",
    "record_end",
    "run_job",
]

#: True when this module is the compiled extension.
compiled = cython.compiled

# No registry value is this object. Compiled, a C global: no module lookup per call.
_MISSING = cython.declare(object, object())
# A job's claims when it has none: one shared empty tuple, no list per close.
_NO_CLAIMS = cython.declare(tuple, ())


@cython.cfunc
@cython.inline
def _dict_of(g):  # type: ignore[no-untyped-def]
    """``g.__dict__`` for a greenlet ``g``. Compiled, read through the type's dict
    offset, where greenlet keeps it (``PyObject_GenericGetDict``: the same dict, made if
    there is none yet, as greenlet's own getter does): an attribute lookup from C goes
    through the generic protocol, which cost more than the rest of a hit."""
    if cython.compiled:
        return PyObject_GenericGetDict(g, cython.NULL)
    return g.__dict__


@cython.cfunc
@cython.inline
def _deref(ref):  # type: ignore[no-untyped-def]
    """``ref()`` for a weakref ``ref``: its referent, or None. Compiled, the C API's
    ``PyWeakref_GetRef``: calling a weakref from C goes through the generic call."""
    if cython.compiled:
        found = cython.declare(cython.pointer(PyObject), cython.NULL)
        if PyWeakref_GetRef(ref, cython.address(found)) and found != cython.NULL:
            obj = cython.cast(object, found)  # a reference of its own
            Py_XDECREF(found)  # the one PyWeakref_GetRef gave
            return obj
        return None
    return ref()


@cython.cfunc
@cython.inline
def _take_live(watch) -> cython.bint:  # type: ignore[no-untyped-def]
    """Take ``watch`` out of _live; False if it was not there (another claim got it
    first). The claim of every path that lets go of a watch's values: one atomic set
    operation (``PySet_Discard`` compiled, which raises no KeyError to catch)."""
    if cython.compiled:
        return PySet_Discard(_live, watch)
    try:
        _live.remove(watch)
    except KeyError:
        return False
    return True


@cython.cclass
class RegistryHit:
    """``registry()``: the current greenlet's value, else the subclass's ``_create()``."""

    __slots__ = ()

    def __call__(self):  # type: ignore[no-untyped-def]
        if cython.compiled:  # decided when Cython compiles this: one branch is C
            # dict.get on a typed dict is one C call, and a miss (every greenlet's first
            # use) raises no KeyError, which costs more than the lookup. Typed means an
            # exact dict: a dict subclass assigned to the greenlet's __dict__ takes the
            # generic path below instead of a TypeError.
            g = getcurrent()
            found = _dict_of(g)
            if type(found) is dict:
                d: dict = found  # type: ignore[type-arg]
                key = self._key
                value = d.get(key, _MISSING)
                if value is _MISSING:
                    return _first(self, g, d, key)
                return value
            try:
                return found[self._key]
            except KeyError:
                return self._create()  # _first() takes exact dicts only, compiled
        # Python: d[key] is cheaper than a d.get() call on every hit; a miss pays.
        try:
            return getcurrent().__dict__[self._key]
        except KeyError:
            g = getcurrent()
            return _first(self, g, g.__dict__, self._key)


@cython.cclass
class ScopedHit:
    """``Session()``: the current greenlet's Session, else SQLAlchemy's path
    (``_greenscope_miss``), with its checks and warnings."""

    __slots__ = ()

    def __call__(self, **kw):  # type: ignore[no-untyped-def]
        if not kw:
            if cython.compiled:  # as in RegistryHit
                found = _dict_of(getcurrent())
                if type(found) is dict:
                    d: dict = found  # type: ignore[type-arg]
                    value = d.get(self._greenscope_key, _MISSING)
                    if value is not _MISSING:
                        return value
                    return self._greenscope_miss(kw)
            try:
                return getcurrent().__dict__[self._greenscope_key]
            except KeyError:
                pass
        return self._greenscope_miss(kw)

    def remove(self):  # type: ignore[no-untyped-def]
        """Close the current greenlet's ``Session``, if any, then forget it.

        The transaction is rolled back and the connection returned to the pool. The
        ``Session`` is forgotten even if ``close()`` raises (the error propagates), so
        the next call makes a fresh one, and its connections are then invalidated, so
        none stays checked out until garbage collection. SQLAlchemy's own ``remove()``
        has no ``try/finally`` and would hand out the half-closed ``Session`` again.
        """
        registry = self.registry
        found = _dict_of(getcurrent())
        # The usual case here: a GreenletRegistry of greenscope's own and a Session.
        # Anything else (another registry, a subclass's clear(), debug mode, a value
        # that is not a Session) is _greenscope_remove()'s, with the same semantics.
        if type(registry) is not _registry_type or _debugging.done or type(found) is not dict:
            return self._greenscope_remove()
        d: dict = found  # type: ignore[type-arg]
        key = registry._key
        value = d.get(key, _MISSING)
        if value is _MISSING:
            return None
        if not isinstance(value, _session_type):
            return self._greenscope_remove()
        try:
            # greenscope._registry.close_or_release, inline: on failure, invalidate what
            # the Session opened, so no connection stays checked out until the GC.
            tx = value.get_transaction()
            try:
                value.close()
            except BaseException:
                _invalidate_opened(tx)
                raise
        except BaseException:
            cython.cast(Counts, registry._counts).failed += 1
            raise
        finally:
            _forget(registry, d, key)
        return None


@cython.cclass
class Flag:
    """A process-wide switch (``done``) that compiled code reads as a C field."""

    if cython.compiled:
        done = cython.declare(cython.bint, visibility="public")
    else:
        __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


@cython.cclass
class Counts:
    """A GreenletRegistry's counters (see greenscope.RegistryStats; ``live``: watches
    holding one of its values) and whether close_all() shut it down: C fields compiled,
    which greenscope._hot's paths change without the generic attribute protocol.

    It also carries what those paths read of the registry, so that a registry's
    attributes are read once per path, not once each: ``key`` (the registry's
    ``_key``) and ``default_close`` (its ``close`` is greenscope's own, which Reap runs
    inline). Both are set once, by GreenletRegistry.__init__, and never change."""

    if cython.compiled:
        shut_down = cython.declare(cython.bint, visibility="public")
        default_close = cython.declare(cython.bint, visibility="public")
        key = cython.declare(object, visibility="public")
        live = cython.declare(cython.Py_ssize_t, visibility="public")
        created = cython.declare(cython.Py_ssize_t, visibility="public")
        removed = cython.declare(cython.Py_ssize_t, visibility="public")
        reaped = cython.declare(cython.Py_ssize_t, visibility="public")
        failed = cython.declare(cython.Py_ssize_t, visibility="public")
        timed_out = cython.declare(cython.Py_ssize_t, visibility="public")
    else:
        __slots__ = (
            "created",
            "default_close",
            "failed",
            "key",
            "live",
            "reaped",
            "removed",
            "shut_down",
            "timed_out",
        )

    def __init__(self, shut_down: bool = False) -> None:
        self.shut_down = shut_down
        self.default_close = False
        self.key = None
        self.live = self.created = self.removed = self.reaped = self.failed = 0
        self.timed_out = 0

    def __copy__(self):  # type: ignore[no-untyped-def]
        # copy.copy() and deepcopy() of a registry (an extension type has no pickling)
        other = Counts(self.shut_down)
        other.default_close, other.key = self.default_close, self.key
        other.live, other.created, other.removed = self.live, self.created, self.removed
        other.reaped, other.failed, other.timed_out = self.reaped, self.failed, self.timed_out
        return other

    def __deepcopy__(self, memo):  # type: ignore[no-untyped-def]
        return self.__copy__()


@cython.cclass
class Watch:
    """The fields of what greenscope holds for one greenlet (``greenscope._registry._Watch``
    adds the logic; the invariants are stated there).

    ``ref`` is a weakref to the greenlet whose callback is the watch itself (its
    ``__call__``): the greenlet was freed. That is a cycle (watch, ref, watch) while the
    greenlet lives, broken when the callback has run; a watch dropped earlier (empty,
    replaced) is freed by the cyclic GC, its ref cleared without a call. ``gid`` (the
    greenlet's ``id()``, for log lines) and ``thread`` (the owner's thread) are C
    integers compiled: no object each. Hashed and compared by identity.
    """

    if cython.compiled:
        ref = cython.declare(object, visibility="public")
        r1 = cython.declare(object, visibility="public")
        v1 = cython.declare(object, visibility="public")
        more = cython.declare(object, visibility="public")
        gtype = cython.declare(object, visibility="public")
        hub = cython.declare(object, visibility="public")
        how = cython.declare(object, visibility="public")
        name = cython.declare(object, visibility="public")
        gid = cython.declare(cython.size_t, visibility="public")
        thread = cython.declare(cython.ulong, visibility="public")
        main = cython.declare(cython.bint, visibility="public")
        rawlinked = cython.declare(cython.bint, visibility="public")
    else:
        __slots__ = (
            "gid",
            "gtype",
            "how",
            "hub",
            "main",
            "more",
            "name",
            "r1",
            "rawlinked",
            "ref",
            "thread",
            "v1",
        )

    def __call__(self, ref):  # type: ignore[no-untyped-def]
        # The greenlet's weakref callback, wherever it was freed: the hub, a GC pass,
        # another thread. A watch that holds nothing (most: their values were removed)
        # is not in _LIVE.
        if self in _live:
            self.detach()


@cython.cclass
class Reap:
    """The fields of a cleanup job, and its run (``greenscope._registry._Reap`` adds
    the rest): close one value where blocking is allowed, count it, log a failure.

    Made once per orphan (by :func:`on_completion`, without a call to ``__init__``)
    and run by a reaper greenlet or thread, so compiled its run is C: the usual case (a
    GreenletRegistry of greenscope's own, its default close, a Session, no debug mode)
    closes inline, as ``close_or_release`` does; anything else goes through the
    registry's ``_close_one``. What only a rare case needs (a log line, a value that is
    not a Session, a cut) is greenscope._registry's, in Python. Hashed by identity (the
    watchdog's table keys on it). ``cut()`` is called by the cleanup watchdog, from its
    own thread, if the close outlives its deadline.
    """

    if cython.compiled:
        registry = cython.declare(object, visibility="public")
        counts = cython.declare(Counts, visibility="public")  # the registry's _counts
        value = cython.declare(object, visibility="public")
        _owner = cython.declare(object, visibility="public")
        claims = cython.declare(object, visibility="public")
        orphan = cython.declare(cython.bint, visibility="public")
        warn = cython.declare(cython.bint, visibility="public")
        reraise = cython.declare(cython.bint, visibility="public")
        done = cython.declare(cython.bint, visibility="public")
    else:
        __slots__ = (
            "_owner",
            "claims",
            "counts",
            "done",
            "orphan",
            "registry",
            "reraise",
            "value",
            "warn",
        )

    def __init__(self, registry, value, owner, orphan, reraise=False):  # type: ignore[no-untyped-def]
        self.registry = registry
        self.counts = registry._counts
        self.value = value
        self._owner = owner  # a watch, named only when a line is logged: naming costs
        self.orphan = orphan
        self.warn = orphan  # a WARNING is logged as it runs (if they are on)
        # Only a caller that asked for the close (close_all) gets a kill re-raised; a
        # reaper never raises: it would kill the reaper or land in the hub.
        self.reraise = reraise
        self.claims = _NO_CLAIMS
        self.done = False

    @property
    def owner(self):  # type: ignore[no-untyped-def]
        """Whose value this is, for log lines."""
        return self._owner.owner

    def cut(self):  # type: ignore[no-untyped-def]
        """The close passed its deadline (the watchdog thread): cut its connections."""
        _reap_cut(self)

    def __call__(self):  # type: ignore[no-untyped-def]
        registry = self.registry
        n: Counts = self.counts
        value = self.value
        orphan: cython.bint = self.orphan
        # For cut(): the connections the close will release, claimed so that a cut can
        # never reach one that is back in the pool (greenscope._cleanup.claim). A Session
        # that never began a transaction holds none: the usual orphan. (_transaction is
        # what get_transaction() starts from, in SQLAlchemy 2.0 and 2.1.)
        session: cython.bint = isinstance(value, _session_type)
        tx = value.get_transaction() if session and value._transaction is not None else None
        if session:
            claims = _NO_CLAIMS if tx is None else _claim(_opened_dbapi(tx))
        else:
            claims = _claims_of(value)
        self.claims = claims
        exc = None
        try:
            try:
                if (
                    session
                    and n.default_close
                    and type(registry) is _registry_type
                    and not _debugging.done
                ):
                    try:  # close_or_release, inline
                        value.close()
                    except BaseException:
                        _invalidate_opened(tx)
                        raise
                else:
                    registry._close_one(value, orphan)
            except BaseException as e:
                exc = e
                _close_failed(registry, value, self, e)
            # After the close: a log handler's I/O never delays it, and a handler still
            # blocked at the deadline (cut there, in a hub) costs the line, not the close.
            # ``warn``: an orphan whose WARNING was on when its greenlet ended (or, made
            # in Python, any orphan); logged if it still is.
            if self.warn and _warnings_on():
                _reap_warn(self)
            if (
                exc is not None
                and self.reraise
                and not isinstance(exc, (Exception, _close_deadline))
            ):
                raise exc  # GreenletExit and the like, to close_all()'s caller
        finally:
            self.value = None
            self.done = True
            if claims:
                _release(claims)
            if orphan:
                n.reaped += 1
            else:
                n.removed += 1


@cython.cclass
class Tally:
    """One process-wide count: greenscope._cleanup's pending jobs and fork generation.

    A C integer compiled. Updates are exact with the GIL (an increment runs no Python
    code, so no thread switch or GC pass comes between its read and its write), and
    approximate on free-threaded builds."""

    if cython.compiled:
        count = cython.declare(cython.long, visibility="public")
    else:
        __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


@cython.cclass
class WatchTable:
    """The fields of greenscope._cleanup's watchdog that every job reads (``_Watchdog``
    adds the logic and the claim protocol): ``running``, each running job's deadline and
    ``on_cut``, and ``sleep_until``, when the watchdog wakes next. C fields compiled:
    :func:`run_job` reads them once per close. ``sleep_until`` is written by the watchdog
    thread and read by any: with the GIL, whole; on free-threaded builds an aligned C
    double, as a Python float's pointer would be."""

    if cython.compiled:
        running = cython.declare(dict, visibility="public")
        sleep_until = cython.declare(cython.double, visibility="public")
    else:
        __slots__ = ("running", "sleep_until")


@cython.cclass
class HubQueue:
    """The fields of a hub's reaper (greenscope._cleanup._HubReaper adds the logic):
    C fields compiled, which :func:`hub_submit` and :func:`drain` read once per orphan.

    ``jobs`` is a deque; ``put`` and ``take`` are its ``append`` and ``popleft``, bound
    once: a method call from C looks the method up each time. ``running``: greenlets
    holding a slot; ``fill_scheduled``: a ``_fill`` is queued in the loop. Both are read
    and written in the hub's thread only."""

    if cython.compiled:
        hub = cython.declare(object, visibility="public")
        jobs = cython.declare(object, visibility="public")
        put = cython.declare(object, visibility="public")
        take = cython.declare(object, visibility="public")
        running = cython.declare(cython.Py_ssize_t, visibility="public")
        fill_scheduled = cython.declare(cython.bint, visibility="public")
    else:
        __slots__ = ("fill_scheduled", "hub", "jobs", "put", "running", "take")


# What greenscope._registry hands over at import (bind()): compiled, C globals read
# without a module lookup.
_live = cython.declare(set, set())  # _registry._LIVE: watches holding a value
_watch_type = cython.declare(object, None)  # _registry._Watch
_registry_type = cython.declare(object, None)  # GreenletRegistry
_session_type = cython.declare(object, None)  # sqlalchemy.orm.Session
_invalidate_opened = cython.declare(object, None)
_gevent_greenlet = cython.declare(object, None)  # gevent.Greenlet, or None without gevent
_get_hub = cython.declare(object, None)  # gevent's get_hub_if_exists
_get_ident = cython.declare(object, None)  # the OS thread's id
_prepared = cython.declare(Flag, Flag())  # _cleanup.prepared: both cleanup threads run
_debugging = cython.declare(Flag, Flag())  # greenscope._debug is on
_watch_key = cython.declare(object, None)
_ordered = cython.declare(Flag, Flag())  # _registry._ORDERED: bytecodes run one at a time
_changing = cython.declare(set, set())  # _registry._CHANGING: the owner is changing these
_reap_warn = cython.declare(object, None)  # _registry._reap_warn: an orphan's WARNING
_reap_cut = cython.declare(object, None)  # _registry._reap_cut
_claims_of = cython.declare(object, None)  # _registry._claims_of: a container's claims
_submit = cython.declare(object, None)  # _cleanup.submit
_warn_enabled = cython.declare(object, None)  # the greenscope logger's isEnabledFor
_claim = cython.declare(object, None)  # _cleanup.claim
_release = cython.declare(object, None)  # _cleanup.release
_opened_dbapi = cython.declare(object, None)  # _registry._opened_dbapi_connections
_close_failed = cython.declare(object, None)  # _registry._close_failed: count and log
_close_deadline = cython.declare(object, None)  # _cleanup.CloseDeadline
# What greenscope._cleanup hands over at import (bind_cleanup()).
_pending = cython.declare(Tally, Tally())  # jobs submitted, not finished or cut yet
_generation = cython.declare(Tally, Tally())  # bumped in a forked child
_watchdog = cython.declare(WatchTable, WatchTable())  # _cleanup._watchdog
# _cleanup's settings that jobs read (bind_settings(), whenever they change).
_close_timeout = cython.declare(cython.double, 10.0)
_max_closes = cython.declare(cython.Py_ssize_t, 8)
_monotonic = cython.declare(object, None)
_log_exception = cython.declare(object, None)  # _cleanup._log_exception: never raises
_log_cache = cython.declare(object, None)  # its Logger._cache, where it has one (a dict)
# (weakref to the last hub a watch was made in, its thread): hubs are per thread, so
# while a greenlet's hub is that one, so is its thread. One object, read and written
# whole: two globals could be read half updated by another thread.
_last_hub = cython.declare(tuple, (None, 0))
# (that hub's weakref, a weakref to its reaper): see _reaper_of.
_last_reaper = cython.declare(tuple, (None, None))


def bind(  # type: ignore[no-untyped-def]
    *,
    live,
    watch_type,
    registry_type,
    session_type,
    invalidate_opened,
    gevent_greenlet,
    get_hub,
    get_ident,
    prepared,
    debugging,
    watch_key,
    ordered,
    changing,
    submit,
    warn_enabled,
    claim,
    release,
    opened_dbapi,
    close_failed,
    close_deadline,
    reap_warn,
    reap_cut,
    claims_of,
):
    """Hand this module what greenscope._registry's paths here need (once, at import)."""
    global _live, _watch_type, _registry_type, _session_type, _invalidate_opened
    global _gevent_greenlet, _get_hub, _get_ident, _prepared, _debugging
    global _watch_key, _ordered, _changing, _submit, _warn_enabled
    global _claim, _release, _opened_dbapi, _close_failed, _close_deadline
    global _reap_warn, _reap_cut, _claims_of
    _changing, _submit, _warn_enabled = changing, submit, warn_enabled
    _reap_warn, _reap_cut, _claims_of = reap_warn, reap_cut, claims_of
    _claim, _release, _opened_dbapi = claim, release, opened_dbapi
    _close_failed, _close_deadline = close_failed, close_deadline
    _live, _watch_type = live, watch_type
    _registry_type, _session_type = registry_type, session_type
    _invalidate_opened, _gevent_greenlet, _get_hub, _get_ident = (
        invalidate_opened,
        gevent_greenlet,
        get_hub,
        get_ident,
    )
    _prepared, _debugging, _watch_key, _ordered = prepared, debugging, watch_key, ordered


def bind_cleanup(*, pending, generation, watchdog, monotonic, logger, log_exception):  # type: ignore[no-untyped-def]
    """Hand this module what greenscope._cleanup's paths here need (once, at import)."""
    global _pending, _generation, _watchdog, _monotonic, _log_exception
    global _log_cache  # noqa: PLW0603 - bound once, at import
    _pending, _generation, _watchdog = pending, generation, watchdog
    _monotonic, _log_exception = monotonic, log_exception
    cache = getattr(logger, "_cache", None)
    _log_cache = cache if type(cache) is dict else None


def bind_settings(close_timeout, max_concurrent_closes):  # type: ignore[no-untyped-def]
    """Hand this module the cleanup settings jobs read (at import, and on each change)."""
    global _close_timeout, _max_closes
    _close_timeout, _max_closes = close_timeout, max_concurrent_closes


@cython.ccall
def run_job(job, on_cut) -> cython.bint:  # type: ignore[no-untyped-def]
    """Run ``job`` under the watchdog; True if it finished before its deadline.

    greenscope._cleanup's, here to be compiled: it runs once per close. Listing the job
    in the watchdog's table and taking it out again is the claim protocol described at
    ``_Watchdog`` (no lock). Jobs log and count their own failures and do not raise;
    this is the last line of defence, so that a reaper never dies and nothing reaches
    the hub or another greenlet.
    """
    generation = _generation.count
    # Compiled, time.monotonic()'s own clock read in C (Cython's cpython.time): no call.
    now: cython.double = _clock() if cython.compiled else _monotonic()
    deadline: cython.double = now + _close_timeout
    running: dict = _watchdog.running  # type: ignore[type-arg]
    running[job] = (deadline, on_cut)
    if deadline < _watchdog.sleep_until:  # as _Watchdog.start() does, inline
        _watchdog.poke()
    in_time: cython.bint = False
    try:
        job()
    except _close_deadline:
        pass  # cut in a hub: the job already logged and counted it
    except BaseException:  # a log handler that raised in the job's own logging, say
        _log_exception("greenscope: a cleanup job failed")  # the reaper must go on
    finally:
        # Started in the parent before fork() and resumed in a child: none of the
        # child's bookkeeping is this job's (see _cleanup._after_fork_in_child).
        if generation == _generation.count:
            in_time = running.pop(job, None) is not None  # else the watchdog cut it
            if in_time:
                _pending.count -= 1
    return in_time


@cython.ccall
def drain(reaper: HubQueue, on_cut) -> cython.bint:  # type: ignore[no-untyped-def]
    """Run the jobs of a hub reaper's queue until it is empty (True), or until one is
    cut at its deadline (False: this greenlet's slot went to another)."""
    while reaper.jobs:
        if not run_job(reaper.take(), on_cut):
            return False
    return True


@cython.ccall
def hub_submit(reaper: HubQueue, job):  # type: ignore[no-untyped-def]
    """``_HubReaper.submit``: queue ``job`` and make sure a job greenlet will run it.

    In the hub, a GC callback or any greenlet of the hub's thread: ``deque.append`` is
    atomic, and ``fill_scheduled`` is only ever read and written in that thread."""
    reaper.put(job)
    if not reaper.fill_scheduled and reaper.running < _max_closes:
        reaper.fill_scheduled = True
        reaper.hub.loop.run_callback(reaper._fill)


@cython.cfunc
def _warnings_on() -> cython.bint:
    """Whether the greenscope logger logs WARNINGs: ``isEnabledFor(WARNING)``, reading
    the answer logging caches (``Logger._cache``, cleared whenever levels change) before
    calling it: a Python call per orphan, otherwise.

    ``Logger.disabled`` (which ``logging.config`` sets) is not read here: it is an
    attribute lookup per orphan, and the cache cannot make a line appear. A logger
    disabled after its cache was filled makes this answer True, and the line is then
    dropped by the logging call itself, after a little work for nothing."""
    if _log_cache is not None:
        found = cython.cast(dict, _log_cache).get(30)  # logging.WARNING
        if found is not None:
            return found
    return _warn_enabled(30)


@cython.cfunc
def _first(registry, g, d: dict, key):  # type: ignore[no-untyped-def,type-arg]
    """The miss of ``registry()``: GreenletRegistry._create()'s usual case, a
    gevent.Greenlet's first value with no other registry's in its watch, in a
    GreenletRegistry itself (a subclass may override _create()).

    The same steps in the same order as _create(): the value is made first (if
    createfunc raises, nothing is registered), and the watch is listed in _LIVE last,
    so a take() elsewhere sees all of this or none of it. Everything else is
    _create()'s.
    """
    if type(registry) is not _registry_type:  # a subclass: its own _create()
        return registry._create()
    n: Counts = registry._counts
    if not _ordered.done or n.shut_down or not _prepared.done or _debugging.done:
        return registry._create()
    value = registry.createfunc()
    if key in d:  # createfunc itself used the registry
        return d[key]
    watch: Watch = d.get(_watch_key)
    if watch is None:
        watch = new_watch(g)
        if watch is None:  # not a gevent.Greenlet in its hub: _create() makes it
            return registry._create(value)
        d[_watch_key] = watch
    elif watch.r1 is not None:  # another registry's value: _create() takes the lock
        return registry._create(value)
    d[key] = value
    watch.r1 = registry
    watch.v1 = value
    n.live += 1
    _live.add(watch)  # last (see above)
    n.created += 1
    return value


@cython.ccall
def new_watch(g):  # type: ignore[no-untyped-def]
    """A watch for ``g``, a running gevent.Greenlet with none yet; None for any other
    greenlet, whose watch greenscope._registry._new_watch makes."""
    global _last_hub  # noqa: PLW0603
    if _gevent_greenlet is None or not isinstance(g, _gevent_greenlet):
        return None
    hub = g.parent  # a gevent.Greenlet runs in its thread's hub: never a main greenlet
    # The cache is a C global: only with the GIL (_ordered) is replacing it safe, where
    # a free-threaded build could release the old tuple twice from two threads at once.
    last = _last_hub if _ordered.done else (None, 0)
    ref = last[0]
    if ref is None or _deref(ref) is not hub:
        if hub is None or hub is not _get_hub():
            return None
        last = (_weakref(hub), _get_ident())
        if _ordered.done:
            _last_hub = last
    watch: Watch = _watch_type()
    watch.ref = PyWeakref_NewRef(g, watch) if cython.compiled else _weakref(g, watch)
    watch.gtype = type(g)
    if cython.compiled:
        watch.gid = cython.cast(cython.size_t, cython.cast(cython.p_void, g))
    else:
        watch.r1 = watch.v1 = watch.more = watch.how = watch.name = None
        watch.gid = id(g)
    watch.hub = last[0]
    watch.thread = last[1]
    watch.main = False
    # Completion, not deallocation: a kept spawn() handle or a Pool must not keep a
    # finished greenlet's Session (and its pool connection) open.
    g.rawlink(on_completion)  # a function, not a bound method: it finds the watch in g
    watch.rawlinked = True
    return watch


def on_completion(g):  # type: ignore[no-untyped-def]
    """gevent's rawlink callback at a Greenlet's completion, in the hub: no I/O.

    Most greenlets removed their values already: that case is tested here. The usual
    orphan (one registry's value, with the GIL) is handed to cleanup here; any other goes
    to ``_Watch._completed``."""
    found = _dict_of(g)
    watch: Watch = (
        cython.cast(dict, found).get(_watch_key) if type(found) is dict else found.get(_watch_key)
    )
    if watch is None or watch.r1 is None:  # empty
        return
    if _ordered.done and not watch.more and watch not in _changing:
        _orphaned(watch, g, found)
    else:
        watch._completed(g)


@cython.ccall
def record_end(watch: Watch, g) -> cython.bint:  # type: ignore[no-untyped-def]
    """Note on ``watch`` how its gevent.Greenlet ``g`` ended, for log lines; return
    whether WARNINGs are on (then its name is noted too). In the hub: no I/O."""
    if g.exception is not None:
        watch.how = " (raised)"
    elif isinstance(g.value, BaseException):  # killed: successful() with GreenletExit
        watch.how = " (killed)"
    else:
        watch.how = " (finished)"
    warn: cython.bint = _warnings_on()
    if warn:  # gevent makes Greenlet.name lazily: only for a log line
        watch.name = g.name
    return warn


@cython.cfunc
def _orphaned(watch: Watch, g, d):  # type: ignore[no-untyped-def]
    """_Watch._completed() for a watch holding one registry's value, with the GIL.

    The take needs no lock here. The owner is done: gevent runs completion callbacks in
    the hub once the greenlet has finished (a finalizer that switched it out at its very
    end is not inside a change of its values: _changing is tested first, and nothing
    else of this thread runs while the hub runs this). So only another take() can race
    this one, in another thread (close_all) or a greenlet of this one switched out
    inside it: removing the watch from _live is the claim, as take() claims it, and the
    watch is read only once claimed. Nothing here frees an object, so no finalizer runs
    in between.
    """
    warn: cython.bint = record_end(watch, g)
    if not _take_live(watch):
        return  # another take() got it first
    registry = watch.r1
    value = watch.v1
    n: Counts = registry._counts
    n.live -= 1
    key = n.key
    if type(d) is dict:  # the greenlet's own: typed, one C call each
        exact: dict = d  # type: ignore[type-arg]
        if exact.get(key, _MISSING) is value:  # not one stored since
            del exact[key]
    elif d.get(key, _MISSING) is value:
        del d[key]
    watch.v1 = None
    watch.r1 = None
    job: Reap = Reap.__new__(Reap)  # compiled, its tp_new: no __init__ call
    job.registry = registry
    job.counts = n
    job.value = value
    job._owner = watch
    job.claims = _NO_CLAIMS
    job.orphan = True
    job.warn = warn
    job.reraise = False
    job.done = False
    hubref = watch.hub
    hub = _deref(hubref) if hubref is not None else None
    if hub is not None and hub is getcurrent():
        # _cleanup.submit()'s usual case, inline: the owner's hub is running this, so
        # its loop is alive and this is the owner's thread.
        reaper = _reaper_of(hub, hubref)
        if reaper is not None:
            _pending.count += 1
            hub_submit(reaper, job)
            return
    _submit(job, watch.thread, hub)


@cython.cfunc
def _reaper_of(hub, hubref):  # type: ignore[no-untyped-def]
    """The reaper of ``hub`` (the current one; ``hubref`` its weakref, as watches hold
    it), or None if it has none yet. The last one found is cached (weakly, as a pair
    read and written whole), as _last_hub is: a hub's __dict__ is an attribute lookup."""
    global _last_reaper  # noqa: PLW0603
    last = _last_reaper
    if last[0] is hubref and _ordered.done:  # a weakref without a callback is shared
        reaper = _deref(last[1])
        if reaper is not None:
            return reaper
    reaper = hub.__dict__.get("_greenscope_reaper")
    if reaper is not None and _ordered.done:
        _last_reaper = (hubref, _weakref(reaper))
    return reaper


def forget(registry, d):  # type: ignore[no-untyped-def]
    """``registry.clear()``, given the current greenlet's dict ``d``.

    The clear of a watch's only value, inline and without the lock (the ordered change:
    removing the watch from _LIVE claims it, as take() does); any other goes to
    ``registry._forget_locked()``."""
    _forget(registry, d, registry._key)


@cython.cfunc
def _forget(registry, d, key):  # type: ignore[no-untyped-def]
    # Kept (a local) until this returns: freed under the lock, its finalizers would run
    # there.
    if type(d) is dict:  # the greenlet's own: typed, one C call each
        exact: dict = d  # type: ignore[type-arg]
        value = exact.pop(key, _MISSING)
        found = exact.get(_watch_key) if value is not _MISSING else None
    else:  # a dict subclass assigned to the greenlet's __dict__: its own methods
        value = d.pop(key, _MISSING)
        found = d.get(_watch_key) if value is not _MISSING else None
    if found is None:
        return
    watch: Watch = found
    # The watch holds every stored value; if it no longer holds this one, a take()
    # elsewhere (close_all) got it first, and counts it as it closes it.
    if _ordered.done and watch.r1 is registry and not watch.more:  # its only value: inline
        if not _take_live(watch):  # the claim, without the lock: take() claims so too
            return
        watch.r1 = None
        watch.v1 = None
        n: Counts = registry._counts
        n.removed += 1
        n.live -= 1
        return
    registry._forget_locked(watch)
