"""Who may do what on NATS: the permission matrix of shared/nats_roles.py against a real
nats-server 2.14 running the generated config, with the runtime, the reaper and the API each
connected as its own role.

Every denial is checked twice: the server refuses the publish (its -ERR, which a client only
sees asynchronously), and the effect it would have had is absent (the stream is still there,
the key is unchanged, the consumer is as it was).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, ConsumerInfo, DeliverPolicy, StreamInfo
from nats.js.errors import NotFoundError

from services.reaper.service import running_reaper
from services.runtime.service import running_runtime
from shared.clock import SystemClock
from shared.config import NKEY_FILE_KEY, Settings, StreamSettings
from shared.instances import Instances, Liveness
from shared.nats_connection import NatsRefused, connect
from shared.nats_credentials import ensure_seed
from shared.nats_roles import Role
from shared.nodes import NODE_KEY_PREFIX
from shared.subjects import (
    COMMANDS_STREAM,
    EVENTS_STREAM,
    INSTANCES_BUCKET,
    NODE_COMMANDS_STREAM,
    SESSIONS_BUCKET,
    STATUS_BUCKET,
    ConsumerName,
    node_command_subject,
    node_commands_of,
    node_consumer,
)
from shared.topology import STATUS, TopologyMissing, ensure_bucket, ensure_topology
from tests.conftest import TEST_TOKEN, missing, settings_for
from tests.support.api_server import serving_api
from tests.support.eventually import eventually, until
from tests.support.nats_parties import Party, connect_as
from tests.support.nats_server import NatsServer, secured_nats_server
from tests.support.processes import make_sandbox_dirs

CHAT = "3f0c9a7e-2b1d-4c8e-9f6a-5d4e3c2b1a09"  # the chat-scoped agent's chat
API = "$JS.API"
SESSIONS = f"KV_{SESSIONS_BUCKET}"
KV = f"$KV.{SESSIONS_BUCKET}"
RUNTIME_CONSUMER = ConsumerName.RUNTIME
PROJECTOR_CONSUMER = ConsumerName.PROJECTOR


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[NatsServer]:
    try:
        with secured_nats_server(tmp_path / "secured", chats=(CHAT,)) as server:
            yield server
    except (OSError, RuntimeError) as exc:
        missing(f"cannot run nats-server: {exc}")


@dataclass
class System:
    server: NatsServer
    api: str
    admin: Party

    async def stream(self, name: str) -> StreamInfo:
        return await self.admin.nc.jetstream().stream_info(name)

    async def consumer(self, stream: str, name: str) -> ConsumerInfo:
        info: ConsumerInfo = await self.admin.nc.jetstream().consumer_info(stream, name)
        return info

    async def last_event_seq(self, chat: str) -> int | None:
        try:
            return (await self.admin.nc.jetstream().get_last_msg(EVENTS_STREAM, f"sandbox.events.{chat}")).seq
        except NotFoundError:
            return None

    async def registry_revision(self, chat: str) -> int | None:
        try:
            return (await self.admin.nc.jetstream().get_last_msg(SESSIONS, f"{KV}.{chat}")).seq
        except NotFoundError:
            return None

    async def registry_version(self, chat: str) -> int | None:
        """The `version` of the chat's registry record: the event sequence it reflects."""
        try:
            raw = await self.admin.nc.jetstream().get_last_msg(SESSIONS, f"{KV}.{chat}")
        except NotFoundError:
            return None
        version = json.loads(raw.data or b"{}").get("version")
        return int(version) if version is not None else None

    async def connect(self, role: Role | None = None, *, chat: str | None = None) -> Party:
        return await connect_as(self.server, role, chat=chat)


def role_settings(server: NatsServer, root: Path, node_id: str, role: Role) -> Settings:
    return settings_for(
        server.url,
        root,
        node_id,
        SANDBOXD_NATS_NKEY_FILE=str(server.seed_file(role)),
        SANDBOXD_NATS_REQUEST_TIMEOUT_SECONDS="2",
        SANDBOXD_TELEMETRY_STATUS_INTERVAL_SECONDS="0.2",
        SANDBOXD_REAPER_STATUS_INTERVAL_SECONDS="0.2",
    )


@pytest.fixture
async def system(
    secured: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient, node_containers: None
) -> AsyncIterator[System]:
    """Declared as admin, then the runtime (on the real Docker engine), the reaper and the
    API, each with its own seed."""
    make_sandbox_dirs(tmp_path)
    admin = await connect_as(secured, Role.ADMIN)
    js = admin.nc.jetstream()
    await ensure_topology(js, StreamSettings())
    await ensure_bucket(js, STATUS, StreamSettings())
    as_role = {role: role_settings(secured, tmp_path, node_id, role) for role in (Role.RUNTIME, Role.REAPER, Role.API)}
    async with (
        running_runtime(as_role[Role.RUNTIME]),
        running_reaper(as_role[Role.REAPER]) as reaper,
        serving_api(as_role[Role.API]) as base,
    ):
        await reaper.ready()
        system = System(secured, base, admin)
        await eventually(lambda: system.consumer(COMMANDS_STREAM, RUNTIME_CONSUMER), lambda _: True)
        await eventually(lambda: system.consumer(EVENTS_STREAM, PROJECTOR_CONSUMER), lambda _: True)
        yield system
    await admin.close()


