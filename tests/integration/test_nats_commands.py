"""Agents publishing commands straight to NATS, with a real runtime and Docker engine."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import docker
import httpx
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from services.runtime.service import RuntimeHandle
from shared.config import Settings
from shared.subjects import COMMANDS_STREAM, EVENTS_STREAM, ConsumerName, command_subject
from tests.support.eventually import eventually, until

OUTCOMES = {"running", "reused", "extended", "stopped", "failed", "rejected"}


class EventLog:
    """Every message on sandbox.events.> since the test began."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.last_seq = 0  # the stream sequence of the last event seen

    async def on_msg(self, msg: Msg) -> None:
        self.events.append((msg.subject, json.loads(msg.data)))
        self.last_seq = msg.metadata.sequence.stream

    def caused_by(self, command_id: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e.get("causation_id") == command_id]

    def outcomes_of(self, command_id: str) -> list[dict[str, Any]]:
        return [e for e in self.caused_by(command_id) if e["type"] in OUTCOMES]

    def on_subject(self, subject: str) -> list[dict[str, Any]]:
        return [e for s, e in self.events if s == subject]

    async def outcome(self, command_id: str) -> dict[str, Any]:
        await until(lambda: bool(self.outcomes_of(command_id)), what=f"an outcome for command {command_id}")
        return self.outcomes_of(command_id)[0]


@pytest.fixture
async def agent(settings: Settings, runtime: RuntimeHandle) -> AsyncIterator[tuple[Client, EventLog]]:
    nc = await nats.connect(settings.nats.url or "")
    log = EventLog()
    # A stream consumer, not a core subscription: it sees only events the stream stored.
    await nc.jetstream().subscribe(
        "sandbox.events.>", cb=log.on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
    )
    yield nc, log
    await nc.close()


