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
"""

try:
    # Cython needs this very import to compile the decorators away (SQLAlchemy 2.1's
    # compiled modules do the same); without Cython installed, the stand-ins do nothing.
    import cython
except ModuleNotFoundError:  # pragma: no cover - depends on the environment
    from greenscope import _cython as cython

from greenlet import getcurrent

__all__ = ["RegistryHit", "ScopedHit", "compiled"]

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
            found = getcurrent().__dict__
            if type(found) is dict:
                d: dict = found  # type: ignore[type-arg]
                value = d.get(self._key, _MISSING)
                if value is _MISSING:
                    return self._create()
                return value
        # Python: d[key] is cheaper than a d.get() call on every hit; a miss pays.
        try:
            return getcurrent().__dict__[self._key]
        except KeyError:
            return self._create()


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