def command(chat: str, **extra: Any) -> tuple[str, bytes]:
    command_id = str(uuid.uuid4())
    return command_id, json.dumps({"command_id": command_id, "chat_id": chat, **extra}).encode()


class Events:
    """One chat's events through an ordered consumer whose name is in its create subject
    (the only kind an outside party may create on SANDBOX_EVENTS)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def on_msg(self, msg: Msg) -> None:
        self.events.append(json.loads(msg.data))

    @classmethod
    async def of(cls, party: Party, chat: str) -> Events:
        events = cls()
        await party.js.subscribe(
            f"sandbox.events.{chat}",
            stream=EVENTS_STREAM,
            cb=events.on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            config=ConsumerConfig(name=f"watch-{uuid.uuid4().hex[:12]}"),
        )
        return events

    async def outcome(self, command_id: str, kind: str) -> dict[str, Any]:
        def match(e: dict[str, Any]) -> bool:
            return e.get("causation_id") == command_id and e["type"] == kind

        await until(lambda: any(match(e) for e in self.events))
        return next(e for e in self.events if match(e))


async def create_as(party: Party, chat: str) -> dict[str, Any]:
    """Publish a create straight to NATS (as an agent would) and wait for its `running` event."""
    events = await Events.of(party, chat)
    command_id, body = command(chat)
    ack = await party.js.publish(f"sandbox.cmd.create.{chat}", body, headers={"Nats-Msg-Id": command_id})
    assert ack.stream == COMMANDS_STREAM
    return await events.outcome(command_id, "running")


# --------------------------------------------------------------------------- the system works


async def test_anonymous_and_unknown_users_are_refused(secured: NatsServer, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="Authorization Violation"):
        await connect_as(secured)
    stranger = tmp_path / "stranger.nk"
    ensure_seed(stranger)
    with pytest.raises(Exception, match="Authorization Violation"):
        await connect_as(secured, seed_file=stranger)


async def test_a_refused_key_fails_start_up_naming_it(secured: NatsServer, tmp_path: Path, node_id: str) -> None:
    stranger = tmp_path / "stranger.nk"
    ensure_seed(stranger)
    for extra, needle in (
        ({"SANDBOXD_NATS_NKEY_FILE": str(stranger)}, f"refused the user of {NKEY_FILE_KEY} = {stranger}"),
        ({}, f"requires authentication (nats: 'Authorization Violation'): set {NKEY_FILE_KEY}"),
    ):
        settings = settings_for(secured.url, tmp_path, node_id, **extra)
        with pytest.raises(NatsRefused) as refused:
            await connect(settings.nats, name="test")
        assert needle in str(refused.value)


async def test_each_process_runs_as_its_role(system: System, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shared.nats_connection")
    agent = await system.connect(Role.AGENT)
    assert (await create_as(agent, str(uuid.uuid4())))["result"] == "created"

    chat = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=system.api, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http:
        # With an idempotency key: the API claims it, stores the answer and reads it back.
        keyed = {"Idempotency-Key": f"roles-{chat}"}
        created = await http.post("/api/v1/sandboxes", json={"chat_id": chat}, headers=keyed)
        assert created.status_code == 201, created.text
        again = await http.post("/api/v1/sandboxes", json={"chat_id": chat}, headers=keyed)
        assert (again.status_code, again.json()) == (201, created.json())
        assert (await http.get(f"/api/v1/sandboxes/{chat}")).json()["session_id"] == created.json()["session_id"]
        history = (await http.get(f"/api/v1/sandboxes/{chat}/events")).json()["events"]
        assert [e["event"]["type"] for e in history] == ["provisioning", "running"]
        await eventually(
            lambda: http.get("/api/v1/sandboxes"), lambda r: chat in {s["chat_id"] for s in r.json()["sessions"]}
        )

        # Stream and consumer info, the registry, and both kinds of status block: the API reads
        # them, the runtime and the reaper wrote their blocks.
        def complete(r: httpx.Response) -> bool:
            sections = r.json()["sections"]
            return bool(r.json()["ok"] and sections["reapers"]["data"] and sections["runtime_nodes"]["data"])

        status = (await eventually(lambda: http.get("/api/v1/status"), complete)).json()
        assert status["sections"]["consumers"]["data"][RUNTIME_CONSUMER]["stream"] == COMMANDS_STREAM
        assert (await http.delete(f"/api/v1/sandboxes/{chat}")).status_code == 200
    await agent.close()
    violations = [r.getMessage() for r in caplog.get_records("setup") + caplog.records]
    assert not [v for v in violations if "permissions violation" in v.lower()], violations


async def test_a_process_without_a_declared_topology_says_what_to_run(
    secured: NatsServer, tmp_path: Path, node_id: str
) -> None:
    settings = role_settings(secured, tmp_path, node_id, Role.RUNTIME)
    with pytest.raises(TopologyMissing, match=r"stream SANDBOX_COMMANDS does not exist.*sandboxctl declare"):
        async with running_runtime(settings):
            pass


# --------------------------------------------------------------------------- agents


async def test_agent_commands_and_reads_events_and_the_registry(system: System) -> None:
    agent = await system.connect(Role.AGENT)
    chat = str(uuid.uuid4())
    feed = await agent.nc.subscribe("sandbox.events.>")  # the core feed: what the stream stored
    running = await create_as(agent, chat)

    last = await agent.js.get_last_msg(EVENTS_STREAM, f"sandbox.events.{chat}", direct=True)
    assert json.loads(last.data or b"")["event_id"] == running["event_id"]
    assert (await agent.js.get_msg(EVENTS_STREAM, last.seq)).subject == f"sandbox.events.{chat}"
    fed = [json.loads((await feed.next_msg(timeout=5)).data)["type"] for _ in range(2)]
    assert fed == ["provisioning", "running"]

    registry = await agent.js.key_value(SESSIONS_BUCKET)
    record = await eventually(lambda: registry.get(chat), lambda e: e.value is not None)
    assert json.loads(record.value or b"")["session_id"] == running["session"]["session_id"]
    watcher = await registry.watchall()
    keys = []
    async for entry in watcher:
        if entry is None:
            break
        keys.append(entry.key)
    await watcher.stop()  # type: ignore[no-untyped-call]
    assert chat in keys
    assert agent.errors == []
    await agent.close()


async def test_agent_cannot_write_events_registry_or_status(system: System) -> None:
    agent = await system.connect(Role.AGENT)
    chat = str(uuid.uuid4())
    await create_as(agent, chat)
    event_seq = await system.last_event_seq(chat)
    # The registry has caught up with the chat's last event (not just its first).
    await eventually(lambda: system.registry_version(chat), lambda v: v == event_seq)
    revision = await system.registry_revision(chat)
    forged = json.dumps({"type": "stopped", "chat_id": chat}).encode()

    assert await agent.attempt(f"sandbox.events.{chat}", forged, {"Sandbox-Event": "stopped"})
    assert await agent.attempt(f"sandbox.events.{uuid.uuid4()}", forged)
    assert await agent.attempt(f"{KV}.{chat}", b"{}")
    assert await agent.attempt(f"{KV}.{chat}", b"", {"KV-Operation": "DEL"})
    assert await agent.attempt(f"$KV.{STATUS_BUCKET}.reaper.forged", b"{}")
    assert await system.last_event_seq(chat) == event_seq
    assert await system.registry_revision(chat) == revision
    with pytest.raises(NotFoundError):
        await system.admin.nc.jetstream().get_last_msg(f"KV_{STATUS_BUCKET}", f"$KV.{STATUS_BUCKET}.reaper.forged")
    await agent.close()


async def test_agent_cannot_manage_streams_or_consumers(system: System) -> None:
    """(d) purge, delete, update, message delete, consumer delete and pause: all refused."""
    agent = await system.connect(Role.AGENT)
    await create_as(agent, str(uuid.uuid4()))
    # The runtime acknowledges the command just after its outcome: wait until the work queue
    # is empty, or its first sequence moves under the snapshot.
    await eventually(lambda: system.stream(COMMANDS_STREAM), lambda info: info.state.messages == 0)
    before = {s: (await system.stream(s)).state for s in (COMMANDS_STREAM, EVENTS_STREAM, SESSIONS)}
    config = (await system.stream(EVENTS_STREAM)).config.as_dict()
    for subject, body in [
        (f"{API}.STREAM.PURGE.{EVENTS_STREAM}", b"{}"),
        (f"{API}.STREAM.PURGE.{SESSIONS}", b"{}"),
        (f"{API}.STREAM.DELETE.{EVENTS_STREAM}", b""),
        (f"{API}.STREAM.DELETE.{COMMANDS_STREAM}", b""),
        (f"{API}.STREAM.UPDATE.{EVENTS_STREAM}", json.dumps({**config, "max_msgs": 1}).encode()),
        (f"{API}.STREAM.CREATE.AGENT_STREAM", json.dumps({"name": "AGENT_STREAM", "subjects": ["x"]}).encode()),
        (f"{API}.STREAM.MSG.DELETE.{EVENTS_STREAM}", b'{"seq": 1}'),
        (f"{API}.CONSUMER.DELETE.{EVENTS_STREAM}.{PROJECTOR_CONSUMER}", b""),
        (f"{API}.CONSUMER.DELETE.{COMMANDS_STREAM}.{RUNTIME_CONSUMER}", b""),
        (f"{API}.CONSUMER.PAUSE.{EVENTS_STREAM}.{PROJECTOR_CONSUMER}", b'{"pause_until": "2999-01-01T00:00:00Z"}'),
    ]:
        assert await agent.attempt(subject, body), subject
    for stream, state in before.items():
        now = (await system.stream(stream)).state
        assert (now.first_seq, now.last_seq) == (state.first_seq, state.last_seq), stream
    assert (await system.stream(EVENTS_STREAM)).config.max_msgs == config.get("max_msgs", -1)
    assert (await system.consumer(EVENTS_STREAM, PROJECTOR_CONSUMER)).config.pause_until is None
    await system.consumer(COMMANDS_STREAM, RUNTIME_CONSUMER)
    await agent.close()


async def test_agent_cannot_rewrite_the_projector(system: System) -> None:
    """(a) The legacy create subject takes the consumer's name from the body: an agent may not
    use it on SANDBOX_EVENTS, nor name the projector in any create subject."""
    agent = await system.connect(Role.AGENT)
    before = (await system.consumer(EVENTS_STREAM, PROJECTOR_CONSUMER)).config
    hijack = {"name": PROJECTOR_CONSUMER, "ack_policy": "explicit", "filter_subject": "sandbox.events.nothing"}
    legacy = f"{API}.CONSUMER.CREATE.{EVENTS_STREAM}"
    for extra in ({}, {"action": ""}, {"action": "update"}, {"action": "create"}):
        body = {"stream_name": EVENTS_STREAM, "config": {**hijack, "max_ack_pending": 1}, **extra}
        assert await agent.attempt(legacy, json.dumps(body).encode())
    durable = {"stream_name": EVENTS_STREAM, "config": {**hijack, "durable_name": PROJECTOR_CONSUMER}}
    for subject in (
        legacy,
        f"{API}.CONSUMER.CREATE.{EVENTS_STREAM}.{PROJECTOR_CONSUMER}",
        f"{API}.CONSUMER.CREATE.{EVENTS_STREAM}.{PROJECTOR_CONSUMER}.sandbox.events.nothing",
        f"{API}.CONSUMER.DURABLE.CREATE.{EVENTS_STREAM}.{PROJECTOR_CONSUMER}",
    ):
        assert await agent.attempt(subject, json.dumps(durable).encode()), subject
    # Under a name of its own the create is allowed, and the server names the consumer after
    # the subject, whatever the body says.
    own = f"agent-{uuid.uuid4().hex[:8]}"
    reply = await agent.nc.request(
        f"{API}.CONSUMER.CREATE.{EVENTS_STREAM}.{own}.sandbox.events.nothing",
        json.dumps({"stream_name": EVENTS_STREAM, "config": hijack}).encode(),
        timeout=5,
    )
    assert json.loads(reply.data)["name"] == own
    assert (await system.consumer(EVENTS_STREAM, PROJECTOR_CONSUMER)).config == before
    await agent.close()


async def test_agent_cannot_take_or_see_the_systems_messages(system: System) -> None:
    """(c) No pull, ack or nak on the runtime's or the projector's consumer; no reading of
    SANDBOX_COMMANDS in any way."""
    agent = await system.connect(Role.AGENT)
    await create_as(agent, str(uuid.uuid4()))
    for subject, body in [
        (f"{API}.CONSUMER.MSG.NEXT.{COMMANDS_STREAM}.{RUNTIME_CONSUMER}", b'{"batch": 10}'),
        (f"{API}.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{PROJECTOR_CONSUMER}", b'{"batch": 10}'),
        (f"$JS.ACK.{COMMANDS_STREAM}.{RUNTIME_CONSUMER}.1.1.1.0.0", b""),
        (f"$JS.ACK.{COMMANDS_STREAM}.{RUNTIME_CONSUMER}.1.1.1.0.0", b"-NAK"),
        (f"$JS.ACK.{EVENTS_STREAM}.{PROJECTOR_CONSUMER}.1.1.1.0.0", b"+TERM"),
        (f"$JS.ACK._.hash.{COMMANDS_STREAM}.{RUNTIME_CONSUMER}.1.1.1.0.0.0", b""),
        (f"{API}.STREAM.INFO.{COMMANDS_STREAM}", b""),
        (f"{API}.STREAM.MSG.GET.{COMMANDS_STREAM}", b'{"seq": 1}'),
        (f"{API}.DIRECT.GET.{COMMANDS_STREAM}", b'{"seq": 1}'),
        (f"{API}.CONSUMER.CREATE.{COMMANDS_STREAM}.spy.sandbox.cmd.>", b"{}"),
        (f"{API}.CONSUMER.CREATE.{COMMANDS_STREAM}", b"{}"),
        (f"{API}.CONSUMER.INFO.{COMMANDS_STREAM}.{RUNTIME_CONSUMER}", b""),
        (f"{API}.CONSUMER.LIST.{EVENTS_STREAM}", b""),
    ]:
        assert await agent.attempt(subject, body), subject
    await agent.nc.subscribe("sandbox.cmd.>")
    assert await agent.denied("sandbox.cmd.>", subscribe=True)
    await agent.close()


async def test_agent_cannot_reach_other_clients_inboxes(system: System) -> None:
    agent = await system.connect(Role.AGENT)
    for subject in ("_INBOX_api.x", "_INBOX_runtime.x.1", "_INBOX_admin.x", "_INBOX.x", "_INBOX_chat.x"):
        assert await agent.attempt(subject, b"{}"), subject
    for subject in ("_INBOX_api.>", "_INBOX_runtime.>", "_INBOX_chat.>", "$KV.>", ">"):
        await agent.nc.subscribe(subject)
        assert await agent.denied(subject, subscribe=True), subject
    await agent.close()


async def test_server_answers_cannot_be_aimed_at_the_system(system: System) -> None:
    """The server sends the answer to a request wherever its reply subject says, without
    checking the requester's permissions. Inside SANDBOXD an empty direct-get answer aimed at
    `$JS.API.STREAM.DELETE.<stream>` deletes the stream; from the agents' account the same
    answers land in the agents' own subject space, where nothing of the system listens."""
    agent = await system.connect(Role.AGENT)
    chat, target = str(uuid.uuid4()), str(uuid.uuid4())
    await create_as(agent, chat)
    events = (await system.stream(EVENTS_STREAM)).state.messages
    control = await agent.nc.subscribe("_INBOX.control.*")
    nothing = f"{API}.DIRECT.GET.{EVENTS_STREAM}.sandbox.events.{uuid.uuid4()}"  # answers an empty 404
    for reply in (
        f"{API}.STREAM.DELETE.{EVENTS_STREAM}",
        f"{API}.STREAM.PURGE.{EVENTS_STREAM}",
        f"{API}.STREAM.DELETE.{COMMANDS_STREAM}",
        f"{API}.CONSUMER.DELETE.{EVENTS_STREAM}.{PROJECTOR_CONSUMER}",
        f"{API}.CONSUMER.DELETE.{COMMANDS_STREAM}.{RUNTIME_CONSUMER}",
        "_INBOX.control.1",
    ):
        await agent.nc.publish(nothing, b"", reply=reply)
    # A PubAck aimed at an event subject and at a registry key, a stream info at a key.
    _, body = command(chat)
    await agent.nc.publish(f"sandbox.cmd.keepalive.{chat}", body, reply=f"sandbox.events.{target}")
    await agent.nc.publish(f"sandbox.cmd.keepalive.{chat}", body, reply=f"{KV}.{target}")
    await agent.nc.publish(f"{API}.STREAM.INFO.{EVENTS_STREAM}", b"", reply=f"{KV}.{chat}")
    await agent.nc.publish(f"sandbox.cmd.keepalive.{chat}", body, reply="_INBOX.control.2")
    await agent.nc.flush()
    answered = {(await control.next_msg(timeout=5)).subject for _ in range(2)}
    assert answered == {"_INBOX.control.1", "_INBOX.control.2"}  # the server did answer

    assert ((await system.stream(EVENTS_STREAM)).state.messages or 0) >= (events or 0)
    await system.consumer(EVENTS_STREAM, PROJECTOR_CONSUMER)
    await system.consumer(COMMANDS_STREAM, RUNTIME_CONSUMER)
    await system.stream(COMMANDS_STREAM)
    assert await system.last_event_seq(target) is None
    assert await system.registry_revision(target) is None
    record = await system.admin.nc.jetstream().get_last_msg(SESSIONS, f"{KV}.{chat}")
    assert json.loads(record.data or b"")["chat_id"] == chat  # still the projector's record
    assert agent.errors == []  # nothing above needed a permission the agent lacks
    # Acks are the one kind of reply subject the server reserves.
    await agent.nc.publish(nothing, b"", reply=f"$JS.ACK.{COMMANDS_STREAM}.{RUNTIME_CONSUMER}.1.1.1.0.0")
    await until(lambda: any("publish with reply of" in e for e in agent.errors))
    await agent.close()


