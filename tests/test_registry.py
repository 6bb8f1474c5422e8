"""GreenletRegistry: one value per greenlet and per thread, no strong references, no reuse."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import pytest
from greenlet import getcurrent
from greenlet import greenlet as RawGreenlet
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import ScopedRegistry

import greenscope
from greenscope import GreenletRegistry


class Closable:
    """A value that records its close()."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_is_a_sqlalchemy_registry() -> None:
    """It implements SQLAlchemy's registry protocol and type, so scoped_session accepts it."""
    registry = GreenletRegistry(Closable)
    assert isinstance(registry, ScopedRegistry)
    assert registry.scopefunc is getcurrent


def test_thousand_greenlets_get_distinct_values_stable_across_switches() -> None:
    """1,000 greenlets of one thread each get their own Session, the same one every time."""
    registry: GreenletRegistry[Session] = GreenletRegistry(sessionmaker())
    main = getcurrent()
    seen: list[tuple[Session, Session]] = []

    def work() -> None:
        first = registry()
        main.switch()  # every other greenlet runs and registers in between
        seen.append((first, registry()))

    greenlets = [RawGreenlet(work) for _ in range(1000)]
    for g in greenlets:
        g.switch()
    assert registry.stats().live == 1000
    for g in greenlets:
        g.switch()
    assert all(g.dead for g in greenlets)
    assert all(first is again for first, again in seen)
    assert len({id(first) for first, _ in seen}) == 1000


def test_native_threads_get_distinct_values() -> None:
    """Threads alive at the same time each get their own Session, and lose it when they end."""
    registry: GreenletRegistry[Session] = GreenletRegistry(sessionmaker())
    barrier = threading.Barrier(8, timeout=10)
    sessions: list[Session] = []
    lock = threading.Lock()

    def work() -> None:
        session = registry()
        barrier.wait()  # all eight hold a Session at once
        assert registry() is session
        with lock:
            sessions.append(session)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len({id(s) for s in sessions}) == 8
    # join() returns before greenlet frees a thread's main greenlet; wait_reaped() knows.
    assert greenscope.wait_reaped(10)
    assert registry.stats() == greenscope.RegistryStats(created=8, reaped=8)


def test_dead_greenlets_are_collectable_and_registry_empties() -> None:
    """Neither a registry nor its values keep a dead greenlet alive; cleanup empties it."""
    registry = GreenletRegistry(Closable)
    refs: list[weakref.ref[RawGreenlet]] = []
    values: list[Closable] = []

    def work() -> None:
        values.append(registry())

    for _ in range(50):
        g = RawGreenlet(work)
        refs.append(weakref.ref(g))
        g.switch()
        del g
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert greenscope.wait_reaped(10)
    assert registry.stats() == greenscope.RegistryStats(created=50, reaped=50)
    assert [v.closed for v in values] == [1] * 50


def test_reaped_values_are_freed() -> None:
    """After cleanup greenscope holds no reference to the value it closed."""
    registry = GreenletRegistry(Closable)
    ref: list[weakref.ref[Closable]] = []
    g = RawGreenlet(lambda: ref.append(weakref.ref(registry())))
    g.switch()
    del g
    assert greenscope.wait_reaped(10)
    gc.collect()
    assert ref[0]() is None


def test_reused_ids_never_receive_an_earlier_value() -> None:
    """Sequential greenlets that reuse id() each get a new value, never a dead one's."""
    registry = GreenletRegistry(Closable)
    values: list[Closable] = []  # kept alive, so a new value cannot reuse their ids
    ids: list[int] = []

    def work() -> None:
        ids.append(id(getcurrent()))
        values.append(registry())

    for _ in range(20):
        RawGreenlet(work).switch()  # unreferenced: freed as soon as it ends
    assert len(set(ids)) < len(ids), "precondition: CPython reused a greenlet id"
    assert len({id(v) for v in values}) == 20


def test_reused_id_before_cleanup_ran_still_gets_a_new_value() -> None:
    """Even while a dead greenlet's close is still queued, its id's next owner starts empty."""
    registry = GreenletRegistry(Closable)
    got: dict[int, list[Closable]] = {}

    def work() -> None:
        got.setdefault(id(getcurrent()), []).append(registry())

    for _ in range(10):  # no yield to the hub in between: the reaper has not run
        RawGreenlet(work).switch()
    reused = [vs for vs in got.values() if len(vs) > 1]
    assert reused, "precondition: CPython reused a greenlet id"
    for vs in reused:
        assert len({id(v) for v in vs}) == len(vs)


