"""Run the close of an orphaned value where blocking is allowed, concurrently, with a deadline.

We learn that a greenlet died in contexts where I/O is forbidden:

* a gevent ``rawlink`` callback runs *in the hub*, and must neither block nor raise
  (``gevent/_abstract_linkable.py``);
* a weakref callback runs wherever the greenlet happened to be freed: very often in the
  hub (gevent frees an unreferenced ``Pool`` greenlet right after it finishes), during a
  cyclic GC pass in any greenlet, or in another thread (a thread's main greenlet is freed
  by whichever thread notices the thread is gone), or while a thread itself is torn down.

A ``Session.close()`` there fails with ``BlockingSwitchOutError``, invalidates the
connection and eventually exhausts the pool (gevent#1937, dify#24143). So those callbacks
only call :func:`submit`, which appends a job to a queue and never does I/O, logging or
locking. Workers in contexts that may block run the jobs::

    owner thread has a live gevent hub  --> _HubReaper of that hub: up to N job greenlets
                                            spawned in the hub's own thread (sockets
                                            belong to the hub of the thread using them)
    no hub, the hub was destroyed, or   --> _ThreadReaper: up to N daemon OS threads (real
    the owner thread is gone                ones even after monkey-patching)
                      every running job --> _Watchdog: one daemon OS thread that enforces
                                            each job's deadline and rescues the queues of
                                            destroyed hubs

Invariants:

* **No head-of-line blocking.** A job that hangs (a ROLLBACK waiting on a dead TCP peer,
  a huge rollback) holds one of the N slots only until its deadline
  (:attr:`CleanupSettings.close_timeout`). Then the watchdog *cuts* it: it shuts the
  job's sockets down from outside (``shutdown(2)`` works from any thread and wakes a
  blocked ``recv``, cooperative or not), the driver fails, and the close invalidates
  the connection, which frees its pool slot; the slot is given to the next job at once.
  In a hub the job greenlet is also thrown :class:`CloseDeadline`, for a close blocked on
  something other than a socket.
* **What cannot be interrupted:** a thread blocked inside a driver call that has no
  socket we can reach (SQLite's own file locks, a C driver holding the GIL-free call
  with no fd) stays blocked. Its slot is still released and a replacement thread takes
  over its queue, so no *other* close waits for it; the blocked thread finishes (and
  counts) when the call returns, or never. Replacements are capped (4 N threads).
* Every job is a zero-argument callable that handles, counts and logs its own errors; a
  job that raises anyway is logged here, so nothing dies silently in a reaper.

Thread/greenlet safety: ``submit`` is reentrant (deque appends, ``SimpleQueue.put`` and
loop callbacks only). The watchdog's table of running jobs takes no lock: a job is
listed by its worker, and taken out by the worker (done) or the watchdog (cut) with an
atomic ``dict.pop``, which only one of them wins. Its other state (cut jobs settling in
a hub) is guarded by a real lock that is only ever taken in ordinary code (job workers
and the watchdog thread), never in a callback.
"""

from __future__ import annotations

import _queue
import _socket
import _thread
import contextlib
import logging
import math
import os
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import greenlet

from greenscope import _hot
from greenscope._hot import Flag, Tally

__all__ = [
    "CleanupSettings",
    "CloseDeadline",
    "allocate_rlock",
    "configure_cleanup",
    "get_ident",
    "hub_if_exists",
    "in_hub",
    "pending",
    "prepare",
    "prepared",
    "settings",
    "shutdown_sockets",
    "submit",
    "wait_idle",
]

logger = logging.getLogger("greenscope")


class Job(Protocol):
    """A cleanup job: runs once, handles and logs its own errors."""

    def __call__(self) -> None: ...

    def cut(self) -> None:
        """Called once, from the watchdog thread, when the job passed its deadline."""


# What the runner of a job does when the watchdog cut it (the watchdog thread): True if
# the job still counts as pending until it has been interrupted where it runs.
OnCut = Callable[[Job], bool]
_monotonic = time.monotonic

try:  # gevent is optional: without it every job goes to the thread reaper.
    from gevent import sleep as _gevent_sleep
    from gevent._hub_local import get_hub_if_exists as _get_hub_if_exists
    from gevent.monkey import get_original as _get_original
except ImportError:  # pragma: no cover - exercised by a subprocess test
    _gevent_sleep = None
    _get_hub_if_exists = None
    _get_original = None