async def test_push_consumers_cannot_deliver_into_the_system(system: System) -> None:
    """(b) A consumer's deliver subject is in its body, beyond any permission: an agent may
    aim one at a registry key, a command or event subject or another role's inbox. The server
    delivers only to a subscription on exactly that subject, and no outside party can make
    one in SANDBOXD; so nothing arrives there (a control consumer aimed at the agent's own
    inbox shows deliveries do flow)."""
    agent = await system.connect(Role.AGENT)
    chat, target = str(uuid.uuid4()), str(uuid.uuid4())
    await create_as(agent, chat)
    await eventually(lambda: system.registry_revision(chat), lambda r: r is not None)
    await eventually(lambda: system.stream(COMMANDS_STREAM), lambda s: s.state.messages == 0)
    await agent.nc.subscribe(f"sandbox.events.{target}")  # the feed: no interest inside SANDBOXD
    counts = {s: (await system.stream(s)).state.messages for s in (COMMANDS_STREAM, EVENTS_STREAM, SESSIONS)}

    async def push(stream: str, deliver: str) -> str:
        name = f"push-{uuid.uuid4().hex[:8]}"
        config = {"name": name, "deliver_subject": deliver, "ack_policy": "none", "deliver_policy": "all"}
        reply = await agent.nc.request(
            f"{API}.CONSUMER.CREATE.{stream}.{name}", json.dumps({"stream_name": stream, "config": config}).encode()
        )
        assert json.loads(reply.data).get("error") is None, reply.data
        return name

    attacks = [
        (EVENTS_STREAM, await push(EVENTS_STREAM, f"{KV}.{target}")),
        (EVENTS_STREAM, await push(EVENTS_STREAM, f"sandbox.cmd.create.{target}")),
        (EVENTS_STREAM, await push(EVENTS_STREAM, f"$KV.{STATUS_BUCKET}.runtime.forged")),
        (EVENTS_STREAM, await push(EVENTS_STREAM, "_INBOX_api.forged")),
        (SESSIONS, await push(SESSIONS, f"sandbox.events.{target}")),
        (SESSIONS, await push(SESSIONS, f"{API}.STREAM.PURGE.{EVENTS_STREAM}")),
    ]
    control = await agent.nc.subscribe("_INBOX.delivered")
    await push(EVENTS_STREAM, "_INBOX.delivered")
    await control.next_msg(timeout=5)

    for stream, name in attacks:
        delivered = (await system.consumer(stream, name)).delivered
        assert delivered is None or delivered.consumer_seq == 0, name
    assert {s: (await system.stream(s)).state.messages for s in counts} == counts
    assert await system.last_event_seq(target) is None
    assert await system.registry_revision(target) is None
    await agent.close()


