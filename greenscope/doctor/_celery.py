"""Checks of a Celery worker: ``celery-install`` and ``celery-soft-time-limit``.

They run only when :func:`~greenscope.doctor.diagnose` is given ``celery_app``; a
gunicorn deployment gets no line from them.
"""

from __future__ import annotations

from greenscope.doctor._framework import Finding, Scan, Setup, register

__all__: list[str] = []  # checks are reached through the registry


@register("celery-install", tag="celery")
def _check_celery_install(setup: Setup, scan: Scan) -> list[Finding]:
    """Celery: does greenscope.celery remove each task's Sessions?"""
    if setup.celery is None:
        return []
    from greenscope._registry import registries  # noqa: PLC0415

    check = "celery-install"
    try:
        from greenscope.celery import installed  # noqa: PLC0415 - Celery is optional
    except ImportError:
        return [Finding(check, "info", "Celery is not importable: not checked")]
    if installed(setup.celery):
        return [Finding(check, "ok", "greenscope.celery.install(app) ran: tasks are removed")]
    long_lived = setup.pool in {"prefork", "threads", "solo"}
    if not registries():
        return [Finding(check, "info", "no greenscope registry: nothing to remove per task")]
    return [
        Finding(
            check,
            "error" if long_lived else "warning",
            f"greenscope.celery.install(app) did not run: with the {setup.pool} pool "
            + (
                "every task runs on one long-lived greenlet, so the next task inherits "
                "the previous one's Session and open transaction"
                if long_lived
                else "each task's Session is left to orphan cleanup (a WARNING per task, "
                "and the connection comes back only after the task's greenlet ended)"
            ),
            "`greenscope.celery.install(app)` where the Celery app is created",
        )
    ]


@register("celery-soft-time-limit", tag="celery")
def _check_celery_soft_time_limit(setup: Setup, scan: Scan) -> list[Finding]:
    """The gevent pool ignores soft_time_limit: say so where one is set."""
    if setup.celery is None or setup.pool != "gevent":
        return []
    check = "celery-soft-time-limit"
    conf = setup.celery.conf
    limited = ["task_soft_time_limit"] if conf.get("task_soft_time_limit") else []
    tasks = getattr(setup.celery, "tasks", {})
    limited += sorted(name for name, t in tasks.items() if getattr(t, "soft_time_limit", None))
    if not limited:
        return [Finding(check, "ok", "no soft_time_limit set")]
    return [
        Finding(
            check,
            "warning",
            f"soft_time_limit set ({', '.join(limited[:5])}), but the gevent pool ignores "
            "it: no SoftTimeLimitExceeded is raised, the task runs on",
            "bound waits with `gevent.Timeout(seconds)` inside the task, or use the hard "
            "`time_limit` (the gevent pool enforces it, and greenscope still removes the "
            "task's Session)",
        )
    ]
