"""Hand the close of an orphaned value to a context where blocking is allowed.

We learn that a greenlet died in contexts where I/O is forbidden:

* a gevent ``rawlink`` callback runs *in the hub*, and must neither block nor raise
  (``gevent/_abstract_linkable.py``);
* a weakref callback runs wherever the greenlet happened to be freed: very often in the
  hub (gevent frees an unreferenced ``Pool`` greenlet right after it finishes), during a
  cyclic GC pass in any greenlet, or in another thread (a thread's main greenlet is freed
  by whichever thread notices the thread is gone).

A ``Session.close()`` there fails with ``BlockingSwitchOutError``, invalidates the
connection and eventually exhausts the pool (gevent#1937, dify#24143). So those callbacks
only call :func:`submit`, which appends a job to a queue and never does I/O, logging or
locking. A worker in a context that may block drains the queue:

    owner thread has a live gevent hub  --> _HubReaper of that hub: a greenlet spawned
                                            in the hub's own thread (sockets belong to
                                            the hub of the thread that uses them)
    no hub, or the owner thread is gone --> _ThreadReaper: one daemon OS thread (a real
                                            one even after monkey-patching)

Every job is a zero-argument callable that handles and logs its own errors; a job that
raises anyway is logged here, so nothing dies silently in a reaper.
"""

from __future__ import annotations

import _queue
import _thread
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import greenlet

__all__ = [
    "get_ident",
    "hub_if_exists",
    "in_hub",
    "pending",
    "prepare",
    "submit",
    "wait_idle",
]

logger = logging.getLogger("greenscope")

Job = Callable[[], None]

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
else:  # pragma: no cover - exercised by a subprocess test
    get_ident = _thread.get_ident
    _start_new_thread = _thread.start_new_thread
    _allocate_lock = _thread.allocate_lock


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