# --------------------------------------------------------------------------- other roles


async def test_reaper_publishes_only_stops_pauses_and_warnings(system: System) -> None:
    """Its commands only; never an event (the runtime checks a `warn` and appends `expiring`)."""
    reaper = await system.connect(Role.REAPER)
    created, stopped = str(uuid.uuid4()), str(uuid.uuid4())
    events = await Events.of(await system.connect(Role.AGENT), stopped)
    assert await reaper.attempt(f"sandbox.cmd.create.{created}", command(created)[1])
    command_id, body = command(stopped, reason="expired")
    assert (await reaper.js.publish(f"sandbox.cmd.stop.{stopped}", body)).stream == COMMANDS_STREAM
    await events.outcome(command_id, "rejected")  # nothing to stop; the runtime answered
    assert await system.last_event_seq(created) is None

    assert await reaper.attempt(f"{KV}.{created}", b"{}")
    assert await reaper.attempt(f"$KV.{STATUS_BUCKET}.runtime.forged", b"{}")
    assert await reaper.attempt(f"sandbox.events.{created}", b"{}")
    assert await reaper.attempt(f"sandbox.cmd.keepalive.{created}", b"{}")
    assert await reaper.attempt(f"sandbox.cmd.resume.{created}", b"{}")
    for kind in ("pause", "warn"):
        ack = await reaper.js.publish(f"sandbox.cmd.{kind}.{stopped}", b"{}")
        assert ack.stream == COMMANDS_STREAM, kind
    assert await reaper.attempt(f"{API}.STREAM.PURGE.{COMMANDS_STREAM}", b"{}")
    status = await reaper.js.key_value(STATUS_BUCKET)
    await status.put("reaper.permission-test", b"{}")
    await reaper.nc.subscribe("_INBOX_api.>")
    assert await reaper.denied("_INBOX_api.>", subscribe=True)
    await reaper.close()


