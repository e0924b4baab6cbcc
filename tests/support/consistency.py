"""The invariant every crash test checks for a chat: one live record and its running
container, or neither; and the registry (KV) agrees with the log."""

from __future__ import annotations

import json

import docker
import nats
from nats.js import JetStreamContext

from shared.event_store import EventStore
from shared.subjects import SESSIONS_BUCKET
from tests.support.eventually import eventually


async def assert_consistent(js: JetStreamContext, docker_client: docker.DockerClient, chat: str) -> None:
    """One live record and its running container, or neither; the KV agrees."""
    state = await EventStore(js).read(chat)
    session = state.session if state.session is not None and state.session.is_live else None
    containers = docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})
    if session is None:
        assert containers == [], "a container without a live record"
    else:
        assert [c.id for c in containers] == [session.container_id], "a live record without its container"
        assert containers[0].status == "running"
    kv = await js.key_value(SESSIONS_BUCKET)

    async def held() -> str | None:
        try:
            record = json.loads((await kv.get(chat)).value or b"null")
        except nats.js.errors.KeyNotFoundError:
            return None
        return record["session_id"] if record else None

    want = session.session_id if session else None
    await eventually(held, lambda got: got == want, timeout=10, what=f"the registry holding {want} for {chat}")
