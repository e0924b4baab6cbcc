"""Claims owned by live instances, over the fakes: a claim names its instance; a claim of a
dead instance is taken over at once, one of a live instance is waited on (outside the chat's
turn); the claim's own command, resumed after a crash, finishes it; the heartbeat is read only
for another instance's claim."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import cast

import msgspec
import pytest
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from services.runtime.containers import ContainerIdentity, container_spec
from services.runtime.decisions import Policy
from services.runtime.handlers import CommandHandlers, HandlerDeps
from shared.config import SandboxSettings
from shared.contracts import (
    AnyCommand,
    AnyEvent,
    CommandRejected,
    CreateResult,
    CreateSandbox,
    InstanceHeartbeat,
    KeepaliveSandbox,
    RejectReason,
    SandboxExtended,
    SandboxProvisioning,
    SandboxReused,
    SandboxRunning,
    SandboxStopped,
    SandboxStopping,
    SessionStatus,
    StopSandbox,
    decode_heartbeat,
    encode,
    is_outcome,
)
from shared.instances import Instances, Liveness, judge
from tests.support.eventually import until
from tests.support.records import T0, session_record
from tests.unit.fakes_runtime import FakeClock, FakeDriver, FakeHandled, FakeStore

NODE = "node-a"
POLICY = Policy(NODE, "img", timedelta(minutes=5), timedelta(hours=1), timedelta(seconds=60))
SETTINGS = SandboxSettings()
HANDLE_TIMEOUT = 10.0  # generous: a command that never takes a claim over would hang the test
GONE = str(uuid.uuid4())  # an instance that crashed


@dataclass
class FakeInstances:
    """This instance, and what the heartbeats of the others say (unknown ids: dead)."""

    instance_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    others: dict[str, Liveness] = field(default_factory=dict)
    lookups: list[str] = field(default_factory=list)

    async def liveness(self, instance_id: str) -> Liveness:
        await asyncio.sleep(0)
        self.lookups.append(instance_id)
        return self.others.get(instance_id, Liveness.DEAD)


class Node:
    def __init__(self) -> None:
        self.clock = FakeClock(T0)
        self.store = FakeStore(self.clock)
        self.driver = FakeDriver()
        self.instances = FakeInstances()
        ids = itertools.count(1)
        self.handlers = CommandHandlers(
            HandlerDeps(
                self.store, self.driver, self.clock, POLICY, SETTINGS, handled=FakeHandled(), instances=self.instances
            ),
            new_id=lambda: str(uuid.UUID(int=next(ids))),
        )
        self.progress_calls = 0

    async def progress(self) -> None:
        self.progress_calls += 1

    def command(self, cls: type[AnyCommand], chat: str, command_id: str | None = None) -> AnyCommand:
        return msgspec.convert({"command_id": command_id or str(uuid.uuid4()), "chat_id": chat}, cls)

    async def handle(self, command: AnyCommand) -> AnyEvent | None:
        return await asyncio.wait_for(self.handlers.handle(command, self.progress), HANDLE_TIMEOUT)

    async def send(self, cls: type[AnyCommand], chat: str) -> AnyCommand:
        command = self.command(cls, chat)
        await self.handle(command)
        return command

    def outcome(self, chat: str, command: AnyCommand) -> AnyEvent:
        found = [e for e in self.store.events(chat) if e.causation_id == str(command.command_id) and is_outcome(e)]
        assert len(found) == 1, found
        return found[0]

    async def crashed_create(self, chat: str, instance_id: str | None = GONE) -> tuple[CreateSandbox, str]:
        """A create claimed by `instance_id`, which started its container and died: the
        create command, and the session it claimed."""
        command = self.command(CreateSandbox, chat)
        assert isinstance(command, CreateSandbox)
        claimed = session_record(now=T0, status=SessionStatus.PROVISIONING, chat_id=chat, node_id=NODE)
        claim = SandboxProvisioning(
            event_id=str(uuid.uuid4()),
            chat_id=chat,
            session_id=claimed.session_id,
            causation_id=str(command.command_id),
            occurred_at=T0,
            node_id=NODE,
            session=claimed,
            instance_id=instance_id,
        )
        await self.store.append(claim, expected_seq=0, msg_id=claim.event_id)
        await self.driver.ensure_running(
            container_spec(ContainerIdentity(chat, claimed.session_id, NODE), claimed, SETTINGS)
        )
        return command, claimed.session_id


@pytest.fixture
def node() -> Node:
    return Node()


def test_an_instance_is_dead_without_a_heartbeat_or_with_one_as_old_as_the_deadline() -> None:
    dead_after = timedelta(seconds=5)
    beat = InstanceHeartbeat(instance_id=GONE, node_id=NODE, pid=7, started_at=T0, beat_at=T0)
    assert judge(None, T0, dead_after) == Liveness.DEAD
    assert judge(beat, T0 + dead_after - timedelta(microseconds=1), dead_after) == Liveness.ALIVE
    assert judge(beat, T0 + dead_after, dead_after) == Liveness.DEAD
    assert judge(beat, T0 - timedelta(seconds=30), dead_after) == Liveness.ALIVE  # a clock behind the writer's


async def test_claims_name_their_instance(node: Node) -> None:
    chat = str(uuid.uuid4())
    await node.send(CreateSandbox, chat)
    await node.send(StopSandbox, chat)
    claims = [e for e in node.store.events(chat) if e.type in ("provisioning", "stopping")]
    assert [(e.type, getattr(e, "instance_id", None)) for e in claims] == [
        ("provisioning", node.instances.instance_id),
        ("stopping", node.instances.instance_id),
    ]
    assert node.instances.lookups == [], "no heartbeat is read for a chat without another's claim"


@pytest.mark.parametrize("kind", ["create", "stop", "keepalive"])
async def test_a_dead_instances_claim_is_taken_over_at_once(node: Node, kind: str) -> None:
    chat = str(uuid.uuid4())
    _, claimed = await node.crashed_create(chat)
    kinds: dict[str, type[AnyCommand]] = {"create": CreateSandbox, "stop": StopSandbox, "keepalive": KeepaliveSandbox}
    cls = kinds[kind]
    command = await node.send(cls, chat)  # the clock stands still: the claim is young
    outcome = node.outcome(chat, command)
    assert node.instances.lookups[:1] == [GONE]
    if kind == "create":
        assert isinstance(outcome, SandboxRunning)
        assert (outcome.result, outcome.previous and outcome.previous.session_id) == (CreateResult.REPLACED, claimed)
        assert len(node.driver.running) == 1
    elif kind == "stop":
        assert isinstance(outcome, SandboxStopped)
        assert node.driver.running == {}
    else:
        assert isinstance(outcome, CommandRejected)
        assert outcome.reason == RejectReason.NOT_RUNNING


async def test_a_live_instances_claim_is_waited_on_until_it_is_gone(node: Node) -> None:
    chat = str(uuid.uuid4())
    node.instances.others[GONE] = Liveness.ALIVE
    await node.crashed_create(chat)
    before = node.store.types(chat)
    task = asyncio.create_task(node.send(CreateSandbox, chat))
    await until(lambda: len(node.instances.lookups) >= 2, what="the create looks at the claim again and again")
    assert not task.done()
    assert node.store.types(chat) == before
    node.instances.others[GONE] = Liveness.DEAD  # its heartbeat stops
    command = await task
    assert isinstance(node.outcome(chat, command), SandboxRunning)


@pytest.mark.parametrize("made_by", ["this instance", "no instance"])
async def test_claims_of_this_instance_and_claims_naming_none_need_no_heartbeat(made_by: str) -> None:
    node = Node()
    chat = str(uuid.uuid4())
    await node.crashed_create(chat, node.instances.instance_id if made_by == "this instance" else None)
    task = asyncio.create_task(node.send(KeepaliveSandbox, chat))
    await until(lambda: node.progress_calls > 0, what="the keepalive waits on the claim")
    assert not task.done()
    node.clock.advance(POLICY.claim_timeout.total_seconds())  # only the timeout frees it
    keepalive = await task
    assert node.outcome(chat, keepalive).reason == RejectReason.NOT_RUNNING
    assert node.instances.lookups == []


async def test_a_create_resumed_after_a_crash_finishes_its_own_claim_under_another_answer(node: Node) -> None:
    """The issue's repro: a keepalive comes while the crashed create's claim is the chat's
    last event; then the create is redelivered. It resumes its claim (never replacing its own
    session), though the keepalive's answer now lies on top of it."""
    chat = str(uuid.uuid4())
    create, claimed = await node.crashed_create(chat)
    keepalive = await node.send(KeepaliveSandbox, chat)
    refused = node.outcome(chat, keepalive)
    assert (refused.type, refused.reason) == ("rejected", RejectReason.NOT_RUNNING)
    await node.handle(create)  # the redelivery
    outcome = node.outcome(chat, create)
    assert isinstance(outcome, SandboxRunning)
    assert (outcome.result, outcome.session_id) == (CreateResult.CREATED, claimed)
    assert node.store.types(chat) == ["provisioning", "rejected", "running"]
    assert len(node.driver.started) == 1, "it found the container it had started before the crash"
    assert node.driver.removed == []


