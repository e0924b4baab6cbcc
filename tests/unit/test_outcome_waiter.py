"""The API's outcome waiter over a fake JetStream: after a reconnect it re-creates its
consumer at once, from the stream sequence after the last event it saw, and hands a waiting
request its outcome when that is already the chat's last event; one outcome serves every
request waiting for the same command."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.api.gateway import OutcomeWaiter
from shared.contracts import AnyEvent, CreateResult, SandboxProvisioning, SandboxReused, encode
from shared.event_store import ChatState, EventStore
from tests.support.eventually import until
from tests.support.records import session_record

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class FakeSub:
    start: int
    unsubscribed: bool = False

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


@dataclass
class FakeJetStream:
    last_seq: int = 40
    failures: int = 0  # subscribe calls that time out first
    subs: list[FakeSub] = field(default_factory=list)

    async def stream_info(self, _: str) -> Any:
        return SimpleNamespace(state=SimpleNamespace(last_seq=self.last_seq))

    async def subscribe(self, _: str, **options: Any) -> FakeSub:
        if self.failures:
            self.failures -= 1
            raise TimeoutError
        sub = FakeSub(options["config"].opt_start_seq)
        self.subs.append(sub)
        return sub


@dataclass
class FakeEvents:
    last: dict[str, AnyEvent] = field(default_factory=dict)

    async def read(self, chat_id: str) -> ChatState:
        event = self.last.get(chat_id)
        return ChatState(1 if event else 0, event)


def reused(chat: str, command_id: str) -> SandboxReused:
    record = session_record(chat_id=chat)
    return SandboxReused(
        event_id=str(uuid.uuid4()),
        chat_id=chat,
        session_id=record.session_id,
        causation_id=command_id,
        occurred_at=NOW,
        node_id="n",
        session=record,
        result=CreateResult.REUSED,
    )


def delivered(event: AnyEvent, seq: int) -> Msg:
    """The event as the ordered consumer delivers it (stream sequence in the reply subject)."""
    reply = f"$JS.ACK.SANDBOX_EVENTS.c.1.{seq}.{seq}.1700000000000000000.0"
    return Msg(_client=cast("Any", None), subject=f"sandbox.events.{event.chat_id}", reply=reply, data=encode(event))


async def started(js: FakeJetStream, events: FakeEvents) -> OutcomeWaiter:
    waiter = OutcomeWaiter()
    await waiter.start(cast("JetStreamContext", js), cast("EventStore", events))
    return waiter


async def test_a_reconnect_recreates_the_consumer_after_the_last_event_seen() -> None:
    js, events = FakeJetStream(last_seq=40), FakeEvents()
    waiter = await started(js, events)
    assert [s.start for s in js.subs] == [41]  # only what is stored from now on
    chat = str(uuid.uuid4())
    claim = SandboxProvisioning(
        event_id="e", chat_id=chat, session_id=None, causation_id="c", occurred_at=NOW, node_id="n"
    )
    for seq in (41, 42, 45):
        await waiter._on_event(delivered(claim, seq))
    waiter.reconnected()
    await until(lambda: len(js.subs) == 2, what="a second consumer")
    assert js.subs[0].unsubscribed
    assert js.subs[1].start == 46
    await waiter.stop()


async def test_the_consumer_comes_back_even_if_jetstream_is_not_ready_at_once() -> None:
    js = FakeJetStream()
    waiter = await started(js, FakeEvents())
    js.failures = 3
    waiter.reconnected()
    waiter.reconnected()  # a second outage while the first is being repaired: no second task
    await until(lambda: len(js.subs) >= 2, what="the consumer re-created")
    await waiter.stop()


async def test_a_request_whose_outcome_is_already_the_last_event_gets_it_after_a_reconnect() -> None:
    js, events = FakeJetStream(), FakeEvents()
    waiter = await started(js, events)
    chat, command_id = str(uuid.uuid4()), str(uuid.uuid4())
    future, first = waiter.expect(chat, command_id)
    assert first
    outcome = reused(chat, command_id)
    events.last[chat] = outcome
    waiter.reconnected()
    assert await asyncio.wait_for(future, 5) == outcome
    waiter.forget(chat, command_id)
    await waiter.stop()


async def test_one_outcome_answers_every_request_waiting_for_the_command() -> None:
    waiter = await started(FakeJetStream(), FakeEvents())
    chat, command_id = str(uuid.uuid4()), str(uuid.uuid4())
    first_future, first = waiter.expect(chat, command_id)
    second_future, second = waiter.expect(chat, command_id)
    assert (first, second) == (True, False)
    assert first_future is second_future
    waiter.forget(chat, command_id)  # one request gave up (202): the other still waits
    outcome = reused(chat, command_id)
    await waiter._on_event(delivered(outcome, 41))
    assert second_future.result() == outcome
    waiter.forget(chat, command_id)
    _, again = waiter.expect(chat, command_id)  # nobody waits any more: a fresh start
    assert again
    await waiter.stop()
