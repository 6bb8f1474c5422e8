"""What a gunicorn worker class does, and which hooks and workers are greenscope's.

The doctor recognises greenscope's gunicorn pieces without importing
:mod:`greenscope.gunicorn`: that module imports the doctor to run it at worker start,
and importing it back would make a circle (and would need gevent, which a ``sync``
deployment may not have). Recognition reads data instead:

* a marker attribute, ``__greenscope_hook__ = "post_request"`` on a hook function or
  ``"worker"`` / ``"pywsgi-handler"`` on a class, when greenscope's pieces carry one;
* else the pieces of ``greenscope.gunicorn`` *as already loaded* (``sys.modules``): a
  hook or worker class of greenscope's exists only once that module has been imported,
  so a module that is not loaded means "not greenscope's".
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.util import find_spec
from pkgutil import resolve_name
from types import ModuleType
from typing import Literal

import greenscope

__all__ = [
    "ALIASES",
    "GEVENT_KINDS",
    "WorkerKind",
    "calls_greenscope",
    "gunicorn_hooks_usable",
    "is_gunicorn_default",
    "worker_kind",
    "worker_name",
]

# How each worker kind behaves: "greenscope" removes Sessions by itself; "gevent" is
# gunicorn's GeventWorker (calls post_request); "gevent-pywsgi" calls no post_request;
# "threads" is sync or gthread; "other" is anything the doctor does not judge.
WorkerKind = Literal["greenscope", "gevent", "gevent-pywsgi", "threads", "other"]
GEVENT_KINDS = frozenset({"greenscope", "gevent", "gevent-pywsgi"})

# gunicorn's short names (gunicorn.workers.SUPPORTED_WORKERS), without importing them.
ALIASES: dict[str, WorkerKind] = {
    "sync": "threads",
    "gthread": "threads",
    "gevent": "gevent",
    "gevent_wsgi": "gevent-pywsgi",
    "gevent_pywsgi": "gevent-pywsgi",
    "eventlet": "other",
    "tornado": "other",
    "asgi": "other",
}

_MARKER = "__greenscope_hook__"
_OURS = "greenscope.gunicorn"


def _loaded_gunicorn_module() -> ModuleType | None:
    """greenscope.gunicorn if something imported it already; never imports it."""
    return sys.modules.get(_OURS)


def _marked(obj: object, role: str) -> bool:
    try:
        return getattr(obj, _MARKER, None) == role
    except Exception:  # an object whose __getattr__ raises: not ours
        return False


def gunicorn_hooks_usable() -> bool:
    """Whether ``from greenscope.gunicorn import post_request`` would work here.

    greenscope.gunicorn needs gevent (gunicorn's gevent worker module imports it), so
    advice naming its hooks only fits where gevent is installed.
    """
    if _loaded_gunicorn_module() is not None:
        return True
    try:
        return find_spec("gevent") is not None
    except (ImportError, ValueError):  # a broken or half-imported gevent
        return False


def worker_kind(worker_class: str | type | None) -> WorkerKind | None:
    """What a gunicorn worker class does, from its short name, dotted path or class."""
    if isinstance(worker_class, str):
        name = worker_class.removeprefix("egg:gunicorn#")
        if name in ALIASES:
            return ALIASES[name]
        try:
            worker_class = resolve_name(name)  # as gunicorn loads it
        except (ImportError, AttributeError, ValueError):
            return "other"
    if worker_class is None:
        return None
    return _class_kind(worker_class) if isinstance(worker_class, type) else "other"


def _class_kind(cls: type) -> WorkerKind:
    """A worker class's kind: by its base classes and, for gevent, its server class."""
    mro_modules = {base.__module__ for base in cls.__mro__}
    if mro_modules & {"gunicorn.workers.sync", "gunicorn.workers.gthread"}:
        return "threads"
    if "gunicorn.workers.ggevent" not in mro_modules:
        return "other"
    server_class = getattr(cls, "server_class", None)
    ours = _marked(cls, "worker") or _OURS in mro_modules
    if not ours:
        return "gevent" if server_class is None else "gevent-pywsgi"
    if server_class is None or _is_our_pywsgi_handler(getattr(cls, "wsgi_handler", None)):
        return "greenscope"
    return "gevent-pywsgi"  # a subclass of ours that swapped the pywsgi handler


def _is_our_pywsgi_handler(handler: object) -> bool:
    if not isinstance(handler, type):
        return False
    if _marked(handler, "pywsgi-handler"):
        return True
    ours = getattr(_loaded_gunicorn_module(), "_PyWSGIHandler", None)
    return isinstance(ours, type) and issubclass(handler, ours)


def worker_name(worker_class: str | type | None) -> str | None:
    """The worker class as gunicorn's setting spells it (a class: its dotted path)."""
    if worker_class is None or isinstance(worker_class, str):
        return worker_class
    return f"{worker_class.__module__}.{worker_class.__qualname__}"


def is_gunicorn_default(hook: Callable[..., object]) -> bool:
    """Whether a hook is gunicorn's own no-op default (``cfg.post_request`` unset)."""
    return getattr(hook, "__module__", None) == "gunicorn.config"


def calls_greenscope(hook: Callable[..., object]) -> bool:
    """Whether a post_request hook is, or refers by name to, greenscope's removal.

    Looks at the names the function's code uses and what they are in its globals:
    ``greenscope_hooks.post_request(...)`` and ``remove_current()`` are seen, a call
    through another function is not.
    """
    ours = _loaded_gunicorn_module()
    targets: list[object] = [greenscope.remove_current]
    if ours is not None:
        targets.append(getattr(ours, "post_request", None))

    def is_target(value: object) -> bool:  # by identity: globals may define __eq__
        return _marked(value, "post_request") or any(value is t for t in targets)

    if is_target(hook):
        return True
    code = getattr(hook, "__code__", None)
    namespace = getattr(hook, "__globals__", None)
    if code is None or not isinstance(namespace, dict):
        return False
    names = set(code.co_names)
    uses_attribute = bool(names & {"post_request", "remove_current"})
    for name in names:
        value = namespace.get(name)
        if is_target(value):
            return True
        if uses_attribute and value is not None and (value is ours or value is greenscope):
            return True
    return False
