"""gunicorn hooks for ``deploy/soak.py``: every worker reports its counters when it exits.

Worker processes come and go during the soak (``max_requests``, SIGHUP, a restart), and
their counters go with them: each worker records that it is ready to serve and, at exit (after
greenscope's worker has closed what was left), writes the demo's and greenscope's
counters to ``$GREENSCOPE_SOAK_DIR``. A worker that was ready and never reported was
killed without cleanup, which the soak counts as a failure.
"""

import json
import os
import sys
from pathlib import Path
from typing import Any

import greenscope

_DIR = Path(os.environ["GREENSCOPE_SOAK_DIR"])


def post_worker_init(worker: Any) -> None:
    # Ready: signal handlers installed and the app loaded. Not at post_fork: a worker that
    # the master stops while it boots (a SIGHUP reload right after a max_requests
    # recycle) dies of the default SIGTERM action before gunicorn installed its handler,
    # runs no worker_exit, and has served nothing, so it holds nothing to judge.
    (_DIR / f"started-{os.getpid()}").touch()


def worker_exit(server: Any, worker: Any) -> None:
    # Orphans whose close is still queued would be in no counter yet (see RegistryStats):
    # let them finish, as greenscope's exit handler would a moment later.
    greenscope.wait_reaped(5)
    demo_app: Any = sys.modules.get("demo_app")
    report = {
        "pid": os.getpid(),
        "counters": dict(demo_app.counters) if demo_app else {},
        "checkedout": demo_app.engine.pool.checkedout() if demo_app else 0,
        "greenscope": greenscope.stats().__dict__,
    }
    tmp = _DIR / f".exit-{os.getpid()}.json"
    tmp.write_text(json.dumps(report))
    tmp.rename(_DIR / f"exit-{os.getpid()}.json")
