"""greenscope._hot: the compiled hit paths and their pure-Python fallback behave alike."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import sys
import threading
import warnings
from pathlib import Path
from unittest import mock

import gevent
import pytest
from greenlet import greenlet as RawGreenlet
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.util import ThreadLocalRegistry

import greenscope
from greenscope import GreenletRegistry, _cleanup, _hot
from greenscope._scoping import _KeyedByScopefunc

from conftest import ProbeJob

SOURCE = Path(_hot.__file__).with_name("_hot.py")


def test_the_build_under_test_is_the_one_expected() -> None:
    """make runs one venv compiled and one pure, so CI tests both: check which this is."""
    expected = os.environ.get("GREENSCOPE_EXPECT_COMPILED")
    if expected is None:
        pytest.skip("GREENSCOPE_EXPECT_COMPILED is unset (make test sets it per venv)")
    assert _hot.compiled is (expected == "1"), _hot.__file__


def test_a_compiled_module_is_not_older_than_its_source() -> None:
    """An extension built before _hot.py last changed would test stale code."""
    if not _hot.compiled:
        pytest.skip("greenscope._hot is the pure-Python module")
    assert Path(_hot.__file__).stat().st_mtime >= SOURCE.stat().st_mtime, (
        f"{_hot.__file__} predates {SOURCE}: rebuild it (make clean; make test)"
    )


def test_the_fallback_is_plain_python_without_cython() -> None:
    """The source imports and runs as plain Python, Cython or not: its stand-ins do."""
    from greenscope import _cython  # noqa: PLC0415 - the fallback's own module

    class Cls:
        pass

    assert _cython.cclass(Cls) is Cls
    assert _cython.compiled is False
    assert SOURCE.exists()


def test_registry_hit_miss_and_create_reentry() -> None:
    """A miss creates once; a createfunc that itself calls the registry gets one value."""
    made: list[object] = []

    def make() -> object:
        if not made:
            made.append(object())
            return registry()
        return made[0]

    registry: GreenletRegistry[object] = GreenletRegistry(make)
    first = registry()
    assert first is made[0]
    assert registry() is first
    assert registry.stats().live == 1
    registry.clear()
    assert not registry.has()


def test_registry_subclass_keeps_slots_and_may_override_call() -> None:
    """GreenletRegistry has no instance dict; a subclass's own __call__ is the one used."""
    registry: GreenletRegistry[object] = GreenletRegistry(object)
    with pytest.raises(AttributeError):
        registry.typo = 1  # type: ignore[attr-defined]

    class Counting(GreenletRegistry[object]):
        calls = 0

        def __call__(self) -> object:
            type(self).calls += 1
            return super().__call__()

    counting = Counting(object)
    value = counting()
    assert counting() is value
    assert Counting.calls == 2
    counting.clear()


def test_session_call_hit_keywords_and_miss() -> None:
    """Session() hits the greenlet's Session; keywords on a hit raise SQLAlchemy's error."""
    session = greenscope.scoped_session(sessionmaker())
    s = session()
    assert session() is s
    with pytest.raises(Exception, match="already present"):
        session(autoflush=False)
    session.remove()
    fresh = session(autoflush=False)
    assert fresh is not s
    assert fresh.autoflush is False
    session.remove()


def test_each_greenlet_gets_its_own_session_through_call_and_proxy() -> None:
    """Session() and a proxied attribute read the calling greenlet's Session."""
    session = greenscope.scoped_session(sessionmaker())
    seen: list[tuple[Session, bool]] = []

    def run() -> None:
        seen.append((session(), session.is_active))
        session.remove()

    for _ in range(3):
        RawGreenlet(run).switch()
    assert len({id(s) for s, _ in seen}) == 3
    assert all(active for _, active in seen)


def test_scopefunc_instances_use_sqlalchemys_paths() -> None:
    """With a scopefunc, __call__ and _proxied are SQLAlchemy's, keyed on the scopefunc."""
    scope = ["a"]
    session = greenscope.scoped_session(sessionmaker(), scopefunc=lambda: scope[0])
    assert type(session) is _KeyedByScopefunc
    a = session()
    scope[0] = "b"
    b = session()
    assert a is not b
    assert session.is_active
    assert _KeyedByScopefunc.__call__ is sa_scoped_session.__call__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session.remove()
    scope[0] = "a"
    session.remove()


def test_a_scoped_session_subclass_may_override_call() -> None:
    """An app's subclass that wraps __call__ keeps working over the compiled base."""

    class Audited(greenscope.scoped_session[Session]):
        calls = 0

        def __call__(self, **kw: object) -> Session:
            type(self).calls += 1
            return super().__call__(**kw)

    session = Audited(sessionmaker())
    s = session()
    assert session() is s
    assert Audited.calls == 2
    session.remove()


def test_a_cooperative_mixin_after_greenscope_still_sees_the_miss() -> None:
    """A mixin's __call__ between greenscope and SQLAlchemy in the MRO runs on a miss."""
    calls: list[dict[str, object]] = []

    class Audit(sa_scoped_session[Session]):
        def __call__(self, **kw: object) -> Session:
            calls.append(kw)
            return super().__call__(**kw)

    class Mine(greenscope.scoped_session[Session], Audit):
        pass

    session = Mine(sessionmaker())
    s = session()
    assert session() is s
    assert calls == [{}]
    session.remove()


