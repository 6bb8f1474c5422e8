"""Which exporters a gunicorn worker starts by itself, at its start and its exit.

greenscope's workers and its ``post_worker_init``/``worker_exit`` hooks call these, so a
gunicorn user gets metrics by configuring the exporter alone: ``--statsd-host`` for
StatsD, ``PROMETHEUS_MULTIPROC_DIR`` (see :mod:`greenscope.metrics.prometheus`) for
Prometheus. ``GREENSCOPE_METRICS=0`` turns both off.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from greenscope.metrics import _core

__all__ = ["worker_exiting", "worker_started"]

_OFF = {"0", "false", "no", "off"}


def worker_started(worker: Any) -> list[str]:
    """Start the exporters this worker is configured for; return their names."""
    if os.environ.get("GREENSCOPE_METRICS", "").strip().lower() in _OFF:
        return []
    from greenscope.metrics import prometheus, statsd  # noqa: PLC0415 - only when used

    interval = _core.interval_from_env()
    started = []
    if statsd.is_statsd_logger(worker.log):
        statsd.start(worker.log, interval=interval)
        started.append("statsd")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if importlib.util.find_spec("prometheus_client") is None:
            worker.log.warning(
                "greenscope.metrics: PROMETHEUS_MULTIPROC_DIR is set but prometheus_client "
                "is not installed: pip install 'greenscope[prometheus]'"
            )
        elif "prometheus_client.values" in sys.modules and not (prometheus._multiprocess_active()):
            worker.log.error(
                "greenscope.metrics: prometheus_client was imported before "
                "PROMETHEUS_MULTIPROC_DIR was set and runs in single-process mode: each "
                "scrape would show one worker. Call greenscope.metrics.prometheus."
                "setup_multiprocess() at the top of gunicorn.conf.py."
            )
        else:
            prometheus.start(interval=interval)
            started.append("prometheus")
    return started


def worker_exiting() -> None:
    """Publish a last time and stop (the worker's final counts are not lost)."""
    _core.stop(final=True)
