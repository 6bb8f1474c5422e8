"""gunicorn settings for the stock gevent worker, with greenscope's hooks.

    gunicorn -c deploy/gunicorn.hooks.conf.py --chdir deploy demo_app:app

Use this when you must keep ``-k gevent`` (another library's worker subclass, say).
gunicorn loads a single config file, so greenscope ships hooks to import, not a config
that would replace yours. ``-k gevent_pywsgi`` calls no post_request: use
greenscope.gunicorn.GeventPyWSGIWorker or greenscope.wsgi.GreenscopeMiddleware there.
"""

import os
from typing import Any

from greenscope import gunicorn as greenscope_hooks

bind = os.environ.get("GREENSCOPE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
worker_class = "gevent"
worker_connections = int(os.environ.get("GREENSCOPE_WORKER_CONNECTIONS", "100"))
keepalive = 5
timeout = 30
graceful_timeout = 30
max_requests = 10_000
max_requests_jitter = 1_000
preload_app = False  # see gunicorn.conf.py for what --preload implies
accesslog = os.environ.get("GREENSCOPE_ACCESSLOG")

# greenscope's hooks as they are:
post_fork = greenscope_hooks.post_fork
worker_exit = greenscope_hooks.worker_exit
# Optional: log what `python -m greenscope doctor` would find, once per worker at start,
# and start the metrics exporters (greenscope.metrics) the worker is configured for.
post_worker_init = greenscope_hooks.post_worker_init


# ... or composed with a hook of your own: call greenscope's last, after your code
# has used the Session for the last time.
def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    # your own post_request work goes here
    greenscope_hooks.post_request(worker, req, environ, resp)