# The real (never monkey-patched) primitives. After ``patch_all()`` the module attributes
# are green: ``_thread.get_ident`` returns a per-greenlet id and ``start_new_thread``
# spawns a greenlet. ``get_original`` returns the saved originals, or the current ones if
# nothing was patched (yet): patching later does not change what we captured here.
if _get_original is not None:
    get_ident: Callable[[], int] = _get_original("_thread", "get_ident")
    _start_new_thread: Callable[..., int] = _get_original("_thread", "start_new_thread")
    _allocate_lock: Callable[[], _thread.LockType] = _get_original("_thread", "allocate_lock")
    allocate_rlock: Callable[[], Any] = _get_original("_thread", "RLock")
    _ThreadLocal: type = _get_original("_thread", "_local")
else:  # pragma: no cover - exercised by a subprocess test
    get_ident = _thread.get_ident
    _start_new_thread = _thread.start_new_thread
    _allocate_lock = _thread.allocate_lock
    allocate_rlock = _thread.RLock
    _ThreadLocal = _thread._local


# -- settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanupSettings:
    """How greenscope runs the closes it owns (orphans, :func:`greenscope.close_all`).

    ``close_timeout``: seconds a close may take before greenscope stops waiting for it
    and cuts its connections (default 10). A ROLLBACK is normally milliseconds; a close
    that takes longer waits on a dead peer or on a lock, and the database rolls back a
    cut connection's transaction by itself. ``max_concurrent_closes``: closes run at
    once per hub, and by the reaper threads (default 8). ``orphan_warnings_per_minute``:
    orphan WARNINGs logged in full per minute before greenscope switches to one summary
    line a minute (default 10; the counters stay exact either way).

    .. versionadded:: 0.2
    """

    close_timeout: float = 10.0
    max_concurrent_closes: int = 8
    orphan_warnings_per_minute: int = 10


_settings = CleanupSettings()


def settings() -> CleanupSettings:
    """The cleanup settings in force."""
    return _settings


def configure_cleanup(
    *,
    close_timeout: float | None = None,
    max_concurrent_closes: int | None = None,
    orphan_warnings_per_minute: int | None = None,
) -> CleanupSettings:
    """Change how greenscope runs the closes it owns; return the previous settings.

    Arguments left out keep their value. Takes effect for closes started afterwards.
    See :class:`CleanupSettings` for what each one means.

    .. versionadded:: 0.2
    """
    global _settings  # one process-wide setting, read when a job starts
    new = _settings
    if close_timeout is not None:
        if isinstance(close_timeout, bool) or not isinstance(close_timeout, (int, float)):
            raise TypeError(
                "greenscope.configure_cleanup(close_timeout=...) takes a number of seconds; "
                f"got {close_timeout!r}"
            )
        # NaN fails the comparison; an int too large for a float is as good as inf.
        seconds = float(close_timeout) if close_timeout <= sys.float_info.max else math.inf
        if not 0 < seconds < math.inf:
            raise ValueError(
                "greenscope.configure_cleanup(close_timeout=...) must be more than 0 "
                f"seconds, and finite; got {close_timeout!r}. A close with no deadline could "
                "hold its pool slot forever."
            )
        new = replace(new, close_timeout=seconds)
    if max_concurrent_closes is not None:
        if isinstance(max_concurrent_closes, bool) or not isinstance(max_concurrent_closes, int):
            raise TypeError(f"max_concurrent_closes must be an int; got {max_concurrent_closes!r}")
        if not 1 <= max_concurrent_closes <= sys.maxsize:
            raise ValueError(
                "greenscope.configure_cleanup(max_concurrent_closes=...) must be at least 1 "
                f"and at most sys.maxsize ({sys.maxsize}); got {max_concurrent_closes}"
            )
        new = replace(new, max_concurrent_closes=max_concurrent_closes)
    if orphan_warnings_per_minute is not None:
        n = orphan_warnings_per_minute
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(
                "greenscope.configure_cleanup(orphan_warnings_per_minute=...) takes an int "
                f">= 0; got {n!r}"
            )
        new = replace(new, orphan_warnings_per_minute=n)
    # The compiled copies first: if they refused a value, nothing has changed.
    _hot.bind_settings(new.close_timeout, new.max_concurrent_closes)
    previous, _settings = _settings, new
    return previous


# -- where we are ---------------------------------------------------------------------------


def hub_if_exists() -> Any | None:
    """Return the current thread's gevent hub without creating one, or None."""
    if _get_hub_if_exists is None:
        return None
    return _get_hub_if_exists()


def in_hub() -> bool:
    """True when the caller runs in the gevent hub, where blocking is impossible."""
    hub = hub_if_exists()
    return hub is not None and greenlet.getcurrent() is hub


