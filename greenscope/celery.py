"""Celery: each task's Sessions removed when the task ends, for every pool.

One line, next to your Celery app::

    import greenscope.celery

    greenscope.celery.install(app)                          # rollback + remove
    greenscope.celery.install(app, commit_on_success=True)  # commit, then remove

What it does, per pool:

* ``-P gevent``: every task runs in a new greenlet. Its Sessions (in every
  request-scoped greenscope registry) are removed in ``task_postrun``, in that greenlet,
  before it ends: no orphan, no WARNING, and the connection is back in the pool before
  the next task can start. Background greenlets a task spawned are still reaped when
  they end.
* ``prefork``, ``threads``, ``solo``: a child process's main greenlet, or a pool
  thread, runs task after task and never ends. Without removal the next task would
  inherit the previous one's Session, identity map and open transaction. Each task's
  Sessions are removed in ``task_postrun``; anything found at ``task_prerun`` (left by
  code that ran between tasks) is removed before the task starts.

``task_postrun`` runs in Celery's ``finally``: after success, failure, ``Retry``,
``Reject``/``Ignore``, and when a revoke with ``terminate=True`` or the hard
``time_limit`` kills the task's greenlet (the gevent pool lets code run after both).
prefork enforces ``time_limit`` by killing the child process: nothing runs, and the
database rolls back the dropped connection's transaction. The threads and solo pools
enforce no time limit at all. The gevent pool ignores ``soft_time_limit`` (no exception
is raised in the task): use ``gevent.Timeout`` in the task, or the hard ``time_limit``.

``commit_on_success=True`` commits the task's Sessions inside the task's execution,
right after it returns and *before* Celery stores SUCCESS: a commit that fails makes the
task fail (so ``autoretry_for``, ``acks_late`` and errbacks see it), and a task is never
reported SUCCESS with its write lost. A task that raises (``Retry`` included) commits
nothing. It wraps the ``__call__`` of the app's ``Task`` class (and of each registered
task class that does not derive from it) once.

Eager execution (``task_always_eager``, ``task.apply()``) and a task called as a plain
function run in the *caller's* greenlet, inside a web request for example: there
nothing is removed or committed; the caller's own removal handles its Session.

Worker exit: ``worker_process_shutdown`` and ``worker_shutdown`` close what is left
(``close_all(include_running=False, shutdown=False)``). Fork: prefork children give
every engine greenscope knows a fresh pool (``worker_process_init``; greenscope's core
does it at every fork anyway).

eventlet is not supported: greenscope's registry keys on greenlets, which eventlet also
uses, but its cleanup paths are gevent's or native threads'; it is untested there.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

try:
    import celery
    from celery import signals
    from celery.app.task import Task as _CeleryTask
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "greenscope.celery needs Celery; install it with: pip install 'greenscope[celery]'"
    ) from exc

import greenscope
from greenscope import _engines

__all__ = ["install", "installed"]

logger = logging.getLogger("greenscope")

_MARK = "_greenscope_commit"
_apps: weakref.WeakKeyDictionary[celery.Celery, bool] = weakref.WeakKeyDictionary()


def installed(app: celery.Celery) -> bool:
    """True if :func:`install` ran for ``app`` (the doctor asks)."""
    return app in _apps


def _ours(sender: Any) -> bool:
    """A task of an installed app, run by a worker (not eagerly, not as a function)."""
    app = getattr(sender, "_app", None) or getattr(sender, "app", None)
    if app not in _apps:
        return False
    request = getattr(sender, "request", None)
    return not (getattr(request, "is_eager", False) or getattr(request, "called_directly", True))


def _remove(where: str) -> None:
    try:
        greenscope.remove_current()
    except Exception:  # pragma: no cover - remove_current logs and swallows Exceptions
        logger.exception("greenscope: removing a task's Sessions %s failed", where)


def _on_prerun(sender: Any = None, **kwargs: Any) -> None:
    if _ours(sender) and greenscope.current_sessions():
        # A long-lived greenlet (prefork, threads, solo) holds Sessions made between
        # tasks: none of them may reach this task.
        _remove("before the task")


def _on_postrun(sender: Any = None, **kwargs: Any) -> None:
    if _ours(sender):
        _remove("after the task")


def _on_process_init(**kwargs: Any) -> None:
    _engines.dispose_after_fork()


def _on_shutdown(**kwargs: Any) -> None:
    try:
        greenscope.close_all(include_running=False, shutdown=False)
    except Exception:  # pragma: no cover - defensive: never fail a worker's exit
        logger.exception("greenscope: closing Sessions at worker shutdown failed")


def _wrap_call(cls: type) -> None:
    """Make ``cls.__call__`` commit the task's Sessions after the task body returns.

    Wrapping ``__call__`` is the pattern Celery supports for running code around a task
    inside its execution (the worker's tracer calls a custom ``__call__``, protected
    against a double request push by ``setup_worker_optimizations``). A ``__call__``
    the class defines itself is kept and called; otherwise the next one in the MRO.
    """
    own = cls.__dict__.get("__call__")
    if own is not None and getattr(own, _MARK, False):
        return

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if own is not None:
            result = own(self, *args, **kwargs)
        else:
            result = super(cls, self).__call__(*args, **kwargs)  # type: ignore[arg-type]  # cls: a type
        if _ours(self):
            # Inside the task's execution, before Celery stores SUCCESS: a failing
            # commit fails the task.
            for session in greenscope.current_sessions():
                commit = getattr(session, "commit", None)
                if commit is not None:
                    commit()
        return result

    setattr(__call__, _MARK, True)
    cls.__call__ = __call__  # type: ignore[method-assign]


def _on_finalize(sender: Any = None, **kwargs: Any) -> None:
    if _apps.get(sender):
        _wrap_tasks(sender)


def _wrap_tasks(app: celery.Celery) -> None:
    base = app.Task
    _wrap_call(base)
    for task in list(app.tasks.values()):
        if not isinstance(task, base) and isinstance(task, _CeleryTask):
            _wrap_call(type(task))


def install(app: celery.Celery, *, commit_on_success: bool = False) -> None:
    """Remove each task's Sessions when it ends (and commit first, if asked); idempotent.

    See the module documentation for what holds with each pool. Call it where the Celery
    app is created, before the worker starts.

    .. versionadded:: 0.2
    """
    if not isinstance(app, celery.Celery):
        raise TypeError(
            f"greenscope.celery.install(app) takes your Celery application; got {app!r}"
        )
    if _apps.get(app) is not None and _apps[app] != commit_on_success:
        raise ValueError(
            "greenscope.celery.install() was already called for this app with "
            f"commit_on_success={_apps[app]}; call it once, with the setting you want"
        )
    _apps[app] = commit_on_success
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="greenscope.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="greenscope.postrun")
    signals.worker_process_init.connect(
        _on_process_init, weak=False, dispatch_uid="greenscope.process_init"
    )
    signals.worker_process_shutdown.connect(
        _on_shutdown, weak=False, dispatch_uid="greenscope.process_shutdown"
    )
    signals.worker_shutdown.connect(_on_shutdown, weak=False, dispatch_uid="greenscope.shutdown")
    if commit_on_success:
        _wrap_call(app.Task)
        # Tasks whose class does not derive from app.Task (base=celery.Task): wrapped
        # once the app is finalized, when every task is registered.
        app.on_after_finalize.connect(_on_finalize, weak=False, dispatch_uid="greenscope.wrap")
        if app.finalized:
            _wrap_tasks(app)
