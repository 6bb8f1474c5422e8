"""A model-based test: random interleavings of owners and actions, invariants after each step.

A Hypothesis state machine drives one ``greenscope.scoped_session`` from many owners: gevent
greenlets, raw greenlets, native threads (with and without a gevent hub), gevent thread-pool
tasks and the test's own greenlet. Every owner runs the same commands (use, remove, set,
clear, gc, nested ``session_scope`` entries and exits, generators holding a scope), and ends
in every way there is (returns, raises, is killed, is freed, lingers in a reference cycle).

A model predicts, for every step, which Session each owner holds, which Sessions greenscope
made, closed and committed, what the registry's counters are and how many pool connections
are checked out. Automatic garbage collection is off while the machine runs, so that
greenlets are freed exactly when the model says (by refcount, or at a ``gc`` command).

Longer runs: ``GREENSCOPE_MODEL_EXAMPLES=500`` (default 30); ``GREENSCOPE_MODEL_RANDOM=1``
draws a fresh seed instead of the fixed one.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import gevent
import gevent.event
import gevent.queue
import gevent.threadpool
import pytest
from greenlet import GreenletExit, getcurrent
from greenlet import greenlet as RawGreenlet
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import create_engine, orm, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import QueuePool

import greenscope
from greenscope import _cleanup

from conftest import CountingEngine

EXAMPLES = int(os.environ.get("GREENSCOPE_MODEL_EXAMPLES", "30"))
RANDOM = os.environ.get("GREENSCOPE_MODEL_RANDOM", "") not in ("", "0")
WAIT = 5.0  # seconds: every wait is bounded, so a bug fails instead of hanging

MAX_GEVENT = 4  # running gevent owners
MAX_RAW = 3  # raw greenlets not freed yet (running, kept or in a cycle)
MAX_FORGOTTEN = 4  # cleared or replaced Sessions the test has not closed yet
MAX_GENERATORS = 4  # generators not dropped yet
MAX_DEPTH = 2  # nested `with session_scope` blocks per owner
SCRIPT_LENGTH = 5  # commands of a thread or thread-pool task
POOL_SIZE = 30  # more than the owners can ever hold at once (see the caps above)


class Boom(Exception):
    """The error an owner raises to end itself."""


class CountingSession(orm.Session):
    """Counts its closes (greenscope's, through close(), and the test's apart) and commits."""

    made: ClassVar[list[CountingSession]] = []  # every instance, in creation order

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closes = 0  # remove(), a reap, close_all(): everything but the test's own
        self.test_closes = 0
        self.commits = 0
        self.close_sites: list[tuple[int, bool]] = []  # (thread, in a hub) of each close()
        CountingSession.made.append(self)

    def close(self) -> None:
        self.closes += 1
        self.close_sites.append((threading.get_ident(), _cleanup.in_hub()))
        super().close()

    def close_by_test(self) -> None:
        """What the test calls for a Session greenscope forgot (clear, set): not counted."""
        self.test_closes += 1
        super().close()

    def commit(self) -> None:
        self.commits += 1
        super().commit()


Scoped = greenscope.scoped_session[CountingSession]


# -- what owners run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cmd:
    """One command for an owner; ``arg`` is a scope's commit flag or a generator's name."""

    op: str
    arg: Any = None

    def __repr__(self) -> str:
        return self.op if self.arg is None else f"{self.op}({self.arg!r})"


@dataclass
class Report:
    """What an owner saw around one command (``has_before`` None: not recorded)."""

    has_before: bool | None
    after: CountingSession | None  # the registry's value once the command ran
    old: CountingSession | None = None  # what clear() or set() took away
    new: CountingSession | None = None  # what set() stored
    current: list[Any] = field(default_factory=list)  # greenscope.current_sessions()


class Channel(Protocol):
    def receive(self) -> Cmd: ...

    def reply(self, report: Report) -> None: ...


class GeventChannel:
    """A gevent owner's mailbox: a command and the AsyncResult to answer it with."""

    def __init__(self) -> None:
        self.inbox: Any = gevent.queue.Queue()
        self.result: Any = None

    def receive(self) -> Cmd:
        cmd, self.result = self.inbox.get()
        assert isinstance(cmd, Cmd)
        return cmd

    def reply(self, report: Report) -> None:
        self.result.set(report)


class RawChannel:
    """A raw greenlet's: each command arrives by a switch() in, each report leaves by one out."""

    def __init__(self, driver: RawGreenlet) -> None:
        self.driver = driver  # the test's greenlet, which sends every command
        self.first: Cmd | None = None
        self.outbox: Report | None = None

    def receive(self) -> Cmd:
        if self.first is not None:
            cmd, self.first = self.first, None
            return cmd
        cmd = self.driver.switch(self.outbox)
        assert isinstance(cmd, Cmd)
        return cmd

    def reply(self, report: Report) -> None:
        self.outbox = report


