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

if cython.compiled:  # the C API's own: no type call (compiled, this import is a cimport)
    from cython.cimports.cpython.weakref import PyWeakref_NewRef

__all__ = [
    "Counts",
    "Flag",
    "RegistryHit",
    "ScopedHit",
    "Watch",
    "bind",
    "compiled",
    "forget",
    "new_watch",
    "on_completion",
]

#: True when this module is the compiled extension.
compiled = cython.compiled

# No registry value is this object. Compiled, a C global: no module lookup per call.
_MISSING = cython.declare(object, object())


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
            found = g.__dict__
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
                found = getcurrent().__dict__
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
        found = getcurrent().__dict__
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
    which greenscope._hot's paths change without the generic attribute protocol."""

    if cython.compiled:
        shut_down = cython.declare(cython.bint, visibility="public")
        live = cython.declare(cython.Py_ssize_t, visibility="public")
        created = cython.declare(cython.Py_ssize_t, visibility="public")
        removed = cython.declare(cython.Py_ssize_t, visibility="public")
        reaped = cython.declare(cython.Py_ssize_t, visibility="public")
        failed = cython.declare(cython.Py_ssize_t, visibility="public")
        timed_out = cython.declare(cython.Py_ssize_t, visibility="public")
    else:
        __slots__ = ("created", "failed", "live", "reaped", "removed", "shut_down", "timed_out")

    def __init__(self, shut_down: bool = False) -> None:
        self.shut_down = shut_down
        self.live = self.created = self.removed = self.reaped = self.failed = 0
        self.timed_out = 0

    def __copy__(self):  # type: ignore[no-untyped-def]
        # copy.copy() and deepcopy() of a registry (an extension type has no pickling)
        other = Counts(self.shut_down)
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
# (weakref to the last hub a watch was made in, its thread): hubs are per thread, so
# while a greenlet's hub is that one, so is its thread. One object, read and written
# whole: two globals could be read half updated by another thread.
_last_hub = cython.declare(tuple, (None, 0))


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
):
    """Hand this module what greenscope._registry's paths here need (once, at import)."""
    global _live, _watch_type, _registry_type, _session_type, _invalidate_opened
    global _gevent_greenlet, _get_hub, _get_ident, _prepared, _debugging
    global _watch_key, _ordered
    _live, _watch_type = live, watch_type
    _registry_type, _session_type = registry_type, session_type
    _invalidate_opened, _gevent_greenlet, _get_hub, _get_ident = (
        invalidate_opened,
        gevent_greenlet,
        get_hub,
        get_ident,
    )
    _prepared, _debugging, _watch_key, _ordered = prepared, debugging, watch_key, ordered


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
    if ref is None or ref() is not hub:
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

    Most greenlets removed their values already: that case is tested here."""
    found = g.__dict__
    watch: Watch = (
        cython.cast(dict, found).get(_watch_key) if type(found) is dict else found.get(_watch_key)
    )
    if watch is not None and watch.r1 is not None:  # not empty
        watch._completed(g)


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
        try:
            _live.remove(watch)  # the claim, without the lock: take() claims so too
        except KeyError:
            return
        watch.r1 = None
        watch.v1 = None
        n: Counts = registry._counts
        n.removed += 1
        n.live -= 1
        return
    registry._forget_locked(watch)
