"""One contract, two event logs: the unit tests' FakeStore and the real EventStore on a
nats-server must agree on everything the handlers rely on — per-subject expected sequences,
one global sequence, stream-wide message-id de-duplication, the order of those two checks
(nats-server 2.14 checks the expected sequence first), and de-duplication that ends with the
duplicate window."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import nats
import nats as nats_client
import pytest
from nats.js.api import StreamConfig

from shared import event_store
from shared.contracts import SandboxRunning
from shared.errors import AppendConflict, NatsUnavailable
from shared.event_store import EventLog, EventStore
from shared.subjects import EVENT_SUBJECTS
from tests.support.nats_server import NatsServer
from tests.support.records import session_record
from tests.unit.fakes_runtime import FakeClock, FakeStore

WINDOW = 0.5  # seconds: the duplicate window of both logs under test


@dataclass
class Log:
    store: EventLog
    pass_the_window: Callable[[], Awaitable[None]]


@pytest.fixture(params=["fake", "real"])
async def log(request: pytest.FixtureRequest) -> AsyncIterator[Log]:
    if request.param == "fake":
        clock = FakeClock()
        fake = FakeStore(clock, duplicate_window=timedelta(seconds=WINDOW))

        async def advance() -> None:
            clock.advance(WINDOW * 3)

        yield Log(fake, advance)
        return
    server: NatsServer = request.getfixturevalue("nats")
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name="CONTRACT_EVENTS", subjects=[EVENT_SUBJECTS], duplicate_window=WINDOW, allow_direct=True)
    )

    async def wait() -> None:
        # Wall-clock time must pass for the server to forget a message id; the server
        # sweeps expired ids on a timer, hence a few windows.
        await asyncio.sleep(WINDOW * 3)

    yield Log(EventStore(js, stream="CONTRACT_EVENTS"), wait)
    await nc.close()


def running(chat: str) -> SandboxRunning:
    session = session_record(chat_id=chat)
    return SandboxRunning(
        event_id=str(uuid.uuid4()),
        chat_id=chat,
        session_id=session.session_id,
        causation_id=str(uuid.uuid4()),
        occurred_at=session.created_at,
        node_id="node-a",
        session=session,
    )


def chat() -> str:
    return str(uuid.uuid4())


async def test_a_chat_with_no_events_reads_as_sequence_zero(log: Log) -> None:
    state = await log.store.read(chat())
    assert (state.seq, state.last) == (0, None)
    assert await log.store.history(chat()) == []


async def test_appends_name_the_sequence_they_were_decided_from(log: Log) -> None:
    a = chat()
    first = await log.store.append(running(a), expected_seq=0, msg_id="m1")
    assert not first.duplicate
    event = running(a)
    second = await log.store.append(event, expected_seq=first.seq, msg_id="m2")
    assert second.seq > first.seq
    state = await log.store.read(a)
    assert (state.seq, state.last) == (second.seq, event)
    assert [s.seq for s in await log.store.history(a)] == [first.seq, second.seq]
    assert [s.seq for s in await log.store.history(a, limit=1)] == [second.seq]


async def test_a_stale_expected_sequence_is_a_conflict_and_stores_nothing(log: Log) -> None:
    a = chat()
    first = await log.store.append(running(a), expected_seq=0, msg_id="m1")
    await log.store.append(running(a), expected_seq=first.seq, msg_id="m2")
    for stale in (0, first.seq, first.seq + 100):
        with pytest.raises(AppendConflict):
            await log.store.append(running(a), expected_seq=stale, msg_id=f"stale-{stale}")
    assert len(await log.store.history(a)) == 2


async def test_expected_sequences_are_per_chat_and_the_sequence_is_global(log: Log) -> None:
    a, b = chat(), chat()
    on_a = await log.store.append(running(a), expected_seq=0, msg_id="a1")
    on_b = await log.store.append(running(b), expected_seq=0, msg_id="b1")  # b's last is 0, not a's
    assert on_b.seq == on_a.seq + 1
    with pytest.raises(AppendConflict):
        await log.store.append(running(b), expected_seq=on_a.seq, msg_id="b2")
    unconditional = await log.store.append(running(a), expected_seq=None, msg_id="a2")
    assert unconditional.seq == on_b.seq + 1


async def test_the_expected_sequence_is_checked_before_de_duplication(log: Log) -> None:
    """A command redelivered after its outcome was appended, re-sending that outcome with the
    sequence it was decided from (now stale), gets a conflict; the handler then reads the
    chat again, and its next attempt (current sequence, same message id) is the duplicate.
    Either way nothing is stored twice."""
    a = chat()
    stored = await log.store.append(running(a), expected_seq=0, msg_id="outcome-1")
    later = await log.store.append(running(a), expected_seq=stored.seq, msg_id="later")
    with pytest.raises(AppendConflict):
        await log.store.append(running(a), expected_seq=0, msg_id="outcome-1")
    again = await log.store.append(running(a), expected_seq=later.seq, msg_id="outcome-1")
    assert (again.seq, again.duplicate) == (stored.seq, True)
    unconditional = await log.store.append(running(a), expected_seq=None, msg_id="outcome-1")
    assert (unconditional.seq, unconditional.duplicate) == (stored.seq, True)
    assert len(await log.store.history(a)) == 2


async def test_message_ids_are_de_duplicated_across_chats(log: Log) -> None:
    a, b = chat(), chat()
    stored = await log.store.append(running(a), expected_seq=0, msg_id="same-id")
    again = await log.store.append(running(b), expected_seq=0, msg_id="same-id")
    assert (again.seq, again.duplicate) == (stored.seq, True)
    assert await log.store.history(b) == []


async def test_de_duplication_ends_with_the_window(log: Log) -> None:
    a = chat()
    stored = await log.store.append(running(a), expected_seq=0, msg_id="outcome-1")
    await log.pass_the_window()
    with pytest.raises(AppendConflict):  # no longer a duplicate: the stale sequence now counts
        await log.store.append(running(a), expected_seq=0, msg_id="outcome-1")
    again = await log.store.append(running(a), expected_seq=stored.seq, msg_id="outcome-1")
    assert (again.seq > stored.seq, again.duplicate) == (True, False)
    assert len(await log.store.history(a)) == 2


async def test_history_is_every_event_of_the_chat_in_order_in_batches(
    log: Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real log reads a history in batched direct gets of HISTORY_BATCH events (three here,
    so eight events take three batches); other chats' events in between are not in it."""
    monkeypatch.setattr(event_store, "HISTORY_BATCH", 3)
    mine, other = chat(), chat()
    appended = []
    for i in range(8):
        event = running(mine)
        appended.append((await log.store.append(event, expected_seq=None, msg_id=event.event_id)).seq)
        if i % 2:
            noise = running(other)
            await log.store.append(noise, expected_seq=None, msg_id=noise.event_id)
    history = await log.store.history(mine)
    assert [s.seq for s in history] == appended
    assert {s.event.chat_id for s in history} == {mine}
    assert [s.seq for s in await log.store.history(mine, limit=2)] == appended[-2:]


