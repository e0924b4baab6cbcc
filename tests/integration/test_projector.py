"""The projector against a real nats-server: KV equals each chat's last event, idempotently,
concurrently, and never backwards."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.runtime.projector import Projector, projector_consumer_config
from shared.config import StreamSettings
from shared.consumers import declare_durable, pull_batch
from shared.contracts import AnyEvent, SandboxRunning, SandboxStopped, SessionRecord, SessionStatus
from shared.event_store import EventStore, connection_of
from shared.registry import Registry
from shared.subjects import EVENTS_STREAM, chat_of
from shared.topology import ensure_topology
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.records import T0, session_record


def session_n(i: int) -> str:
    return f"5e55e55e-0000-4000-8000-{i:012d}"


def stopped(session: SessionRecord) -> SessionRecord:
    return msgspec.structs.replace(session, status=SessionStatus.STOPPED)


def event(cls: type[AnyEvent], session: SessionRecord) -> AnyEvent:
    return cls(
        event_id=str(uuid.uuid4()),
        chat_id=session.chat_id,
        session_id=session.session_id,
        causation_id=None,
        occurred_at=T0,
        node_id="n",
        session=session,
    )


@pytest.fixture
async def parts(nats: NatsServer) -> AsyncIterator[tuple[JetStreamContext, EventStore, Registry, Projector]]:
    nc = await _connect(nats.url)
    js = nc.jetstream()
    kv = await ensure_topology(js, StreamSettings())
    store = EventStore(js)
    registry = Registry(js, kv)
    yield js, store, registry, Projector(js, store, registry)
    await nc.close()


async def _connect(url: str) -> Client:
    return await nats.connect(url)


async def append(store: EventStore, e: AnyEvent) -> int:
    state = await store.read(e.chat_id)
    return (await store.append(e, expected_seq=state.seq, msg_id=e.event_id)).seq


async def test_projection_follows_the_last_event(
    parts: tuple[JetStreamContext, EventStore, Registry, Projector],
) -> None:
    _, store, registry, projector = parts
    chat = str(uuid.uuid4())
    running = session_record(chat_id=chat)
    seq = await append(store, event(SandboxRunning, running))
    assert await projector.project_chat(chat) == "written"
    assert await projector.project_chat(chat) == "current"
    got = await registry.get(chat)
    assert got is not None
    assert (got.status, got.version) == (SessionStatus.RUNNING, seq)

    # A stale record put there by hand is corrected, never kept.
    entry = await registry.entry(chat)
    await registry.put(
        msgspec.structs.replace(got, status=SessionStatus.PROVISIONING, version=seq - 1), last_revision=entry.revision
    )
    assert await projector.project_chat(chat) == "written"
    assert (await registry.get(chat)) == got

    await append(store, event(SandboxStopped, stopped(running)))
    assert await projector.project_chat(chat) == "deleted"
    assert await projector.project_chat(chat) == "absent"
    assert await registry.get(chat) is None


async def test_concurrent_projectors_converge_on_the_last_event(
    parts: tuple[JetStreamContext, EventStore, Registry, Projector],
) -> None:
    _, store, registry, projector = parts
    chat = str(uuid.uuid4())

    async def writer() -> None:
        for i in range(15):
            status = SessionStatus.RUNNING if i % 2 == 0 else SessionStatus.STOPPED
            cls: type[AnyEvent] = SandboxRunning if i % 2 == 0 else SandboxStopped
            await append(store, event(cls, session_record(chat_id=chat, status=status, session_id=session_n(i))))

    async def projecting() -> None:
        for _ in range(15):
            await projector.project_chat(chat)

    await asyncio.gather(writer(), *(projecting() for _ in range(6)))
    await projector.project_chat(chat)
    last = (await store.read(chat)).session
    assert last is not None
    assert last.session_id == session_n(14)
    got = await registry.get(chat)
    assert got is not None
    assert got.session_id == session_n(14)


async def test_the_projector_loop_keeps_the_bucket_in_step(
    parts: tuple[JetStreamContext, EventStore, Registry, Projector],
) -> None:
    _, store, registry, projector = parts
    stopping = asyncio.Event()
    task = asyncio.create_task(projector.run(stopping))
    chats = [str(uuid.uuid4()) for _ in range(30)]
    sessions = {chat: session_record(chat_id=chat) for chat in chats}
    for chat in chats:
        await append(store, event(SandboxRunning, sessions[chat]))
    for chat in chats[:10]:
        await append(store, event(SandboxStopped, stopped(sessions[chat])))
    await eventually(
        registry.list, lambda records: {r.chat_id for r in records} == set(chats[10:]), what="the live chats in KV"
    )
    stopping.set()
    await task
    assert {r.chat_id for r in await registry.list()} == set(chats[10:])


async def test_a_batch_reads_what_one_by_one_reads(
    parts: tuple[JetStreamContext, EventStore, Registry, Projector],
) -> None:
    """The batched reads (keys, then last events, in one round trip each) equal the
    per-chat reads: absent chats, delete markers, poison in the bucket and as a chat's last
    event, and more chats than one batched direct get may answer (1024)."""
    js, store, registry, projector = parts
    chats = [str(uuid.uuid4()) for _ in range(1030)]
    live, gone, poisoned_key, poisoned_event, never = chats[0], chats[1], chats[2], chats[3], chats[4]
    for chat in chats[:4] + chats[5:]:
        await append(store, event(SandboxRunning, session_record(chat_id=chat)))
    for chat in chats[:4]:
        assert await projector.project_chat(chat) == "written"
    await append(store, event(SandboxStopped, stopped(session_record(chat_id=gone))))
    assert await projector.project_chat(gone) == "deleted"  # its key is a delete marker now
    entry = await registry.entry(poisoned_key)
    await js.publish(f"$KV.sandbox_sessions.{poisoned_key}", b"{not json")
    await js.publish(f"sandbox.events.{poisoned_event}", b"{not json either")

    entries = await registry.entries(chats)
    states = await store.read_many(chats)

    for chat in (live, gone, poisoned_key, poisoned_event, never, chats[-1]):
        assert entries[chat] == await registry.entry(chat), chat
        assert states[chat] == await store.read(chat), chat
    assert entries[poisoned_key].corrupt
    assert entries[poisoned_key].revision > entry.revision
    assert entries[gone].record is None
    assert entries[gone].revision > 0
    assert (entries[never], states[never].seq) == (await registry.entry(never), 0)
    assert states[poisoned_event].poisoned
    assert states[poisoned_event].last is not None
    assert len(entries) == len(states) == len(chats)


async def test_the_loop_repairs_keys_and_follows_poison_in_batches(
    parts: tuple[JetStreamContext, EventStore, Registry, Projector],
) -> None:
    """Through the loop (batched reads): a forged key is overwritten, a chat whose last
    event is poison keeps its last valid session, a stopped chat's key goes."""
    js, store, registry, projector = parts
    chats = [str(uuid.uuid4()) for _ in range(40)]
    forged, poisoned, gone = chats[0], chats[1], chats[2]
    sessions = {chat: session_record(chat_id=chat) for chat in chats}
    await registry.put(msgspec.structs.replace(sessions[forged], version=10**9), last_revision=0)
    for chat in chats:
        await append(store, event(SandboxRunning, sessions[chat]))
    await append(store, event(SandboxStopped, stopped(sessions[gone])))
    await js.publish(f"sandbox.events.{poisoned}", b"{not json")
    stopping = asyncio.Event()
    task = asyncio.create_task(projector.run(stopping))

    async def held() -> dict[str, SessionRecord]:
        return {r.chat_id: r for r in await registry.list()}

    expected = {
        chat: msgspec.structs.replace(sessions[chat], version=(await store.read(chat)).seq)
        for chat in chats
        if chat != gone
    }
    expected[poisoned] = msgspec.structs.replace(sessions[poisoned], version=(await store.read(poisoned)).seq)
    await eventually(held, lambda got: got == expected, what="every live chat as its last valid event")
    stopping.set()
    await task


