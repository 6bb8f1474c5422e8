"""Production gunicorn settings for a gevent app using greenscope.

    gunicorn -c deploy/gunicorn.conf.py --chdir deploy demo_app:app

Command-line flags (and GUNICORN_CMD_ARGS) override any value here; the few read from
environment variables say so. For your own app, copy this file into your project and
replace the app path. Read deploy/README.md for pool sizing and drivers before you
change the concurrency.
"""

import importlib.util
import os

# Metrics (greenscope.metrics, deploy/README.md "Metrics"): with prometheus_client
# installed, every worker publishes greenscope's and its pools' figures, added up over
# the workers at /metrics (the demo serves it; prometheus.MetricsMiddleware in your app).
# This must run before anything imports prometheus_client. With --statsd-host instead,
# greenscope's worker sends the same figures through gunicorn's own StatsD logger.
if importlib.util.find_spec("prometheus_client") is not None:
    from greenscope.metrics import prometheus

    prometheus.setup_multiprocess()
    on_starting = prometheus.on_starting  # a clean directory at each master start
    child_exit = prometheus.child_exit  # a dead worker's gauges leave the sums

bind = os.environ.get("GREENSCOPE_BIND", "127.0.0.1:8000")

# One process per core; each serves up to worker_connections clients at once, and each
# has its own pools: workers x (pool_size + max_overflow) must fit the database's
# max_connections (or PgBouncer's). Set WEB_CONCURRENCY to stay within that budget.
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))

# greenscope's gevent worker removes each request's Sessions when its response is closed,
# gives each worker fresh pools after fork and closes what is left at worker exit. With
# the stock "gevent" worker, wire the hooks instead: see gunicorn.hooks.conf.py.
worker_class = "greenscope.gunicorn.GeventWorker"

# Greenlets per worker. Every one of them may need a database connection at the same
# time: keep pool_size + max_overflow of each engine >= worker_connections, or lower
# this (deploy/README.md, "Pool sizing").
worker_connections = int(os.environ.get("GREENSCOPE_WORKER_CONNECTIONS", "100"))

# Keep-alive: one greenlet serves many requests of a connection; greenscope removes the
# Session after each request, so an idle connection holds no database connection.
# Behind a load balancer, set this above the balancer's idle timeout.
keepalive = 5

timeout = 30  # a worker silent this long is killed (SIGABRT, then post_request runs)
graceful_timeout = 30  # SIGTERM: in-flight requests get this long to finish

# Recycle workers now and then; jitter keeps them from restarting together.
max_requests = 10_000
max_requests_jitter = 1_000

# preload_app = False (the default) is recommended: the app, its engines and its drivers
# are then imported in each worker *after* gevent patched it. With preload_app = True
# the app is imported in the unpatched master: create engines lazily, not at import
# (create_engine imports psycopg, which then blocks the hub in every worker), and rely
# on the worker (or greenscope.gunicorn.post_fork) to dispose of inherited pools with
# engine.dispose(close=False).
preload_app = False

accesslog = os.environ.get("GREENSCOPE_ACCESSLOG")  # e.g. "-" for stdout
