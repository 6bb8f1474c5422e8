"""The check of SQLAlchemy's own scoped_sessions: ``stock-scoped-session``.

greenscope's registries keep one Session per greenlet and are removed at request end;
SQLAlchemy's ``scoped_session`` keeps one per ``threading.local``, which gevent's
patching makes per greenlet only if it was built after the patch, and which nothing of
greenscope's removes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.util import ScopedRegistry, ThreadLocalRegistry

import greenscope
from greenscope.doctor._apps import REUSED, flask_apps, removes_stock
from greenscope.doctor._framework import Finding, Scan, Setup, gevent_monkey, plural, register
from greenscope.doctor._workers import GEVENT_KINDS

__all__: list[str] = []  # checks are reached through the registry


@register("stock-scoped-session", tag="registries")
def _check_registries(setup: Setup, scan: Scan) -> list[Finding]:
    check = "stock-scoped-session"
    findings = []
    monkey = gevent_monkey()
    shared: list[ScopedRegistry[Any]] = []
    unscoped: list[ScopedRegistry[Any]] = []
    if monkey is not None and monkey.is_module_patched("threading"):
        real_local = monkey.get_original("_thread", "_local")
        for registry in scan.stock_registries:
            if type(registry) is ThreadLocalRegistry and type(registry.registry) is real_local:
                shared.append(registry)
            else:
                unscoped.append(registry)
    if shared:
        findings.append(
            Finding(
                check,
                "error",
                f"{plural(len(shared), 'SQLAlchemy scoped_session')} built before gevent "
                "patched threading: every greenlet of the worker shares ONE Session, its "
                "objects and its transaction",
                "use greenscope's drop-in: `from greenscope import scoped_session`",
            )
        )
    if (
        unscoped
        and setup.kind in GEVENT_KINDS
        and not removes_stock(setup.app, setup.post_request)
    ):
        stock = f"{plural(len(unscoped), 'SQLAlchemy scoped_session')} (not greenscope's)"
        why = (
            "greenscope's request-end removal skips SQLAlchemy's registries, and a gevent "
            "worker serves every keep-alive request of a connection in one greenlet"
        )
        fix = (
            "use greenscope's drop-in, `from greenscope import scoped_session`, or call "
            "`Session.remove()` at the end of every request (Flask: in a teardown function)"
        )
        if flask_apps(setup.app):  # Flask's teardowns are all there is to look at
            message = f"{stock}, and no Flask teardown function calls remove(): {why}, so "
            findings.append(Finding(check, "error", message + REUSED, fix))
        else:
            message = (
                f"{stock}: {why}; the doctor cannot see whether your app calls its "
                f"remove() when each request ends, and if not, {REUSED}"
            )
            findings.append(Finding(check, "warning", message, fix))
    elif unscoped:
        findings.append(
            Finding(
                check,
                "info",
                f"{plural(len(unscoped), 'SQLAlchemy scoped_session')} (not greenscope's): "
                "a Session whose greenlet ends without remove() keeps its connection until "
                "garbage collection, and greenscope's request-end removal skips it",
                "use greenscope.scoped_session, or remove() at the end of every request",
            )
        )
    ours = len(greenscope.registries())
    if ours:
        findings.append(
            Finding(check, "ok", f"{plural(ours, 'greenscope registry', 'greenscope registries')}")
        )
    elif not scan.stock_registries:
        findings.append(Finding(check, "info", "no scoped_session found"))
    elif not findings:
        findings.append(
            Finding(
                check, "ok", "SQLAlchemy scoped_session without gevent: one Session per thread"
            )
        )
    return findings
