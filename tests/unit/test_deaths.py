"""The death watch over fakes: what a container's death means for its chat (pure), and the
watch that follows the engine's events, records `lost`, keeps the handlers off dead
containers and catches up after the engine comes back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import queue
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import msgspec
import pytest

from services.runtime.containers import ContainerIdentity, container_name
from services.runtime.deaths import ContainerDeath, DeathAwareLog, DeathWatch, Park, decide_death, lost_msg_id
from services.runtime.decisions import Policy
from services.runtime.docker_driver import ContainerEvent, ExitState, ObservedContainer
from services.runtime.handlers import CommandHandlers, HandlerDeps
from services.runtime.losses import MarkLost
from shared.config import SandboxSettings
from shared.contracts import (
    AnyEvent,
    CreateResult,
    CreateSandbox,
    ErrorInfo,
    ErrorType,
    KeepaliveSandbox,
    LostReason,
    RejectReason,
    SandboxLost,
    SandboxProvisioning,
    SandboxRunning,
    SandboxStopped,
    SandboxStopping,
    SessionRecord,
    SessionStatus,
)
from shared.errors import DockerUnavailable, NatsUnavailable
from tests.support.eventually import holds, until
from tests.support.records import T0, session_record
from tests.unit.fakes_runtime import FakeClock, FakeDriver, FakeHandled, FakeStore

NODE = "node-a"
POLICY = Policy(NODE, "img", timedelta(minutes=5), timedelta(hours=1), timedelta(seconds=60))


def event_of(cls: type[AnyEvent], session: SessionRecord, seq: int = 0, **fields: object) -> AnyEvent:
    return cls(
        event_id=str(uuid.uuid4()),
        chat_id=session.chat_id,
        session_id=session.session_id,
        causation_id=str(uuid.uuid4()),
        occurred_at=T0,
        node_id=session.node_id,
        session=msgspec.structs.replace(session, version=seq),
        **fields,  # type: ignore[arg-type]
    )


def death_of(session: SessionRecord, **fields: object) -> ContainerDeath:
    values: dict[str, object] = {
        "chat_id": session.chat_id,
        "session_id": session.session_id,
        "container_id": session.container_id or "c-none",
        "exit_code": 137,
        "oom_killed": False,
        "removed": False,
        "noticed_at": 0.0,
    }
    return ContainerDeath(**{**values, **fields})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- decide_death


def test_a_running_session_whose_container_died_is_lost_with_how_it_ended() -> None:
    session = session_record(node_id=NODE)
    decision = decide_death(event_of(SandboxRunning, session), death_of(session, oom_killed=True), NODE)
    assert isinstance(decision, MarkLost)
    assert (decision.session, decision.reason, decision.container_id) == (
        session,
        LostReason.CONTAINER_EXITED,
        session.container_id,
    )
    assert decision.error == ErrorInfo(
        ErrorType.CONTAINER_STATE, "exited with code 137, killed by the OOM killer", exit_code=137, oom_killed=True
    )


def test_a_container_removed_without_a_death_seen_is_missing() -> None:
    session = session_record(node_id=NODE)
    death = death_of(session, exit_code=None, oom_killed=None, removed=True)
    decision = decide_death(event_of(SandboxRunning, session), death, NODE)
    assert isinstance(decision, MarkLost)
    assert decision.reason == LostReason.CONTAINER_MISSING
    assert decision.error.exit_code is None


@pytest.mark.parametrize(
    ("why", "last", "fields"),
    [
        ("our own stop claimed it first", SandboxStopping, {"status": SessionStatus.STOPPING}),
        ("already stopped", SandboxStopped, {"status": SessionStatus.STOPPED}),
        ("already lost", SandboxLost, {"status": SessionStatus.LOST}),
        ("another node's session", SandboxRunning, {"node_id": "node-b"}),
        ("another container of the session", SandboxRunning, {"container_id": "c-other"}),
        ("another session of the chat", SandboxRunning, {"session_id": str(uuid.uuid4())}),
    ],
)
def test_a_death_that_is_not_behind_our_back_changes_nothing(
    why: str, last: type[AnyEvent], fields: dict[str, object]
) -> None:
    died = session_record(node_id=NODE)
    now = msgspec.structs.replace(died, **fields)
    assert decide_death(event_of(last, now), death_of(died), NODE) is None, why
    assert decide_death(None, death_of(died), NODE) is None


def test_a_death_during_its_own_create_waits_for_the_create() -> None:
    claim = session_record(node_id=NODE, status=SessionStatus.PROVISIONING)
    assert isinstance(decide_death(event_of(SandboxProvisioning, claim), death_of(claim), NODE), Park)


# --------------------------------------------------------------------------- the watch


class FakeStream:
    """Blocks like the engine's stream; `end()` is the engine going away."""

    _END = object()

    def __init__(self) -> None:
        self._q: queue.Queue[object] = queue.Queue()

    def put(self, event: ContainerEvent) -> None:
        self._q.put(event)

    def end(self) -> None:
        self._q.put(self._END)

    def __iter__(self) -> Iterator[ContainerEvent]:
        while (item := self._q.get()) is not self._END:
            assert isinstance(item, ContainerEvent)
            yield item

    def close(self) -> None:
        self.end()


