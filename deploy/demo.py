"""``make demo``: the demo service under a real gunicorn, with and without greenscope.

    python deploy/demo.py                       # both runs, side by side
    python deploy/demo.py --without-greenscope  # only the stock run
    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/test python deploy/demo.py

Each run starts ``gunicorn -k <worker>`` (one worker) on a free loopback port, drives the
same concurrent keep-alive load (writes, failing requests, forgotten commits, streamed
bodies, background writes, clients that hang up mid-stream), audits the server and the
table while the keep-alive connections are still open, stops the server with SIGTERM and
prints a report. The greenscope run must show no leak: the exit status says whether it
did. The stock run (``sqlalchemy.orm.scoped_session``, ``-k gevent``, no request-end
removal) shows what goes wrong without it; its failures do not change the exit status.

SQLite (a file in a temporary directory) is the default, so the demo needs no server.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import loadgen

DEPLOY = Path(__file__).resolve().parent

RUNS = {
    "greenscope": ("greenscope.gunicorn.GeventWorker", "greenscope"),
    "stock": ("gevent", "stock"),
}

ROWS = [
    ("requests sent", "requests"),
    ("  answered as expected", "ok"),
    ("  unexpected answers/errors", "unexpected_count"),
    ("  deliberate 500s", "expected_failures"),
    ("  clients that hung up mid-stream", "disconnects"),
    ("latency p50 (ms)", "p50_ms"),
    ("latency p99 (ms)", "p99_ms"),
    ("seconds", "seconds"),
    ("sessions created", "created"),
    ("sessions removed", "removed"),
    ("sessions reaped (orphans)", "reaped"),
    ("connections checked out, clients idle", "checkedout"),
    ("backends idle in transaction", "idle_in_tx"),
    ("requests that saw another's Session", "saw_foreign"),
    ("acknowledged (201) writes lost", "lost_count"),
    ("accepted (202) background writes lost", "background_lost_count"),
    ("failed/forgotten writes stored", "leaked_count"),
    ("rows stored twice", "duplicates"),
    ("server exit status (SIGTERM)", "exit_status"),
]

MUST_BE_ZERO = [
    "unexpected_count",
    "checkedout",
    "idle_in_tx",
    "saw_foreign",
    "lost_count",
    "background_lost_count",
    "leaked_count",
    "duplicates",
    "exit_status",
]


def _progress(label: str, total: int) -> Any:
    tty = sys.stderr.isatty()
    last = [-1.0]

    def show(out: loadgen.Outcome) -> None:
        done = out.requests
        pct = 100.0 * done / total if total else 100.0
        if tty:
            bar = "#" * int(pct / 4)
            print(f"\r  {label:<10} [{bar:<25}] {done}/{total}", end="", file=sys.stderr)
            if done >= total:
                print(file=sys.stderr)
        elif pct >= last[0] + 25 or done >= total:
            last[0] = pct
            print(f"  {label}: {done}/{total} requests", file=sys.stderr)

    return show


def drop_table(url: str, table: str) -> None:
    from sqlalchemy import create_engine, text  # noqa: PLC0415 - after the runs only

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


def run(name: str, url: str, workdir: str, clients: int, rounds: int) -> dict[str, Any]:
    worker, mode = RUNS[name]
    table = f"demo_{name}_{uuid.uuid4().hex[:8]}"
    app_name = f"greenscope-demo-{name}-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "GREENSCOPE_DEMO_TABLE": table,
        "GREENSCOPE_DEMO_APP_NAME": app_name,
        "GREENSCOPE_DEMO_MODE": mode,
        "PYTHONPATH": str(DEPLOY),
    }
    loadgen.create_demo_schema(env)
    try:
        return _run(
            name,
            worker=worker,
            url=url,
            table=table,
            app_name=app_name,
            env=env,
            workdir=workdir,
            clients=clients,
            rounds=rounds,
        )
    finally:
        if not url.startswith("sqlite"):
            drop_table(url, table)


def _causes(log: str) -> list[str]:
    """The server's most frequent exceptions, other than the deliberate ones."""
    found = collections.Counter(
        f"{m.group(1)}: {m.group(2)[:90]}"
        for m in re.finditer(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.*)$", log, re.MULTILINE)
        if "deliberate failure" not in m.group(2)
    )
    return [f"{n} x {what}" for what, n in found.most_common(3)]


