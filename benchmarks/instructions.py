"""Instruction counts under callgrind: exact, repeatable figures for the micro rows.

Timings on a shared 2-core machine wander by 10-20 %; instruction counts do not. Each
group of candidates (``lookup``: hits, ``Session()``, proxied calls, their parts, then
the hit with greenscope.metrics running; ``lifecycle``: greenlets that spawn, use a
Session and end) runs in its own process under ``valgrind --tool=callgrind`` with
``PYTHONHASHSEED=0``, and callgrind counts only inside *regions*::

    valgrind --tool=callgrind --collect-atstart=no \\
        --toggle-collect=sys_call_tracing --dump-after=sys_call_tracing \\
        python benchmarks/instructions.py worker GROUP N PAIRS

Every region is one ``sys.call_tracing(loop, (n,))`` call (a C function nothing else
calls: collection is on while it runs, in its thread only, and each call ends in its own
dump file), so interpreter startup, imports, setup and other threads (greenscope's
watchdog, the metrics publisher) never count. Each candidate is measured as pairs of
regions of ``n`` and ``2n`` iterations: the difference of a pair is exactly ``n``
iterations, so what a region costs once (the call into it, the loop's setup) cancels
too. An empty loop measured the same way is subtracted from the per-iteration figure of
the loops (``net``): what is left is the operation itself. The lifecycle candidates run
batches of greenlets instead (``net`` is per greenlet, every orphan closed, the cyclic
GC included).

Each loop candidate runs in a fresh raw greenlet of its own (its dict holds only its own
registry's slot), with its own loop code object (the specializing interpreter keeps
per-code caches), warmed before the first region, the cyclic GC off meanwhile.
Greenlet switches (the lifecycle) are safe because the gevent hub is first entered
inside a region: every greenlet's stack is then deeper than the region's frame, so
callgrind never sees the region return early (the number of dumps is checked against
the number of regions).

:func:`measure` runs every group ``runs`` times (separate processes, ``jobs`` at once)
and reports, per candidate, the median over all pairs and runs and the spread within a
process and across processes. :func:`profile` lists the C functions that make up one
iteration (the difference of a pair, read from the dumps); :func:`python_profile` the
Python functions, from one more run with perf trampolines (``--trampolines``: CPython
3.12+ then runs every Python function through a stub listed in ``/tmp/perf-PID.map``,
so callgrind sees calls to it), never used for the counts since the stubs cost a few
instructions per call.

    python benchmarks/instructions.py   # every group, twice: a JSON report on stdout
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import gevent
import gevent.local
import greenlet
from greenlet import getcurrent
from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm import sessionmaker
from sqlalchemy.util import ScopedRegistry, ThreadLocalRegistry

import greenscope
import greenscope.metrics
from greenscope import _registry

HERE = Path(__file__).resolve().parent

# The C function behind sys.call_tracing (a static function in every CPython 3.10+,
# reached through its method table, so never inlined into a caller).
TOGGLE = "sys_call_tracing"
GROUPS = ("lookup", "lifecycle")
# Iterations per region (n; its pair runs 2n). Lifecycle regions run n // LIFE_DIV
# batches of LIFE_BATCH greenlets each (n = 10,000: 200 greenlets, and 400).
DEFAULT_N = 10_000
LIFE_BATCH = 50
LIFE_DIV = 2_500
# The lifecycle floor of automatic cleanup (HandOffFloor), for the docs' reasoning.
FLOOR = "lifecycle: floor: sqlalchemy, its close handed out of the hub"


# -- the worker: runs inside valgrind ----------------------------------------------------


@dataclass
class Candidate:
    """One measured thing: a loop ``body`` over the names ``setup()`` returns."""

    name: str
    setup: Callable[[], dict[str, Any]]
    body: str


def _loop(body: str, names: dict[str, Any], tag: str) -> Callable[[int], None]:
    """A fresh code object per candidate: ``for _ in repeat(None, n): <body>``, with the
    candidate's objects bound as locals (default arguments), as timeit's loop has them."""
    params = "".join(f", {k}={k}" for k in names)
    src = f"def loop(n{params}):\n    for _ in repeat(None, n):\n        {body}\n"
    ns: dict[str, Any] = {"repeat": repeat, **names}
    exec(compile(src, f"<callgrind {tag}>", "exec"), ns)
    loop: Callable[[int], None] = ns["loop"]
    return loop


def _lookup_candidates() -> list[Candidate]:
    factory = sessionmaker()

    def tl() -> dict[str, Any]:
        f = ThreadLocalRegistry(factory)
        f()
        return {"f": f}

    def tl_patched() -> dict[str, Any]:
        f = ThreadLocalRegistry(factory)
        f.registry = gevent.local.local()  # what threading.local is once patched
        f()
        return {"f": f}

    def by_getcurrent() -> dict[str, Any]:
        f = ScopedRegistry(factory, getcurrent)
        f()
        return {"f": f}

    def ours() -> dict[str, Any]:
        f = greenscope.GreenletRegistry(factory)
        f()
        return {"f": f, "gc": getcurrent, "k": f._key, "d": getcurrent().__dict__}

    def watch() -> dict[str, Any]:
        # A gevent.Greenlet that never runs: its watch is made and its link taken back,
        # so that links do not pile up on it from one iteration to the next.
        g = gevent.Greenlet(lambda: None)
        return {"g": g, "new_watch": _registry._new_watch, "done": _registry._on_completion}

    def stock_scoped() -> dict[str, Any]:
        s = sa_scoped_session(factory)
        return {"f": s, "s": s, "sess": s()}

    def ours_scoped() -> dict[str, Any]:
        s = greenscope.scoped_session(factory)
        return {"f": s, "s": s, "sess": s()}

    return [
        Candidate("empty loop", dict, "pass"),
        Candidate("hit: ThreadLocalRegistry", tl, "f()"),
        Candidate("hit: ThreadLocalRegistry (patched: gevent.local)", tl_patched, "f()"),
        Candidate("hit: ScopedRegistry(getcurrent)", by_getcurrent, "f()"),
        Candidate("hit: greenscope.GreenletRegistry", ours, "f()"),
        Candidate("Session(): sqlalchemy scoped_session", stock_scoped, "f()"),
        Candidate("Session(): greenscope.scoped_session", ours_scoped, "f()"),
        Candidate("proxied is_active: sqlalchemy scoped_session", stock_scoped, "s.is_active"),
        Candidate("proxied is_active: greenscope.scoped_session", ours_scoped, "s.is_active"),
        Candidate(
            "proxied expire_all(): sqlalchemy scoped_session",
            stock_scoped,
            "s.expire_all()",
        ),
        Candidate(
            "proxied expire_all(): greenscope.scoped_session",
            ours_scoped,
            "s.expire_all()",
        ),
        # The anatomy of the hit and of a proxied call: what each step costs.
        Candidate("part: getcurrent()", ours, "gc()"),
        Candidate("part: getcurrent().__dict__", ours, "gc().__dict__"),
        Candidate("part: d[key] (the greenlet's dict, held)", ours, "d[k]"),
        Candidate("part: getcurrent().__dict__[key] (inline)", ours, "gc().__dict__[k]"),
        Candidate("part: registry._key", ours, "f._key"),
        Candidate(
            "part: ThreadLocalRegistry .registry.value (inline)",
            tl,
            "f.registry.value",
        ),
        Candidate("part: greenscope scoped_session._proxied", ours_scoped, "s._proxied"),
        Candidate("part: sqlalchemy scoped_session._proxied", stock_scoped, "s._proxied"),
        Candidate("part: Session.is_active (no proxy)", ours_scoped, "sess.is_active"),
        # What a greenlet's automatic cleanup costs it once (the lifecycle rows' gap).
        Candidate(
            "part: a gevent.Greenlet's watch, then unlink", watch, "new_watch(g); g.unlink(done)"
        ),
        Candidate("part: gevent rawlink, then unlink", watch, "g.rawlink(done); g.unlink(done)"),
    ]


def _run_loop_candidate(cand: Candidate, tag: str, n: int, pairs: int, labels: list[str]) -> None:
    def body() -> None:
        names = cand.setup()
        loop = _loop(cand.body, names, tag)
        loop(min(n, 2_000))  # specialize the loop's bytecode before any region
        _regions(loop, cand.name, n, pairs, labels)

    greenlet.greenlet(body).switch()  # a fresh greenlet per candidate: its own dict


def _regions(
    loop: Callable[[int], None], name: str, n: int, pairs: int, labels: list[str]
) -> None:
    """``pairs`` pairs of regions of ``n`` and ``2n`` iterations. The cyclic GC is off
    meanwhile: a loop keeps nothing beyond an iteration, so a collection that happens to
    fall in one region of a pair is noise, not a cost of the operation."""
    gc.collect()
    gc.disable()
    try:
        for _ in range(pairs):
            for size in (n, 2 * n):
                sys.call_tracing(loop, (size,))
                labels.append(f"{name}|{size}")
    finally:
        gc.enable()


def _work_lookup(n: int, pairs: int) -> list[str]:
    labels: list[str] = []
    for i, cand in enumerate(_lookup_candidates()):
        _run_loop_candidate(cand, f"lookup {i}", n, pairs, labels)
    _metrics_last(n, pairs, labels)  # last: nothing measured after it sees the metrics
    return labels


class _NullSink:
    """A metrics sink that publishes nowhere: the publisher runs, nothing is sent."""

    def publish(self, collected: Any) -> None:
        pass


def _metrics_last(n: int, pairs: int, labels: list[str]) -> None:
    """The hit in one greenlet, before and after greenscope.metrics starts: an engine
    instrumented, a publisher running (a no-op sink, an hour's interval)."""
    engine = create_engine("sqlite://")
    registry = greenscope.GreenletRegistry(sessionmaker(engine))

    def body() -> None:
        registry()
        names = {"f": registry}
        off = _loop("f()", names, "metrics off")
        on = _loop("f()", names, "metrics on")
        off(min(n, 2_000))
        _regions(off, "hit: greenscope.GreenletRegistry, metrics off", n, pairs, labels)
        greenscope.metrics.instrument(engine)
        greenscope.metrics.start(_NullSink(), interval=3600)
        with engine.connect() as conn:  # the pool's instrumentation runs once, for real
            conn.exec_driver_sql("SELECT 1")
        greenscope.metrics.publish_now()  # and a collection: every part has run once
        on(min(n, 2_000))
        _regions(on, "hit: greenscope.GreenletRegistry, metrics on", n, pairs, labels)

    greenlet.greenlet(body).switch()
    greenscope.metrics.stop(final=False)
    engine.dispose()


def lifecycle_bodies(factory: sessionmaker[Any]) -> dict[str, Callable[[], None]]:
    """The lifecycle candidates (what each greenlet runs), by name: for the timed
    benchmark (bench.py) and the instruction counts alike."""
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

    return {
        "greenscope, automatic cleanup": auto,
        "greenscope + remove()": ours_remove,
        "sqlalchemy + try/finally remove()": stock_remove,
    }


class HandOffFloor:
    """A floor, not a design: what any cleanup that keeps an orphan's close out of the
    gevent hub costs at the least, on top of SQLAlchemy's own registry.

    Each greenlet uses a Session of a stock ``scoped_session`` keyed on the greenlet and
    links its completion (``rawlink``); at completion, in the hub, the link hands the
    Session's ``close`` to one long-lived greenlet through a gevent queue (the hub
    cannot block: gevent#1937). Nothing else: no deadline for a hung close, no
    counters, nothing for a greenlet freed before it finished, one closer for all.
    """

    def __init__(self, factory: sessionmaker[Any]) -> None:
        import gevent.queue  # noqa: PLC0415 - only here

        self.scoped = sa_scoped_session(factory, scopefunc=getcurrent)
        self.sessions: dict[Any, Any] = self.scoped.registry.registry
        self.queue: gevent.queue.JoinableQueue[Callable[[], None]] = gevent.queue.JoinableQueue()
        self.closer: gevent.Greenlet | None = None
        self.finished = self._finished  # one bound method for every greenlet's link

    def __call__(self) -> None:
        if self.closer is None:  # inside the first region, as the hub is
            self.closer = gevent.spawn(self._close_loop)
        self.scoped.is_active  # noqa: B018 - the use of the Session is the point
        current: Any = getcurrent()  # a gevent.Greenlet (spawned)
        current.rawlink(self.finished)

    def _finished(self, g: Any) -> None:  # in the hub: no I/O
        session = self.sessions.pop(g, None)
        if session is not None:
            self.queue.put_nowait(session.close)

    def _close_loop(self) -> None:
        while True:
            close = self.queue.get()
            close()
            self.queue.task_done()

    def drain(self) -> None:
        """Wait until every handed-out close has run."""
        self.queue.join()


def _work_lifecycle(n: int, pairs: int) -> list[str]:
    engine = create_engine("sqlite://")

    def region(func: Callable[[], None], batches: int) -> None:
        # What the timed benchmark does, in batches: spawn, use, end, every orphan closed.
        drain = getattr(func, "drain", None)
        for _ in repeat(None, batches):
            greenlets = [gevent.spawn(func) for _ in repeat(None, LIFE_BATCH)]
            gevent.joinall(greenlets)
            del greenlets
            if not greenscope.wait_reaped(60):
                raise RuntimeError("orphans were not closed within 60 s")
            if drain is not None:
                drain()
        gc.collect()  # each region pays for its own cyclic garbage, and only for it

    cands: dict[str, Callable[[], None]] = {
        f"lifecycle: {k}": f for k, f in lifecycle_bodies(sessionmaker(engine)).items()
    }
    cands[FLOOR] = HandOffFloor(sessionmaker(engine))
    batches = max(1, n // LIFE_DIV)
    labels: list[str] = []
    # The first region enters the hub: all greenlet stacks are then below a region's frame.
    for func in cands.values():
        sys.call_tracing(region, (func, batches))
        labels.append("warm-up|0")
    gc.collect()
    gc.freeze()  # startup's objects: no full collection inside a region walks them
    for name, func in cands.items():
        # One more region, unmeasured, right before the candidate's pairs: the first
        # region after another candidate's pays once for what the latter freed (about
        # 570,000 instructions for a candidate whose closes are deferred, which keeps
        # more Sessions alive at once), and would flatter the first pair's difference.
        sys.call_tracing(region, (func, batches))
        labels.append("warm-up|0")
        for _ in range(pairs):
            for size in (batches, 2 * batches):
                sys.call_tracing(region, (func, size))
                labels.append(f"{name}|{size * LIFE_BATCH}")
    engine.dispose()
    return labels


def worker_main(argv: list[str]) -> int:
    group, n, pairs = argv[0], int(argv[1]), int(argv[2])
    if "--trampolines" in argv[3:]:
        # Every Python function then runs through a stub of its own, listed in
        # /tmp/perf-PID.map: callgrind sees calls to it, so Python functions get
        # inclusive counts. The stubs cost instructions: never for the judged counts.
        sys.activate_stack_trampoline("perf")  # type: ignore[attr-defined,unused-ignore]
    logging.getLogger("greenscope").setLevel(logging.ERROR)  # orphans are the point
    work = {"lookup": _work_lookup, "lifecycle": _work_lifecycle}
    labels = work[group](n, pairs)
    print(json.dumps({"labels": labels, "pid": os.getpid()}))
    return 0


# -- the driver: runs valgrind and reads its dumps -----------------------------------------


def available() -> str | None:
    """Why callgrind cannot run here, or None if it can."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed"
    return None


def valgrind_version() -> str:
    out = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


_TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.MULTILINE)


def _totals(path: Path) -> int:
    found = _TOTALS.search(path.read_text())
    if found is None:
        raise RuntimeError(f"no totals in {path}")
    return int(found.group(1))


@dataclass
class GroupRun:
    """One process's regions: labels in order, their instruction counts, their files."""

    group: str
    labels: list[str]
    totals: list[int]
    files: list[Path]
    seconds: float
    # With trampolines: address of each Python function's stub -> "qualname (file)"
    python_functions: dict[int, str] | None = None


def command(out: Path, python: str = sys.executable) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--collect-atstart=no",
        f"--toggle-collect={TOGGLE}",
        f"--dump-after={TOGGLE}",
        f"--log-file={out}.log",
        python,
        str(Path(__file__).resolve()),
        "worker",
    ]


def trampolines_available(python: str = sys.executable) -> bool:
    """Whether ``python`` has perf trampolines (CPython 3.12+ on Linux, built with them)."""
    probe = (
        "import os, sys; sys.activate_stack_trampoline('perf'); "
        "sys.deactivate_stack_trampoline(); m = f'/tmp/perf-{os.getpid()}.map'; "
        "os.path.exists(m) and os.remove(m)"
    )
    return subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0


def _perf_map(pid: int) -> dict[int, str]:
    path = Path(f"/tmp/perf-{pid}.map")
    found: dict[int, str] = {}
    if not path.exists():
        return found
    try:
        for line in path.read_text().splitlines():
            addr, _size, label = line.split(" ", 2)
            if label.startswith("py::"):
                qual, _, file = label[4:].partition(":")
                found[int(addr, 16)] = f"{qual} ({file})"
    finally:
        path.unlink()
    return found


def run_group(
    group: str,
    n: int,
    pairs: int,
    workdir: Path,
    python: str = sys.executable,
    *,
    trampolines: bool = False,
) -> GroupRun:

    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "callgrind.out"
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    extra = ["--trampolines"] if trampolines else []
    proc = subprocess.run(
        [*command(out, python), group, str(n), str(pairs), *extra],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=1800,
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        log = Path(f"{out}.log")
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(
            f"callgrind {group} failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{tail}"
        )
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    labels: list[str] = answer["labels"]
    functions = _perf_map(int(answer["pid"])) if trampolines else None
    files = sorted(
        (p for p in workdir.glob("callgrind.out.*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
    )
    if len(files) != len(labels):
        raise RuntimeError(
            f"callgrind {group}: {len(files)} dumps for {len(labels)} regions: a region "
            "ended early (a stack switch above its frame?); the counts cannot be trusted"
        )
    return GroupRun(group, labels, [_totals(f) for f in files], files, seconds, functions)


def per_iteration(run: GroupRun) -> dict[str, list[float]]:
    """Instructions per iteration of each candidate, one value per (n, 2n) pair."""
    by: dict[str, list[tuple[int, int]]] = {}
    for label, total in zip(run.labels, run.totals, strict=True):
        name, size = label.rsplit("|", 1)
        if name == "warm-up":
            continue
        by.setdefault(name, []).append((int(size), total))
    out: dict[str, list[float]] = {}
    for name, regions in by.items():
        values = []
        for (n1, t1), (n2, t2) in zip(regions[0::2], regions[1::2], strict=True):
            assert n2 == 2 * n1, (name, n1, n2)
            values.append((t2 - t1) / (n2 - n1))
        out[name] = values
    return out


def _pair_files(run: GroupRun, name: str) -> tuple[Path, Path, int] | None:
    """The first (n, 2n) pair of dump files of ``name`` in ``run``, and n."""
    found = [
        (f, int(label.rsplit("|", 1)[1]))
        for label, f in zip(run.labels, run.files, strict=True)
        if label.rsplit("|", 1)[0] == name
    ]
    if len(found) < 2:
        return None
    (f1, n1), (f2, n2) = found[0], found[1]
    return f1, f2, n2 - n1


@dataclass
class Dump:
    """One dump, read: exclusive Ir per C function, and the calls made to each callee
    (``[count, inclusive Ir]``, summed over call sites)."""

    own: dict[str, int]
    calls: dict[str, list[int]]


def read_dump(path: Path) -> Dump:
    """Parse one callgrind dump.

    The format (``positions: line``, ``events: Ir``): ``fn=`` starts a function's cost
    lines (``position cost``); ``cfn=`` names a callee and ``calls=count position``
    announces that the next cost line is that call's inclusive cost, which is not the
    caller's own. Names are compressed: ``(id) name`` the first time, ``(id)`` after.
    """
    names: dict[str, str] = {}
    objects: dict[str, str] = {}
    own: dict[str, int] = {}
    calls: dict[str, list[int]] = {}
    fn = obj = callee = ""
    pending: int | None = None  # the call count of a calls= line, until its cost line

    def name(value: str, table: dict[str, str]) -> str:
        ref, _, text = value.partition(") ")
        if value.startswith("(") and text:
            table[ref + ")"] = text
            return text
        return table.get(value, value)

    for line in path.read_text().splitlines():
        if not line or line[0] == "#":
            continue
        head = line[0]
        if head.isdigit() or head in "+-*":
            parts = line.split()
            if len(parts) < 2:
                continue
            if pending is not None:
                entry = calls.setdefault(callee, [0, 0])
                entry[0] += pending
                entry[1] += int(parts[1])
                pending = None
            elif fn:
                own[fn] = own.get(fn, 0) + int(parts[1])
            continue
        key, _, value = line.partition("=")
        if key == "ob":
            obj = name(value, objects)
        elif key == "fn":
            label = name(value, names).split("'", 1)[0]  # f'2: f's recursion, level 2
            lib = obj.rsplit("/", 1)[-1]
            fn = label if lib.startswith(("libpython", "python")) else f"{label} [{lib}]"
        elif key == "cob":
            name(value, objects)
        elif key == "cfn":
            callee = name(value, names).split("'", 1)[0]
        elif key == "calls":
            pending = int(value.split()[0])
    return Dump(own, calls)


def _functions(path: Path) -> dict[str, int]:
    return read_dump(path).own


def profile(run: GroupRun, name: str, top: int = 8) -> list[tuple[str, float]]:
    """The C functions that make up one iteration of ``name``: the difference of its first
    (n, 2n) pair, per iteration, largest first."""
    pair = _pair_files(run, name)
    if pair is None:
        return []
    f1, f2, n = pair
    a, b = _functions(f1), _functions(f2)
    diff = {k: (b.get(k, 0) - a.get(k, 0)) / n for k in set(a) | set(b)}
    ranked = sorted(diff.items(), key=lambda kv: -kv[1])
    return [(k, v) for k, v in ranked[:top] if v >= 0.5]


def python_profile(run: GroupRun, name: str, top: int = 40) -> list[dict[str, Any]]:
    """The Python functions of one iteration of ``name`` (a run with trampolines): calls
    and inclusive Ir per iteration, from the difference of its first (n, 2n) pair.
    Functions that switch greenlets midway (joins, waits, the hub's loop) get
    meaningless inclusive counts: callgrind cannot follow a stack switch."""
    pair = _pair_files(run, name)
    if pair is None or not run.python_functions:
        return []
    f1, f2, n = pair
    a, b = read_dump(f1).calls, read_dump(f2).calls
    by: dict[str, list[float]] = {}
    for callee in set(a) | set(b):
        if not callee.startswith("0x"):
            continue
        label = run.python_functions.get(int(callee, 16))
        if label is None:
            continue
        ca, cb = a.get(callee, [0, 0]), b.get(callee, [0, 0])
        entry = by.setdefault(label, [0.0, 0.0])
        entry[0] += (cb[0] - ca[0]) / n
        entry[1] += (cb[1] - ca[1]) / n
    ranked = sorted(by.items(), key=lambda kv: -kv[1][1])
    return [
        {"function": k, "calls": round(c, 3), "ir": round(ir, 1)}
        for k, (c, ir) in ranked[:top]
        if c > 0
    ]


def _spread(values: list[float]) -> float:
    """Half the range, relative to the median (0 when every value is the same)."""
    med = statistics.median(values)
    return (max(values) - min(values)) / 2 / med if med else 0.0


def measure(
    *,
    n: int = DEFAULT_N,
    pairs: int = 2,
    runs: int = 2,
    jobs: int = 2,
    groups: tuple[str, ...] = GROUPS,
    profiled: tuple[str, ...] = (),
    python_profiled: tuple[str, ...] = (),
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run every group ``runs`` times under callgrind (``jobs`` processes at once); with
    ``python_profiled``, one more run of their groups with perf trampolines, for a
    profile of Python functions (never for the counts)."""
    with tempfile.TemporaryDirectory(prefix="greenscope-callgrind-") as tmp:
        tasks = [(g, r) for r in range(runs) for g in groups]
        extra: list[str] = []
        if python_profiled and trampolines_available():
            extra = sorted(
                {"lifecycle" if p.startswith("lifecycle") else "lookup" for p in python_profiled}
            )

        def one(task: tuple[str, int]) -> GroupRun:
            g, r = task
            if r < 0:  # the profile run
                run = run_group(g, n, 1, Path(tmp) / f"{g}-py", trampolines=True)
                log(f"  callgrind {g}, Python-function profile: {run.seconds:.0f} s")
                return run
            run = run_group(g, n, pairs, Path(tmp) / f"{g}-{r}")
            regions = len(run.labels)
            log(f"  callgrind {g}, run {r + 1}/{runs}: {regions} regions, {run.seconds:.0f} s")
            return run

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            done_all = list(pool.map(one, tasks + [(g, -1) for g in extra]))
        done, py_runs = done_all[: len(tasks)], done_all[len(tasks) :]
        # per candidate: per run: per pair values
        samples: dict[str, list[list[float]]] = {}
        empty: dict[tuple[str, int], float] = {}
        group_of: dict[str, str] = {}
        for (g, r), run in zip(tasks, done, strict=True):
            for cand, values in per_iteration(run).items():
                if cand == "empty loop":
                    empty[g, r] = statistics.median(values)
                name = f"empty loop ({g})" if cand == "empty loop" else cand
                samples.setdefault(name, [[] for _ in range(runs)])[r] = values
                group_of[name] = g
        rows: dict[str, dict[str, Any]] = {}
        for name, per_run in samples.items():
            g = group_of[name]
            flat = [v for vs in per_run for v in vs]
            loop = name.startswith("empty loop") or g == "lifecycle"
            nets = [v - (0.0 if loop else empty[g, r]) for r, vs in enumerate(per_run) for v in vs]
            rows[name] = {
                "group": g,
                "unit": "greenlet" if g == "lifecycle" else "iteration",
                "ir": statistics.median(flat),
                "net": statistics.median(nets),
                "samples": per_run,
                # pairs within one process, and the medians of separate processes
                "spread_in_process": max(_spread(vs) for vs in per_run),
                "spread_across_runs": _spread([statistics.median(vs) for vs in per_run]),
            }
        profiles = {}
        first = {run.group: run for (g, r), run in zip(tasks, done, strict=True) if r == 0}
        for name in profiled:
            if name in group_of:
                profiles[name] = profile(first[group_of[name]], name)
        py_by_group = {run.group: run for run in py_runs}
        python_profiles = {
            name: python_profile(py_by_group[group_of[name]], name)
            for name in python_profiled
            if name in group_of and group_of[name] in py_by_group
        }
        return {
            "tool": valgrind_version(),
            "command": [*command(Path("OUT")), "GROUP", str(n), str(pairs)],
            "env": {"PYTHONHASHSEED": "0"},
            "n": n,
            "pairs": pairs,
            "runs": runs,
            "lifecycle_batch": LIFE_BATCH,
            "seconds": {
                f"{g}-{r}": round(run.seconds, 1) for (g, r), run in zip(tasks, done, strict=True)
            },
            "rows": rows,
            "profiles": profiles,
            "python_profiles": python_profiles,
        }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    result = measure(log=lambda s: print(s, file=sys.stderr))
    print(json.dumps(result, indent=2))