async def test_pull_batch_takes_what_is_there_then_waits_for_the_first(
    parts: tuple[JetStreamContext, EventStore, Registry, Projector],
) -> None:
    js, store, _, _ = parts
    config = projector_consumer_config("pull-batch-test", 8)
    await declare_durable(js, EVENTS_STREAM, config)
    nc = connection_of(js)
    chats = [str(uuid.uuid4()) for _ in range(5)]
    for chat in chats:
        await append(store, event(SandboxRunning, session_record(chat_id=chat)))
    first = await pull_batch(nc, EVENTS_STREAM, "pull-batch-test", 3, expires=5.0)
    rest = await pull_batch(nc, EVENTS_STREAM, "pull-batch-test", 8, expires=5.0)  # 2 there: not 8, no wait
    assert [chat_of(m.subject) for m in first + rest] == chats
    for m in first + rest:
        await m.ack()
    assert await pull_batch(nc, EVENTS_STREAM, "pull-batch-test", 8, expires=0.2) == []

    async def later() -> None:
        await asyncio.sleep(0.3)
        await append(store, event(SandboxRunning, session_record(chat_id=str(uuid.uuid4()))))

    appending = asyncio.create_task(later())
    waited = await pull_batch(nc, EVENTS_STREAM, "pull-batch-test", 8, expires=30.0)
    await appending
    assert len(waited) == 1
    await waited[0].ack()

    # A stop does not wait out a waiting pull (a runtime's stop would take `expires` longer).
    stopping = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, stopping.set)
    pulling = pull_batch(nc, EVENTS_STREAM, "pull-batch-test", 8, expires=60.0, stopping=stopping)
    assert await asyncio.wait_for(pulling, 20) == []
