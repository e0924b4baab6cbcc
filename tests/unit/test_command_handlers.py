"""The command handlers over in-memory fakes: the seed's use cases, translated."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import timedelta

import msgspec
import pytest

from services.runtime.capacity import NodeCapacity
from services.runtime.containers import ContainerSpec, container_name
from services.runtime.decisions import Policy
from services.runtime.handlers import CommandHandlers, Delivery, HandlerDeps
from shared.commands import MalformedCommand
from shared.config import SandboxSettings
from shared.contracts import (
    AnyCommand,
    AnyEvent,
    CommandRejected,
    CreateResult,
    CreateSandbox,
    KeepaliveSandbox,
    LostReason,
    Placement,
    PreviousSession,
    RejectReason,
    SandboxFailed,
    SandboxLost,
    SandboxProvisioning,
    SandboxRunning,
    SandboxStopped,
    SandboxStopping,
    SessionStatus,
    StopSandbox,
    is_outcome,
)
from shared.errors import (
    DockerUnavailable,
    Forward,
    NatsUnavailable,
    SandboxStartFailed,
    SandboxStopFailed,
    WrongNode,
)
from shared.nodes import NodeState
from shared.subjects import INVALID_EVENTS_SUBJECT
from tests.support.eventually import until
from tests.unit.fakes_runtime import FakeClock, FakeDriver, FakeHandled, FakeStore

POLICY = Policy("node-a", "img", timedelta(minutes=5), timedelta(hours=1), timedelta(seconds=60))


class World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = FakeStore(self.clock)
        self.driver = FakeDriver()
        self.handled = FakeHandled()
        ids = itertools.count(1)
        self.handlers = CommandHandlers(
            HandlerDeps(self.store, self.driver, self.clock, POLICY, SandboxSettings(), handled=self.handled),
            new_id=lambda: f"id-{next(ids)}",
        )
        self.progress_calls = 0

    async def progress(self) -> None:
        self.progress_calls += 1

    async def create(self, chat: uuid.UUID, **kw: object) -> CreateSandbox:
        command = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat), **kw}, CreateSandbox)
        await self.handlers.handle(command, self.progress)
        return command

    async def stop(self, chat: uuid.UUID, **kw: object) -> StopSandbox:
        command = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat), **kw}, StopSandbox)
        await self.handlers.handle(command, self.progress)
        return command

    def outcome(self, chat: uuid.UUID, command_id: uuid.UUID) -> AnyEvent:
        found = [e for e in self.store.events(str(chat)) if e.causation_id == str(command_id) and is_outcome(e)]
        assert len(found) == 1, found
        return found[0]


def hold_starts(driver: FakeDriver) -> asyncio.Event:
    """Container starts wait until the returned event is set."""
    gate = asyncio.Event()
    original = driver.ensure_running

    async def held(spec: ContainerSpec) -> str:
        await gate.wait()
        return await original(spec)

    driver.ensure_running = held  # type: ignore[method-assign]
    return gate


@pytest.fixture
def world() -> World:
    return World()


async def test_create_then_reuse(world: World) -> None:
    chat = uuid.uuid4()
    first = await world.create(chat)
    running = world.outcome(chat, first.command_id)
    assert isinstance(running, SandboxRunning)
    assert running.result == CreateResult.CREATED
    assert running.session is not None
    assert running.session.status == SessionStatus.RUNNING
    assert running.session.container_id == f"id-{container_name(running.session.session_id)}"
    assert running.session.version == 1, "an event's session names the sequence it was decided from"
    second = await world.create(chat)
    reused = world.outcome(chat, second.command_id)
    assert reused.type == "reused"
    assert reused.session == running.session.__class__(**{**msgspec.structs.asdict(running.session), "version": 2})
    assert world.store.types(str(chat)) == ["provisioning", "running", "reused"]
    assert len(world.driver.started) == 1


async def test_concurrent_duplicate_creates_make_one_container(world: World) -> None:
    chat = uuid.uuid4()
    commands = await asyncio.gather(*(world.create(chat) for _ in range(20)))
    outcomes = [world.outcome(chat, c.command_id) for c in commands]
    assert sorted(o.type for o in outcomes) == ["reused"] * 19 + ["running"]
    assert len(world.driver.started) == 1
    assert len({o.session.session_id for o in outcomes if o.session}) == 1


async def test_expired_session_is_replaced_and_the_old_container_removed(world: World) -> None:
    chat = uuid.uuid4()
    first = world.outcome(chat, (await world.create(chat, ttl_seconds=60)).command_id)
    assert first.session is not None
    world.clock.advance(60)  # expires_at == now: expired
    replaced = world.outcome(chat, (await world.create(chat)).command_id)
    assert isinstance(replaced, SandboxRunning)
    assert replaced.result == CreateResult.REPLACED
    assert replaced.previous == PreviousSession(first.session.session_id, first.session.container_id)
    assert replaced.session is not None
    assert replaced.session.session_id != first.session.session_id
    assert first.session.container_id in world.driver.removed
    assert list(world.driver.running.values()) == [replaced.session.container_id]
    assert world.store.types(str(chat)) == ["provisioning", "running", "stopping", "provisioning", "running"]


async def overtake(world: World, chat: uuid.UUID, *events: type[AnyEvent]) -> None:
    """Another command appends `events` on the chat's current session (a stop's claim and
    outcome change its status; anything else carries it unchanged)."""
    cause = str(uuid.uuid4())
    statuses = {SandboxStopping: SessionStatus.STOPPING, SandboxStopped: SessionStatus.STOPPED}
    for cls in events:
        state = await world.store.read(str(chat))
        assert state.session is not None
        status = statuses.get(cls, state.session.status)
        event = cls(
            event_id=str(uuid.uuid4()),
            chat_id=str(chat),
            session_id=state.session.session_id,
            causation_id=cause,
            occurred_at=world.clock.now(),
            node_id="node-a",
            session=msgspec.structs.replace(state.session, status=status),
        )
        await world.store.append(event, expected_seq=state.seq, msg_id=event.event_id)


async def test_a_lost_running_append_removes_the_started_container(world: World) -> None:
    """The seed's 'save failed after create' case: while the container started, the claim was
    taken over and ended (another runtime judged ours dead); the untracked container is
    removed, and the create decides again."""
    chat = uuid.uuid4()
    gate = hold_starts(world.driver)
    task = asyncio.create_task(world.create(chat))
    await until(lambda: world.store.types(str(chat)) == ["provisioning"], what="the create's claim")
    await overtake(world, chat, SandboxStopping, SandboxStopped)
    gate.set()
    command = await task
    assert len(world.driver.started) == 2, "the lost container was removed, then the retry made a new one"
    assert world.driver.removed == [f"id-{world.driver.started[0]}"]
    outcome = world.outcome(chat, command.command_id)
    assert isinstance(outcome, SandboxRunning)
    assert outcome.session is not None
    assert list(world.driver.running.values()) == [outcome.session.container_id]


async def test_an_answer_landing_on_the_claim_does_not_cost_the_container(world: World) -> None:
    """Another command's answer (a keepalive refused while the session provisions) lands on
    the claim while the container starts: the claim is still the create's own, so it keeps
    its container and ends `running` on top of that answer."""
    chat = uuid.uuid4()
    gate = hold_starts(world.driver)
    task = asyncio.create_task(world.create(chat))
    await until(lambda: world.store.types(str(chat)) == ["provisioning"], what="the create's claim")
    await overtake(world, chat, CommandRejected)
    gate.set()
    command = await task
    assert world.driver.removed == []
    assert len(world.driver.started) == 1
    assert world.store.types(str(chat)) == ["provisioning", "rejected", "running"]
    outcome = world.outcome(chat, command.command_id)
    assert outcome.result == CreateResult.CREATED
    assert outcome.session is not None
    assert list(world.driver.running.values()) == [outcome.session.container_id]


async def test_nats_failing_after_the_start_keeps_the_container_for_the_retry(world: World) -> None:
    chat = uuid.uuid4()
    world.store.fail_next["running"].append(NatsUnavailable("gone"))
    command = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat)}, CreateSandbox)
    with pytest.raises(NatsUnavailable):
        await world.handlers.handle(command, world.progress)
    assert len(world.driver.running) == 1
    # The redelivery resumes its own claim and finds the same container by name.
    await world.handlers.handle(command, world.progress)
    assert len(world.driver.started) == 1
    assert world.outcome(chat, command.command_id).type == "running"


async def test_a_docker_failure_is_a_failed_outcome_and_leaves_nothing(world: World) -> None:
    chat = uuid.uuid4()
    world.driver.start_errors.append(SandboxStartFailed("image 'x' is not on this Docker engine"))
    outcome = world.outcome(chat, (await world.create(chat)).command_id)
    assert isinstance(outcome, SandboxFailed)
    assert outcome.error is not None
    assert outcome.error.type == "sandbox_start_failed"
    assert outcome.session is not None
    assert outcome.session.status == SessionStatus.FAILED
    assert world.driver.running == {}
    world.driver.start_errors.append(DockerUnavailable("no engine"))
    second = world.outcome(chat, (await world.create(chat)).command_id)
    assert second.error is not None
    assert second.error.type == "docker_unavailable"


async def test_stop_removes_the_container(world: World) -> None:
    chat = uuid.uuid4()
    running = world.outcome(chat, (await world.create(chat)).command_id)
    stopped = world.outcome(chat, (await world.stop(chat, reason="done")).command_id)
    assert stopped.type == "stopped"
    assert stopped.reason == "done"
    assert stopped.session is not None
    assert stopped.session.status == SessionStatus.STOPPED
    assert running.session is not None
    assert running.session.container_id in world.driver.removed
    assert world.driver.running == {}


async def test_a_failed_stop_keeps_the_record_on_the_container_and_is_retried(world: World) -> None:
    chat = uuid.uuid4()
    running = world.outcome(chat, (await world.create(chat)).command_id)
    assert running.session is not None
    world.driver.remove_errors.append(SandboxStopFailed("device busy"))
    failed = world.outcome(chat, (await world.stop(chat)).command_id)
    assert isinstance(failed, SandboxFailed)
    assert failed.session is not None
    assert failed.session.status == SessionStatus.STOPPING
    assert failed.session.container_id == running.session.container_id
    assert len(world.driver.running) == 1
    retried = world.outcome(chat, (await world.stop(chat)).command_id)
    assert retried.type == "stopped"
    assert world.driver.running == {}


async def test_a_stale_stop_changes_nothing(world: World) -> None:
    chat = uuid.uuid4()
    await world.create(chat)
    refused = world.outcome(chat, (await world.stop(chat, session_id=str(uuid.uuid4()))).command_id)
    assert isinstance(refused, CommandRejected)
    assert refused.reason == "stale_session"
    assert len(world.driver.running) == 1


async def test_handling_a_command_twice_gives_one_outcome(world: World) -> None:
    chat = uuid.uuid4()
    command = await world.create(chat)
    await world.stop(chat)
    await world.handlers.handle(command, world.progress)  # redelivered after its chat moved on
    assert len([e for e in world.store.events(str(chat)) if e.causation_id == str(command.command_id)]) == 2
    assert world.driver.running == {}


async def test_a_create_waits_for_a_claim_in_flight(world: World) -> None:
    chat = uuid.uuid4()
    gate = hold_starts(world.driver)
    first = asyncio.create_task(world.create(chat))
    await until(lambda: world.store.types(str(chat)) == ["provisioning"], what="the first create's claim")
    second = asyncio.create_task(world.create(chat))
    # The wait for the chat's turn reports progress each second; the claim holds meanwhile.
    await until(lambda: world.progress_calls > 0, what="a waiting command keeps its message in progress")
    assert not second.done()
    gate.set()
    await asyncio.gather(first, second)
    assert sorted(world.store.types(str(chat))) == ["provisioning", "reused", "running"]


async def test_malformed_commands_are_rejected_once(world: World) -> None:
    chat = str(uuid.uuid4())
    await world.handlers.reject_malformed(
        MalformedCommand(RejectReason.INVALID_JSON, "bad", chat_id=chat, command_id=None)
    )
    await world.handlers.reject_malformed(
        MalformedCommand(RejectReason.INVALID_SUBJECT, "bad", chat_id=None, command_id="c-1")
    )
    assert world.store.types(chat) == ["rejected"]
    invalid = world.store.subjects[INVALID_EVENTS_SUBJECT]
    assert [(s.event.type, s.event.reason, s.event.causation_id) for s in invalid] == [
        ("rejected", "invalid_subject", "c-1")
    ]


async def test_a_create_waits_for_another_process_claim(world: World) -> None:
    chat = uuid.uuid4()
    other = World()
    other.store = world.store  # a second runtime process sharing the log
    other.handlers = CommandHandlers(
        HandlerDeps(world.store, world.driver, world.clock, POLICY, SandboxSettings(), handled=world.handled),
        new_id=lambda: str(uuid.uuid4()),
    )
    gate = hold_starts(world.driver)
    first = asyncio.create_task(other.create(chat))
    await until(lambda: world.store.types(str(chat)) == ["provisioning"], what="the other process's claim")
    second = asyncio.create_task(world.create(chat))
    await until(lambda: world.progress_calls > 0, what="a command waiting on another claim stays in progress")
    assert not second.done()
    gate.set()
    await asyncio.gather(first, second)
    assert sorted(world.store.types(str(chat))) == ["provisioning", "reused", "running"]


async def test_only_the_owning_node_touches_a_container(world: World) -> None:
    chat = uuid.uuid4()
    node_b = CommandHandlers(
        HandlerDeps(
            world.store,
            world.driver,
            world.clock,
            Policy("node-b", "img", timedelta(minutes=5), timedelta(hours=1), timedelta(seconds=60)),
            SandboxSettings(),
            handled=world.handled,
        ),
    )
    created = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat)}, CreateSandbox)
    await node_b.handle(created, world.progress)
    before = world.store.types(str(chat))
    stop = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat)}, StopSandbox)
    with pytest.raises(WrongNode, match="node-b"):
        await world.handlers.handle(stop, world.progress)
    assert world.store.types(str(chat)) == before, "no claim, no event from the wrong node"
    assert len(world.driver.running) == 1
    await node_b.handle(stop, world.progress)
    assert world.store.types(str(chat))[-1] == "stopped"
    assert world.driver.running == {}


async def test_one_command_id_on_two_chats_gets_an_outcome_on_each(world: World) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    command_id = str(uuid.uuid4())
    for chat in (first, second):
        command = msgspec.convert({"command_id": command_id, "chat_id": str(chat)}, CreateSandbox)
        await world.handlers.handle(command, world.progress)
    assert world.outcome(first, uuid.UUID(command_id)).type == "running"
    assert world.outcome(second, uuid.UUID(command_id)).type == "running"


async def test_a_create_beyond_the_nodes_capacity_is_refused(world: World) -> None:
    async def live() -> set[str]:
        return {c.session_id for c in await world.driver.list_managed("node-a")}

    world.handlers = CommandHandlers(
        HandlerDeps(
            world.store,
            world.driver,
            world.clock,
            POLICY,
            SandboxSettings(),
            capacity=NodeCapacity(2, live),
            handled=world.handled,
        ),
        new_id=lambda: str(uuid.uuid4()),
    )
    chats = [uuid.uuid4() for _ in range(4)]
    commands = await asyncio.gather(*(world.create(chat) for chat in chats))
    outcomes = [world.outcome(chat, c.command_id) for chat, c in zip(chats, commands, strict=True)]
    refused = [o for o in outcomes if isinstance(o, CommandRejected)]
    assert sorted(o.type for o in outcomes) == ["rejected", "rejected", "running", "running"]
    assert {o.reason for o in refused} == {"capacity_exceeded"}
    assert all(o.error is not None and "2" in o.error.message for o in refused)
    assert len(world.driver.running) == 2
    # Reuse is not limited; a stop makes room for a chat that was refused.
    running = [c for c, o in zip(chats, outcomes, strict=True) if o.type == "running"]
    late = next(c for c, o in zip(chats, outcomes, strict=True) if o.type == "rejected")
    assert world.outcome(running[0], (await world.create(running[0])).command_id).type == "reused"
    await world.stop(running[0])
    assert world.outcome(late, (await world.create(late)).command_id).type == "running"
    assert len(world.driver.running) == 2


async def test_a_container_that_is_not_the_sessions_is_left_alone(world: World) -> None:
    chat, other = uuid.uuid4(), uuid.uuid4()
    mine = world.outcome(chat, (await world.create(chat)).command_id)
    theirs = world.outcome(other, (await world.create(other)).command_id)
    assert mine.session is not None
    assert theirs.session is not None
    # A record (forged, or corrupt) naming the other chat's session and container: a stop
    # must not remove the other chat's container.
    forged = msgspec.structs.replace(mine.session, session_id=theirs.session.session_id, container_id="anything")
    state = await world.store.read(str(chat))
    await world.store.append(
        SandboxRunning(
            event_id="forged",
            chat_id=str(chat),
            session_id=forged.session_id,
            causation_id=None,
            occurred_at=world.clock.now(),
            node_id="node-a",
            session=forged,
        ),
        expected_seq=state.seq,
        msg_id="forged",
    )
    assert world.outcome(chat, (await world.stop(chat)).command_id).type == "stopped"
    assert world.driver.left_alone == [container_name(theirs.session.session_id)]
    assert container_name(theirs.session.session_id) in world.driver.running


def new_command(cls: type[AnyCommand], chat: uuid.UUID, **kw: object) -> AnyCommand:
    return msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat), **kw}, cls)


async def test_handle_returns_the_outcome_it_appended(world: World) -> None:
    chat = uuid.uuid4()
    for command, kind in (
        (new_command(CreateSandbox, chat), "running"),
        (new_command(CreateSandbox, chat), "reused"),
        (new_command(KeepaliveSandbox, chat), "extended"),
        (new_command(StopSandbox, chat), "stopped"),
        (new_command(KeepaliveSandbox, chat), "rejected"),
    ):
        returned = await world.handlers.handle(command, world.progress)
        assert returned is not None
        assert returned.type == kind
        assert returned == world.outcome(chat, command.command_id)


async def test_handle_returns_none_when_the_outcome_was_given_before(world: World) -> None:
    chat = uuid.uuid4()
    create = new_command(CreateSandbox, chat)
    await world.handlers.handle(create, world.progress)
    assert await world.handlers.handle(create, world.progress) is None  # its outcome is the last event
    first, second = new_command(KeepaliveSandbox, chat), new_command(KeepaliveSandbox, chat)
    await world.handlers.handle(first, world.progress)
    await world.handlers.handle(second, world.progress)
    events = len(world.store.events(str(chat)))
    # Redelivered after another outcome: it decides again, and its outcome append is a duplicate.
    assert await world.handlers.handle(first, world.progress) is None
    assert len(world.store.events(str(chat))) == events
    await world.handlers.handle(new_command(StopSandbox, chat), world.progress)
    assert await world.handlers.handle(create, world.progress) is None  # found in the chat's history


async def test_only_a_command_that_may_have_been_handled_before_reads_the_chats_history(world: World) -> None:
    chat = uuid.uuid4()
    await world.handlers.handle(new_command(CreateSandbox, chat), world.progress)
    reads = world.store.history_reads
    # A client's message delivered for the first time: nothing handled it before.
    stopped = await world.handlers.handle(new_command(StopSandbox, chat), world.progress, Delivery(first=True))
    assert stopped is not None
    assert stopped.type == "stopped"
    created = await world.handlers.handle(new_command(CreateSandbox, chat), world.progress, Delivery(first=True))
    assert created is not None
    assert created.type == "running"
    assert world.store.history_reads == reads
    # A redelivery or a forwarded copy looks back before its claim.
    await world.handlers.handle(new_command(StopSandbox, chat), world.progress, Delivery())
    assert world.store.history_reads == reads + 1
    await world.handlers.handle(new_command(CreateSandbox, chat), world.progress, Delivery(hops=1))
    assert world.store.history_reads == reads + 2


async def test_a_command_sent_again_as_a_new_message_is_not_handled_twice(world: World) -> None:
    """Its first message was recorded as handled before its ack: a second message with the
    same command id (past the commands stream's duplicate window) finds it, history unread."""
    chat = uuid.uuid4()
    create = new_command(CreateSandbox, chat)
    await world.handlers.handle(create, world.progress, Delivery(first=True))
    await world.handlers.handle(new_command(StopSandbox, chat), world.progress, Delivery(first=True))
    events = len(world.store.events(str(chat)))
    assert await world.handlers.handle(create, world.progress, Delivery(first=True)) is None
    assert len(world.store.events(str(chat))) == events


class StubNodes:
    """Nodes as the handlers see them: fixed states, a fixed placement."""

    def __init__(self, here: str, states: dict[str, NodeState], place_on: str) -> None:
        self._here = here
        self.states = states
        self.place_on = place_on

    @property
    def node_id(self) -> str:
        return self._here

    def state(self, node_id: str) -> NodeState:
        return NodeState.ALIVE if node_id == self._here else self.states[node_id]

    def place(self) -> Placement:
        return Placement(node_id=self.place_on, placed_by=self._here, free=3, nodes=2)


def handlers_on(world: World, node: str, nodes: StubNodes) -> CommandHandlers:
    policy = Policy(node, "img", timedelta(minutes=5), timedelta(hours=1), timedelta(seconds=60))
    return CommandHandlers(
        HandlerDeps(
            world.store, world.driver, world.clock, policy, SandboxSettings(), handled=world.handled, nodes=nodes
        )
    )


async def test_a_create_placed_on_another_node_is_forwarded_with_its_placement(world: World) -> None:
    chat = uuid.uuid4()
    here = handlers_on(world, "node-a", StubNodes("node-a", {"node-b": NodeState.ALIVE}, place_on="node-b"))
    create = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat)}, CreateSandbox)
    with pytest.raises(Forward) as forwarded:
        await here.handle(create, world.progress)
    assert forwarded.value.node_id == "node-b"
    assert forwarded.value.placement is not None
    assert forwarded.value.placement.placed_by == "node-a"
    assert world.store.types(str(chat)) == [], "nothing recorded by the node that placed it"
    there = handlers_on(world, "node-b", StubNodes("node-b", {"node-a": NodeState.ALIVE}, place_on="node-a"))
    await there.handle(create, world.progress, Delivery(placement=forwarded.value.placement, hops=1))
    claim = world.store.events(str(chat))[0]
    assert isinstance(claim, SandboxProvisioning)
    assert claim.placement == forwarded.value.placement, "the placed node claims it, recording the choice"
    assert world.store.types(str(chat)) == ["provisioning", "running"]


