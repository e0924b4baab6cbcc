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

from services.runtime.projector import Projector
from shared.config import StreamSettings
from shared.contracts import AnyEvent, SandboxRunning, SandboxStopped, SessionRecord, SessionStatus
from shared.event_store import EventStore
from shared.registry import Registry
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