async def publish(nc: Client, kind: str, chat: str, body: dict[str, Any] | bytes, msg_id: str | None = None) -> int:
    """Publish a command; its sequence in the commands stream."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    return (await nc.jetstream().publish(command_subject(kind, chat), data, headers=headers)).seq


async def settled(nc: Client, log: EventLog, seq: int) -> None:
    """Wait until the runtime has settled (acked or terminated) every command up to `seq`,
    then until the log has seen every event stored by then: whatever those commands caused
    is in the log, and nothing is left to be redelivered."""
    js = nc.jetstream()
    await eventually(
        lambda: js.consumer_info(COMMANDS_STREAM, ConsumerName.RUNTIME),
        lambda info: info.ack_floor.stream_seq >= seq and info.num_ack_pending == 0,
        what=f"commands up to {seq} settled",
    )
    stored = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    await until(lambda: log.last_seq >= stored, what=f"the log up to event {stored}")


async def test_create_reuse_stop_by_hand(agent: tuple[Client, EventLog], docker_client: docker.DockerClient) -> None:
    nc, log = agent
    chat = str(uuid.uuid4())
    # What an agent typing a command by hand sends: only the two ids.
    create = str(uuid.uuid4())
    await publish(nc, "create", chat, {"command_id": create, "chat_id": chat})
    running = await log.outcome(create)
    assert running["type"] == "running"
    assert running["result"] == "created"
    session = running["session"]
    assert session["status"] == "running"
    assert docker_client.containers.get(session["container_id"]).status == "running"

    again = str(uuid.uuid4())
    await publish(nc, "create", chat.upper(), {"command_id": again, "chat_id": chat.upper()})
    reused = await log.outcome(again)
    assert reused["type"] == "reused"
    assert reused["session"]["session_id"] == session["session_id"]

    stale = str(uuid.uuid4())
    await publish(nc, "stop", chat, {"command_id": stale, "chat_id": chat, "session_id": str(uuid.uuid4())})
    refused = await log.outcome(stale)
    assert (refused["type"], refused["reason"]) == ("rejected", "stale_session")
    assert docker_client.containers.get(session["container_id"]).status == "running"

    stop = str(uuid.uuid4())
    await publish(
        nc, "stop", chat, {"command_id": stop, "chat_id": chat, "session_id": session["session_id"], "reason": "done"}
    )
    stopped = await log.outcome(stop)
    assert (stopped["type"], stopped["reason"], stopped["session"]["status"]) == ("stopped", "done", "stopped")
    assert not docker_client.containers.list(all=True, filters={"id": session["container_id"]})
    for command_id in (create, again, stale, stop):
        assert len(log.outcomes_of(command_id)) == 1


async def test_many_concurrent_creates_make_one_container(
    agent: tuple[Client, EventLog], settings: Settings, docker_client: docker.DockerClient
) -> None:
    nc, log = agent
    chat = str(uuid.uuid4())
    from tests.conftest import TEST_TOKEN  # noqa: PLC0415
    from tests.support.api_server import serving_api  # noqa: PLC0415

    over_nats = [str(uuid.uuid4()) for _ in range(15)]
    async with (
        serving_api(settings) as url,
        httpx.AsyncClient(base_url=url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        responses, _ = await asyncio.gather(
            asyncio.gather(*(http.post("/api/v1/sandboxes", json={"chat_id": chat}) for _ in range(15))),
            asyncio.gather(*(publish(nc, "create", chat, {"command_id": c, "chat_id": chat}) for c in over_nats)),
        )
        outcomes = [await log.outcome(c) for c in over_nats]
    sessions = {r.json()["session_id"] for r in responses} | {o["session"]["session_id"] for o in outcomes}
    assert len(sessions) == 1
    statuses = sorted(r.status_code for r in responses)
    kinds = [o["type"] for o in outcomes]
    assert statuses.count(201) + kinds.count("running") == 1
    assert set(statuses) <= {200, 201}
    assert set(kinds) <= {"running", "reused"}
    containers = docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})
    assert len(containers) == 1
    running = [e for _, e in log.events if e["type"] == "running" and e["chat_id"] == chat]
    assert len(running) == 1


async def test_malformed_commands_are_rejected_once_and_never_redelivered(
    agent: tuple[Client, EventLog], settings: Settings
) -> None:
    nc, log = agent
    chat = str(uuid.uuid4())
    other = str(uuid.uuid4())
    cases = [
        ("create", chat, b"{not json", "invalid_json"),
        (
            "create",
            chat,
            json.dumps({"command_id": str(uuid.uuid4()), "chat_id": chat, "ttl_seconds": "x"}).encode(),
            "invalid_payload",
        ),
        ("create", chat, json.dumps({"chat_id": chat}).encode(), "invalid_payload"),
        ("stop", chat, json.dumps({"command_id": str(uuid.uuid4()), "chat_id": other}).encode(), "subject_mismatch"),
        ("explode", chat, json.dumps({"command_id": str(uuid.uuid4()), "chat_id": chat}).encode(), "unknown_command"),
    ]
    for kind, subject_chat, data, _ in cases:
        await publish(nc, kind, subject_chat, data)
    last = await publish(
        nc, "create", "not-a-chat", json.dumps({"command_id": str(uuid.uuid4()), "chat_id": chat}).encode()
    )

    await settled(nc, log, last)
    on_chat = log.on_subject(f"sandbox.events.{chat}")
    invalid = log.on_subject("sandbox.events.invalid")
    assert sorted(e["reason"] for e in on_chat) == sorted(c[3] for c in cases)
    assert all(e["type"] == "rejected" and e["session"] is None for e in on_chat)
    assert [e["reason"] for e in invalid] == ["invalid_subject"]
    assert (
        "ttl_seconds" in next(e for e in on_chat if e["error"]["message"].find("ttl_seconds") >= 0)["error"]["message"]
    )

    js = nc.jetstream()
    info = await js.stream_info(COMMANDS_STREAM)
    assert info.state.messages == 0, "terminated commands must leave the work queue"
    consumer = await js.consumer_info(COMMANDS_STREAM, ConsumerName.RUNTIME)
    assert consumer.num_ack_pending == 0
    # Every delivery so far was a first one: each command was delivered once, never again.
    assert consumer.delivered.consumer_seq == consumer.delivered.stream_seq == last


async def test_duplicate_and_redelivered_commands_get_one_outcome(agent: tuple[Client, EventLog]) -> None:
    nc, log = agent
    chat = str(uuid.uuid4())
    command_id = str(uuid.uuid4())
    body = {"command_id": command_id, "chat_id": chat}
    # Same Nats-Msg-Id twice: the stream keeps one.
    await publish(nc, "create", chat, body, msg_id=command_id)
    await publish(nc, "create", chat, body, msg_id=command_id)
    await log.outcome(command_id)
    # The same command again under another message id (a client retrying after the
    # duplicate window): its outcome is already in the log, so nothing new is appended.
    retry = await publish(nc, "create", chat, body, msg_id=command_id + "-retry")
    await settled(nc, log, retry)
    assert len(log.outcomes_of(command_id)) == 1
    assert [e["type"] for e in log.caused_by(command_id)] == ["provisioning", "running"]


async def test_keepalive_moves_expiry(agent: tuple[Client, EventLog]) -> None:
    nc, log = agent
    chat = str(uuid.uuid4())
    create = str(uuid.uuid4())
    await publish(nc, "create", chat, {"command_id": create, "chat_id": chat, "ttl_seconds": 60})
    first = (await log.outcome(create))["session"]
    keep = str(uuid.uuid4())
    await publish(
        nc,
        "keepalive",
        chat,
        {"command_id": keep, "chat_id": chat, "ttl_seconds": 3600, "session_id": first["session_id"]},
    )
    extended = await log.outcome(keep)
    assert extended["type"] == "extended"
    assert extended["session"]["expires_at"] > first["expires_at"]
    # A shorter keepalive never moves the expiry earlier.
    short = str(uuid.uuid4())
    await publish(nc, "keepalive", chat, {"command_id": short, "chat_id": chat, "ttl_seconds": 30})
    kept = await log.outcome(short)
    assert (kept["type"], kept["reason"]) == ("extended", "already_later")
    assert kept["session"]["expires_at"] == extended["session"]["expires_at"]
    stale = str(uuid.uuid4())
    await publish(nc, "keepalive", chat, {"command_id": stale, "chat_id": chat, "session_id": str(uuid.uuid4())})
    assert (await log.outcome(stale))["reason"] == "stale_session"


async def test_a_resent_create_whose_outcome_is_not_last_starts_nothing(
    agent: tuple[Client, EventLog], docker_client: docker.DockerClient
) -> None:
    nc, log = agent
    chat = str(uuid.uuid4())
    create = str(uuid.uuid4())
    body = {"command_id": create, "chat_id": chat}
    await publish(nc, "create", chat, body, msg_id=create)
    await log.outcome(create)
    stop = str(uuid.uuid4())
    await publish(nc, "stop", chat, {"command_id": stop, "chat_id": chat})
    await log.outcome(stop)
    # The same create again (a redelivery after a lost ack looks the same to the runtime):
    # its outcome is in the history, though no longer the chat's last event.
    again = await publish(nc, "create", chat, body, msg_id=create + "-again")
    await settled(nc, log, again)
    assert [e["type"] for e in log.caused_by(create)] == ["provisioning", "running"]
    assert not docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})
