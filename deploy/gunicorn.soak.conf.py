"""gunicorn hooks for ``deploy/soak.py``: every worker reports its counters when it exits.

Worker processes come and go during the soak (``max_requests``, SIGHUP, a restart), and
their counters go with them: each worker records that it started and, at exit (after
greenscope's worker has closed what was left), writes the demo's and greenscope's
counters to ``$GREENSCOPE_SOAK_DIR``. A worker that started and never reported was
killed without cleanup, which the soak counts as a failure.
"""

import json
import os
import sys
from pathlib import Path
from typing import Any

import greenscope

_DIR = Path(os.environ["GREENSCOPE_SOAK_DIR"])


def post_fork(server: Any, worker: Any) -> None:
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