class ScriptChannel:
    """A thread's or thread-pool task's: a fixed script, its reports kept in order."""

    def __init__(self, script: list[Cmd]) -> None:
        self.script = iter(script)
        self.reports: list[Report] = []

    def receive(self) -> Cmd:
        return next(self.script)

    def reply(self, report: Report) -> None:
        self.reports.append(report)


class World:
    """What owners act on: the scoped_session, two shared scopes, the generators.

    Holds no owner, greenlet or model object: a greenlet's frames reference this, and a
    reference back would keep a finished greenlet alive longer than the model says.
    """

    def __init__(self, Session: Scoped) -> None:
        self.Session = Session
        registry = Session.registry
        assert isinstance(registry, greenscope.GreenletRegistry)
        self.registry: greenscope.GreenletRegistry[CountingSession] = registry
        # Shared by every owner and generator: exits are matched to entries by frame.
        self.scopes = {
            False: greenscope.session_scope(Session),
            True: greenscope.session_scope(Session, commit=True),
        }
        self.gens: dict[str, Generator[None, None, None]] = {}

    def body(self, commit: bool) -> Generator[None, None, None]:
        with self.scopes[commit]:
            self.Session.execute(text("SELECT 1"))
            yield

    def snapshot(
        self,
        has_before: bool | None,
        old: CountingSession | None = None,
        new: CountingSession | None = None,
    ) -> Report:
        after = self.registry() if self.registry.has() else None
        return Report(has_before, after, old, new, greenscope.current_sessions())

    def perform(self, cmd: Cmd) -> Report:
        has_before = self.registry.has()
        old = new = None
        op = cmd.op
        if op == "use":
            self.Session()
            self.Session.execute(text("SELECT 1"))  # checks a pool connection out
        elif op == "remove":
            self.Session.remove()
        elif op == "set":
            old = self.registry() if has_before else None
            new = self.Session.session_factory()
            self.registry.set(new)
        elif op == "clear":
            old = self.registry() if has_before else None
            self.registry.clear()
        elif op == "gc":
            gc.collect()
        elif op == "hub":
            gevent.sleep(0)  # this thread has a gevent hub from now on
        elif op == "gen_enter":
            next(self.gens[cmd.arg])
        elif op == "gen_finish":
            next(self.gens[cmd.arg], None)
        elif op == "gen_close":
            self.gens[cmd.arg].close()
        elif op == "gen_drop":
            del self.gens[cmd.arg]  # the last reference: finalized here, in this greenlet
        else:
            raise AssertionError(f"unknown command {cmd!r}")
        return self.snapshot(has_before, old, new)

    def serve(self, chan: Channel) -> bool:
        """Run commands until "end" (True) or "exit" (False: leave one `with` block)."""
        while True:
            cmd = chan.receive()
            if cmd.op == "end":
                return True
            if cmd.op == "exit":
                return False
            if cmd.op == "raise":
                raise Boom(cmd)
            if cmd.op == "enter":
                has_before = self.registry.has()
                with self.scopes[cmd.arg]:
                    chan.reply(self.snapshot(has_before))
                    ended = self.serve(chan)
                if ended:
                    return True
                chan.reply(self.snapshot(None))  # the answer to "exit"
            else:
                chan.reply(self.perform(cmd))

    def serve_raw(self, chan: RawChannel, first: Cmd) -> bool:
        chan.first = first
        return self.serve(chan)


# -- the model ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Owner:
    """A greenlet or thread as the model sees it."""

    name: str
    kind: str  # main | gevent | raw | thread | pool
    held: Model | None = None  # the Session greenscope holds for it
    entries: list[Entry] = field(default_factory=list)  # its open `with` scopes, innermost last
    state: str = "running"  # running | kept (raw, finished, referenced) | cyclic | gone
    greenlet: Any = None
    chan: Any = None

    def __repr__(self) -> str:
        return self.name

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis's reports
        printer.text(self.name)


@dataclass(eq=False)
class Model:
    """A Session as the model predicts it; ``real`` is bound once greenscope has made it."""

    number: int
    owner: Owner
    real: CountingSession | None = None
    connected: bool = False  # holds a pool connection
    closes: int = 0  # every close() but the test's
    test_closes: int = 0
    commits: int = 0
    stale: bool = False  # its owned scope was exited by another greenlet

    def __repr__(self) -> str:
        return f"<Session #{self.number} of {self.owner.name}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass
class Entry:
    """One `with session_scope` entry: its commit flag, whether it made the Session (then
    its exit ends it), and the Session it handed out (what its exit commits)."""

    commit: bool
    owned: bool
    session: Model


@dataclass(eq=False)
class Gen:
    """A generator holding a scope: who entered it, and how far it got."""

    name: str
    commit: bool
    state: str = "new"  # new | suspended | done | dropped
    owner: Owner | None = None
    entry: Entry | None = None

    def __repr__(self) -> str:
        return self.name

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis's reports
        printer.text(self.name)


@dataclass
class Expect:
    """What a command's report must show."""

    has_before: bool | None
    after: Model | None
    old: Model | None = None
    new: Model | None = None


def _step(method: Callable[..., None]) -> Callable[..., None]:
    """A rule: the machine is unhealthy until it returns (teardown checks only after success)."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> None:
        self.healthy = False
        method(self, *args, **kwargs)
        self.healthy = True

    return run


def _real(model: Model | None) -> CountingSession | None:
    return None if model is None else model.real


class RegistryMachine(RuleBasedStateMachine):
    """Owners and actions at random; the model is checked after every step."""

    db: ClassVar[CountingEngine]
    threadpool: ClassVar[Any]

    def __init__(self) -> None:
        super().__init__()
        self.made: list[CountingSession] = []
        CountingSession.made = self.made
        self.Session: Scoped = greenscope.scoped_session(
            sessionmaker(self.db.engine, class_=CountingSession)
        )
        self.world = World(self.Session)
        self.main = Owner("main", "main")  # the test's own greenlet: never ends
        self.owners: list[Owner] = [self.main]
        self.sessions: list[Model] = []
        self.unbound: list[Model] = []  # predicted, not matched to a real Session yet
        self.bound = 0  # how many of self.made are matched
        self.forgotten: list[Model] = []  # cleared or replaced: the test must close them
        self.gens: list[Gen] = []
        self.obtained: dict[int, str] = {}  # id(Session) -> the owner that saw it
        self.created = self.removed = self.reaped = 0
        self.names = 0
        self.invalidated_before = self.db.invalidated
        self.main_thread = threading.get_ident()
        self.healthy = True
        self.finished = False  # _finish() ended every owner and collected the cycles

    # -- model bookkeeping --------------------------------------------------------------------

    def _owner(self, kind: str) -> Owner:
        self.names += 1
        owner = Owner(f"{kind}-{self.names}", kind)
        self.owners.append(owner)
        return owner

    def _running(self, *kinds: str) -> list[Owner]:
        return [o for o in self.owners if o.state == "running" and o.kind in kinds]

    def _new(self, owner: Owner) -> Model:
        model = Model(len(self.sessions) + 1, owner)
        self.sessions.append(model)
        self.unbound.append(model)
        self.created += 1
        return model

    def _hold(self, owner: Owner) -> Model:
        """The owner's Session, made now if it has none (what Session() does)."""
        if owner.held is None:
            owner.held = self._new(owner)
        return owner.held

    def _remove(self, owner: Owner) -> None:
        held = owner.held
        if held is not None:
            held.closes += 1
            held.connected = False
            self.removed += 1
            owner.held = None

    def _forget(self, owner: Owner) -> None:
        held = owner.held
        if held is not None:
            self.removed += 1
            self.forgotten.append(held)
            owner.held = None

    def _reap(self, owner: Owner) -> None:
        held = owner.held
        if held is not None:
            held.closes += 1
            held.connected = False
            self.reaped += 1
            owner.held = None
        owner.state = "gone"

    def _enter(self, owner: Owner, commit: bool) -> Entry:
        """A scope's entry: it hands out the owner's Session, made now if it has none.

        A Session left stale (its owned scope was exited by another greenlet) is removed
        first, unless an open scope of the owner made it.
        """
        held = owner.held
        if held is not None and held.stale and not self._made_by_scope(owner, held, None):
            self._remove(owner)
        owned = owner.held is None
        return Entry(commit, owned, self._hold(owner))

    def _made_by_scope(self, owner: Owner, session: Model, exiting: Entry | None) -> bool:
        """Whether an open owned entry of the owner, but ``exiting``, made ``session``."""
        open_entries = owner.entries + [
            g.entry for g in self.gens if g.state == "suspended" and g.owner is owner and g.entry
        ]
        return any(e.owned and e.session is session and e is not exiting for e in open_entries)

    def _exit(self, owner: Owner, entry: Entry, failed: bool) -> None:
        """A scope's exit in the greenlet that entered it (greenscope 0.2 semantics).

        An owned exit ends its unit of work: the owner's current Session, whether its
        entry made it or it was made after a remove() in the block, unless another open
        owned scope made it. With commit and no failure it commits the Session it handed
        out, and that current one; an owned exit then removes the current one and closes
        the one it handed out if that was replaced and still has work.
        """
        session, current = entry.session, owner.held
        ours = (
            current is not None
            and entry.owned
            and (current is session or not self._made_by_scope(owner, current, entry))
        )
        if entry.commit and not failed:
            session.commits += 1
            session.connected = False
            if ours and current is not None and current is not session:
                current.commits += 1
                current.connected = False
        if entry.owned:
            if ours:
                self._remove(owner)
            if session is not current and session.connected:  # a transaction to end
                session.closes += 1
                session.connected = False

    def _unwind(self, owner: Owner, failed: bool) -> None:
        while owner.entries:
            self._exit(owner, owner.entries.pop(), failed)

    def _collected(self) -> None:
        """A gc pass: the finished raw greenlets left in a cycle are freed, then reaped."""
        for owner in self.owners:
            if owner.state == "cyclic":
                self._reap(owner)

    def _gen(self, name: str) -> Gen:
        [gen] = [g for g in self.gens if g.name == name]
        return gen

    def _apply(self, owner: Owner, cmd: Cmd) -> Expect:
        """Predict one non-final command; return what its report must show."""
        has_before: bool | None = owner.held is not None
        old = new = None
        op = cmd.op
        if op == "use":
            self._hold(owner).connected = True
        elif op == "remove":
            self._remove(owner)
        elif op == "set":
            old = owner.held
            self._forget(owner)  # set() replaces without closing
            new = owner.held = self._new(owner)
        elif op == "clear":
            old = owner.held
            self._forget(owner)
        elif op == "gc":
            self._collected()
        elif op == "enter":
            owner.entries.append(self._enter(owner, cmd.arg))
        elif op == "exit":
            has_before = None
            self._exit(owner, owner.entries.pop(), failed=False)
        elif op == "gen_enter":
            gen = self._gen(cmd.arg)
            gen.owner, gen.entry, gen.state = owner, self._enter(owner, gen.commit), "suspended"
            gen.entry.session.connected = True
        elif op in ("gen_finish", "gen_close", "gen_drop"):
            gen = self._gen(cmd.arg)
            if gen.state == "suspended" and gen.owner is owner:
                assert gen.entry is not None
                self._exit(owner, gen.entry, failed=op != "gen_finish")
            elif gen.state == "suspended" and gen.entry is not None and gen.entry.owned:
                gen.entry.session.stale = True  # its owner's next scope starts fresh
            # Exited by another greenlet: neither committed nor closed.
            gen.state = "dropped" if op == "gen_drop" else "done"
        else:
            assert op == "hub", op
        return Expect(has_before, owner.held, old, new)

    def _bind(self) -> None:
        """Match the Sessions greenscope made since the last step to the predicted ones."""
        fresh = self.made[self.bound :]
        assert len(fresh) == len(self.unbound), (
            f"greenscope made {len(fresh)} Session(s); the model expected {self.unbound}"
        )
        for model, real in zip(self.unbound, fresh, strict=True):
            model.real = real
        self.bound += len(fresh)
        self.unbound.clear()

    def _obtained(self, owner: Owner, session: CountingSession) -> None:
        first = self.obtained.setdefault(id(session), owner.name)
        assert first == owner.name, f"{owner} obtained a Session {first} obtained before"

    def _check(self, owner: Owner, cmd: Cmd, expect: Expect, report: Any) -> None:
        assert isinstance(report, Report), f"{owner} answered {cmd!r} with {report!r}"
        where = f"{owner} after {cmd!r}"
        if expect.has_before is not None:
            assert report.has_before == expect.has_before, f"{where}: has() before"
        assert report.after is _real(expect.after), (
            f"{where}: the registry holds {report.after!r}, the model {expect.after!r}"
        )
        assert report.old is _real(expect.old), f"{where}: replaced {report.old!r}"
        assert report.new is _real(expect.new), f"{where}: stored {report.new!r}"
        assert report.current == ([] if report.after is None else [report.after]), where
        for session in (report.after, report.old, report.new):
            if session is not None:
                self._obtained(owner, session)

    # -- acting ---------------------------------------------------------------------------------

    def _ask_gevent(self, owner: Owner, cmd: Cmd) -> Any:
        result = gevent.event.AsyncResult()
        owner.chan.inbox.put((cmd, result))
        gevent.wait([result, owner.greenlet], timeout=WAIT, count=1)
        if not result.ready():
            raise AssertionError(f"{owner} did not answer {cmd!r}: {owner.greenlet!r}")
        return result.get()

    def _send(self, owner: Owner, cmd: Cmd) -> None:
        expect = self._apply(owner, cmd)
        if owner.kind == "main":
            report: Any = self.world.perform(cmd)
        elif owner.kind == "gevent":
            report = self._ask_gevent(owner, cmd)
        else:
            report = owner.greenlet.switch(cmd)
        self._bind()
        self._check(owner, cmd, expect, report)

    def _end_gevent(self, owner: Owner, how: str, keep: bool) -> None:
        self._unwind(owner, failed=how != "end")
        if how == "kill":
            owner.greenlet.kill(block=True, timeout=WAIT)
        else:
            owner.chan.inbox.put((Cmd(how), gevent.event.AsyncResult()))
            owner.greenlet.join(timeout=WAIT)
        assert owner.greenlet.dead, f"{owner} did not end"
        if how == "raise":
            assert isinstance(owner.greenlet.exception, Boom)
        elif how == "end":
            assert owner.greenlet.value is True
        if not keep:
            owner.greenlet = None
        self._bind()
        self._reap(owner)  # at completion, referenced or not

    def _end_raw(self, owner: Owner, how: str, after: str) -> None:
        self._unwind(owner, failed=how != "end")
        if how == "abandon":
            owner.greenlet = None  # freed while suspended: greenlet throws GreenletExit in
        else:
            if how == "end":
                assert owner.greenlet.switch(Cmd("end")) is True
            elif how == "raise":
                try:
                    owner.greenlet.switch(Cmd("raise"))
                except Boom:
                    pass
                else:
                    raise AssertionError(f"{owner} did not raise")
            else:
                owner.greenlet.throw(GreenletExit)
            assert owner.greenlet.dead, f"{owner} did not end"
        self._bind()
        if owner.greenlet is None or after == "drop":
            owner.greenlet = None  # freed now: reaped
            self._reap(owner)
        elif after == "keep":
            owner.state = "kept"  # finished but referenced: keeps its Session until freed
        else:
            cycle: list[Any] = [owner.greenlet]
            cycle.append(cycle)
            owner.greenlet = None
            owner.state = "cyclic"  # freed by the next gc pass

    def _release(self, owner: Owner) -> None:
        owner.greenlet = None
        self._reap(owner)

    def _close_forgotten(self, index: int) -> None:
        model = self.forgotten.pop(index)
        assert model.real is not None
        model.real.close_by_test()
        model.test_closes += 1
        model.connected = False

    def _options(
        self,
        depth: int,
        forgotten: int,
        gens: dict[str, str] | None,
        *,
        hub: bool,
        scopes: bool,
    ) -> list[Cmd]:
        """The commands an owner may run now: valid in its state, within the caps."""
        options = [Cmd("use"), Cmd("use"), Cmd("gc"), Cmd("remove")]  # use: twice as likely
        if forgotten < MAX_FORGOTTEN:
            options += [Cmd("set"), Cmd("clear")]
        if scopes and depth < MAX_DEPTH:
            options += [Cmd("enter", False), Cmd("enter", True)]
        if depth:
            options.append(Cmd("exit"))
        if hub:
            options.append(Cmd("hub"))
        for name, state in (gens or {}).items():
            if state == "new":
                options.append(Cmd("gen_enter", name))
            elif state == "suspended":
                options += [Cmd("gen_finish", name), Cmd("gen_close", name), Cmd("gen_drop", name)]
            elif state == "done":
                options.append(Cmd("gen_drop", name))
        return options

    def _script(self, data: st.DataObject, *, hub: bool, gens: bool) -> list[Cmd]:
        """A thread's or a thread-pool task's commands, valid in order, then end or raise."""
        states = {g.name: g.state for g in self.gens} if gens else None
        depth, forgotten, script = 0, len(self.forgotten), []
        for _ in range(data.draw(st.integers(0, SCRIPT_LENGTH), label="length")):
            options = self._options(depth, forgotten, states, hub=hub, scopes=True)
            cmd = data.draw(st.sampled_from(options), label="command")
            depth += {"enter": 1, "exit": -1}.get(cmd.op, 0)
            forgotten += cmd.op in ("set", "clear")
            if states is not None and cmd.op.startswith("gen_"):
                states[cmd.arg] = {
                    "gen_enter": "suspended",
                    "gen_drop": "dropped",
                }.get(cmd.op, "done")
            script.append(cmd)
        script.append(data.draw(st.sampled_from([Cmd("end"), Cmd("raise")]), label="ending"))
        return script

    # -- rules ----------------------------------------------------------------------------------

    def _commands(self, data: st.DataObject, owner: Owner, least: int = 1) -> None:
        """A few commands for ``owner``, each answered before the next is sent."""
        for _ in range(data.draw(st.integers(least, 3), label="commands")):
            states = {g.name: g.state for g in self.gens}
            scopes = owner.kind != "main"  # the test's greenlet enters scopes in generators only
            options = self._options(
                len(owner.entries), len(self.forgotten), states, hub=False, scopes=scopes
            )
            self._send(owner, data.draw(st.sampled_from(options), label="command"))

    @precondition(lambda self: len(self._running("gevent")) < MAX_GEVENT)
    @rule(data=st.data())
    @_step
    def spawn_gevent(self, data: st.DataObject) -> None:
        owner = self._owner("gevent")
        owner.chan = GeventChannel()
        owner.greenlet = gevent.spawn(self.world.serve, owner.chan)
        self._commands(data, owner, least=0)

    @precondition(
        lambda self: sum(o.kind == "raw" and o.state != "gone" for o in self.owners) < MAX_RAW
    )
    @rule(data=st.data())
    @_step
    def spawn_raw(self, data: st.DataObject) -> None:
        owner = self._owner("raw")
        owner.chan = RawChannel(getcurrent())
        owner.greenlet = RawGreenlet(functools.partial(self.world.serve_raw, owner.chan))
        self._commands(data, owner, least=0)

    @rule(data=st.data())
    @_step
    def command_main(self, data: st.DataObject) -> None:
        self._commands(data, self.main)

    @precondition(lambda self: bool(self._running("gevent")))
    @rule(data=st.data())
    @_step
    def command_gevent(self, data: st.DataObject) -> None:
        self._commands(data, data.draw(st.sampled_from(self._running("gevent")), label="owner"))

    @precondition(lambda self: bool(self._running("raw")))
    @rule(data=st.data())
    @_step
    def command_raw(self, data: st.DataObject) -> None:
        self._commands(data, data.draw(st.sampled_from(self._running("raw")), label="owner"))

    @precondition(lambda self: bool(self._running("gevent")))
    @rule(data=st.data())
    @_step
    def end_gevent(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(self._running("gevent")), label="owner")
        how = data.draw(st.sampled_from(["end", "raise", "kill"]), label="how")
        self._end_gevent(owner, how, keep=data.draw(st.booleans(), label="keep the handle"))

    @precondition(lambda self: bool(self._running("raw")))
    @rule(data=st.data())
    @_step
    def end_raw(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(self._running("raw")), label="owner")
        how = data.draw(st.sampled_from(["end", "raise", "kill", "abandon"]), label="how")
        after = data.draw(st.sampled_from(["drop", "keep", "cycle"]), label="then")
        self._end_raw(owner, how, after)

    @precondition(lambda self: any(o.state == "kept" for o in self.owners))
    @rule(data=st.data())
    @_step
    def release_kept(self, data: st.DataObject) -> None:
        kept = [o for o in self.owners if o.state == "kept"]
        self._release(data.draw(st.sampled_from(kept), label="owner"))

    @precondition(lambda self: sum(g.state != "dropped" for g in self.gens) < MAX_GENERATORS)
    @rule(commit=st.booleans())
    @_step
    def new_generator(self, commit: bool) -> None:
        gen = Gen(f"gen-{len(self.gens) + 1}", commit)
        self.gens.append(gen)
        self.world.gens[gen.name] = self.world.body(commit)

    @rule()
    @_step
    def close_all(self) -> None:
        expected = 0
        for owner in self.owners:
            if owner.state != "gone" and owner.held is not None:
                self._remove(owner)
                expected += 1
        assert greenscope.close_all(shutdown=False) == expected

    @precondition(lambda self: bool(self.forgotten))
    @rule(data=st.data())
    @_step
    def close_forgotten(self, data: st.DataObject) -> None:
        self._close_forgotten(data.draw(st.integers(0, len(self.forgotten) - 1), label="which"))

    @rule(data=st.data())
    @_step
    def thread(self, data: st.DataObject) -> None:
        hub = data.draw(st.sampled_from(["none", "first", "later"]), label="hub")
        destroy = hub != "none" and data.draw(st.booleans(), label="destroy the hub at the end")
        script = self._script(data, hub=hub == "later", gens=True)
        if hub == "first":
            script.insert(0, Cmd("hub"))
        owner = self._owner("thread")
        expects = [(cmd, self._apply(owner, cmd)) for cmd in script[:-1]]
        self._unwind(owner, failed=script[-1].op == "raise")
        chan = ScriptChannel(script)
        errors: list[BaseException] = []

        def target() -> None:
            try:
                self.world.serve(chan)
            except Boom:
                pass
            except BaseException as exc:  # reported by the test, not by threading
                errors.append(exc)
            finally:
                current_hub = _cleanup.hub_if_exists()
                if destroy and current_hub is not None:
                    current_hub.destroy(destroy_loop=True)

        t = threading.Thread(target=target, name=owner.name, daemon=True)
        t.start()
        t.join(WAIT)
        assert not t.is_alive(), f"{owner} did not end"
        assert not errors, errors
        self._bind()
        self._reap(owner)  # its thread ended: what it held is an orphan
        assert len(chan.reports) == len(expects)
        for (cmd, expect), report in zip(expects, chan.reports, strict=True):
            self._check(owner, cmd, expect, report)

    @rule(data=st.data())
    @_step
    def pool_task(self, data: st.DataObject) -> None:
        # No generators: a pool's worker greenlet outlives its task, so a scope entered by
        # one task and exited by the next is exited in the greenlet that entered it.
        # Whatever the task does inside its scope (remove, set, clear, then a new Session)
        # must be gone when the scope ends, or the next task on that worker would get it
        # (test_a_session_made_after_remove_in_a_scope_does_not_reach_the_next_task).
        script = self._script(data, hub=False, gens=False)
        owner = self._owner("pool")
        owner.entries.append(self._enter(owner, commit=False))  # the task's session_scope
        expects = [(cmd, self._apply(owner, cmd)) for cmd in script[:-1]]
        self._unwind(owner, failed=script[-1].op == "raise")
        assert owner.held is None, "the task's scope removes whatever it holds"
        chan = ScriptChannel(script)
        Session = self.Session

        def task() -> None:
            with greenscope.session_scope(Session):
                self.world.serve(chan)

        result = self.threadpool.spawn(task)
        try:
            result.get(timeout=WAIT)
        except Boom:
            assert script[-1].op == "raise"
        else:
            assert script[-1].op == "end"
        self._bind()
        owner.state = "gone"
        for (cmd, expect), report in zip(expects, chan.reports, strict=True):
            self._check(owner, cmd, expect, report)
        assert len(chan.reports) == len(expects)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def settled(self) -> None:
        self.healthy = False
        assert greenscope.wait_reaped(WAIT), "the reaper did not finish in time"
        self._bind()
        live = sum(o.state != "gone" and o.held is not None for o in self.owners)
        stats = self.world.registry.stats()
        assert stats == greenscope.RegistryStats(
            created=self.created, removed=self.removed, reaped=self.reaped, live=live
        ), f"{stats} != the model's created={self.created} removed={self.removed} " + (
            f"reaped={self.reaped} live={live}"
        )
        assert stats.created == stats.removed + stats.reaped + stats.live
        connected = [m for m in self.sessions if m.connected]
        assert self.db.checkedout() == len(connected), f"checked out: {connected}"
        assert self.db.invalidated == self.invalidated_before, "a close failed"
        for model in self.sessions:
            real = model.real
            assert real is not None
            assert real.closes <= 1, f"{model} closed {real.closes} times"
            assert (real.closes, real.test_closes, real.commits) == (
                model.closes,
                model.test_closes,
                model.commits,
            ), f"{model}: (closes, test closes, commits)"
            for thread, in_hub in real.close_sites:
                assert not in_hub, f"{model} was closed in a hub"
                if model.owner.kind in ("main", "gevent", "raw"):
                    assert thread == self.main_thread, f"{model} closed off its thread"
        self.healthy = True

    # -- teardown -------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.healthy:
                self._finish()
        finally:
            self._scrub()

    def _finish(self) -> None:
        """End every owner through the model, then check that everything was closed once."""
        for owner in list(self.owners):
            if owner.state == "running" and owner.kind == "gevent":
                self._end_gevent(owner, "kill", keep=False)
            elif owner.state == "running" and owner.kind == "raw":
                self._end_raw(owner, "kill", "drop")
            elif owner.state == "kept":
                self._release(owner)
        for gen in self.gens:
            if gen.state != "dropped":
                self._send(self.main, Cmd("gen_drop", gen.name))
        self._send(self.main, Cmd("remove"))
        self._send(self.main, Cmd("gc"))
        while self.forgotten:
            self._close_forgotten(0)
        self.settled()
        self.finished = True
        assert self.db.checkedout() == 0
        assert self.world.registry.stats().live == 0
        for model in self.sessions:
            assert model.real is not None
            assert model.real.closes + model.real.test_closes >= 1, f"{model} never closed"
            assert model.real.closes <= 1, f"{model} closed twice"

    def _scrub(self) -> None:
        """Best effort, after a failure too: nothing of this example reaches the next."""
        for owner in self.owners:
            g, owner.greenlet = owner.greenlet, None
            if g is None or g.dead:
                continue
            if owner.kind == "gevent":
                g.kill(block=True, timeout=WAIT)
            else:
                with contextlib.suppress(BaseException):  # a failing example's: reported
                    g.throw(GreenletExit)
        self.world.gens.clear()
        try:
            self.Session.remove()
        finally:
            if not self.finished:
                gc.collect()  # what a failing example left in cycles
            greenscope.wait_reaped(WAIT)
            greenscope.close_all(shutdown=False)
            for session in self.made:  # after a failure, some may still hold a connection
                session.close_by_test()