async def test_auditor_reads_but_cannot_command(system: System) -> None:
    auditor = await system.connect(Role.AUDITOR)
    agent = await system.connect(Role.AGENT)
    chat = str(uuid.uuid4())
    running = await create_as(agent, chat)
    events = await Events.of(auditor, chat)
    await until(lambda: any(e["event_id"] == running["event_id"] for e in events.events))
    status = await auditor.js.key_value(STATUS_BUCKET)
    blocks = await eventually(status.keys, lambda keys: any(k.startswith("reaper.") for k in keys))
    assert (await status.get(next(k for k in blocks if k.startswith("reaper.")))).value

    other = str(uuid.uuid4())
    assert await auditor.attempt(f"sandbox.cmd.create.{other}", command(other)[1])
    assert await auditor.attempt(f"sandbox.cmd.stop.{chat}", command(chat)[1])
    assert await auditor.attempt(f"$KV.{STATUS_BUCKET}.reaper.forged", b"{}")
    assert await system.last_event_seq(other) is None
    await auditor.close()
    await agent.close()


async def test_internal_roles_hold_only_their_own_rights(system: System) -> None:
    runtime, api = await system.connect(Role.RUNTIME), await system.connect(Role.API)
    chat = str(uuid.uuid4())
    assert await runtime.attempt(f"sandbox.cmd.create.{chat}", command(chat)[1])
    assert await runtime.attempt(f"{API}.STREAM.PURGE.{EVENTS_STREAM}", b"{}")
    assert await runtime.attempt(f"{API}.CONSUMER.MSG.NEXT.{COMMANDS_STREAM}.other", b"{}")
    assert await runtime.attempt(f"$KV.{STATUS_BUCKET}.reaper.forged", b"{}")
    assert await api.attempt(f"sandbox.events.{chat}", b"{}")
    assert await api.attempt(f"{KV}.{chat}", b"{}")
    assert await api.attempt(f"{API}.CONSUMER.MSG.NEXT.{COMMANDS_STREAM}.{RUNTIME_CONSUMER}", b"{}")
    assert await api.attempt(f"{API}.STREAM.CREATE.{EVENTS_STREAM}", b"{}")
    assert await system.last_event_seq(chat) is None
    await runtime.close()
    await api.close()