def _loop_alive(hub: Any) -> bool:
    loop = getattr(hub, "loop", None)
    return loop is not None and not getattr(hub, "dead", False)


class CloseDeadline(BaseException):
    """Thrown into a close that passed :attr:`CleanupSettings.close_timeout` in a hub.

    A ``BaseException``, so that SQLAlchemy treats it as an exit exception and
    invalidates the connection instead of resetting it (``util.is_exit_exception``).
    Never leaves greenscope.
    """


# -- bookkeeping -----------------------------------------------------------------------------


# Jobs submitted and not yet finished, for wait_idle(). A job cut at its deadline in a
# reaper thread stops counting: nobody waits for it any more. One cut in a hub counts
# until the hub has interrupted it and it has counted its failure (a loop callback away).
_pending = Tally()
# Bumped in a forked child: jobs started before the fork are the parent's.
_generation = Tally()


def pending() -> int:
    """Jobs submitted and not finished (or cut) yet."""
    return _pending.count


class _Watchdog(_hot.WatchTable):
    """One daemon OS thread: cuts jobs past their deadline; rescues destroyed hubs' jobs.

    Started by :func:`prepare` in ordinary code. It wakes at the earliest deadline, or
    every ``_SWEEP_INTERVAL`` to move the queued jobs of destroyed hubs to the thread
    reaper (independently of how busy the thread reaper is) and to flush the orphan
    warnings summary.

    ``running`` maps each running job to its deadline and the ``on_cut`` of whoever runs
    it. Taking a job out of it is the claim on the job's bookkeeping (the pending count
    and the worker slot): the worker takes it when it finishes, the watchdog when the
    deadline passed, and of the two only one gets it (``dict.pop`` is atomic, with the
    GIL and on free-threaded builds alike), so neither path takes a lock: they are paid
    once per close. ``on_cut(job)`` runs in the watchdog thread after the job's sockets
    were shut down. A job object runs at most once at a time (each is made for one close).
    ``running`` and ``sleep_until`` are :class:`greenscope._hot.WatchTable`'s fields.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lock = _allocate_lock()
        self.wake = _allocate_lock()
        self.wake.acquire()
        self.running: dict[Job, tuple[float, OnCut]] = {}
        self.started = False
        self.periodic: list[Callable[[], None]] = []
        # When the watchdog wakes next; a start() with an earlier deadline wakes it.
        self.sleep_until = 0.0
        # Cut jobs of live hubs that still count as pending until the hub has thrown
        # into them (see _cut): job -> its hub. Guarded by ``lock``.
        self.settling: dict[Job, Any] = {}

    def ensure_started(self) -> None:
        if self.started:
            return
        with self.lock:
            if not self.started:
                _start_new_thread(self._run, ())
                self.started = True

    def start(self, job: Job, on_cut: OnCut) -> None:
        deadline = _monotonic() + _settings.close_timeout
        self.running[job] = (deadline, on_cut)
        # Read after the job is listed, and the watchdog writes its provisional wake-up
        # before it copies the table: either it sees this job, or this sees when it
        # wakes (see _run). A short close_timeout only: the usual one is past any sweep.
        if deadline < self.sleep_until:
            self.poke()

    def poke(self) -> None:
        """Wake the watchdog now. Safe from any context (a real lock's release)."""
        with contextlib.suppress(RuntimeError):  # already woken
            self.wake.release()

    def finish(self, job: Job) -> bool:
        """The worker finished ``job``; True if in time (it still owns the bookkeeping)."""
        return self.running.pop(job, None) is not None

    def settled(self, entry: Job) -> None:
        """A cut hub job has been interrupted and counted: it stops counting as pending.

        Called from the hub's loop callback, or from the sweep when the hub was destroyed
        before the callback ran; whichever comes first. The lock is held for a few
        dict operations and never across a switch, so the hub cannot wait on itself.
        """
        with self.lock:
            if self.settling.pop(entry, None) is None:
                return
        _pending.count -= 1

    def _settle_destroyed(self) -> None:
        with self.lock:
            gone = [e for e, hub in self.settling.items() if not _loop_alive(hub)]
        for entry in gone:
            self.settled(entry)

    def _run(self) -> None:
        next_sweep = time.monotonic() + _SWEEP_INTERVAL
        while True:
            try:
                next_sweep = self._turn(next_sweep)
            except BaseException:  # pragma: no cover - defensive
                # Never end: every later hung close depends on this thread to be cut. A
                # daemon thread gets no signals, so nothing here is the user's to see.
                _log_exception("greenscope: the cleanup watchdog's turn failed")
                self.wake.acquire(timeout=_SWEEP_INTERVAL)

    def _turn(self, next_sweep: float) -> float:
        """Cut what is due, run the periodic tasks if a sweep is due, then sleep until
        the earliest deadline; return when the next sweep is due."""
        now = _monotonic()
        # Provisional, before the copy: a job listed after the copy reads this or
        # the final value below, and wakes us if its deadline is earlier (start()).
        self.sleep_until = earliest = next_sweep
        due: list[tuple[Job, OnCut]] = []
        # dict.copy() runs no Python code (jobs hash by identity): a consistent view.
        for job, (deadline, on_cut) in self.running.copy().items():
            if deadline > now:
                earliest = min(earliest, deadline)
            elif self.running.pop(job, None) is not None:  # else it just finished
                due.append((job, on_cut))
        self.sleep_until = earliest
        for job, on_cut in due:
            self._cut(job, on_cut)
        _thread_reaper.staff()
        if now >= next_sweep:
            next_sweep = now + _SWEEP_INTERVAL
            self._settle_destroyed()
            for task in list(self.periodic):
                try:
                    task()
                except BaseException:
                    _log_exception("greenscope: a periodic cleanup task failed")
        self.wake.acquire(timeout=max(0.0, earliest - time.monotonic()))
        return next_sweep

    @staticmethod
    def _cut(job: Job, on_cut: OnCut) -> None:
        settles_later = False
        try:
            job.cut()  # logs an ERROR: a log handler that raises lands here
        except BaseException:
            _log_exception("greenscope: cutting a hung close failed")
        finally:
            try:
                # True: the job will be interrupted where it runs (a hub), and the
                # pending count drops once it has counted its failure, so that
                # wait_idle() returning True means the counters are settled. False: it
                # may never return (a thread blocked in a driver call): nobody waits
                # for it any more.
                settles_later = on_cut(job)
            except BaseException:  # pragma: no cover - defensive
                _log_exception("greenscope: releasing a hung close's slot failed")
            finally:
                if not settles_later:
                    _pending.count -= 1


def _log_exception(msg: str) -> None:
    """``logger.exception(msg)``, which never raises.

    For the cleanup threads and job greenlets: a log handler or filter that raises (a
    log shipper down; a ``gevent.Timeout`` around its send, a BaseException) must not
    end the watchdog, which every later hung close needs, nor a reaper thread, nor skip
    a job's bookkeeping, nor reach the hub or the application. Anything: the callers are
    the last line of defence (``run_job``, the watchdog), and a ``CloseDeadline`` thrown
    into a job while it logs is a cut the watchdog has already counted. The line is lost
    then, as the handler lost it.
    """
    with contextlib.suppress(BaseException):
        logger.exception(msg)


_SWEEP_INTERVAL = 1.0
_watchdog = _Watchdog()


# Runs each job under the watchdog (compiled: once per close; see greenscope._hot).
_run_job = _hot.run_job


# -- hubs -----------------------------------------------------------------------------------


class _HubReaper(_hot.HubQueue):
    """Runs jobs in up to N greenlets of one hub's thread. One per hub, stored on the hub.

    ``submit`` may run in the hub, in a GC callback or in any greenlet of the hub's
    thread: it only appends and schedules a loop callback. Job greenlets are started
    from that callback (in the hub), each drains the queue until it is empty. ``running``
    counts greenlets holding a slot; a greenlet whose job was cut gives its slot up at
    the cut and ends when its job returns. The fields are
    :class:`greenscope._hot.HubQueue`'s.
    """

    __slots__ = ("__weakref__",)

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        jobs: deque[Job] = deque()
        self.jobs, self.put, self.take = jobs, jobs.append, jobs.popleft
        self.running = 0
        self.fill_scheduled = False  # read and written in the hub's thread only
        _hub_reapers.add(self)

    # Append, and schedule _fill unless it is already (compiled: once per orphan).
    submit = _hot.hub_submit

    def submit_threadsafe(self, job: Job) -> None:
        self.jobs.append(job)
        self.hub.loop.run_callback_threadsafe(self._fill)

    def _fill(self) -> None:  # runs in the hub: start a greenlet, up to the limit
        # One at a time. A greenlet drains the queue until it is empty, so while closes
        # do not block one is enough (a batch of orphans started up to N greenlets, all
        # but one for nothing). This looks again a loop callback later, after the new
        # greenlet ran: if its close blocked, jobs still wait, and one more starts.
        self.fill_scheduled = False
        if self.jobs and self.running < _settings.max_concurrent_closes:
            self.running += 1
            worker = greenlet.greenlet(self._drain, self.hub)
            loop = self.hub.loop
            loop.run_callback(worker.switch)
            self.fill_scheduled = True
            loop.run_callback(self._fill)

    def _drain(self) -> None:  # its own greenlet: may block
        me = greenlet.getcurrent()
        holds_slot = True

        def on_cut(entry: Job) -> bool:  # the watchdog thread
            if not _loop_alive(self.hub):
                return False  # nothing will run _after_cut: stop counting it now
            with _watchdog.lock:
                _watchdog.settling[entry] = self.hub
            try:
                self.hub.loop.run_callback_threadsafe(self._after_cut, me, entry)
            except Exception:
                # The hub was destroyed between the check and the call (a thread-pool
                # worker exiting): nothing will run _after_cut. Whoever takes the entry
                # out of `settling` first counts it, exactly once: us, or the sweep.
                with _watchdog.lock:
                    ours = _watchdog.settling.pop(entry, None) is not None
                return not ours
            return True

        try:
            if not _hot.drain(self, on_cut):
                holds_slot = False  # the slot went to another greenlet at the cut
        finally:
            if holds_slot:
                self.running -= 1
            if self.jobs and _loop_alive(self.hub):  # killed mid-drain, or a late submit
                self.hub.loop.run_callback(self._fill)

    def _after_cut(self, worker: greenlet.greenlet, entry: Job) -> None:  # in the hub
        self.running -= 1
        try:
            if not worker.dead:
                # Blocked on something the socket shutdown did not wake (or not yet): stop
                # it. Thrown from a loop callback, as gevent's own kill() does; throw()
                # returns once the close has failed, been counted and its greenlet ended
                # (or blocked again, in which case it counts whenever it ends).
                worker.throw(CloseDeadline())
        finally:
            _watchdog.settled(entry)
            self._fill()


# Every hub reaper, so the watchdog can rescue the jobs of a destroyed hub.
_hub_reapers: weakref.WeakSet[_HubReaper] = weakref.WeakSet()


def _hub_reaper(hub: Any) -> _HubReaper:
    reaper: _HubReaper | None = hub.__dict__.get("_greenscope_reaper")
    if reaper is None:
        reaper = hub.__dict__["_greenscope_reaper"] = _HubReaper(hub)
    return reaper


def _rescue_orphaned_hub_jobs() -> None:
    """Take over the jobs of hubs that were destroyed before they could run them.

    A thread that ends (or a ``ThreadPool`` that is killed) may destroy its hub with
    jobs still queued. Closing in a reaper thread, off the owner's thread, is the only
    option left: it works for drivers whose connections may change threads once their
    owner is gone (psycopg, pg8000, PyMySQL); a failure is logged and counted.
    """
    for reaper in list(_hub_reapers):
        if reaper.jobs and not _loop_alive(reaper.hub):
            while reaper.jobs:
                _thread_reaper.submit(reaper.jobs.popleft())


# -- threads --------------------------------------------------------------------------------


class _ThreadReaper:
    """Daemon OS threads that run jobs whose owner has no usable hub.

    ``_queue.SimpleQueue.put`` is reentrant: documented as safe from ``__del__`` and
    weakref callbacks. The first thread is started by :func:`prepare`, from ordinary
    code, never from a callback (starting a thread takes locks); a worker that finds more
    work queued and no idle peer starts another, up to ``max_concurrent_closes``, and a
    worker cut at its deadline is replaced at once (by the watchdog). Workers beyond the
    first exit after an idle while. Threads stuck in closes that cannot be interrupted
    are capped at four times the limit: past that, the queue waits for one to return.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.queue: _queue.SimpleQueue[Job] = _queue.SimpleQueue()
        self.lock = _allocate_lock()
        self.workers = 0  # threads holding a slot
        self.stuck = 0  # cut at their deadline, still inside their job
        self.idle = 0

    @property
    def started(self) -> bool:
        return self.workers > 0

    def ensure_started(self) -> None:
        if self.workers == 0:
            self._grow()

    def _grow(self) -> None:
        """Start one more worker if below the limit. Ordinary code only (takes locks).

        Never raises: a reaper thread calls it holding a job it has dequeued."""
        with self.lock:
            limit = _settings.max_concurrent_closes
            if self.workers >= limit:
                return
            capped = self.stuck >= 4 * limit
            if not capped:
                self.workers += 1
        if capped:
            with contextlib.suppress(BaseException):  # as _log_exception
                logger.error(
                    "greenscope: %d cleanup threads are stuck in closes that cannot be "
                    "interrupted; no more are started until one of them returns",
                    self.stuck,
                )
            return
        try:
            _start_new_thread(self._run, ())
        except BaseException:  # can't start new thread (a pids limit): the slot is free
            with self.lock:
                self.workers -= 1
            # The watchdog's staff() tries again on its next turn, while jobs wait.
            _log_exception("greenscope: starting a cleanup thread failed")

    def submit(self, job: Job) -> None:
        self.queue.put(job)
        if self.idle == 0:  # every worker is busy (or stuck): the watchdog starts one
            _watchdog.poke()

    def staff(self) -> None:
        """From the watchdog: start a worker if jobs wait and none is idle (below the
        limit and the stuck cap). Ordinary code."""
        if (
            not self.queue.empty()
            and self.idle == 0
            and self.workers < _settings.max_concurrent_closes
        ):
            self._grow()

    def _on_cut(self, entry: Job) -> bool:  # the watchdog thread
        with self.lock:
            self.workers -= 1
            self.stuck += 1
        prepared.done = False  # if no replacement starts, the next prepare() tries again
        self._grow()  # a replacement takes over the queue at once
        return False  # a thread cannot be interrupted: nobody waits for it any more

    def _run(self) -> None:
        while True:
            with self.lock:
                self.idle += 1
            try:
                job = self.queue.get(timeout=_IDLE_EXIT)
            except _queue.Empty:
                with self.lock:
                    self.idle -= 1
                    if self.workers > 1:  # keep one worker; the rest go when idle
                        self.workers -= 1
                        return
                continue
            with self.lock:
                self.idle -= 1
                more = self.idle == 0 and not self.queue.empty()
            if more:
                self._grow()
            if not _run_job(job, self._on_cut):
                with self.lock:
                    self.stuck -= 1
                _watchdog.poke()  # below the stuck cap again: jobs may be waiting
                return  # replaced at the cut: this thread is surplus now


_IDLE_EXIT = 5.0
_thread_reaper = _ThreadReaper()


# ``done``: both cleanup threads run; callers skip prepare() (a Python call). A Flag:
# greenscope._hot's compiled first store reads it as a C field.
prepared = Flag()


def prepare() -> None:
    """Called when a greenlet first registers a value: make sure every cleanup path exists.

    The thread reaper is the fallback of every owner (a hub can be destroyed before its
    greenlets are freed), and the watchdog guards every job, so both are started here,
    in ordinary code, keeping thread creation out of callbacks. Callers on a hot path
    check ``prepared.done`` first; it is reset when a fork loses the threads.
    """
    if not _watchdog.started:
        _watchdog.ensure_started()
    if not _thread_reaper.started:
        _thread_reaper.ensure_started()
    prepared.done = _watchdog.started and _thread_reaper.started


def add_periodic(task: Callable[[], None]) -> None:
    """Run ``task`` about once a second in the watchdog thread (must not block)."""
    _watchdog.periodic.append(task)


add_periodic(_rescue_orphaned_hub_jobs)


# -- cutting a hung close --------------------------------------------------------------------

_SOCKET_ATTRS = ("_usock", "_sock", "sock", "socket")  # pg8000, PyMySQL, others


def _fileno(dbapi_connection: Any) -> int | None:
    """The socket fd of a DBAPI connection, for the drivers we know; None if there is none."""
    pgconn = getattr(dbapi_connection, "pgconn", None)  # psycopg 3
    if pgconn is not None:
        try:
            fd = pgconn.socket
        except Exception:  # closed, or not connected
            return None
        return fd if isinstance(fd, int) else None
    for attr in _SOCKET_ATTRS:
        sock = getattr(dbapi_connection, attr, None)
        fileno = getattr(sock, "fileno", None)
        if callable(fileno):
            try:
                fd = fileno()
            except Exception:
                continue
            return fd if isinstance(fd, int) and fd >= 0 else None
    fileno = getattr(dbapi_connection, "fileno", None)  # psycopg2, mysqlclient
    if callable(fileno):
        try:
            fd = fileno()
        except Exception:
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None
    return None


class _Claim:
    """A DBAPI connection a running cleanup job holds, and whether it was cut."""

    __slots__ = ("connection", "cut")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.cut = False


# id(DBAPI connection) -> its claim, while a cleanup job holds it. Guarded by _claim_lock,
# which is what makes "still the job's, so shut it down" atomic with the check-in: the
# pool's reset event (see checking_in) runs before a connection re-enters the pool.
_claims: dict[int, _Claim] = {}
_claim_lock = _allocate_lock()


def claim(dbapi_connections: list[Any]) -> list[_Claim]:
    """Mark connections a job is about to release (ordinary code, the job's own context)."""
    if not dbapi_connections:
        return []  # a Session that never connected: no lock to take
    claims = [_Claim(c) for c in dbapi_connections]
    with _claim_lock:
        for c in claims:
            _claims[id(c.connection)] = c
    return claims


def release(claims: Sequence[_Claim]) -> None:
    """The job is over: forget its claims (those checked in are gone already)."""
    if not claims:
        return
    with _claim_lock:
        for c in claims:
            if _claims.get(id(c.connection)) is c:
                del _claims[id(c.connection)]


def cut_claimed(claims: Sequence[_Claim]) -> int:
    """Shut down the sockets of ``claims`` still held by their job; return how many.

    Under the claim lock: a connection already checked in (its claim dropped by
    :func:`checking_in`) is never touched, so a cut can never reach a connection the
    pool has handed to another request. Any thread; never blocks for long.
    """
    with _claim_lock:
        live = [c for c in claims if _claims.get(id(c.connection)) is c and not c.cut]
        for c in live:
            c.cut = True
        return shutdown_sockets([c.connection for c in live])


def checking_in(dbapi_connection: Any, record: Any) -> None:
    """From the pool's ``reset`` event, before a connection re-enters its pool.

    Drops the connection's claim; if a cut shut its socket down meanwhile, the record
    goes back empty (the next checkout connects anew), as an invalidation leaves it.
    Cost on every check-in: one truth test of a dict that is almost always empty.
    """
    if not _claims:
        return
    c = _claims.get(id(dbapi_connection))
    if c is None or c.connection is not dbapi_connection:
        return
    with _claim_lock:
        del _claims[id(dbapi_connection)]
        cut = c.cut
    if cut and record is not None:
        record.dbapi_connection = None
        with contextlib.suppress(Exception):  # its socket is dead: closing may complain
            dbapi_connection.close()


def shutdown_sockets(dbapi_connections: list[Any]) -> int:
    """Shut down the sockets of ``dbapi_connections`` from outside; return how many.

    ``shutdown(SHUT_RDWR)`` acts on the socket, not the descriptor: any thread blocked in
    ``recv``/``send`` on it wakes with EOF or EPIPE, and a gevent waiter's fd becomes
    readable. The descriptor itself stays open (its owner closes it), so no fd number is
    ever freed under a watcher. Any thread, any context; never blocks.
    """
    done = 0
    for conn in dbapi_connections:
        fd = _fileno(conn)
        if fd is None:
            continue
        try:
            sock = _socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # not a socket (a file), or closed meanwhile
        try:
            sock.shutdown(_socket.SHUT_RDWR)
            done += 1
        except OSError:
            pass  # not connected any more
        finally:
            sock.close()
    return done


# -- threads that end -----------------------------------------------------------------------


class _ThreadEnd:
    """Stored in a real thread-local: freed when its OS thread ends, however the thread's
    greenlets are kept (a gevent hub and its loop form a cycle that keeps the thread's
    main greenlet alive, so its weakref callback may never run). Its ``__del__`` runs in
    the ending thread, during its teardown: it only calls back, which submits."""

    __slots__ = ("callbacks",)

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def __del__(self) -> None:
        for callback in self.callbacks:
            with contextlib.suppress(Exception):  # never fail a thread's exit
                callback()


_thread_ends = _ThreadLocal()


def at_thread_end(callback: Callable[[], None]) -> None:
    """Call ``callback`` when the current OS thread ends.

    ``callback`` runs in the ending thread during its teardown (like a weakref
    callback): it must not block, log or raise. For the process's main thread that is
    interpreter shutdown, if ever: harmless (no special case: which thread is "main" is
    not something we can learn reliably after monkey-patching).
    """
    end: _ThreadEnd | None = getattr(_thread_ends, "end", None)
    if end is None:
        end = _thread_ends.end = _ThreadEnd()
    end.callbacks.append(callback)


# -- fork -----------------------------------------------------------------------------------


def pin_forever(objs: list[Any]) -> None:
    """Never free ``objs`` nor run their finalizers, for the rest of the process.

    For what a forked child inherits: freed, a Session would let SQLAlchemy's pool roll
    back a checked-out connection it finds garbage, on a socket (or SQLite file) the
    parent still uses. A reference nothing drops: not even interpreter shutdown.
    """
    if not objs:
        return
    _PINNED.append(objs)
    try:
        import ctypes  # noqa: PLC0415 - only in a child that inherited values

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(objs))
    except Exception:  # no ctypes (some embedded builds): kept until shutdown only
        logger.debug("greenscope: could not pin inherited values", exc_info=True)


_PINNED: list[list[Any]] = []


def _after_fork_in_child() -> None:
    # Nothing queued before fork is the child's to close: those values hold connections
    # whose sockets the child shares with its parent (gunicorn forks workers from a master
    # that may have loaded the app with --preload). The reaper threads are gone anyway.
    # Dropped, the jobs would free their values: they are pinned (see pin_forever).
    inherited: list[Any] = []
    for reaper in list(_hub_reapers):
        inherited.extend(reaper.jobs)
        reaper.jobs.clear()
        reaper.running = 0
    while True:
        try:
            inherited.append(_thread_reaper.queue.get_nowait())
        except _queue.Empty:
            break
    pin_forever(inherited)
    _generation.count += 1
    _pending.count = 0
    _claims.clear()
    _thread_reaper.reset()
    prepared.done = False  # the threads did not come along
    periodic = _watchdog.periodic
    _watchdog.reset()
    _watchdog.periodic = periodic
    global _claim_lock  # noqa: PLW0603 - the parent's may have been held at fork
    _claim_lock = _allocate_lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
_hot.bind_cleanup(
    pending=_pending,
    generation=_generation,
    watchdog=_watchdog,
    monotonic=_monotonic,
    logger=logger,
    log_exception=_log_exception,
)
_hot.bind_settings(_settings.close_timeout, _settings.max_concurrent_closes)


# -- entry points --------------------------------------------------------------------------


def submit(job: Job, owner_thread: int | None, owner_hub: Any | None) -> None:
    """Run ``job`` soon, where blocking is allowed, on the owner's thread if possible.

    ``owner_thread`` None means the owner's thread is gone (or ending): the job goes to
    the reaper threads. Safe from the hub, GC and weakref callbacks, a thread's teardown
    and other threads: it never blocks, logs, or raises for a reason of its own.
    """
    _pending.count += 1
    if owner_thread is not None:
        if get_ident() == owner_thread:
            # The hub may have been created after the value was registered.
            hub = hub_if_exists()
            if hub is not None and _loop_alive(hub):
                _hub_reaper(hub).submit(job)
                return
        elif owner_hub is not None and _loop_alive(owner_hub):
            _hub_reaper(owner_hub).submit_threadsafe(job)
            return
    _thread_reaper.submit(job)


def _not_settled(job: Job) -> bool:
    return False


def run_here(job: Job) -> None:
    """Run ``job`` now, in the calling context, under the watchdog's deadline (a cut
    shuts its sockets down, which makes a blocked close fail). Re-raises what it raises."""
    _pending.count += 1
    generation = _generation.count
    _watchdog.start(job, _not_settled)  # the caller sees it fail
    try:
        job()
    finally:
        if generation == _generation.count and _watchdog.finish(job):
            _pending.count -= 1


def wait_for(done: Callable[[], bool]) -> None:
    """Wait (yielding to this thread's hub) until ``done()``. A greenlet, never the hub."""
    sleep = _gevent_sleep if hub_if_exists() is not None and _gevent_sleep else time.sleep
    while not done():
        sleep(0.001)


def wait_idle(timeout: float | None = None, busy: Callable[[], bool] = lambda: False) -> bool:
    """Wait until every submitted job has finished and ``busy()`` is false; False on timeout.

    A job cut at its deadline counts as finished. Cooperative in a thread with a gevent
    hub (it yields to the hub, which runs the reapers and the completion callbacks), a
    plain wait elsewhere. Polls every millisecond: meant for tests and shutdown, not for
    hot paths.
    """
    if in_hub():
        raise RuntimeError(
            "greenscope.wait_reaped() cannot wait inside the gevent hub; "
            "call it from a greenlet, e.g. gevent.spawn(greenscope.wait_reaped).join()"
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    # With a hub (which implies gevent), yield to it: it runs the reaper and completions.
    sleep = _gevent_sleep if hub_if_exists() is not None and _gevent_sleep else time.sleep
    while True:
        sleep(0)  # with gevent: let the hub run callbacks already queued (completions)
        if _pending.count <= 0 and not busy():
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        sleep(0.001)