async def test_a_command_waiting_on_a_claim_lets_the_claims_own_command_resume_it(node: Node) -> None:
    """Both in one runtime: a keepalive waits on a live-looking claim; the claim's create,
    redelivered meanwhile, must not queue behind it for the chat's turn."""
    chat = str(uuid.uuid4())
    node.instances.others[GONE] = Liveness.ALIVE  # its heartbeat has not aged out yet
    create, claimed = await node.crashed_create(chat)
    keepalive = node.command(KeepaliveSandbox, chat)
    waiting = asyncio.create_task(node.handle(keepalive))
    await until(lambda: node.instances.lookups != [], what="the keepalive meets the claim")
    await node.handle(create)
    await waiting
    assert node.outcome(chat, create).session_id == claimed
    assert isinstance(node.outcome(chat, keepalive), SandboxExtended)
    assert node.store.types(chat) == ["provisioning", "running", "extended"]


async def test_a_second_create_after_a_crash_takes_over_and_the_first_reuses_it(node: Node) -> None:
    chat = str(uuid.uuid4())
    create, claimed = await node.crashed_create(chat)
    second = await node.send(CreateSandbox, chat)
    replaced = node.outcome(chat, second)
    assert isinstance(replaced, SandboxRunning)
    assert replaced.previous is not None
    assert replaced.previous.session_id == claimed
    await node.handle(create)  # the redelivery: its claim was taken over and ended
    reused = node.outcome(chat, create)
    assert isinstance(reused, SandboxReused)
    assert reused.session_id == replaced.session_id
    assert list(node.driver.running.values()) == [replaced.session and replaced.session.container_id]


