"""Reuse over HTTP is a read: a create on a chat whose last event shows a running, unexpired
session is answered `200 reused` from that event, with no command published and no event
appended; anything else takes the command path. Against a real nats-server, the real runtime
and the real Docker engine (services/api/reuse.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import pytest
from nats.js import JetStreamContext

from shared.config import Settings
from shared.contracts import (
    AnyEvent,
    SandboxFailed,
    SandboxLost,
    SandboxProvisioning,
    SandboxRunning,
    SandboxStopped,
    SandboxStopping,
    SessionStatus,
)
from shared.event_store import EventStore
from shared.idempotency import IDEMPOTENCY_HEADER
from shared.subjects import COMMANDS_STREAM, event_subject
from tests.support.appends import append_event
from tests.support.eventually import past
from tests.support.records import session_record

API = "/api/v1"
Client = httpx.AsyncClient
Marks = tuple[int, int]


@pytest.fixture
async def js(settings: Settings) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(settings.nats.url or "")
    yield nc.jetstream()
    await nc.close()


async def marks(js: JetStreamContext, chat: str) -> Marks:
    """(the last sequence of the chat's events, the last sequence of the command stream)."""
    last_event = (await EventStore(js).read(chat)).seq  # the subject's last, poison or not
    commands = await js.stream_info(COMMANDS_STREAM)
    return last_event, commands.state.last_seq


async def create(api: Client, chat: str, **body: Any) -> dict[str, Any]:
    answer = await api.post(f"{API}/sandboxes", json={"chat_id": chat, **body})
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


async def test_a_create_on_a_running_chat_is_answered_from_its_last_event(api: Client, js: JetStreamContext) -> None:
    chat = str(uuid.uuid4())
    first = await create(api, chat, labels={"team": "qa"})
    before = await marks(js, chat)
    view = (await api.get(f"{API}/sandboxes/{chat}")).json()

    plain = await api.post(f"{API}/sandboxes", json={"chat_id": chat})
    # A ttl and labels change nothing on a live session (as the runtime's reuse): still a read.
    named = await api.post(f"{API}/sandboxes", json={"chat_id": chat, "ttl_seconds": 60, "labels": {"x": "y"}})
    seed = await api.post(f"{API}/create", json={"chat_id": chat})

    for answer in (plain, named):
        assert answer.status_code == 200, answer.text
        assert answer.json() == {**view, "result": "reused"}
    assert seed.status_code == 200, seed.text
    assert seed.json()["session_id"] == first["session_id"]
    assert seed.json()["expires_at"] == first["expires_at"]
    assert await marks(js, chat) == before, "no event appended, no command published"
    events = (await api.get(f"{API}/sandboxes/{chat}/events")).json()["events"]
    assert [e["event"]["type"] for e in events] == ["provisioning", "running"]


async def test_an_idempotent_reuse_is_stored_and_a_retry_gets_it(api: Client, js: JetStreamContext) -> None:
    chat = str(uuid.uuid4())
    first = await create(api, chat)
    before = await marks(js, chat)
    key = {IDEMPOTENCY_HEADER: f"reuse-{uuid.uuid4()}"}

    reused = await api.post(f"{API}/sandboxes", json={"chat_id": chat}, headers=key)
    assert reused.status_code == 200, reused.text
    assert (reused.json()["result"], reused.json()["session_id"]) == ("reused", first["session_id"])
    assert await marks(js, chat) == before, "the keyed reuse was a read too"

    # The session ends; the key still stands for the answer it was given.
    assert (await api.delete(f"{API}/sandboxes/{chat}")).status_code == 200
    after_stop = await marks(js, chat)
    retried = await api.post(f"{API}/sandboxes", json={"chat_id": chat}, headers=key)
    assert retried.status_code == 200, retried.text
    assert retried.content == reused.content
    assert retried.headers.get("Idempotent-Replayed") == "true"
    assert await marks(js, chat) == after_stop, "a replayed answer sends nothing"
    other = await api.post(f"{API}/sandboxes", json={"chat_id": chat, "ttl_seconds": 60}, headers=key)
    assert other.status_code == 422, "the key stands for its first request"


async def test_an_expired_session_takes_the_command_path_and_is_replaced(api: Client, js: JetStreamContext) -> None:
    chat = str(uuid.uuid4())
    old = await create(api, chat, ttl_seconds=1)
    await past(datetime.fromisoformat(old["expires_at"]))  # no reaper here: it stays, expired
    events_before, commands_before = await marks(js, chat)

    new = await api.post(f"{API}/sandboxes", json={"chat_id": chat})

    assert new.status_code == 201, new.text
    assert new.json()["result"] == "replaced"
    assert new.json()["session_id"] != old["session_id"]
    events_after, commands_after = await marks(js, chat)
    assert commands_after == commands_before + 1, "the create went through the runtime"
    assert events_after > events_before


async def test_a_ttl_over_the_maximum_is_refused_on_a_live_session_as_before(
    api: Client, js: JetStreamContext, settings: Settings
) -> None:
    chat = str(uuid.uuid4())
    await create(api, chat)
    _, commands_before = await marks(js, chat)

    answer = await api.post(
        f"{API}/sandboxes", json={"chat_id": chat, "ttl_seconds": settings.sandbox.max_ttl_seconds + 1}
    )

    assert answer.status_code == 422, answer.text
    assert "exceeds the maximum" in answer.json()["detail"]
    assert (await marks(js, chat))[1] == commands_before + 1, "the runtime refused it, as it always did"


# A chat's last event, written straight to the stream (sessions on this node, unexpired).
LAST_EVENTS: dict[str, tuple[type[AnyEvent], SessionStatus]] = {
    "running": (SandboxRunning, SessionStatus.RUNNING),
    "provisioning": (SandboxProvisioning, SessionStatus.PROVISIONING),
    "stopping": (SandboxStopping, SessionStatus.STOPPING),
    "stopped": (SandboxStopped, SessionStatus.STOPPED),
    "failed": (SandboxFailed, SessionStatus.FAILED),
    "lost": (SandboxLost, SessionStatus.LOST),
}


@pytest.mark.parametrize(
    ("last", "command_path"),
    [
        ("running", False),
        ("provisioning", True),
        ("stopping", True),
        ("stopped", True),
        ("failed", True),
        ("lost", True),
    ],
)
async def test_only_a_running_session_is_reused_without_a_command(
    api: Client, js: JetStreamContext, settings: Settings, last: str, command_path: bool
) -> None:
    chat = str(uuid.uuid4())
    cls, status = LAST_EVENTS[last]
    # Long ago, so a claim is abandoned (not in flight) and the runtime takes it over at once.
    then = datetime.now(UTC) - timedelta(hours=1)
    session = session_record(
        now=then, ttl=timedelta(days=1), status=status, chat_id=chat, node_id=settings.runtime.node_id
    )
    await append_event(EventStore(js), cls, session, occurred_at=then)
    events_before, commands_before = await marks(js, chat)

    answer = await api.post(f"{API}/sandboxes", json={"chat_id": chat})

    events_after, commands_after = await marks(js, chat)
    if command_path:
        assert answer.status_code == 201, answer.text
        assert answer.json()["session_id"] != session.session_id
        assert commands_after == commands_before + 1, f"a {last} session is not reused from the log"
    else:
        assert answer.status_code == 200, answer.text
        assert (answer.json()["result"], answer.json()["session_id"]) == ("reused", session.session_id)
        assert (events_after, commands_after) == (events_before, commands_before)


async def test_a_poisoned_last_event_takes_the_command_path(api: Client, js: JetStreamContext) -> None:
    chat = str(uuid.uuid4())
    first = await create(api, chat)
    await js.publish(event_subject(chat), b"{not an event")
    events_before, commands_before = await marks(js, chat)

    answer = await api.post(f"{API}/sandboxes", json={"chat_id": chat})

    # The runtime reads the last valid event (running) and reuses it, with an outcome event.
    assert answer.status_code == 200, answer.text
    assert (answer.json()["result"], answer.json()["session_id"]) == ("reused", first["session_id"])
    events_after, commands_after = await marks(js, chat)
    assert commands_after == commands_before + 1
    assert events_after > events_before
