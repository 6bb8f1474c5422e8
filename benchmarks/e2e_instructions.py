"""``make bench-e2e-instructions``: where a request's instructions go, greenscope's worker
against stock's, counted by callgrind in the gunicorn worker itself.

    python benchmarks/e2e_instructions.py [--requests N]

The timed end-to-end rows (``make bench``, section 5) share two cores between server,
PostgreSQL and load generator, and their intervals are wider than the few percent the
targets ask about. This runs the demo service's worker (one, as there) under callgrind
with perf trampolines (Python 3.12+), serves ``N`` and then ``2N`` sequential
``GET /sql`` on one keep-alive connection, and prints per request, from the difference
of the two runs:

* the whole worker's instructions (start-up and exit cancel out; the waits do not:
  gevent's and psycopg's poll loops run a timing-dependent number of times, so this row
  moves by a few percent between runs, even in instructions);
* the two steps that differ between the servers, inclusive of everything they call:
  getting the request's Session (greenscope's miss path; stock's
  ``ThreadLocalRegistry``) and the request-end removal (greenscope's worker; stock's
  hand-written ``post_request``), each with its ROLLBACK round trip;
* the steps both run alike (the app's query, gunicorn's parser), for scale.

Needs valgrind, Python 3.12+ and ``DATABASE_URL`` or ``GREENSCOPE_TEST_PG_URL``. About
three minutes. Instruction counts, not time: what the worker executes, not what it waits
for, and not the database server's own work (another process).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from pathlib import Path

import bench
import instructions

import loadgen  # deploy/, on the path once bench is imported

# Each step: (label, greenscope's function, stock's function), as perf trampolines name them.
STEPS = [
    (
        "the request's Session (its first use)",
        "scoped_session._greenscope_miss (/greenscope/_scoping.py)",
        "ThreadLocalRegistry.__call__ (/sqlalchemy/util/_collections.py)",
    ),
    (
        "request-end removal (its ROLLBACK included)",
        "_end_request (/greenscope/gunicorn.py)",
        "post_request (/benchmarks/stock_remove.conf.py)",
    ),
    (
        "same in both: the app's SELECT (Session.execute)",
        "Session.execute (/sqlalchemy/orm/session.py)",
        "Session.execute (/sqlalchemy/orm/session.py)",
    ),
    (
        "same in both: parsing the request (gunicorn)",
        "Request.parse (/gunicorn/http/message.py)",
        "Request.parse (/gunicorn/http/message.py)",
    ),
]


def _serve(variant: str, url: str, table: str, requests: int, workdir: str) -> dict[str, float]:
    """One worker under callgrind for ``requests`` requests: its total instructions
    ("total") and, per Python function, the inclusive instructions of all its calls."""
    port = loadgen.free_port()
    out = Path(workdir) / f"e2e-{variant}-{requests}"
    grind = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}.%p",
        f"--log-file={out}.log",
    ]
    argv, env = bench._server_command(variant, url, table, port, grind)
    argv[-1:-1] = ["--timeout", "900"]  # a worker under valgrind heartbeats slowly
    env["PYTHONPERFSUPPORT"] = "1"  # a stub per Python function, named in /tmp/perf-PID.map
    # Under valgrind the start-up takes a minute or more.
    server = loadgen.Server(argv, port, env, workdir, f"{out.name}.server", start_timeout=600)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for _ in range(requests):
            conn.request("GET", "/sql")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{variant}: GET /sql answered {resp.status}")
        conn.close()
    finally:
        server.stop(timeout=600)  # gunicorn's graceful stop: the worker exits, callgrind writes
    booted = re.findall(r"Booting worker with pid: (\d+)", server.log())
    if len(booted) != 1:  # a worker replaced mid-run would split the count
        raise RuntimeError(f"{variant}: expected one worker, gunicorn booted {booted}")
    pid = int(booted[0])
    names = instructions._perf_map(pid)
    dump = Path(f"{out}.{pid}")
    found: dict[str, float] = {"total": instructions._totals(dump)}
    for callee, (_calls, ir) in instructions.read_dump(dump).calls.items():
        label = names.get(int(callee, 16)) if callee.startswith("0x") else None
        if label is not None:
            found[label] = found.get(label, 0) + ir
    return found


def _lookup(counts: dict[str, float], function: str) -> float:
    """The inclusive count of ``function`` ("qualname (/tail/of/its/file.py)")."""
    qual, _, tail = function.partition(" (")
    hits = [v for k, v in counts.items() if k.startswith(f"{qual} (") and k.endswith(tail)]
    return sum(hits)


def measure(url: str, requests: int, workdir: str) -> dict[str, dict[str, float]]:
    """Per request, by variant: "total" and each step's greenscope or stock function."""
    table = f"bench_{uuid.uuid4().hex[:8]}"
    loadgen.create_demo_schema({**os.environ, "DATABASE_URL": url, "GREENSCOPE_DEMO_TABLE": table})
    runs = [(v, n) for v in bench.VARIANTS for n in (requests, 2 * requests)]
    try:
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            found = pool.map(
                _serve,
                [v for v, _ in runs],
                repeat(url),
                repeat(table),
                [n for _, n in runs],
                repeat(workdir),
            )
            counts = dict(zip(runs, found, strict=True))
    finally:
        bench._drop_demo_table(url, table)
    per: dict[str, dict[str, float]] = {}
    for i, variant in enumerate(bench.VARIANTS):
        once, twice = counts[variant, requests], counts[variant, 2 * requests]
        row = {"total": (twice["total"] - once["total"]) / requests}
        for _, *functions in STEPS:
            function = functions[i]
            row[function] = (_lookup(twice, function) - _lookup(once, function)) / requests
        per[variant] = row
    return per


def report(per: dict[str, dict[str, float]], requests: int) -> str:
    ours, stock = per["greenscope"], per["stock"]
    rows = []
    for label, g_fn, s_fn in STEPS:
        rows.append((label, ours[g_fn], stock[s_fn]))
    differ = rows[:2]
    rows.append(
        (
            "the two steps that differ, together",
            sum(r[1] for r in differ),
            sum(r[2] for r in differ),
        )
    )
    rows.append(
        ("the whole worker (moves by a few % between runs)", ours["total"], stock["total"])
    )
    return bench.table(
        f"Instructions per request in the gunicorn worker (callgrind; GET /sql on PostgreSQL, "
        f"one keep-alive client; runs of {requests} and {2 * requests} requests)",
        [(label, f"{g:,.0f}", f"{s:,.0f}", f"{g / s:.3f}x") for label, g, s in rows],
        ("step", "Ir greenscope", "Ir stock", "greenscope / stock"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="N (default 100)")
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL") or os.environ.get("GREENSCOPE_TEST_PG_URL")
    why = instructions.available()
    if why is None and not instructions.trampolines_available():
        why = "perf trampolines need Python 3.12+ on Linux"
    if why is None and not url:
        why = "set DATABASE_URL or GREENSCOPE_TEST_PG_URL to a PostgreSQL database"
    if why is not None:
        print(f"e2e_instructions: cannot run: {why}", file=sys.stderr)
        return 2
    assert url is not None
    with tempfile.TemporaryDirectory(prefix="greenscope-e2e-ir-") as workdir:
        per = measure(url, args.requests, workdir)
    print(report(per, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