async def test_only_runtimes_forward_commands_to_nodes_and_consume_the_nodes_queues(system: System) -> None:
    """`sandbox.node.>` (SANDBOX_NODE_COMMANDS) is the runtimes' alone: a command there is
    carried out by the node it names without any further check of who sent it."""
    chat = str(uuid.uuid4())
    forwarded = node_command_subject("node-x", "create", chat)
    for role in (Role.API, Role.REAPER, Role.AGENT, Role.AUDITOR):
        party = await system.connect(role)
        assert await party.attempt(forwarded, command(chat)[1]), role
        assert await party.attempt(f"{API}.CONSUMER.MSG.NEXT.{NODE_COMMANDS_STREAM}.{node_consumer('node-x')}"), role
        await party.close()
    runtime = await system.connect(Role.RUNTIME)
    ack = await runtime.js.publish(forwarded, command(chat)[1], headers={"Nats-Msg-Id": str(uuid.uuid4())})
    assert ack.stream == NODE_COMMANDS_STREAM
    await runtime.js.add_consumer(
        NODE_COMMANDS_STREAM, durable_name=node_consumer("node-x"), filter_subject=node_commands_of("node-x")
    )
    sub = await runtime.js.pull_subscribe_bind(node_consumer("node-x"), NODE_COMMANDS_STREAM)
    [msg] = await sub.fetch(1, timeout=5)
    assert msg.subject == forwarded
    await msg.ack()
    await runtime.close()