@dataclass
class FakeEngine:
    streams: list[FakeStream] = field(default_factory=list)
    opened_since: list[int | None] = field(default_factory=list)
    refuse_opens: int = 0
    listed: list[ObservedContainer] = field(default_factory=list)
    states: dict[str, ExitState] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def open_events(self, node_id: str, since_ns: int | None) -> FakeStream:
        assert node_id == NODE
        if self.refuse_opens:
            self.refuse_opens -= 1
            raise DockerUnavailable("the engine is down")
        self.opened_since.append(since_ns)
        self.streams.append(FakeStream())
        return self.streams[-1]

    async def exit_state(self, container_id: str) -> ExitState | None:
        return self.states.get(container_id)

    async def list_managed(self, node_id: str) -> list[ObservedContainer]:
        assert node_id == NODE
        return list(self.listed)

    async def remove(self, identity: ContainerIdentity, stop_timeout_seconds: int, ref: str | None = None) -> None:
        assert ref is not None
        assert identity.node_id == NODE
        assert stop_timeout_seconds >= 0
        self.removed.append(ref)


def engine_event(action: str, session: SessionRecord, *, exit_code: int | None = None, at: int = 1) -> ContainerEvent:
    return ContainerEvent(
        action=action,
        container_id=session.container_id or "",
        name=container_name(session.session_id),
        chat_id=session.chat_id,
        session_id=session.session_id,
        node_id=NODE,
        exit_code=exit_code,
        time_ns=at,
    )


@dataclass
class Watched:
    store: FakeStore
    engine: FakeEngine
    watch: DeathWatch
    reconciled: list[int]

    async def append(self, cls: type[AnyEvent], session: SessionRecord, **fields: object) -> int:
        state = await self.store.read(session.chat_id)
        event = event_of(cls, session, state.seq, **fields)
        return (await self.store.append(event, expected_seq=state.seq, msg_id=event.event_id)).seq

    def lost(self, session: SessionRecord) -> list[AnyEvent]:
        return [e for e in self.store.events(session.chat_id) if isinstance(e, SandboxLost)]

    async def running(self) -> SessionRecord:
        session = session_record(node_id=NODE, container_id=f"c-{uuid.uuid4().hex}")
        await self.append(SandboxRunning, session)
        return session


@contextlib.asynccontextmanager
async def watching(first_backoff: float = 0.01) -> AsyncIterator[Watched]:
    store = FakeStore(FakeClock())
    engine = FakeEngine()
    ids = itertools.count(1)
    watch = DeathWatch(
        store,
        engine,
        store.clock,
        node_id=NODE,
        stop_timeout_seconds=1,
        park_seconds=60,
        first_backoff=first_backoff,
        max_backoff=max(first_backoff, 0.05),
        new_id=lambda: f"lost-{next(ids)}",
    )
    reconciled: list[int] = []

    async def reconcile() -> None:
        reconciled.append(1)

    watch.reconcile_after_reconnect(reconcile)
    stopping = asyncio.Event()
    task = asyncio.create_task(watch.run(stopping))
    await asyncio.wait_for(watch.connected.wait(), 5)
    try:
        yield Watched(store, engine, watch, reconciled)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)


