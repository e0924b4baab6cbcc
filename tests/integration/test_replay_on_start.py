"""`runtime.replay_on_start`: registry keys deleted or corrupted while no runtime ran are
rebuilt from the event stream by the next runtime to start, before it consumes anything —
by default, and not when the flag is off."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import docker
import nats
import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from services.runtime.service import running_runtime
from shared.config import Settings, load_settings
from shared.contracts import SandboxRunning, SessionRecord
from shared.event_store import EventStore
from shared.registry import check_record
from shared.subjects import SESSIONS_BUCKET
from tests.conftest import settings_for
from tests.support.appends import append_event
from tests.support.eventually import eventually, holds
from tests.support.records import session_record

CORRUPT = b'{"session_id": "not what a record holds"'


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats.url or "")
    yield client
    await client.close()


async def value(kv: KeyValue, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    return entry.value


async def record(kv: KeyValue, key: str) -> SessionRecord | str | None:
    raw = await value(kv, key)
    return None if raw is None else check_record(key, raw)


async def sessions_damaged_while_down(settings: Settings, nc: Client, node_id: str) -> tuple[KeyValue, list[str]]:
    """Two live sessions projected by a runtime; then, with no runtime running, one key is
    deleted and the other overwritten with poison. The chats, deleted then corrupted."""
    store = EventStore(nc.jetstream())
    now = datetime.now(UTC)
    sessions = [session_record(now=now, chat_id=str(uuid.uuid4()), node_id=node_id) for _ in range(2)]
    async with running_runtime(settings):
        for s in sessions:
            await append_event(store, SandboxRunning, s, occurred_at=now)
        kv = await nc.jetstream().key_value(SESSIONS_BUCKET)
        for s in sessions:
            projected = await eventually(partial(record, kv, s.chat_id), what=f"{s.chat_id} projected")
            assert isinstance(projected, SessionRecord)
            assert projected.session_id == s.session_id
    deleted, corrupted = (s.chat_id for s in sessions)
    await kv.delete(deleted)
    await kv.put(corrupted, CORRUPT)
    return kv, [deleted, corrupted]


async def test_a_runtime_starting_with_replay_repairs_what_changed_while_none_ran(
    settings: Settings, nc: Client, node_id: str, docker_client: docker.DockerClient, node_containers: None
) -> None:
    assert load_settings(environ={}).runtime.replay_on_start is True, "on by default"
    assert settings.runtime.replay_on_start is True, "`settings` leaves it at its default"
    store = EventStore(nc.jetstream())
    kv, chats = await sessions_damaged_while_down(settings, nc, node_id)

    async with running_runtime(settings):
        # Replay has run once the runtime is up: no waiting.
        for chat in chats:
            last = (await store.read(chat)).session
            assert last is not None
            repaired = await record(kv, chat)
            assert isinstance(repaired, SessionRecord), (chat, repaired)
            assert (repaired.session_id, repaired.status) == (last.session_id, last.status)


async def test_a_runtime_starting_without_replay_leaves_the_registry_as_it_finds_it(
    settings: Settings,
    nc: Client,
    tmp_path: Path,
    node_id: str,
    docker_client: docker.DockerClient,
    node_containers: None,
) -> None:
    off = settings_for(settings.nats.url or "", tmp_path, node_id, SANDBOXD_RUNTIME_REPLAY_ON_START="false")
    assert off.runtime.replay_on_start is False
    kv, (deleted, corrupted) = await sessions_damaged_while_down(off, nc, node_id)

    async with running_runtime(off):

        async def both() -> tuple[bytes | None, bytes | None]:
            return await value(kv, deleted), await value(kv, corrupted)

        await holds(both, lambda got: got == (None, CORRUPT), seconds=1.0, what="the registry left as it was")