async def test_a_command_for_another_nodes_session_is_forwarded_waits_or_loses_it(world: World) -> None:
    chat = uuid.uuid4()
    nodes = StubNodes("node-a", {"node-b": NodeState.ALIVE}, place_on="node-a")
    node_b = handlers_on(world, "node-b", StubNodes("node-b", {}, place_on="node-b"))
    await node_b.handle(
        msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat)}, CreateSandbox), world.progress
    )
    node_a = handlers_on(world, "node-a", nodes)
    stop = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat)}, StopSandbox)
    with pytest.raises(Forward, match="node-b"):
        await node_a.handle(stop, world.progress)
    nodes.states["node-b"] = NodeState.SILENT
    with pytest.raises(WrongNode, match="node-b"):
        await node_a.handle(stop, world.progress)
    assert world.store.types(str(chat)) == ["provisioning", "running"], "nothing recorded while it is another's"
    nodes.states["node-b"] = NodeState.DEAD
    await node_a.handle(stop, world.progress)
    lost, rejected = world.store.events(str(chat))[-2:]
    assert isinstance(lost, SandboxLost)
    assert lost.reason == LostReason.NODE_LOST
    assert isinstance(rejected, CommandRejected)
    assert rejected.reason == RejectReason.NO_LIVE_SESSION
    assert len(world.driver.running) == 1, "node-a never touches node-b's container"