@pytest.fixture
async def watched() -> AsyncIterator[Watched]:
    async with watching() as running:
        yield running


async def test_a_container_killed_behind_our_back_is_recorded_lost(watched: Watched) -> None:
    session = await watched.running()
    stream = watched.engine.streams[-1]
    stream.put(engine_event("oom", session))
    stream.put(engine_event("die", session, exit_code=137))

    await until(lambda: bool(watched.lost(session)), what="the lost event")
    (lost,) = watched.lost(session)
    assert lost.reason == LostReason.CONTAINER_EXITED
    assert lost.error == ErrorInfo(
        ErrorType.CONTAINER_STATE, "exited with code 137, killed by the OOM killer", exit_code=137, oom_killed=True
    )
    assert lost.session is not None
    assert lost.session.status == SessionStatus.LOST
    assert lost.causation_id is None
    assert lost_msg_id(session.chat_id, session.session_id) in watched.store.msg_ids
    await until(lambda: watched.engine.removed == [session.container_id], what="the dead container removed")
    # Its removal reports a `destroy`: nothing more happens.
    stream.put(engine_event("destroy", session))
    await holds(lambda: _count(watched, session), lambda n: n == 1, seconds=0.2, what="one lost")


async def _count(watched: Watched, session: SessionRecord) -> int:
    return len(watched.lost(session))


async def test_what_docker_inspect_says_beats_the_event(watched: Watched) -> None:
    session = await watched.running()
    assert session.container_id is not None
    watched.engine.states[session.container_id] = ExitState(
        running=False, exit_code=137, oom_killed=True, status="exited"
    )
    watched.engine.streams[-1].put(engine_event("die", session, exit_code=137))
    await until(lambda: bool(watched.lost(session)), what="the lost event")
    error = watched.lost(session)[0].error
    assert error is not None
    assert (error.exit_code, error.oom_killed) == (137, True)


async def test_our_own_stop_records_no_lost(watched: Watched) -> None:
    session = await watched.running()
    await watched.append(SandboxStopping, msgspec.structs.replace(session, status=SessionStatus.STOPPING))
    watched.engine.streams[-1].put(engine_event("die", session, exit_code=143))
    watched.engine.streams[-1].put(engine_event("destroy", session))
    await holds(lambda: _count(watched, session), lambda n: n == 0, seconds=0.3, what="no lost")
    assert watched.watch.pending_death(await watched.store.read(session.chat_id)) is None
    assert watched.engine.removed == []


async def test_a_container_started_again_is_not_lost(watched: Watched) -> None:
    session = await watched.running()
    assert session.container_id is not None
    watched.engine.states[session.container_id] = ExitState(running=True, exit_code=0, oom_killed=False, status="")
    watched.engine.streams[-1].put(engine_event("die", session, exit_code=1))
    await holds(lambda: _count(watched, session), lambda n: n == 0, seconds=0.3, what="no lost")


async def test_a_dead_container_is_never_reused_while_its_lost_is_not_recorded() -> None:
    """The `lost` append fails (NATS is away) and its retry is far off: the create reads the
    chat through the death-aware log, which records `lost` first; the create then makes a
    new session instead of answering with the dead container. A keepalive is refused."""
    async with watching(first_backoff=3600) as watched:
        await _never_reused(watched)


