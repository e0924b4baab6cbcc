"""Guards of the stop and create paths that only show when two writers meet: the expiry stop
that a keepalive overtook, and claims a dead writer left behind (taken over once older than
the claim timeout, waited on before)."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import datetime, timedelta

import msgspec
import pytest

from services.runtime.containers import ContainerIdentity, container_spec
from services.runtime.decisions import ClaimStop, Policy, Reject, decide_stop, stopping
from services.runtime.handlers import CommandHandlers, HandlerDeps
from shared.config import SandboxSettings
from shared.contracts import (
    AnyCommand,
    AnyEvent,
    CommandRejected,
    CreateResult,
    CreateSandbox,
    KeepaliveSandbox,
    PreviousSession,
    RejectReason,
    SandboxExtended,
    SandboxProvisioning,
    SandboxRunning,
    SandboxStopped,
    SandboxStopping,
    SessionRecord,
    SessionStatus,
    StopSandbox,
    is_outcome,
)
from tests.support.eventually import until
from tests.support.records import T0, session_record
from tests.unit.fakes_runtime import FakeClock, FakeDriver, FakeHandled, FakeStore

NODE = "node-a"
CLAIM_TIMEOUT = timedelta(seconds=60)
POLICY = Policy(NODE, "img", timedelta(minutes=5), timedelta(hours=1), CLAIM_TIMEOUT)
SETTINGS = SandboxSettings()
# Generous: a handler that never takes a claim over would otherwise hang the test.
HANDLE_TIMEOUT = 10.0


def event(cls: type[AnyEvent], session: SessionRecord, *, cause: str, at: datetime) -> AnyEvent:
    return cls(
        event_id=str(uuid.uuid4()),
        chat_id=session.chat_id,
        session_id=session.session_id,
        causation_id=cause,
        occurred_at=at,
        node_id=session.node_id,
        session=session,
    )


class Node:
    """One runtime's handlers over the fakes, with a clock the test moves."""

    def __init__(self) -> None:
        self.clock = FakeClock(T0)
        self.store = FakeStore(self.clock)
        self.driver = FakeDriver()
        ids = itertools.count(1)
        self.handlers = CommandHandlers(
            HandlerDeps(self.store, self.driver, self.clock, POLICY, SETTINGS, handled=FakeHandled()),
            new_id=lambda: str(uuid.UUID(int=next(ids))),
        )
        self.progress_calls = 0

    async def progress(self) -> None:
        self.progress_calls += 1

    async def send(self, cls: type[AnyCommand], chat: str, **fields: object) -> AnyCommand:
        command = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": chat, **fields}, cls)
        await asyncio.wait_for(self.handlers.handle(command, self.progress), HANDLE_TIMEOUT)
        return command

    def outcome(self, chat: str, command: AnyCommand) -> AnyEvent:
        found = [e for e in self.store.events(chat) if e.causation_id == str(command.command_id) and is_outcome(e)]
        assert len(found) == 1, found
        return found[0]

    async def dead_writers_claim(self, cls: type[AnyEvent], session: SessionRecord) -> None:
        """A claim appended by a process that died right after it (its command never returns)."""
        state = await self.store.read(session.chat_id)
        claim = event(cls, msgspec.structs.replace(session, version=state.seq), cause=str(uuid.uuid4()), at=T0)
        await self.store.append(claim, expected_seq=state.seq, msg_id=claim.event_id)


@pytest.fixture
def node() -> Node:
    return Node()


# --------------------------------------------------------------------------- not_expired


def test_an_expiry_stop_refuses_a_session_that_is_no_longer_expired() -> None:
    live = session_record(now=T0 - timedelta(minutes=10), ttl=timedelta(minutes=30), node_id=NODE)
    running = event(SandboxRunning, live, cause="create", at=T0 - timedelta(minutes=10))

    def stop(reason: str, session_id: str | None = live.session_id) -> StopSandbox:
        body = {"command_id": str(uuid.uuid4()), "chat_id": live.chat_id, "reason": reason, "session_id": session_id}
        return msgspec.convert(body, StopSandbox)

    refused = decide_stop(running, stop("expired"), T0, POLICY)
    assert isinstance(refused, Reject)
    assert refused.reason == RejectReason.NOT_EXPIRED
    assert live.expires_at.isoformat() in refused.detail
    assert isinstance(decide_stop(running, stop("expired", None), T0, POLICY), Reject), "pinned or not"

    # Only an expiry stop is conditional, and only until the expiry has passed (boundary included).
    assert isinstance(decide_stop(running, stop("api"), T0, POLICY), ClaimStop)
    assert isinstance(decide_stop(running, stop("expired"), live.expires_at, POLICY), ClaimStop)
    # A session stuck in a stop claim is not "running": an expiry stop still finishes it.
    left = event(SandboxStopping, stopping(live, T0), cause="dead", at=T0 - CLAIM_TIMEOUT)
    assert isinstance(decide_stop(left, stop("expired"), T0, POLICY), ClaimStop)


