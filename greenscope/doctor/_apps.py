"""What the WSGI app does at request end, as far as its objects show it.

Read by the checks of request-end removal (``_servers``) and of SQLAlchemy's registries
(``_registries``). Nothing here runs the app: middleware are followed through their
attributes, Flask's teardown functions are read, never called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from greenscope.doctor._workers import is_gunicorn_default

__all__ = [
    "NOTHING_REMOVES",
    "REUSED",
    "app_removes",
    "flask_apps",
    "removes_stock",
]

REUSED = (
    "the next keep-alive request of a connection gets the previous one's Session and "
    "open transaction"
)
NOTHING_REMOVES = f"nothing removes Sessions at request end, so {REUSED}"


def _wsgi_chain(app: object) -> list[object]:
    """The app and what it wraps: middleware keep the next app in ``.app``,
    ``.application`` or (Flask) ``.wsgi_app``. Bounded, cycle-safe, never raises."""
    chain: list[object] = []
    todo = [app]
    while todo and len(chain) < 16:
        obj = todo.pop(0)
        if obj is None or any(obj is seen for seen in chain):
            continue
        chain.append(obj)
        for attr in ("wsgi_app", "app", "application"):
            try:
                todo.append(getattr(obj, attr, None))
            except Exception:  # a property that raises: not a wrapper
                continue
    return chain


def flask_apps(app: object) -> list[Any]:
    """The Flask apps in the app's middleware chain."""
    return [a for a in _wsgi_chain(app) if hasattr(a, "teardown_appcontext_funcs")]


def _teardown_funcs(app: object) -> list[Callable[..., object]]:
    """Flask's teardown_appcontext and teardown_request functions (every blueprint's)."""
    funcs: list[Callable[..., object]] = []
    for flask_app in flask_apps(app):
        funcs += list(getattr(flask_app, "teardown_appcontext_funcs", None) or [])
        per_blueprint = getattr(flask_app, "teardown_request_funcs", None) or {}
        if isinstance(per_blueprint, dict):
            for blueprint_funcs in per_blueprint.values():
                funcs += list(blueprint_funcs)
    return funcs


def _calls_remove(func: object) -> bool:
    """Whether ``func``'s code uses the name ``remove`` (``Session.remove()``)."""
    return "remove" in getattr(getattr(func, "__code__", None), "co_names", ())


def app_removes(app: object) -> str | None:
    """How the app removes Sessions at request end by itself, if it visibly does."""
    # Imported here: greenscope.wsgi is not needed to import the doctor.
    from greenscope.wsgi import GreenscopeMiddleware  # noqa: PLC0415

    if any(type(a) is GreenscopeMiddleware for a in _wsgi_chain(app)):
        return "the app is wrapped in greenscope.wsgi.GreenscopeMiddleware"
    for func in _teardown_funcs(app):
        module = getattr(func, "__module__", "") or ""
        if module.startswith(("greenscope", "flask_sqlalchemy")) or _calls_remove(func):
            return "Flask removes the Session in a teardown function"
    return None


def removes_stock(app: object, post_request: Callable[..., object] | None) -> bool:
    """Whether a Flask teardown or a post_request hook of the app's visibly calls remove().

    greenscope's worker, hooks and middleware remove greenscope's registries only; a
    SQLAlchemy scoped_session needs the app's own ``remove()``. Seen by name in the
    function's code, as ``Session.remove()`` (and Flask-SQLAlchemy's teardown) has it.
    """
    funcs = _teardown_funcs(app)
    if post_request is not None and not is_gunicorn_default(post_request):
        funcs.append(post_request)
    return any(_calls_remove(f) for f in funcs)