def test_registries_and_scoped_sessions_copy_and_subclass_new() -> None:
    """copy, deepcopy and a subclass's super().__new__ work over the compiled bases."""
    registry: GreenletRegistry[object] = GreenletRegistry(object)
    assert copy.copy(registry)._key == registry._key
    assert isinstance(copy.deepcopy(registry), GreenletRegistry)
    assert isinstance(copy.deepcopy(greenscope.scoped_session(sessionmaker())), sa_scoped_session)

    class Single(GreenletRegistry[object]):
        def __new__(cls, *args: object, **kwargs: object) -> Single:
            return super().__new__(cls)

    single = Single(object)
    assert single() is single()
    single.clear()


def test_signatures_are_the_python_ones() -> None:
    """inspect.signature of Session and registry is their __call__'s, the class's its own."""
    session = greenscope.scoped_session(sessionmaker())
    assert str(inspect.signature(session)) == "(**kw: 'Any') -> '_S'"
    assert str(inspect.signature(session.registry)) == "() -> '_T'"
    assert "session_factory" in inspect.signature(greenscope.scoped_session).parameters
    assert "createfunc" in inspect.signature(GreenletRegistry).parameters


def test_a_subclass_built_with_a_scopefunc_keeps_its_class() -> None:
    """With a scopefunc, an app's subclass stays itself, and its __call__ still runs."""

    class Mine(greenscope.scoped_session[Session]):
        calls = 0

        def __call__(self, **kw: object) -> Session:
            type(self).calls += 1
            return super().__call__(**kw)

    scope = ["a"]
    session = Mine(sessionmaker(), scopefunc=lambda: scope[0])
    assert type(session) is Mine
    a = session()
    scope[0] = "b"
    assert session() is not a
    assert session.is_active
    assert Mine.calls == 2
    session.remove()
    scope[0] = "a"
    session.remove()


def test_a_registry_assigned_later_is_the_one_session_uses() -> None:
    """Reassigning .registry (another GreenletRegistry, or SQLAlchemy's) moves the hits."""
    session = greenscope.scoped_session(sessionmaker())
    old = session()
    old_registry = session.registry
    replacement: GreenletRegistry[Session] = GreenletRegistry(sessionmaker())
    session.registry = replacement
    new = session()
    assert new is not old
    assert session() is new
    assert session.is_active
    assert replacement.has()
    session.remove()
    assert not replacement.has()
    stock = ThreadLocalRegistry(sessionmaker())
    session.registry = stock
    assert session() is stock()
    assert session.is_active
    stock.clear()
    old.close()
    old_registry.clear()


def test_a_greenlet_whose_dict_is_a_dict_subclass_still_gets_its_session() -> None:
    """A dict subclass assigned to a greenlet's __dict__ works on both hit paths."""

    class Attrs(dict[str, object]):
        pass

    registry: GreenletRegistry[object] = GreenletRegistry(object)
    session = greenscope.scoped_session(sessionmaker())
    seen: list[object] = []

    def body() -> None:
        RawGreenlet.getcurrent().__dict__ = Attrs()
        value = registry()
        seen.extend([value is registry(), session() is session()])
        session.remove()
        registry.clear()

    RawGreenlet(body).switch()
    assert seen == [True, True]
    assert registry.stats().live == greenscope.stats().live == 0


def test_the_fallback_source_imports_with_the_stand_ins_alone() -> None:
    """_hot.py imports as plain Python where Cython is not installed, whatever it uses."""
    spec = importlib.util.spec_from_file_location("greenscope._hot_probe", SOURCE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, {"cython": None}):  # import cython: ModuleNotFoundError
        spec.loader.exec_module(module)
    assert module.compiled is False
    assert module.Counts().default_close is False
    assert module.WatchTable.__slots__ == ("running", "sleep_until")


def test_a_jobs_deadline_is_time_monotonic_plus_the_close_timeout_in_force() -> None:
    """A job's deadline is on time.monotonic()'s clock and follows configure_cleanup()."""
    job = ProbeJob()

    previous = greenscope.configure_cleanup(close_timeout=3.0)
    try:
        for timeout in (3.0, 7.0):
            greenscope.configure_cleanup(close_timeout=timeout)
            assert job.run()
            assert timeout - 1.0 < job.left[-1] <= timeout
    finally:
        greenscope.configure_cleanup(close_timeout=previous.close_timeout)
    assert job not in _cleanup._watchdog.running


def test_orphans_of_two_hubs_in_turn_are_each_closed_in_their_own_thread() -> None:
    """The reaper found for one thread's hub is never handed another hub's orphans."""
    closed_in: list[tuple[str, int]] = []

    class Recording(Session):
        def close(self) -> None:
            if "owner" in self.info:
                closed_in.append((self.info["owner"], threading.get_ident()))
            super().close()

    scoped = greenscope.scoped_session(sessionmaker(class_=Recording))
    turn = {"a": threading.Event(), "b": threading.Event()}
    idents: dict[str, int] = {}
    failures: list[BaseException] = []

    def orphan(name: str) -> None:
        scoped().info["owner"] = name  # and end without remove()

    def thread(name: str, other: str, rounds: int) -> None:
        idents[name] = threading.get_ident()
        try:
            for _ in range(rounds):
                assert turn[name].wait(10)
                turn[name].clear()
                gevent.spawn(orphan, name).join()
                assert greenscope.wait_reaped(10)
                turn[other].set()
        except BaseException as e:  # reported below, in the test's own thread
            failures.append(e)
            turn[other].set()

    threads = [
        threading.Thread(target=thread, args=("a", "b", 2)),
        threading.Thread(target=thread, args=("b", "a", 1)),
    ]
    for t in threads:
        t.start()
    turn["a"].set()
    for t in threads:
        t.join(30)
    assert not failures
    assert closed_in == [("a", idents["a"]), ("b", idents["b"]), ("a", idents["a"])]
    assert scoped.registry.stats().reaped == 3  # type: ignore[attr-defined]