@dataclass
class FakeBucket:
    """`sandbox_instances` in memory: the value of each key, and every write in order."""

    values: dict[str, bytes] = field(default_factory=dict)
    writes: list[tuple[str, str]] = field(default_factory=list)

    async def put(self, key: str, value: bytes) -> int:
        self.values[key] = value
        self.writes.append(("put", key))
        return len(self.writes)

    async def delete(self, key: str) -> bool:
        self.values.pop(key, None)
        self.writes.append(("delete", key))
        return True

    async def get(self, key: str) -> SimpleNamespace:
        if key not in self.values:
            raise KeyNotFoundError
        return SimpleNamespace(value=self.values[key])


async def test_an_instance_heartbeats_until_it_leaves_and_reads_its_peers() -> None:
    clock = FakeClock(T0)
    bucket = FakeBucket()
    dead_after = timedelta(seconds=0.05)  # heartbeats every 10 ms
    me = Instances(cast("KeyValue", bucket), clock, node_id=NODE, dead_after=dead_after)
    peer = Instances(cast("KeyValue", bucket), clock, node_id=NODE, dead_after=dead_after)
    async with me.heartbeating():
        assert bucket.writes == [("put", me.instance_id)], "the first beat is written before anything runs"
        await until(lambda: len(bucket.writes) >= 4, what="the heartbeat rewritten while the instance runs")
        assert await peer.liveness(me.instance_id) == Liveness.ALIVE
        assert await me.liveness(me.instance_id) == Liveness.ALIVE
        clock.advance(dead_after.total_seconds())  # the next beat carries the new time
        await until(lambda: len(bucket.writes) >= 6, what="beats after the clock moved")
        assert await peer.liveness(me.instance_id) == Liveness.ALIVE, "a fresh beat at the new time"
        beat = decode_heartbeat(bucket.values[me.instance_id])
        assert (beat.instance_id, beat.node_id, beat.beat_at) == (me.instance_id, NODE, clock.now())
    assert bucket.writes[-1] == ("delete", me.instance_id)
    assert await peer.liveness(me.instance_id) == Liveness.DEAD, "gone the moment it left"
    bucket.values[GONE] = encode(InstanceHeartbeat(instance_id=GONE, node_id=NODE, pid=9, started_at=T0, beat_at=T0))
    clock.advance(dead_after.total_seconds())
    assert await peer.liveness(GONE) == Liveness.DEAD, "a heartbeat as old as the deadline"
    bucket.values[GONE] = b"not json"
    assert await peer.liveness(GONE) == Liveness.UNKNOWN, "poison says nothing"
    bucket.values[GONE] = encode(beat)
    assert await peer.liveness(GONE) == Liveness.UNKNOWN, "a heartbeat naming another instance says nothing"