async def test_the_reapers_expiry_stop_loses_to_a_keepalive_that_came_first(node: Node) -> None:
    chat = str(uuid.uuid4())
    created = node.outcome(chat, await node.send(CreateSandbox, chat, ttl_seconds=60))
    assert isinstance(created, SandboxRunning)
    assert created.session is not None
    session_id = created.session.session_id
    node.clock.advance(59)
    kept = node.outcome(chat, await node.send(KeepaliveSandbox, chat, ttl_seconds=600, session_id=session_id))
    assert isinstance(kept, SandboxExtended)
    node.clock.advance(2)  # past the expiry the reaper scheduled from the record before the keepalive

    expiry = await node.send(StopSandbox, chat, reason="expired", session_id=session_id)

    refused = node.outcome(chat, expiry)
    assert isinstance(refused, CommandRejected)
    assert refused.reason == RejectReason.NOT_EXPIRED
    assert refused.session is not None
    assert kept.session is not None
    unchanged = msgspec.structs.replace(kept.session, version=refused.session.version)
    assert refused.session == unchanged, "the extended session is carried unchanged"
    assert node.store.types(chat) == ["provisioning", "running", "extended", "rejected"], "no stop claim"
    assert list(node.driver.running.values()) == [created.session.container_id]
    assert node.driver.removed == []

    # Past the new expiry the reaper's next stop does stop it.
    node.clock.advance(600)
    again = node.outcome(chat, await node.send(StopSandbox, chat, reason="expired", session_id=session_id))
    assert isinstance(again, SandboxStopped)
    assert again.reason == "expired"
    assert node.driver.running == {}


# --------------------------------------------------------------------------- claim takeover


async def _abandoned_claim(node: Node, chat: str, claim: str) -> tuple[SessionRecord, str]:
    """A claim of `claim` type left by a dead writer, and the container its session has."""
    if claim == "provisioning":
        # The dead writer claimed a new session and had started its container.
        dead = session_record(now=T0, status=SessionStatus.PROVISIONING, chat_id=chat, node_id=NODE)
        await node.dead_writers_claim(SandboxProvisioning, dead)
        spec = container_spec(ContainerIdentity(chat, dead.session_id, NODE), dead, SETTINGS)
        return dead, await node.driver.ensure_running(spec)
    # The dead writer claimed the stop of a running session and never removed its container.
    created = node.outcome(chat, await node.send(CreateSandbox, chat))
    assert created.session is not None
    await node.dead_writers_claim(SandboxStopping, stopping(created.session, T0))
    assert created.session.container_id is not None
    return created.session, created.session.container_id


@pytest.mark.parametrize("claim", ["provisioning", "stopping"])
@pytest.mark.parametrize("kind", ["create", "stop"])
async def test_a_claim_left_by_a_dead_writer_is_waited_on_then_taken_over(node: Node, claim: str, kind: str) -> None:
    chat = str(uuid.uuid4())
    dead, dead_container = await _abandoned_claim(node, chat, claim)
    before = node.store.types(chat)
    cls: type[AnyCommand] = CreateSandbox if kind == "create" else StopSandbox

    task = asyncio.create_task(node.send(cls, chat))
    # Younger than the claim timeout, the claim may still be carried out: the command waits,
    # keeps its message in progress, and appends nothing.
    await until(lambda: node.progress_calls > 0 or task.done(), what="the command waits on the claim")
    assert not task.done(), "a claim younger than the timeout was taken over"
    seen = node.progress_calls
    node.clock.advance(CLAIM_TIMEOUT.total_seconds() - 1)
    # Every progress call follows a decision; one after the advance is a decision at the new time.
    await until(lambda: node.progress_calls > seen, what="the command still waits a second before the timeout")
    assert not task.done()
    assert node.store.types(chat) == before
    node.clock.advance(1)  # now exactly as old as the claim timeout: abandoned

    command = await task

    outcome = node.outcome(chat, command)
    assert dead_container in node.driver.removed, "the dead writer's container is gone"
    types = node.store.types(chat)
    if kind == "create":
        assert isinstance(outcome, SandboxRunning)
        assert outcome.result == CreateResult.REPLACED
        assert outcome.previous == PreviousSession(dead.session_id, dead.container_id)
        assert outcome.session is not None
        assert outcome.session.session_id != dead.session_id
        assert list(node.driver.running.values()) == [outcome.session.container_id]
        assert types[len(before) :] == ["stopping", "provisioning", "running"]
    else:
        assert isinstance(outcome, SandboxStopped)
        assert outcome.session is not None
        assert (outcome.session.session_id, outcome.session.status) == (dead.session_id, SessionStatus.STOPPED)
        assert node.driver.running == {}
        assert types[len(before) :] == ["stopping", "stopped"]