def test_has_set_and_clear_act_on_the_current_greenlet_only() -> None:
    """has/set/clear follow SQLAlchemy's protocol and never touch another greenlet's value."""
    registry = GreenletRegistry(Closable)
    mine = Closable()

    def other() -> None:
        assert not registry.has()
        registry.set(Closable())
        registry.clear()

    registry.set(mine)
    assert registry.has()
    assert registry() is mine
    RawGreenlet(other).switch()
    assert registry() is mine
    registry.clear()
    assert not registry.has()
    assert mine.closed == 0, "clear() forgets without closing, as in SQLAlchemy"
    registry.clear()  # clearing nothing is fine
    assert registry.stats() == greenscope.RegistryStats(created=2, removed=2)


def test_set_replaces_without_closing() -> None:
    """set() over an existing value replaces it (counted as removed) and does not close it."""
    registry = GreenletRegistry(Closable)
    first, second = Closable(), Closable()
    registry.set(first)
    registry.set(second)
    assert registry() is second
    assert first.closed == 0
    registry.clear()
    assert registry.stats() == greenscope.RegistryStats(created=2, removed=2)


def test_values_stored_with_set_are_reaped() -> None:
    """A value stored with set() (Session(**kw) does that) is closed when its greenlet ends."""
    registry = GreenletRegistry(Closable)
    value = Closable()
    g = RawGreenlet(lambda: registry.set(value))
    g.switch()
    del g
    assert greenscope.wait_reaped(10)
    assert value.closed == 1


def test_failing_createfunc_registers_nothing() -> None:
    """If createfunc raises, the error propagates and nothing is registered."""

    def broken() -> Any:
        raise RuntimeError("no database")

    registry = GreenletRegistry(broken)
    with pytest.raises(RuntimeError, match="no database"):
        registry()
    assert not registry.has()
    assert registry.stats() == greenscope.RegistryStats()


def test_values_without_close_are_dropped() -> None:
    """A value with no close() is simply forgotten when its greenlet ends."""
    registry: GreenletRegistry[object] = GreenletRegistry(object)
    g = RawGreenlet(registry)
    g.switch()
    del g
    assert greenscope.wait_reaped(10)
    assert registry.stats() == greenscope.RegistryStats(created=1, reaped=1)


def test_custom_close_is_used() -> None:
    """close= replaces the default close(): e.g. to dispose of a non-Session resource."""
    closed: list[object] = []
    registry: GreenletRegistry[object] = GreenletRegistry(object, close=closed.append)
    g = RawGreenlet(registry)
    g.switch()
    del g
    assert greenscope.wait_reaped(10)
    assert len(closed) == 1


def test_two_registries_in_one_greenlet_are_independent() -> None:
    """Registries never share values; both are reaped when their greenlet ends."""
    r1, r2 = GreenletRegistry(Closable), GreenletRegistry(Closable)
    values: list[Closable] = []

    def work() -> None:
        values.extend([r1(), r2()])
        assert values[0] is not values[1]
        r1.clear()
        assert r2.has()

    g = RawGreenlet(work)
    g.switch()
    del g
    assert greenscope.wait_reaped(10)
    assert [v.closed for v in values] == [0, 1]
    assert r1.stats() == greenscope.RegistryStats(created=1, removed=1)
    assert r2.stats() == greenscope.RegistryStats(created=1, reaped=1)


def test_createfunc_must_be_callable() -> None:
    """A non-callable createfunc is refused up front with a message saying what to pass."""
    with pytest.raises(TypeError, match="sessionmaker"):
        GreenletRegistry(None)  # type: ignore[arg-type]


def test_stats_sum_every_registry() -> None:
    """greenscope.stats() adds up every live registry; registries() lists them weakly."""
    registry = GreenletRegistry(Closable)
    registry()
    assert registry in greenscope.registries()
    assert greenscope.stats().live >= 1
    registry.clear()
    ref = weakref.ref(registry)
    del registry
    gc.collect()
    assert ref() is None, "the process-wide list holds registries weakly"


def test_a_greenlets_values_stay_oldest_first_and_counted_once() -> None:
    """Three registries in one greenlet: clear, set and re-use keep order and live counts."""
    regs = [GreenletRegistry(lambda n=n: f"value {n}") for n in range(3)]  # type: ignore[misc]

    def work() -> tuple[list[Any], list[Any], list[int]]:
        for r in regs:
            r()
        regs[0].clear()  # the first registry's value leaves the watch's slots
        regs[1].set("replaced")  # replacing is not a new live value
        after_clear = greenscope.current_sessions()
        regs[0]()  # back, now the newest
        return after_clear, greenscope.current_sessions(), [r.stats().live for r in regs]

    after_clear, after_reuse, live = RawGreenlet(work).switch()
    assert after_clear == ["replaced", "value 2"]
    assert after_reuse == ["replaced", "value 2", "value 0"]
    assert live == [1, 1, 1]
    gc.collect()
    assert greenscope.wait_reaped(5)
    assert [r.stats().live for r in regs] == [0, 0, 0]
    assert [r.stats().reaped for r in regs] == [1, 1, 1]