async def _never_reused(watched: Watched) -> None:
    session = await watched.running()
    clock = watched.store.clock
    handlers = CommandHandlers(
        HandlerDeps(
            DeathAwareLog(watched.store, watched.watch),
            FakeDriver(),
            clock,
            POLICY,
            SandboxSettings(),
            handled=FakeHandled(),
        )
    )
    keepalive_first = KeepaliveSandbox(command_id=uuid.uuid4(), chat_id=uuid.UUID(session.chat_id))
    create = CreateSandbox(command_id=uuid.uuid4(), chat_id=uuid.UUID(session.chat_id))
    watched.store.fail_next["lost"].append(NatsUnavailable("away"))
    watched.engine.streams[-1].put(engine_event("die", session, exit_code=137))
    await until(lambda: watched.watch.pending_count == 1, what="the death noticed")
    await until(lambda: not watched.store.fail_next["lost"], what="the first lost append failed")
    assert watched.lost(session) == []

    async def progress() -> None:
        return None

    refused = await handlers.handle(keepalive_first, progress)
    assert refused is not None
    assert refused.reason == RejectReason.NO_LIVE_SESSION
    outcome = await handlers.handle(create, progress)

    assert isinstance(outcome, SandboxRunning)
    assert outcome.result == CreateResult.CREATED
    assert outcome.session is not None
    assert outcome.session.session_id != session.session_id
    types = watched.store.types(session.chat_id)
    assert types[:2] == ["running", "lost"], types


async def test_a_container_dead_before_its_running_landed_is_lost_right_after(watched: Watched) -> None:
    claim = session_record(node_id=NODE, status=SessionStatus.PROVISIONING, container_id=None)
    await watched.append(SandboxProvisioning, claim)
    running = msgspec.structs.replace(claim, status=SessionStatus.RUNNING, container_id=f"c-{uuid.uuid4().hex}")
    watched.engine.streams[-1].put(engine_event("die", running, exit_code=1))
    await until(lambda: watched.watch.pending_count == 1, what="the death parked")
    await holds(lambda: _count(watched, claim), lambda n: n == 0, seconds=0.2, what="no lost while provisioning")

    log = DeathAwareLog(watched.store, watched.watch)
    state = await watched.store.read(claim.chat_id)
    event = event_of(SandboxRunning, running, state.seq, result=CreateResult.CREATED)
    await log.append(event, expected_seq=state.seq, msg_id="outcome")

    await until(lambda: bool(watched.lost(claim)), what="the lost after the running")
    assert watched.store.types(claim.chat_id) == ["provisioning", "running", "lost"]


async def test_the_watch_reconnects_and_catches_up_on_what_it_missed(watched: Watched) -> None:
    dies_while_away = await watched.running()
    seen = await watched.running()
    assert dies_while_away.container_id is not None
    first_since = watched.engine.opened_since[0]
    assert first_since is not None
    last_event_at = first_since + 5_000_000_000
    watched.engine.streams[-1].put(engine_event("die", seen, exit_code=0, at=last_event_at))
    await until(lambda: bool(watched.lost(seen)), what="the death seen live")
    assert watched.reconciled == [], "no extra reconciliation on the first connection"

    # The engine restarts: the stream ends, the first reconnects are refused.
    watched.engine.refuse_opens = 2
    watched.engine.listed = [
        ObservedContainer(
            dies_while_away.container_id,
            container_name(dies_while_away.session_id),
            dies_while_away.chat_id,
            dies_while_away.session_id,
            "exited",
            "Exited (137) 1 second ago",
            NODE,
        )
    ]
    watched.engine.streams[-1].end()

    await until(lambda: len(watched.engine.opened_since) == 2, what="the reconnect")
    assert watched.engine.opened_since[1] == last_event_at, "it asks for what happened since its last event"
    await until(lambda: bool(watched.lost(dies_while_away)), what="the death it missed")
    await until(lambda: watched.reconciled == [1], what="a reconciliation pass after the reconnect")
    assert watched.watch.connections == 2


async def test_events_of_containers_not_made_by_us_are_ignored(watched: Watched) -> None:
    session = await watched.running()
    forged = dataclasses.replace(engine_event("die", session, exit_code=1), name="not-ours")
    watched.engine.streams[-1].put(forged)
    watched.engine.streams[-1].put(dataclasses.replace(forged, name=container_name(session.session_id), chat_id="x"))
    await holds(lambda: _count(watched, session), lambda n: n == 0, seconds=0.2, what="no lost")
