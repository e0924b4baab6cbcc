"""Exactly once with real parts: a command id published again long after its outcome —
beyond the event stream's de-duplication window — gets no second outcome, and the
`sandbox_handled` bucket says which outcome it had."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import docker
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.runtime.service import RuntimeHandle, running_runtime
from shared.config import Settings, StreamSettings
from shared.contracts import OUTCOME_TYPES, decode_handled
from shared.event_store import EventStore, StoredEvent
from shared.handled import handled_key
from shared.subjects import HANDLED_BUCKET, command_subject
from shared.topology import ensure_topology
from tests.support.eventually import eventually, holds
from tests.support.nats_server import NatsServer


async def connect(url: str) -> Client:
    return await nats.connect(url)  # a module-level function: tests name their server fixture `nats`


OUTCOMES = {t.__struct_config__.tag for t in OUTCOME_TYPES}
WINDOW = 1.0  # seconds; the contract's minimum is 120 s, too long to wait for in a test


@pytest.fixture
async def js(nats: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc: Client = await connect(nats.url)
    js = nc.jetstream()
    # Declared before the runtime attaches, with a short duplicate window.
    await ensure_topology(js, StreamSettings(events_duplicate_window_seconds=WINDOW))
    yield js
    await nc.close()


@pytest.fixture
async def short_window_runtime(
    js: JetStreamContext, settings: Settings, docker_client: docker.DockerClient, node_containers: None
) -> AsyncIterator[RuntimeHandle]:
    async with running_runtime(settings) as handle:
        yield handle


async def publish(js: JetStreamContext, kind: str, chat: str, command_id: str, **fields: object) -> None:
    body = json.dumps({"command_id": command_id, "chat_id": chat, **fields}).encode()
    await js.publish(command_subject(kind, chat), body)  # no Nats-Msg-Id: every publish is a new message


async def outcomes_of(js: JetStreamContext, chat: str, command_id: str) -> list[StoredEvent]:
    history = await EventStore(js).history(chat)
    return [s for s in history if s.event.causation_id == command_id and s.event.type in OUTCOMES]


async def one_outcome(js: JetStreamContext, chat: str, command_id: str) -> StoredEvent:
    found = await eventually(lambda: outcomes_of(js, chat, command_id), lambda o: len(o) > 0)
    assert len(found) == 1, found
    return found[0]


async def test_a_command_published_again_after_the_window_gets_no_second_outcome(
    js: JetStreamContext, short_window_runtime: RuntimeHandle, docker_client: docker.DockerClient
) -> None:
    chat = str(uuid.uuid4())
    create, reuse, keepalive, stop = (str(uuid.uuid4()) for _ in range(4))
    await publish(js, "create", chat, create)
    created = await one_outcome(js, chat, create)
    await publish(js, "create", chat, reuse)
    reused = await one_outcome(js, chat, reuse)
    await publish(js, "keepalive", chat, keepalive, ttl_seconds=600)
    await one_outcome(js, chat, keepalive)
    assert [created.event.type, reused.event.type] == ["running", "reused"]

    handled = await js.key_value(HANDLED_BUCKET)
    for command_id, kind in ((create, "create"), (reuse, "create"), (keepalive, "keepalive")):
        entry = decode_handled((await handled.get(handled_key(chat, command_id))).value or b"")
        assert (entry.kind, entry.outcome_seq) == (kind, (await one_outcome(js, chat, command_id)).seq)

    await publish(js, "stop", chat, stop)
    await one_outcome(js, chat, stop)
    # Let the stream forget the outcomes' message ids, then publish every command again.
    # Without the index each would be decided afresh: the creates would start a new sandbox
    # (a second `running` and a container), the keepalive and the stop would be refused.
    history = await EventStore(js).history(chat)
    await holds(lambda: EventStore(js).history(chat), lambda h: h == history, seconds=WINDOW * 3)
    for kind, command_id in (("create", create), ("create", reuse), ("keepalive", keepalive), ("stop", stop)):
        await publish(js, kind, chat, command_id)
    marker = str(uuid.uuid4())  # a fresh command after them: once it has its outcome, they were consumed
    await publish(js, "stop", chat, marker)
    await one_outcome(js, chat, marker)
    for command_id in (create, reuse, keepalive, stop):
        assert len(await outcomes_of(js, chat, command_id)) == 1
    after = await EventStore(js).history(chat)
    assert [s.event.type for s in after] == [*(s.event.type for s in history), "rejected"]
    assert docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"}) == []