async def test_a_stop_whose_claim_was_taken_over_never_stops_the_session_made_since(node: Node) -> None:
    """A stop claimed and its runtime died; a create took the dead claim over (removing the
    container the stop was after) before the stop came back: the stop, redelivered, is pinned
    to the session it claimed and leaves the new one alone."""
    chat = str(uuid.uuid4())
    created = node.outcome(chat, await node.send(CreateSandbox, chat))
    assert created.session is not None
    stop = node.command(StopSandbox, chat)
    state = await node.store.read(chat)
    claim = SandboxStopping(
        event_id=str(uuid.uuid4()),
        chat_id=chat,
        session_id=created.session.session_id,
        causation_id=str(stop.command_id),
        occurred_at=T0,
        node_id=NODE,
        session=msgspec.structs.replace(created.session, status=SessionStatus.STOPPING, version=state.seq),
        instance_id=GONE,
    )
    await node.store.append(claim, expected_seq=state.seq, msg_id=claim.event_id)
    replaced = node.outcome(chat, await node.send(CreateSandbox, chat))
    assert (replaced.type, replaced.result) == ("running", CreateResult.REPLACED)
    await node.handle(stop)  # the redelivery
    refused = node.outcome(chat, stop)
    assert (refused.type, refused.reason) == ("rejected", RejectReason.STALE_SESSION)
    assert refused.session is not None
    assert replaced.session is not None
    assert (refused.session.session_id, refused.session.status) == (replaced.session.session_id, "running")
    assert list(node.driver.running.values()) == [replaced.session.container_id]


@dataclass
class UnansweredBucket(FakeBucket):
    """A bucket whose writes after the first never come back (NATS gone mid-run)."""

    answered: int = 1

    async def put(self, key: str, value: bytes) -> int:
        if len([w for w in self.writes if w[0] == "put"]) >= self.answered:
            self.writes.append(("put (unanswered)", key))
            await asyncio.Event().wait()
        return await super().put(key, value)


async def test_a_stop_does_not_wait_for_a_beat_nats_never_answers() -> None:
    """Stopping cancels the beat in flight (its retries would hold the stop while NATS is gone)
    and still deletes the heartbeat."""
    bucket = UnansweredBucket()
    me = Instances(cast("KeyValue", bucket), FakeClock(T0), node_id=NODE, dead_after=timedelta(seconds=0.05))
    heartbeat = me.heartbeating()
    await heartbeat.__aenter__()
    await until(lambda: ("put (unanswered)", me.instance_id) in bucket.writes, what="a beat left hanging")
    stopped = asyncio.create_task(heartbeat.__aexit__(None, None, None))
    await until(stopped.done, what="the stop, with a beat unanswered")
    assert bucket.writes[-1] == ("delete", me.instance_id)


async def test_a_stop_with_nats_gone_leaves_the_heartbeat_to_age() -> None:
    """With the connection down the delete cannot happen: the stop does not try (peers judge
    the instance dead once its heartbeat is older than `instance_dead_after_seconds`)."""
    bucket = FakeBucket()
    me = Instances(cast("KeyValue", bucket), FakeClock(T0), node_id=NODE, dead_after=timedelta(seconds=0.05))
    connected = [True]
    async with me.heartbeating(lambda: connected[0]):
        connected[0] = False
    assert ("delete", me.instance_id) not in bucket.writes
    assert me.instance_id in bucket.values