async def test_a_history_is_never_older_than_the_sequence_it_is_read_beside(nats: NatsServer) -> None:
    """Direct gets may be answered by a replica that lags: a history read `through` a
    sequence waits for it, and is refused (NatsUnavailable, retried later) if none has it."""
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="LAG_EVENTS", subjects=[EVENT_SUBJECTS], allow_direct=True))
    store = EventStore(js, stream="LAG_EVENTS")
    mine = chat()
    event = running(mine)
    seq = (await store.append(event, expected_seq=None, msg_id=event.event_id)).seq
    assert [s.seq for s in await store.history(mine, through=seq)] == [seq]
    with pytest.raises(NatsUnavailable, match=f"sequence {seq + 1}"):
        await store.history(mine, through=seq + 1)
    await nc.close()


async def test_reads_made_together_are_each_chats_own(log: Log) -> None:
    """Reads made at once (the real store sends them as one batched direct get) answer
    each chat's own last event and sequence, a chat with no events included."""
    chats = [chat() for _ in range(40)]
    seqs: dict[str, int] = {}
    for i, c in enumerate(chats[:-1]):
        appended = await log.store.append(running(c), expected_seq=None, msg_id=str(uuid.uuid4()))
        seqs[c] = appended.seq
        if i % 2 == 0:  # a second event: the last one must be read, not the first
            appended = await log.store.append(running(c), expected_seq=appended.seq, msg_id=str(uuid.uuid4()))
            seqs[c] = appended.seq
    together = await asyncio.gather(*(log.store.read(c) for c in chats + chats[:5]))
    alone = [await log.store.read(c) for c in chats + chats[:5]]
    assert together == alone
    assert [s.seq for s in together[: len(chats)]] == [seqs.get(c, 0) for c in chats]
    assert all(s.last is not None and s.last.chat_id == c for s, c in zip(together, chats[:-1], strict=False))


async def test_a_failed_batch_of_reads_fails_every_read_in_it(nats: NatsServer) -> None:
    nc = await nats_client.connect(nats.url)
    try:
        lasts = event_store.LastMessages(nc.jetstream(), "NO_SUCH_STREAM", timeout=0.5)
        results = await asyncio.gather(
            *(lasts.last(f"sandbox.events.{chat()}") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, Exception) for r in results), results
        alone = await asyncio.gather(lasts.last(f"sandbox.events.{chat()}"), return_exceptions=True)
        assert isinstance(alone[0], Exception)
    finally:
        await nc.close()