def _run(
    name: str,
    *,
    worker: str,
    url: str,
    table: str,
    app_name: str,
    env: dict[str, str],
    workdir: str,
    clients: int,
    rounds: int,
) -> dict[str, Any]:
    port = loadgen.free_port()
    argv = [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.conf.py")]
    argv += ["--chdir", str(DEPLOY), "-w", "1", "-k", worker, "-b", f"127.0.0.1:{port}"]
    # Keep idle keep-alive connections for a minute: the audit runs while they are open.
    argv += ["--graceful-timeout", "10", "--keep-alive", "60", "demo_app:app"]
    backend = url.split(":", maxsplit=1)[0]
    print(f"{name}: gunicorn -k {worker} on 127.0.0.1:{port}, {backend}", file=sys.stderr)
    server = loadgen.Server(argv, port, env, workdir)
    total = clients * rounds * 6
    started = time.monotonic()
    try:
        out, open_clients = loadgen.run_load(
            port,
            clients=clients,
            rounds=rounds,
            disconnects=max(2, clients // 3),
            prefix=f"{name}-",
            progress=_progress(name, total),
        )
        print(
            f"  {name}: auditing (waiting up to 5 s for the server to settle) ...",
            file=sys.stderr,
        )
        report = loadgen.audit(port, url, table, out, app_name=app_name)
        for client in open_clients:
            client.close()
    finally:
        code = server.stop()
    report["causes"] = _causes(server.log())
    report["exit_status"] = code
    report["seconds"] = round(time.monotonic() - started, 1)
    report.update(report.pop("greenscope"))
    report["lost_count"] = len(report["lost"])
    report["background_lost_count"] = len(report["background_lost"])
    report["leaked_count"] = len(report["leaked"])
    if report["mode"] == "stock":  # no greenscope registry in the server
        for key in ("created", "removed", "reaped"):
            report[key] = "-"
    return report


def print_report(reports: dict[str, dict[str, Any]]) -> None:
    names = list(reports)
    width = max(len(label) for label, _ in ROWS)
    header = f"{'':<{width}}  " + "  ".join(f"{n:>12}" for n in names)
    print()
    print(header)
    print("-" * len(header))
    for label, key in ROWS:
        cells = []
        for n in names:
            value = reports[n].get(key)
            cells.append(f"{'n/a' if value is None else value:>12}")
        print(f"{label:<{width}}  " + "  ".join(cells))
    print()
    for n in names:
        r = reports[n]
        if r["causes"]:
            print(f"{n}: most frequent errors in the server log:")
            for line in r["causes"]:
                print(f"    {line}")
        if r["unexpected"]:
            print(f"{n}: first unexpected answers:")
            for line in r["unexpected"][:3]:
                print(f"    {line[:160]}")
        if r["leaked"]:
            print(f"{n}: stored although their request failed or forgot to commit: ", end="")
            print(", ".join(r["leaked"][:5]) + (" ..." if len(r["leaked"]) > 5 else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The demo service under a real gunicorn, with and without greenscope.",
        epilog=(
            "DATABASE_URL selects the database (default: SQLite in a temporary directory); "
            "tables are created and dropped per run. Besides the keep-alive clients, at "
            "least two clients hang up mid-stream. Exit status: 0 if the greenscope run "
            "leaked, lost or shared nothing, 1 otherwise; the stock run's failures are "
            "expected and do not count."
        ),
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--without-greenscope", action="store_true", help="only the stock run")
    group.add_argument("--greenscope-only", action="store_true", help="only the greenscope run")
    parser.add_argument("--clients", type=int, default=12, help="keep-alive clients (12)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per client (5)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rounds < 1:
        parser.error("--clients and --rounds must be at least 1")
    names = ["greenscope", "stock"]
    if args.without_greenscope:
        names = ["stock"]
    elif args.greenscope_only:
        names = ["greenscope"]
    with tempfile.TemporaryDirectory(prefix="greenscope-demo-") as workdir:
        url = os.environ.get("DATABASE_URL") or f"sqlite:///{workdir}/demo.db"
        shown = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
        print(f"database: {shown}", file=sys.stderr)
        try:
            reports = {n: run(n, url, workdir, args.clients, args.rounds) for n in names}
        except KeyboardInterrupt:
            print("\ninterrupted: servers stopped, demo tables dropped", file=sys.stderr)
            return 130
    print_report(reports)
    if "greenscope" not in reports:
        return 0
    bad = [k for k in MUST_BE_ZERO if reports["greenscope"].get(k) not in (0, None)]
    if bad:
        print(f"greenscope run FAILED: non-zero {', '.join(bad)}")
        return 1
    print("greenscope run: no Session shared, no connection leaked, no write lost or leaked.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