class _Pending:
    """Jobs submitted and not yet finished, for :func:`wait_idle`.

    Plain int updates: exact under the GIL (an ``int`` attribute increment cannot be
    interrupted by a thread switch or a GC pass); approximate on free-threaded builds.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


_pending = _Pending()


def pending() -> int:
    """Jobs submitted and not finished yet."""
    return _pending.count


def _run_job(job: Job) -> None:
    # Jobs log and count their own failures and do not raise; this is the last line of
    # defence, so that a reaper never dies and nothing reaches the hub or another greenlet.
    try:
        job()
    except BaseException:  # pragma: no cover - defensive
        logger.exception("greenscope: a cleanup job failed")
    finally:
        _pending.count -= 1


class _HubReaper:
    """Drains jobs in a greenlet of one hub's thread. One per hub, stored on the hub.

    ``submit`` may run in the hub, in a GC callback or in any greenlet of the hub's
    thread: it only appends and schedules a loop callback. The drain greenlet is spawned
    from that callback, so it starts from the hub like any gevent greenlet.
    """

    __slots__ = ("__weakref__", "hub", "jobs", "scheduled")

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.jobs: deque[Job] = deque()
        self.scheduled = False
        _hub_reapers.add(self)

    def submit(self, job: Job) -> None:
        self.jobs.append(job)  # deque.append is atomic: safe from any context
        if not self.scheduled:
            self.scheduled = True
            self.hub.loop.run_callback(self._spawn)

    def submit_threadsafe(self, job: Job) -> None:
        self.jobs.append(job)
        # The flag is only read and written in the hub's thread, so we always wake it.
        self.hub.loop.run_callback_threadsafe(self._spawn_if_needed)

    def _spawn_if_needed(self) -> None:
        if not self.scheduled and self.jobs:
            self.scheduled = True
            self._spawn()

    def _spawn(self) -> None:  # runs in the hub
        drain = greenlet.greenlet(self._drain, self.hub)
        self.hub.loop.run_callback(drain.switch)

    def _drain(self) -> None:  # runs in its own greenlet: may block
        try:
            while self.jobs:
                _run_job(self.jobs.popleft())
        finally:
            self.scheduled = False
            if self.jobs and _loop_alive(self.hub):  # killed mid-drain, or a late submit
                self.scheduled = True
                self.hub.loop.run_callback(self._spawn)


# Every hub reaper, so the thread reaper can rescue the jobs of a destroyed hub.
_hub_reapers: weakref.WeakSet[_HubReaper] = weakref.WeakSet()


def _hub_reaper(hub: Any) -> _HubReaper:
    reaper: _HubReaper | None = hub.__dict__.get("_greenscope_reaper")
    if reaper is None:
        reaper = hub.__dict__["_greenscope_reaper"] = _HubReaper(hub)
    return reaper


class _ThreadReaper:
    """One daemon OS thread that runs jobs whose owner has no usable hub.

    ``_queue.SimpleQueue.put`` is reentrant: documented as safe from ``__del__`` and
    weakref callbacks. The thread is started lazily by :func:`prepare`,
    from ordinary code, never from a callback (starting a thread takes locks).
    """

    __slots__ = ("lock", "queue", "started")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.queue: _queue.SimpleQueue[Job] = _queue.SimpleQueue()
        self.started = False
        self.lock = _allocate_lock()

    def ensure_started(self) -> None:
        if self.started:
            return
        with self.lock:
            if not self.started:
                _start_new_thread(self._run, ())
                self.started = True

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def _run(self) -> None:
        while True:
            try:
                job = self.queue.get(timeout=_SWEEP_INTERVAL)
            except _queue.Empty:
                self._rescue_orphaned_hub_jobs()
                continue
            _run_job(job)

    def _rescue_orphaned_hub_jobs(self) -> None:
        """Take over the jobs of hubs that were destroyed before they could run them.

        A thread that ends (or a ``ThreadPool`` that is killed) may destroy its hub with
        jobs still queued. Closing here, off the owner's thread, is the only option left:
        it works for drivers whose connections may change threads once their owner is
        gone (psycopg, pg8000, PyMySQL); a failure is logged and counted.
        """
        for reaper in list(_hub_reapers):
            if reaper.jobs and not _loop_alive(reaper.hub):
                while reaper.jobs:
                    self.queue.put(reaper.jobs.popleft())


_SWEEP_INTERVAL = 1.0
_thread_reaper = _ThreadReaper()


def prepare() -> None:
    """Called when a greenlet first registers a value: make sure every cleanup path exists.

    Only the thread reaper needs preparing (a hub reaper is created inside ``submit``).
    It is the fallback of every owner (a hub can be destroyed before its greenlets are
    freed), so it is started here, in ordinary code, keeping thread creation out of
    callbacks. Cost after the first call: one attribute check.
    """
    _thread_reaper.ensure_started()


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
    # that may have loaded the app with --preload). The reaper thread is gone anyway.
    # Dropped, the jobs would free their values: they are pinned (see pin_forever).
    inherited: list[Any] = []
    for reaper in list(_hub_reapers):
        inherited.extend(reaper.jobs)
        reaper.jobs.clear()
    while True:
        try:
            inherited.append(_thread_reaper.queue.get_nowait())
        except _queue.Empty:
            break
    pin_forever(inherited)
    _pending.count = 0
    _thread_reaper.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


def submit(job: Job, owner_thread: int, owner_hub: Any | None) -> None:
    """Run ``job`` soon, where blocking is allowed, on the owner's thread if possible.

    Safe from the hub, GC and weakref callbacks, and other threads: it never blocks,
    logs, or raises for a reason of its own.
    """
    _pending.count += 1
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


def wait_idle(timeout: float | None = None, busy: Callable[[], bool] = lambda: False) -> bool:
    """Wait until every submitted job has finished and ``busy()`` is false; False on timeout.

    Cooperative in a thread with a gevent hub (it yields to the hub, which runs the
    reaper and the completion callbacks), a plain wait elsewhere. Polls every
    millisecond: meant for tests and shutdown, not for hot paths.
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