async def test_runtimes_heartbeat_and_read_each_others_heartbeats_and_nobody_else_writes_them(
    system: System,
) -> None:
    """The running runtime's heartbeat is in `sandbox_instances`; another runtime instance
    reads it (one direct get) and judges it alive; no other role may write one."""
    kv = await system.admin.nc.jetstream().key_value(INSTANCES_BUCKET)
    keys = await eventually(
        kv.keys, lambda found: any(not k.startswith(NODE_KEY_PREFIX) for k in found), what="a heartbeat"
    )
    (running,) = [k for k in keys if not k.startswith(NODE_KEY_PREFIX)]
    peer = await system.connect(Role.RUNTIME)
    peer_kv = await peer.js.key_value(INSTANCES_BUCKET)
    instances = Instances(peer_kv, SystemClock(), node_id="peer", dead_after=timedelta(seconds=5))
    assert await instances.liveness(running) == Liveness.ALIVE
    assert await instances.liveness(str(uuid.uuid4())) == Liveness.DEAD
    await instances.beat()
    assert instances.instance_id in await kv.keys()
    for role in (Role.API, Role.REAPER, Role.AGENT, Role.AUDITOR):
        party = await system.connect(role)
        assert await party.attempt(f"$KV.{INSTANCES_BUCKET}.{running}", b"{}"), role
        await party.close()
    await peer.close()


async def test_admin_purges_and_keeps_its_replies_private(system: System) -> None:
    agent = await system.connect(Role.AGENT)
    await create_as(agent, str(uuid.uuid4()))
    await system.admin.nc.jetstream().purge_stream(EVENTS_STREAM)
    assert (await system.stream(EVENTS_STREAM)).state.messages == 0
    # With the default `_INBOX` prefix the admin's replies would be visible to outside parties
    # (their deliveries share that namespace): refused, not leaked.
    careless = await connect_as(system.server, Role.ADMIN, inbox="_INBOX")
    with pytest.raises(Exception):  # noqa: B017, PT011 - a time-out: the reply subscription was refused
        await careless.nc.request(f"{API}.INFO", b"", timeout=1)
    assert any('subscription to "_inbox.' in e.lower() for e in careless.errors), careless.errors
    await careless.close()
    await agent.close()


# --------------------------------------------------------------------------- what the design rests on
# nats-server behaviour, shown inside SANDBOXD on scratch objects: why outside parties get
# accounts of their own and may not use the legacy create subject. Should a server version
# change this, these fail, and shared/nats_roles.py could be simpler.