# -- the test -------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[CountingEngine]:
    """A file SQLite database whose pool outnumbers what the machine's owners can hold."""
    engine = create_engine(
        f"sqlite:///{tmp_path / 'model.db'}",
        poolclass=QueuePool,
        pool_size=POOL_SIZE,
        max_overflow=0,
        pool_timeout=WAIT,
    )
    yield CountingEngine(engine)
    greenscope.wait_reaped(WAIT)
    greenscope.close_all(shutdown=False)
    engine.dispose()


@pytest.fixture
def quiet_boom() -> Iterator[None]:
    """The hub does not print the tracebacks of greenlets and tasks that raise Boom."""
    hub = gevent.get_hub()
    hub.NOT_ERROR = (*type(hub).NOT_ERROR, Boom)
    yield
    del hub.NOT_ERROR


@pytest.fixture
def threadpool() -> Iterator[Any]:
    pool = gevent.threadpool.ThreadPool(2)
    yield pool
    pool.kill()


@pytest.mark.timeout(max(60, 3 * EXAMPLES))
def test_registry_and_cleanup_follow_the_model(
    db: CountingEngine, threadpool: Any, quiet_boom: None
) -> None:
    """Random owners and actions keep the model's Sessions, counters and pool count exact."""

    class Machine(RegistryMachine):
        pass

    Machine.db = db
    Machine.threadpool = threadpool
    enabled = gc.isenabled()
    gc.disable()  # greenlets are freed when the model says: by refcount or a `gc` command
    gc.freeze()  # and a `gc` command only scans what the machine made: fast
    try:
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=30,
                deadline=None,
                derandomize=not RANDOM,
                database=None,
                report_multiple_bugs=False,  # shrink one failure, quickly
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no explain:
                # it traces every line of a failing case again, for minutes
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            ),
        )
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
        gc.collect()
    assert db.checkedout() == 0


