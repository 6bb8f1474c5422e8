"""``make bench``: greenscope against what users run today, measured side by side.

    python benchmarks/bench.py [--quick] [--no-e2e] [--json FILE] [--svg FILE]

Sections (each figure is a median over interleaved repeats, all in one process and run,
so the ratios compare like with like on a noisy machine):

1. lookup: a registry hit, and a proxied attribute (``Session.is_active``), inside a
   greenlet, against SQLAlchemy's ``ThreadLocalRegistry`` (unpatched ``threading.local``;
   and patched, i.e. backed by ``gevent.local`` as in any monkey-patched app) and
   ``ScopedRegistry(scopefunc=greenlet.getcurrent)``;
2. lifecycle: greenlets per second that spawn, use a Session (no I/O) and end, with
   greenscope's automatic cleanup, with greenscope plus ``remove()``, and with a stock
   ``scoped_session`` plus a hand-written ``try/finally: remove()``;
3. scale: 10,000 greenlets holding a Session at once: hit time against one live entry,
   memory per entry beyond the Session itself, time from the last greenlet's end until
   every orphan is closed;
4. end to end: the demo service under gunicorn (one worker) on SQLite and PostgreSQL (if
   ``DATABASE_URL`` or ``GREENSCOPE_TEST_PG_URL`` names one), greenscope's worker against
   stock ``-k gevent`` with a hand-written ``post_request`` remove, at several
   concurrencies: requests/s and p99 latency.

It prints tables, checks the targets of the performance issue, and writes the same
results as JSON and the end-to-end run as an SVG chart.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import gevent.local
import greenlet
import sqlalchemy
from gevent.event import Event
from greenlet import getcurrent
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.util import ScopedRegistry, ThreadLocalRegistry

import greenscope

HERE = Path(__file__).resolve().parent
DEPLOY = HERE.parent / "deploy"
sys.path.insert(0, str(DEPLOY))
import loadgen  # noqa: E402 - lives in deploy/

logging.getLogger("greenscope").setLevel(logging.ERROR)  # orphans are the point here


def in_greenlet(func: Callable[[], Any]) -> Any:
    """Run ``func`` in a fresh raw greenlet (lookups are per greenlet) and return its value."""
    return greenlet.greenlet(func).switch()


def interleaved(cands: dict[str, Callable[[], Any]], rounds: int, number: int) -> dict[str, float]:
    """Median ns per call of each candidate, timed in interleaved rounds."""
    samples: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for name, func in cands.items():
            samples[name].append(timeit.timeit(func, number=number) / number * 1e9)
    return {k: statistics.median(v) for k, v in samples.items()}


# -- 1. lookup ----------------------------------------------------------------------------


def bench_lookup(rounds: int, number: int) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        factory = sessionmaker()
        tl = ThreadLocalRegistry(factory)
        tl_patched = ThreadLocalRegistry(factory)
        tl_patched.registry = gevent.local.local()  # what threading.local is once patched
        by_getcurrent = ScopedRegistry(factory, getcurrent)
        ours = greenscope.GreenletRegistry(factory)
        stock = sa_scoped_session(factory)
        stock_patched = sa_scoped_session(factory)
        stock_patched.registry.registry = gevent.local.local()
        scoped = greenscope.scoped_session(factory)
        for warm in (tl, tl_patched, by_getcurrent, ours, stock, stock_patched, scoped):
            warm()
        hits = interleaved(
            {
                "ThreadLocalRegistry": tl,
                "ThreadLocalRegistry (patched: gevent.local)": tl_patched,
                "ScopedRegistry(getcurrent)": by_getcurrent,
                "greenscope.GreenletRegistry": ours,
            },
            rounds,
            number,
        )
        proxied = interleaved(
            {
                "sqlalchemy scoped_session": lambda: stock.is_active,
                "sqlalchemy scoped_session (patched)": lambda: stock_patched.is_active,
                "greenscope.scoped_session": lambda: scoped.is_active,
            },
            rounds,
            number,
        )
        for s in (stock, stock_patched, scoped):
            s.remove()
        ours.clear()
        by_getcurrent.clear()
        return {"hit_ns": hits, "proxied_ns": proxied}

    result: dict[str, Any] = in_greenlet(run)
    return result


# -- 2. lifecycle -------------------------------------------------------------------------


def bench_lifecycle(rounds: int, n: int) -> dict[str, float]:
    engine = create_engine("sqlite://")
    factory = sessionmaker(engine)
    ours = greenscope.scoped_session(factory)
    stock = sa_scoped_session(factory, scopefunc=getcurrent)

    def auto() -> None:
        ours.is_active  # noqa: B018 - the use of the Session is the point

    def ours_remove() -> None:
        try:
            ours.is_active  # noqa: B018
        finally:
            ours.remove()

    def stock_remove() -> None:
        try:
            stock.is_active  # noqa: B018
        finally:
            stock.remove()

    def rate(func: Callable[[], None]) -> float:
        start = time.perf_counter()
        greenlets = [gevent.spawn(func) for _ in range(n)]
        gevent.joinall(greenlets)
        del greenlets
        assert greenscope.wait_reaped(60)
        return n / (time.perf_counter() - start)

    samples: dict[str, list[float]] = {
        "greenscope, automatic cleanup": [],
        "greenscope + remove()": [],
        "sqlalchemy + try/finally remove()": [],
    }
    funcs = dict(zip(samples, (auto, ours_remove, stock_remove), strict=True))
    for _ in range(rounds):
        for name, func in funcs.items():
            gc.collect()
            samples[name].append(rate(func))
    engine.dispose()
    return {k: statistics.median(v) for k, v in samples.items()}


# -- 3. scale -----------------------------------------------------------------------------


def bench_scale(n: int, rounds: int, number: int) -> dict[str, float]:
    factory = sessionmaker()
    registry = greenscope.GreenletRegistry(factory)
    release = Event()

    def hold() -> None:
        registry()
        release.wait()

    def measure() -> float:
        registry()
        return interleaved({"hit": registry}, rounds, number)["hit"]

    one = gevent.spawn(measure).get()
    assert greenscope.wait_reaped(60)
    holders = [gevent.spawn(hold) for _ in range(n)]
    gevent.sleep(0)
    assert registry.stats().live == n
    many = gevent.spawn(measure).get()
    release.set()
    gevent.joinall(holders)
    ended = time.perf_counter()
    del holders
    assert greenscope.wait_reaped(120)
    drained = time.perf_counter() - ended
    assert registry.stats().live == 0

    def memory(use_registry: bool) -> float:
        release = Event()
        kept: list[Session] = []

        def hold() -> None:
            if use_registry:
                registry()
            else:
                kept.append(factory())
            release.wait()

        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        holders = [gevent.spawn(hold) for _ in range(n)]
        gevent.sleep(0)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        release.set()
        gevent.joinall(holders)
        del holders
        kept.clear()
        assert greenscope.wait_reaped(120)
        return (after - before) / n

    per_entry = memory(True) - memory(False)
    return {
        "hit_ns_1_live": one,
        "hit_ns_10k_live": many,
        "ratio": many / one,
        "bytes_per_entry": per_entry,
        "seconds_to_close_all": drained,
    }


# -- 4. end to end ------------------------------------------------------------------------


def _server(variant: str, url: str, table: str, port: int, workdir: str) -> loadgen.Server:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "GREENSCOPE_DEMO_TABLE": table,
        "GREENSCOPE_DEMO_MODE": "greenscope" if variant == "greenscope" else "stock",
        "PYTHONPATH": str(DEPLOY),
        # Both servers run at once: 2 x 40 connections stay under PostgreSQL's default
        # max_connections (100); beyond 40 clients requests queue for a connection.
        "GREENSCOPE_DEMO_POOL_SIZE": "20",
        "GREENSCOPE_DEMO_MAX_OVERFLOW": "20",
    }
    argv = [sys.executable, "-m", "gunicorn", "--chdir", str(DEPLOY), "-w", "1"]
    argv += ["-b", f"127.0.0.1:{port}", "--worker-connections", "1000"]
    if variant == "greenscope":
        argv += ["-k", "greenscope.gunicorn.GeventWorker"]
    else:
        argv += ["-c", str(HERE / "stock_remove.conf.py")]
    return loadgen.Server([*argv, "demo_app:app"], port, env, workdir)


def bench_e2e(
    urls: dict[str, str], concurrencies: list[int], seconds: float, repeats: int, workdir: str
) -> list[dict[str, Any]]:
    rows = []
    for db, url in urls.items():
        table = f"bench_{uuid.uuid4().hex[:8]}"
        loadgen.create_demo_schema(
            {**os.environ, "DATABASE_URL": url, "GREENSCOPE_DEMO_TABLE": table}
        )
        servers = {}
        try:
            for variant in ("greenscope", "stock"):
                servers[variant] = _server(variant, url, table, loadgen.free_port(), workdir)
            for c in concurrencies:
                samples: dict[str, list[dict[str, Any]]] = {v: [] for v in servers}
                for _ in range(repeats):  # A B A B ...: drift hits both alike
                    for variant, server in servers.items():
                        _load(server.port, c, min(1.0, seconds))  # warm-up
                        samples[variant].append(_load(server.port, c, seconds))
                for variant, runs in samples.items():
                    rps = [r["rps"] for r in runs]
                    result = {
                        "rps": statistics.median(rps),
                        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                        "errors": sum(r["errors"] for r in runs),
                        # half the range of the repeats, relative to their median
                        "spread": (max(rps) - min(rps)) / 2 / statistics.median(rps),
                    }
                    rows.append({"db": db, "concurrency": c, "variant": variant, **result})
                    print(
                        f"  {db:<10} c={c:<4} {variant:<10} {result['rps']:8.0f} req/s "
                        f"p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}",
                        file=sys.stderr,
                    )
        finally:
            for server in servers.values():
                server.stop()
            if not url.startswith("sqlite"):
                engine = create_engine(url)
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
                engine.dispose()
    return rows


def _load(port: int, concurrency: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "http_load.py"),
            str(port),
            "/sql",
            str(concurrency),
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- report -------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "gevent": gevent.__version__,
        "greenlet": greenlet.__version__,
        "greenscope": greenscope.__version__,
    }


def table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append(
            "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        )
    return "\n".join(lines) + "\n"


def check(name: str, value: float, op: str, target: float) -> dict[str, Any]:
    met = value <= target if op == "<=" else value >= target
    return {"target": name, "value": round(value, 3), "op": op, "goal": target, "met": met}


def svg_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: requests/s per (database, concurrency), greenscope vs stock."""
    groups = sorted({(r["db"], r["concurrency"]) for r in rows}, key=lambda g: (g[0], g[1]))
    by = {(r["db"], r["concurrency"], r["variant"]): r for r in rows}
    top = max(r["rps"] for r in rows) * 1.15
    width, height, left, bottom = 120 + 110 * len(groups), 330, 60, 260
    colors = {"greenscope": "#2b8a3e", "stock": "#868e96"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14" font-weight="bold">Demo service under '
        f"gunicorn (1 worker): requests/s, higher is better</text>",
        f'<line x1="{left}" y1="{bottom}" x2="{width - 20}" y2="{bottom}" stroke="black"/>',
    ]
    for i in range(5):
        value = top * i / 4
        y = bottom - (bottom - 40) * i / 4
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{value:.0f}</text>')
        parts.append(f'<line x1="{left}" y1="{y}" x2="{width - 20}" y2="{y}" stroke="#eee"/>')
    for gi, (db, c) in enumerate(groups):
        x0 = left + 20 + gi * 110
        for vi, variant in enumerate(("greenscope", "stock")):
            r = by.get((db, c, variant))
            if r is None:
                continue
            h = (bottom - 40) * r["rps"] / top
            x = x0 + vi * 40
            parts.append(
                f'<rect x="{x}" y="{bottom - h:.1f}" width="36" height="{h:.1f}" '
                f'fill="{colors[variant]}"/>'
            )
            parts.append(
                f'<text x="{x + 18}" y="{bottom - h - 4:.1f}" text-anchor="middle" '
                f'font-size="10">{r["rps"]:.0f}</text>'
            )
        parts.append(f'<text x="{x0 + 38}" y="{bottom + 16}" text-anchor="middle">{db}</text>')
        parts.append(f'<text x="{x0 + 38}" y="{bottom + 30}" text-anchor="middle">c={c}</text>')
    for vi, (variant, color) in enumerate(colors.items()):
        label = "greenscope worker" if variant == "greenscope" else "stock + post_request"
        y = bottom + 52 + vi * 16
        parts.append(f'<rect x="{left}" y="{y - 10}" width="12" height="12" fill="{color}"/>')
        parts.append(f'<text x="{left + 18}" y="{y}">{label}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the gunicorn section")
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    parser.add_argument("--svg", type=Path, default=HERE / "e2e.svg")
    args = parser.parse_args(argv)
    rounds, number = (5, 20_000) if args.quick else (15, 100_000)
    results: dict[str, Any] = {"machine": machine()}
    print(f"greenscope benchmarks: {json.dumps(results['machine'])}", file=sys.stderr)

    print("1/4 lookup ...", file=sys.stderr)
    lookup = results["lookup"] = bench_lookup(rounds, number)
    print("2/4 lifecycle ...", file=sys.stderr)
    life = results["lifecycle"] = bench_lifecycle(3 if args.quick else 7, 2_000)
    print("3/4 scale ...", file=sys.stderr)
    scale = results["scale"] = bench_scale(10_000, 5 if args.quick else 9, number // 4)
    rows: list[dict[str, Any]] = []
    if not args.no_e2e:
        print("4/4 end to end ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="greenscope-bench-") as workdir:
            urls = {"sqlite": f"sqlite:///{workdir}/bench.db"}
            pg = os.environ.get("DATABASE_URL") or os.environ.get("GREENSCOPE_TEST_PG_URL")
            if pg:
                urls["postgresql"] = pg
            conc = [10, 50] if args.quick else [10, 50, 100]
            seconds, repeats = (2.0, 1) if args.quick else (3.0, 3)
            rows = results["e2e"] = bench_e2e(urls, conc, seconds, repeats, workdir)

    hit, prox = lookup["hit_ns"], lookup["proxied_ns"]
    base = hit["ThreadLocalRegistry"]
    pbase = prox["sqlalchemy scoped_session"]
    out = [f"Machine: {'; '.join(f'{k} {v}' for k, v in results['machine'].items())}", ""]
    out.append(
        table(
            "1. Lookup inside a greenlet (median ns per call)",
            [(k, f"{v:.1f}", f"{v / base:.2f}x") for k, v in hit.items()]
            + [(k, f"{v:.1f}", f"{v / pbase:.2f}x") for k, v in prox.items()],
            ("what", "ns", "vs SQLAlchemy unpatched"),
        )
    )
    lbase = life["sqlalchemy + try/finally remove()"]
    out.append(
        table(
            "2. Lifecycle: spawn, use a Session (no I/O), end (median greenlets/s)",
            [(k, f"{v:.0f}", f"{v / lbase:.2f}x") for k, v in life.items()],
            ("what", "greenlets/s", "vs SQLAlchemy + remove()"),
        )
    )
    out.append(
        table(
            "3. Scale: 10,000 greenlets holding a Session",
            [
                ("hit with 1 live entry", f"{scale['hit_ns_1_live']:.1f} ns"),
                ("hit with 10,000 live entries", f"{scale['hit_ns_10k_live']:.1f} ns"),
                ("ratio", f"{scale['ratio']:.2f}x"),
                ("memory per entry beyond the Session", f"{scale['bytes_per_entry']:.0f} B"),
                ("last greenlet's end to all closed", f"{scale['seconds_to_close_all']:.3f} s"),
            ],
            ("what", "value"),
        )
    )
    checks = [
        check(
            "hit vs ThreadLocalRegistry (unpatched)",
            hit["greenscope.GreenletRegistry"] / base,
            "<=",
            0.8,
        ),
        check(
            "hit vs ThreadLocalRegistry (patched)",
            hit["greenscope.GreenletRegistry"]
            / hit["ThreadLocalRegistry (patched: gevent.local)"],
            "<=",
            0.8,
        ),
        check(
            "proxied call vs stock (unpatched)",
            prox["greenscope.scoped_session"] / pbase,
            "<=",
            0.95,
        ),
        check(
            "proxied call vs stock (patched)",
            prox["greenscope.scoped_session"] / prox["sqlalchemy scoped_session (patched)"],
            "<=",
            0.95,
        ),
        check(
            "lifecycle, automatic cleanup",
            life["greenscope, automatic cleanup"] / lbase,
            ">=",
            0.9,
        ),
        check("lifecycle, with remove()", life["greenscope + remove()"] / lbase, ">=", 0.9),
        check("scale: hit with 10k live / 1 live", scale["ratio"], "<=", 1.2),
    ]
    if rows:
        by = {(r["db"], r["concurrency"], r["variant"]): r for r in rows}
        out.append(
            table(
                "4. End to end: demo service, gunicorn, 1 worker, GET /sql",
                [
                    (
                        db,
                        str(c),
                        f"{by[db, c, 'greenscope']['rps']:.0f}",
                        f"{by[db, c, 'stock']['rps']:.0f}",
                        f"{by[db, c, 'greenscope']['rps'] / by[db, c, 'stock']['rps']:.2f}x",
                        f"{by[db, c, 'greenscope']['p99_ms']:.1f}",
                        f"{by[db, c, 'stock']['p99_ms']:.1f}",
                        f"{by[db, c, 'greenscope']['p99_ms'] / by[db, c, 'stock']['p99_ms']:.2f}x",
                        f"±{100 * by[db, c, 'greenscope']['spread']:.0f}% / "
                        f"±{100 * by[db, c, 'stock']['spread']:.0f}%",
                    )
                    for db, c, v in sorted(by)
                    if v == "greenscope"
                ],
                (
                    "db",
                    "clients",
                    "req/s greenscope",
                    "req/s stock",
                    "ratio",
                    "p99 ms greenscope",
                    "p99 ms stock",
                    "ratio",
                    "req/s spread of repeats",
                ),
            )
        )
        for db, c, v in sorted(by):
            if v != "greenscope":
                continue
            g, s = by[db, c, "greenscope"], by[db, c, "stock"]
            checks.append(check(f"e2e {db} c={c}: throughput", g["rps"] / s["rps"], ">=", 0.97))
            checks.append(check(f"e2e {db} c={c}: p99", g["p99_ms"] / s["p99_ms"], "<=", 1.05))
        svg_chart(rows, args.svg)
    results["targets"] = checks
    out.append(
        table(
            "Targets",
            [
                (
                    c["target"],
                    f"{c['value']:.2f}",
                    f"{c['op']} {c['goal']}",
                    "met" if c["met"] else "MISSED",
                )
                for c in checks
            ],
            ("target", "measured", "goal", ""),
        )
    )
    print("\n".join(out))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.json}" + (f", chart: {args.svg}" if rows else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