async def test_inside_one_account_an_answer_aimed_at_the_api_is_executed(system: System) -> None:
    js = system.admin.nc.jetstream()
    await js.add_stream(name="SCRATCH", subjects=["scratch.>"])
    reaper = await system.connect(Role.REAPER)  # may direct-get registry keys, nothing more
    control = await reaper.nc.subscribe("_INBOX_reaper.control")
    nothing = f"{API}.DIRECT.GET.{SESSIONS}.{KV}.{uuid.uuid4()}"
    await reaper.nc.publish(nothing, b"", reply=f"{API}.STREAM.DELETE.SCRATCH")
    await reaper.nc.publish(nothing, b"", reply="_INBOX_reaper.control")
    await control.next_msg(timeout=5)

    async def scratch_exists() -> bool:
        try:
            await system.stream("SCRATCH")
        except NotFoundError:
            return False
        return True

    await eventually(scratch_exists, lambda exists: not exists)  # deleted by the server's own answer
    assert reaper.errors == []  # and no permission of the reaper's was needed
    await reaper.close()


async def test_the_legacy_create_subject_rewrites_a_durable_named_in_the_body(system: System) -> None:
    js = system.admin.nc.jetstream()
    await js.add_consumer(EVENTS_STREAM, ConsumerConfig(durable_name="scratch", filter_subject="sandbox.events.>"))
    api = await system.connect(Role.API)  # may use the legacy subject for its ordered consumers
    config = {"name": "scratch", "ack_policy": "explicit", "filter_subject": "sandbox.events.none"}
    body = {"stream_name": EVENTS_STREAM, "config": config}
    reply = await api.nc.request(f"{API}.CONSUMER.CREATE.{EVENTS_STREAM}", json.dumps(body).encode(), timeout=5)
    assert json.loads(reply.data).get("name") == "scratch", reply.data
    rewritten = (await system.consumer(EVENTS_STREAM, "scratch")).config
    assert rewritten.filter_subject == "sandbox.events.none"
    assert rewritten.durable_name is None
    await api.close()


# --------------------------------------------------------------------------- chat-scoped agents


async def test_chat_agent_acts_only_on_its_chat(system: System) -> None:
    chat_agent = await system.connect(chat=CHAT)
    running = await create_as(chat_agent, CHAT)
    assert running["result"] == "created"
    last = await chat_agent.js.get_last_msg(EVENTS_STREAM, f"sandbox.events.{CHAT}", direct=True)
    assert json.loads(last.data or b"")["event_id"] == running["event_id"]
    registry = await chat_agent.js.key_value(SESSIONS_BUCKET)
    await eventually(lambda: registry.get(CHAT), lambda e: e.value is not None)
    feed = await chat_agent.nc.subscribe(f"sandbox.events.{CHAT}")
    _, keepalive = command(CHAT)
    await chat_agent.js.publish(f"sandbox.cmd.keepalive.{CHAT}", keepalive)
    assert json.loads((await feed.next_msg(timeout=5)).data)["type"] == "extended"
    assert chat_agent.errors == []

    other = str(uuid.uuid4())
    agent = await system.connect(Role.AGENT)
    await create_as(agent, other)
    others_last = await system.last_event_seq(other)
    for subject, body in [
        (f"sandbox.cmd.create.{other}", command(other)[1]),
        (f"sandbox.cmd.stop.{other}", command(other)[1]),
        (f"{API}.DIRECT.GET.{EVENTS_STREAM}.sandbox.events.{other}", b""),
        (f"{API}.DIRECT.GET.{EVENTS_STREAM}", json.dumps({"last_by_subj": f"sandbox.events.{other}"}).encode()),
        (f"{API}.STREAM.MSG.GET.{EVENTS_STREAM}", b'{"seq": 1}'),
        (f"{API}.DIRECT.GET.{SESSIONS}.{KV}.{other}", b""),
        (f"{API}.CONSUMER.CREATE.{EVENTS_STREAM}.spy.sandbox.events.>", b"{}"),
        (f"{API}.CONSUMER.CREATE.{EVENTS_STREAM}.spy.sandbox.events.{other}", b"{}"),
        (f"{API}.CONSUMER.CREATE.{SESSIONS}", b"{}"),
    ]:
        assert await chat_agent.attempt(subject, body), subject
    for subject in ("sandbox.events.>", f"sandbox.events.{other}", "_INBOX.>", "_INBOX_chat.>"):
        await chat_agent.nc.subscribe(subject)
        assert await chat_agent.denied(subject, subscribe=True), subject
    # A consumer named in an allowed subject but filtering more in its body: the server
    # refuses the mismatch.
    spy = {"name": "spy", "filter_subject": "sandbox.events.>", "deliver_subject": f"_INBOX_chat.{CHAT}.spy"}
    reply = await chat_agent.nc.request(
        f"{API}.CONSUMER.CREATE.{EVENTS_STREAM}.spy.sandbox.events.{CHAT}",
        json.dumps({"stream_name": EVENTS_STREAM, "config": spy}).encode(),
        timeout=5,
    )
    assert json.loads(reply.data)["error"]["err_code"] == 10131  # filter subject mismatch
    assert await system.last_event_seq(other) == others_last
    await chat_agent.close()
    await agent.close()