# -- what the machine found: focused reproductions ------------------------------------------------


def test_a_session_made_after_remove_in_a_scope_does_not_reach_the_next_task(
    sqlite_db: CountingEngine,
) -> None:
    """A thread-pool task's scope leaves nothing to the next task, whatever ran inside it."""
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine))
    pool = gevent.threadpool.ThreadPool(1)  # one worker greenlet runs both tasks
    seen: list[orm.Session] = []

    def first() -> None:
        with greenscope.session_scope(Session, commit=True):
            Session.execute(text("SELECT 1"))
            Session.remove()  # a helper that ends "its" unit of work
            Session.execute(text("INSERT INTO items (owner) VALUES ('first')"))  # a new Session
            seen.append(Session())

    def second() -> None:
        with greenscope.session_scope(Session) as session:
            seen.append(session)

    def cleanup() -> None:
        Session.remove()

    try:
        pool.spawn(first).get(timeout=WAIT)
        after_first = (sqlite_db.checkedout(), sqlite_db.count_rows())
        pool.spawn(second).get(timeout=WAIT)
        assert seen[1] is not seen[0], "the second task got the first task's Session"
        assert after_first == (0, 1), "(checked out, committed rows) after the first task"
    finally:
        pool.spawn(cleanup).get(timeout=WAIT)
        pool.kill()


def test_a_session_removed_inside_its_scope_is_closed_once(sqlite_db: CountingEngine) -> None:
    """remove() inside a scope closes its Session; the scope's exit does not close it again."""
    Session = greenscope.scoped_session(sessionmaker(sqlite_db.engine, class_=CountingSession))
    with greenscope.session_scope(Session) as session:
        Session.execute(text("SELECT 1"))
        Session.remove()
    assert session.closes == 1
