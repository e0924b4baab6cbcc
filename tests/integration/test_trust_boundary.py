"""Attacks on the trust boundary against a real nats-server, runtime, API and Docker engine.

The events and records here are forged by writing to the stream or bucket directly, as a
client with write access (an admin, a bug, an older version) could: nothing read back from
them may choose a mount source, an image or a container to remove, and poison must never
stop a reader.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import nats
import pytest
from nats.aio.client import Client

from services.reaper.service import running_reaper
from services.runtime.docker_driver import DockerDriver, userns_offset
from services.runtime.projector import Projector
from services.runtime.replay import replay
from services.runtime.service import RuntimeHandle, running_runtime
from shared.config import Settings
from shared.contracts import AnyEvent, SessionRecord, encode, is_outcome
from shared.event_store import EventStore
from shared.registry import Registry
from shared.subjects import COMMANDS_STREAM, EVENTS_STREAM, SESSIONS_BUCKET, command_subject, event_subject
from tests.conftest import TEST_IMAGE, TEST_TOKEN, missing, settings_for
from tests.support.api_server import serving_api
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.private_dockerd import PrivateDockerd, private_dockerd_with_image
from tests.support.processes import make_sandbox_dirs
from tests.support.records import session_record

API = "/api/v1"


async def connect(settings: Settings) -> Client:
    return await nats.connect(settings.nats.url or "")


def forged_session(chat: str, node: str, *, status: str, session_id: str | None = None, **extra: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "session_id": session_id or str(uuid.uuid4()),
        "chat_id": chat,
        "node_id": node,
        "container_id": None,
        "image": TEST_IMAGE,
        "status": status,
        "created_at": now.isoformat(),
        "expires_at": (now + timedelta(hours=1)).isoformat(),
        "updated_at": now.isoformat(),
        **extra,
    }


async def forge(nc: Client, chat: str, event_type: str, session: dict[str, Any], **fields: Any) -> int:
    """Append an event the runtime never wrote (no expected sequence: a blind write)."""
    body = {
        "type": event_type,
        "event_id": str(uuid.uuid4()),
        "chat_id": chat,
        "session_id": session.get("session_id"),
        "causation_id": None,
        "occurred_at": datetime.now(UTC).isoformat(),
        "node_id": session.get("node_id"),
        "session": session,
        **fields,
    }
    ack = await nc.jetstream().publish(event_subject(chat), json.dumps(body).encode(), stream=EVENTS_STREAM)
    return ack.seq


async def send(nc: Client, kind: str, chat: str, body: dict[str, Any], *, msg_id: bool = True) -> str:
    command_id = body.setdefault("command_id", str(uuid.uuid4()))
    body.setdefault("chat_id", chat)
    headers = {"Nats-Msg-Id": command_id} if msg_id else None
    await nc.jetstream().publish(command_subject(kind, chat), json.dumps(body).encode(), headers=headers)
    return str(command_id)


async def outcome(store: EventStore, chat: str, command_id: str, timeout: float = 30.0) -> dict[str, Any]:
    async def outcomes() -> list[AnyEvent]:
        return [
            s.event for s in await store.history(chat) if s.event.causation_id == command_id and is_outcome(s.event)
        ]

    done = await eventually(outcomes, timeout=timeout, what=f"an outcome for {command_id} on {chat}")
    assert len(done) == 1, done
    found_outcome: dict[str, Any] = json.loads(encode(done[0]))
    return found_outcome


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await connect(settings)
    yield client
    await client.close()


def mounts(docker_client: docker.DockerClient, container_id: str) -> dict[str, str]:
    attrs = docker_client.containers.get(container_id).attrs
    return {m["Destination"]: m["Source"] for m in attrs["Mounts"]}


# --------------------------------------------------------------------------- forged events


async def test_a_forged_claim_chooses_no_mount_and_no_image(
    api: httpx.AsyncClient, nc: Client, settings: Settings, node_id: str, docker_client: docker.DockerClient
) -> None:
    store = EventStore(nc.jetstream())
    chats_root = Path(settings.sandbox.chats_root).resolve()

    # A claim whose session names a host path as its chat: it is poison, never a mount.
    chat = str(uuid.uuid4())
    escape = chats_root.parent / f"escaped-{uuid.uuid4().hex[:8]}"
    command_id = str(uuid.uuid4())
    traversal = forged_session(f"../{escape.name}", node_id, status="provisioning")
    await forge(nc, chat, "provisioning", traversal, causation_id=command_id)
    await send(nc, "create", chat, {"command_id": command_id})
    running = await outcome(store, chat, command_id)
    assert running["type"] == "running", running
    assert running["session"]["session_id"] != traversal["session_id"]
    assert mounts(docker_client, running["session"]["container_id"])[settings.sandbox.chat_mount_path] == str(
        chats_root / chat
    )
    assert not escape.exists()

    # A well-formed claim naming another image: the container runs the configured one.
    other = str(uuid.uuid4())
    command_id = str(uuid.uuid4())
    claim = forged_session(other, node_id, status="provisioning", image="attacker/evil:latest")
    await forge(nc, other, "provisioning", claim, causation_id=command_id)
    await send(nc, "create", other, {"command_id": command_id})
    resumed = await outcome(store, other, command_id)
    assert resumed["type"] == "running", resumed
    container = docker_client.containers.get(resumed["session"]["container_id"])
    assert container.attrs["Config"]["Image"] == TEST_IMAGE
    assert resumed["session"]["image"] == TEST_IMAGE
    assert mounts(docker_client, container.id or "")[settings.sandbox.chat_mount_path] == str(chats_root / other)


async def test_a_forged_running_event_removes_no_container_that_is_not_its_sessions(
    api: httpx.AsyncClient, nc: Client, node_id: str, docker_client: docker.DockerClient
) -> None:
    store = EventStore(nc.jetstream())
    bystander = docker_client.containers.run(
        TEST_IMAGE, ["sleep", "infinity"], detach=True, init=True, network_mode="none", name=f"bystander-{node_id}"
    )
    try:
        victim_chat = str(uuid.uuid4())
        victim = (await api.post(f"{API}/sandboxes", json={"chat_id": victim_chat})).json()

        # One forged record names an unmanaged container, another the victim's session.
        for forged in (
            forged_session(str(uuid.uuid4()), node_id, status="running", container_id=bystander.id),
            forged_session(
                str(uuid.uuid4()),
                node_id,
                status="running",
                session_id=victim["session_id"],
                container_id=victim["container_id"],
            ),
        ):
            chat = forged["chat_id"]
            await forge(nc, chat, "running", forged)
            stop = await send(nc, "stop", chat, {})
            stopped = await outcome(store, chat, stop)
            assert stopped["type"] == "stopped", stopped  # its own container is gone: it never existed
        bystander.reload()
        assert bystander.status == "running"
        assert docker_client.containers.get(victim["container_id"]).status == "running"
        assert (await api.get(f"{API}/sandboxes/{victim_chat}")).json()["status"] == "running"
    finally:
        bystander.remove(force=True)


async def test_one_command_id_on_two_chats_gets_two_outcomes(api: httpx.AsyncClient, nc: Client) -> None:
    store = EventStore(nc.jetstream())
    command_id = str(uuid.uuid4())
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    await send(nc, "create", first, {"command_id": command_id})
    await send(nc, "create", second, {"command_id": command_id}, msg_id=False)
    assert (await outcome(store, first, command_id))["type"] == "running"
    assert (await outcome(store, second, command_id))["type"] == "running"
    for chat in (first, second):
        assert (await api.delete(f"{API}/sandboxes/{chat}")).status_code == 200


# --------------------------------------------------------------------------- poison


async def test_poisoned_events_never_stop_a_chat_or_the_projector(
    api: httpx.AsyncClient, nc: Client, settings: Settings
) -> None:
    js = nc.jetstream()
    chat = str(uuid.uuid4())
    created = (await api.post(f"{API}/sandboxes", json={"chat_id": chat})).json()
    # Garbage as the chat's last event: the chat reads as its last valid event.
    await js.publish(event_subject(chat), b"\xff\xfe not an event", stream=EVENTS_STREAM)
    got = await api.get(f"{API}/sandboxes/{chat}")
    assert got.status_code == 200, got.text
    assert got.json()["session_id"] == created["session_id"]
    history = await api.get(f"{API}/sandboxes/{chat}/events")
    assert history.status_code == 200
    assert [e["event"]["type"] for e in history.json()["events"]] == ["provisioning", "running"]
    deleted = await api.delete(f"{API}/sandboxes/{chat}")
    assert deleted.status_code == 200, deleted.text
    assert (await api.post(f"{API}/sandboxes", json={"chat_id": chat})).status_code == 201

    # An event whose payload names another chat than its subject is poison too (it once spun).
    mismatched = str(uuid.uuid4())
    await forge(
        nc, mismatched, "running", forged_session(str(uuid.uuid4()), settings.runtime.node_id, status="running")
    )
    assert (await api.get(f"{API}/sandboxes/{mismatched}")).status_code == 404
    assert (await api.post(f"{API}/sandboxes", json={"chat_id": mismatched})).status_code == 201

    # 1,100 poisoned messages (more than the projector's window) do not hold back new sessions.
    for i in range(1100):
        subject = event_subject(str(uuid.uuid4())) if i % 2 else "sandbox.events.not-a-chat"
        await js.publish(subject, b'{"type": "running", "chat_id": 5}', stream=EVENTS_STREAM)
    fresh = str(uuid.uuid4())
    assert (await api.post(f"{API}/sandboxes", json={"chat_id": fresh})).status_code == 201

    async def listed() -> bool:
        listing = await api.get(f"{API}/sandboxes")
        assert listing.status_code == 200, listing.text
        return fresh in {s["chat_id"] for s in listing.json()["sessions"]}

    await eventually(listed, what="the new session reaches the registry past the poison")

    async def drained() -> bool:
        info = await js.consumer_info(EVENTS_STREAM, "sandboxd-projector")
        return (info.num_pending, info.num_ack_pending) == (0, 0)

    await eventually(drained, what="the projector acknowledges every poisoned message")
    for c in (chat, mismatched, fresh):
        assert (await api.delete(f"{API}/sandboxes/{c}")).status_code == 200


async def test_poisoned_registry_entries_are_skipped_reported_and_repaired(
    nats: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient, node_containers: None
) -> None:
    make_sandbox_dirs(tmp_path)
    settings = settings_for(nats.url, tmp_path, node_id)
    live = str(uuid.uuid4())
    async with running_runtime(settings), serving_api(settings) as base:
        http = httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30)
        created = (await http.post(f"{API}/sandboxes", json={"chat_id": live})).json()
        await http.aclose()

    nc = await connect(settings)
    try:
        js = nc.jetstream()
        kv = await js.key_value(SESSIONS_BUCKET)
        garbage, mismatch, extra, naive = (str(uuid.uuid4()) for _ in range(4))
        await kv.put(garbage, b"\xff{not json")
        # Well-formed, but its chat_id is not the key it is put under (`mismatch`).
        wrong = session_record(node_id=node_id, container_id=None, image=TEST_IMAGE, now=datetime.now(UTC))
        await kv.put(mismatch, encode(wrong))
        await kv.put(extra, encode(msgspec_replace(wrong, chat_id=extra)))
        # Decodes as JSON of the right shape, but its times have no zone: comparing them with
        # the clock would raise in the reaper and in reconciliation.
        zoneless = json.loads(encode(msgspec_replace(wrong, chat_id=naive)))
        zoneless["expires_at"] = "2026-01-01T00:00:00"
        await kv.put(naive, json.dumps(zoneless).encode())
        held = await kv.get(live)
        forged = json.loads(held.value or b"{}")
        forged["version"] = 10**9  # a record that claims to be newer than the stream
        forged["expires_at"] = "2036-01-01T00:00:00+00:00"
        await kv.put(live, json.dumps(forged).encode())

        # Everything still starts: the runtime (its replay on start), the reaper, the API.
        async with (
            running_runtime(settings) as runtime,
            running_reaper(settings) as reaper,
            serving_api(settings) as base,
            httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
        ):
            await reaper.ready()
            listing = await http.get(f"{API}/sandboxes")
            assert listing.status_code == 200, listing.text
            assert (await http.get(f"{API}/status")).json()["sections"]["registry"]["ok"]
            assert await runtime.reconciler.run_once() is not None

        registry = Registry(js, kv)
        report = await replay(js, registry, Projector(js, EventStore(js), registry), repair=False)
        assert report.drift == 0, "the runtime's replay on start repaired everything"
        keys = set(await kv.keys())
        assert keys == {live}
        record = await registry.get(live)
        assert record is not None
        assert record.session_id == created["session_id"]
        assert record.expires_at.year != 2036
    finally:
        await nc.close()


def msgspec_replace(record: SessionRecord, **changes: Any) -> SessionRecord:
    import msgspec  # noqa: PLC0415

    return msgspec.structs.replace(record, **changes)


# --------------------------------------------------------------------------- input


async def test_commands_with_unknown_fields_or_wrong_types_are_rejected(
    api: httpx.AsyncClient, nc: Client, docker_client: docker.DockerClient, node_id: str
) -> None:
    store = EventStore(nc.jetstream())
    for body in (
        {"ttl_seconds": "600"},
        {"ttl": 600},
        {"image": "attacker/evil:latest"},
        {"labels": {"team": "a\u0000b"}},
    ):
        chat = str(uuid.uuid4())
        command_id = await send(nc, "create", chat, dict(body))
        rejected = await outcome(store, chat, command_id)
        assert (rejected["type"], rejected["reason"]) == ("rejected", "invalid_payload"), (body, rejected)
    assert not docker_client.containers.list(all=True, filters={"label": f"sandboxd.node_id={node_id}"})


async def test_http_input_is_strict(api: httpx.AsyncClient) -> None:
    chat = str(uuid.uuid4())
    cases: list[tuple[bytes, str]] = [
        (json.dumps({"chat_id": chat, "ttl_seconds": "600"}).encode(), "ttl_seconds"),
        (json.dumps({"chat_id": chat, "ttl": 600}).encode(), "ttl"),
        (json.dumps({"chat_id": chat, "labels": {"team": "a\nb"}}).encode(), "labels"),
        (b'{"chat_id": "\xff"}', "JSON"),
        (b"[" * 1000 + b"]" * 1000, "body"),
        (b'{"chat_id": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001, "body"),
        (b'{"chat_id": "' + chat.encode() + b'"', "JSON"),
    ]
    for body, needle in cases:
        answer = await api.post(f"{API}/sandboxes", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400, (body[:60], answer.status_code, answer.text)
        assert needle in answer.json()["detail"], answer.text
    keepalive = await api.post(f"{API}/sandboxes/{chat}/keepalive", json={"ttl_seconds": "5"})
    assert keepalive.status_code == 400
    assert (await api.get(f"{API}/sandboxes/{chat}")).status_code == 404, "nothing was created"
    async with httpx.AsyncClient(base_url=str(api.base_url), timeout=10) as anonymous:
        assert (await anonymous.get(f"{API}/status")).status_code == 401
        assert (await anonymous.get(f"{API}/health")).status_code == 200


async def test_a_body_that_never_arrives_is_a_408(
    nats: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient
) -> None:
    make_sandbox_dirs(tmp_path)
    settings = settings_for(nats.url, tmp_path, node_id, SANDBOXD_HTTP_BODY_TIMEOUT_SECONDS="0.5")
    async with serving_api(settings) as base:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {API}/sandboxes HTTP/1.1\r\nHost: x\r\nX-API-Token: {TEST_TOKEN}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"chat_id":'.encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408"), head
        writer.close()


# --------------------------------------------------------------------------- limits


async def test_capacity_and_lifetime_limits(
    nats: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient, node_containers: None
) -> None:
    make_sandbox_dirs(tmp_path)
    settings = settings_for(
        nats.url,
        tmp_path,
        node_id,
        SANDBOXD_RUNTIME_MAX_SESSIONS="2",
        SANDBOXD_SANDBOX_TTL_SECONDS="30",
        SANDBOXD_SANDBOX_MAX_TTL_SECONDS="60",
        SANDBOXD_SANDBOX_MAX_LIFETIME_SECONDS="60",
    )
    async with (
        running_runtime(settings),
        serving_api(settings) as base,
        httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        chats = [str(uuid.uuid4()) for _ in range(3)]
        answers = [await http.post(f"{API}/sandboxes", json={"chat_id": c}) for c in chats]
        assert [a.status_code for a in answers] == [201, 201, 429], [a.text for a in answers]
        assert answers[2].headers["retry-after"].isdigit()
        assert "capacity_exceeded" in answers[2].json()["detail"]
        assert (await http.post(f"{API}/sandboxes", json={"chat_id": chats[0]})).status_code == 200, "reuse is free"

        kept = await http.post(f"{API}/sandboxes/{chats[0]}/keepalive", json={"ttl_seconds": 60})
        assert kept.status_code == 200, kept.text
        view = kept.json()
        created_at = datetime.fromisoformat(view["created_at"])
        assert datetime.fromisoformat(view["expires_at"]) == created_at + timedelta(seconds=60), "held at the cap"

        assert (await http.delete(f"{API}/sandboxes/{chats[1]}")).status_code == 200
        assert (await http.post(f"{API}/sandboxes", json={"chat_id": chats[2]})).status_code == 201


async def test_the_event_stream_is_bounded_per_chat(runtime: RuntimeHandle, nc: Client, settings: Settings) -> None:
    js = nc.jetstream()
    info = await js.stream_info(EVENTS_STREAM)
    assert info.config.max_msgs_per_subject == settings.streams.events_max_msgs_per_subject
    assert (info.config.max_bytes or 0) > 0
    commands = await js.stream_info(COMMANDS_STREAM)
    assert str(commands.config.discard) == "DiscardPolicy.NEW" or commands.config.discard == "new"
    chat = str(uuid.uuid4())
    for i in range(settings.streams.events_max_msgs_per_subject + 50):
        await js.publish(event_subject(chat), json.dumps({"n": i}).encode(), stream=EVENTS_STREAM)
    per_subject = await js.stream_info(EVENTS_STREAM, subjects_filter=event_subject(chat))
    assert (per_subject.state.subjects or {})[event_subject(chat)] == settings.streams.events_max_msgs_per_subject
    last = await js.get_last_msg(EVENTS_STREAM, event_subject(chat))
    assert json.loads(last.data or b"{}") == {"n": settings.streams.events_max_msgs_per_subject + 49}


async def test_a_command_that_cannot_be_carried_out_ends_after_max_deliveries(
    nats: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient, node_containers: None
) -> None:
    make_sandbox_dirs(tmp_path)
    settings = settings_for(nats.url, tmp_path, node_id, SANDBOXD_RUNTIME_MAX_DELIVERIES="3")
    async with running_runtime(settings):
        nc = await connect(settings)
        try:
            store = EventStore(nc.jetstream())
            chat = str(uuid.uuid4())
            # A session on a node that never answers: its stop can only be handed back.
            await forge(nc, chat, "running", forged_session(chat, "ghost-node", status="running"))
            stop = await send(nc, "stop", chat, {})
            failed = await outcome(store, chat, stop)
            assert failed["type"] == "failed", failed
            assert failed["error"]["type"] == "gave_up"
            assert "3 deliveries" in failed["error"]["message"]

            async def settled() -> bool:
                info = await nc.jetstream().consumer_info(COMMANDS_STREAM, "sandboxd-runtime")
                return (info.num_pending, info.num_ack_pending) == (0, 0)

            await eventually(settled, what="the command is terminated, not left pending")
        finally:
            await nc.close()


# --------------------------------------------------------------------------- unprivileged sandboxes


def run_in(docker_client: docker.DockerClient, container_id: str, *command: str) -> tuple[int, str]:
    result = docker_client.containers.get(container_id).exec_run(list(command))
    output = result.output if isinstance(result.output, bytes) else b"".join(result.output)
    return int(result.exit_code or 0), output.decode(errors="replace").strip()


async def test_sandboxes_run_unprivileged_and_cannot_plant_set_id_binaries(
    api: httpx.AsyncClient, settings: Settings, docker_client: docker.DockerClient
) -> None:
    chats_root = Path(settings.sandbox.chats_root).resolve()
    uid, gid = (int(x) for x in settings.sandbox.user.split(":"))

    # A chat directory left by an older version (root-owned, with a set-uid root binary).
    legacy_chat = str(uuid.uuid4())
    legacy = chats_root / legacy_chat
    legacy.mkdir(parents=True)
    planted = legacy / "rootshell"
    planted.write_bytes(Path("/bin/busybox").read_bytes() if Path("/bin/busybox").exists() else b"x")
    planted.chmod(0o4755)
    created = await api.post(f"{API}/sandboxes", json={"chat_id": legacy_chat})
    assert created.status_code == 201, created.text
    info = planted.stat()
    assert (info.st_uid, info.st_gid) == (uid, gid)
    assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID), "set-id bits are stripped when a directory is handed over"

    chat = str(uuid.uuid4())
    view = (await api.post(f"{API}/sandboxes", json={"chat_id": chat})).json()
    container = view["container_id"]
    assert run_in(docker_client, container, "id", "-u") == (0, str(uid))
    code, output = run_in(
        docker_client,
        container,
        "sh",
        "-c",
        "echo hi > /workspace/chat/note && cp /bin/busybox /workspace/chat/sh && chmod 4755 /workspace/chat/sh",
    )
    assert code == 0, output
    assert run_in(docker_client, container, "touch", "/tmp/scratch")[0] == 0
    assert run_in(docker_client, container, "touch", "/etc/planted")[0] != 0, "the root file system is read-only"

    chat_dir = chats_root / chat
    assert stat.S_IMODE(chat_dir.stat().st_mode) == 0o700
    assert (chat_dir.stat().st_uid, (chat_dir / "note").stat().st_uid) == (uid, uid)
    binary = chat_dir / "sh"
    assert binary.stat().st_uid == uid, "a set-uid file made in the sandbox belongs to the sandbox user, not root"
    assert stat.S_IMODE(chats_root.stat().st_mode) & 0o077 == 0, "other host users cannot reach the chat directories"
    if os.geteuid() == 0:
        # A host user (nobody) cannot even reach it; and were it reachable, it would not run as root.
        try:
            attempt = subprocess.run(
                [str(binary), "id", "-u"], user=65534, group=65534, capture_output=True, text=True, check=False
            )
        except PermissionError:
            pass  # what happens here: the chats root is closed to it
        else:
            assert attempt.returncode != 0 or attempt.stdout.strip() != "0", attempt


@pytest.fixture
def remapped_engine() -> Iterator[PrivateDockerd]:
    # The remapped root must be able to traverse the data root's parents (pytest's are 0700);
    # short, too: unix socket paths are limited.
    root = Path(tempfile.mkdtemp(prefix="sbd-udk-", dir="/tmp"))
    root.chmod(0o711)
    try:
        with private_dockerd_with_image(root, TEST_IMAGE, "--userns-remap=default") as started:
            yield started
    except RuntimeError as exc:
        missing(f"cannot run a private dockerd with --userns-remap: {exc}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_sandboxes_under_a_user_namespace_remap(settings: Settings, remapped_engine: PrivateDockerd) -> None:
    """On an engine that remaps user namespaces, the chat directory goes to the remapped ids
    and the sandbox's user can still write it."""
    client = remapped_engine.client()
    offset = userns_offset(client.info())
    assert offset != (0, 0), "the engine remaps user namespaces"
    driver = DockerDriver(remapped_engine.client())
    async with (
        running_runtime(settings, driver=driver),
        serving_api(settings) as base,
        httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        chat = str(uuid.uuid4())
        created = await http.post(f"{API}/sandboxes", json={"chat_id": chat})
        assert created.status_code == 201, created.text
        container = created.json()["container_id"]
        assert run_in(client, container, "id", "-u") == (0, "10001")
        assert run_in(client, container, "sh", "-c", "echo hi > /workspace/chat/note")[0] == 0
        note = Path(settings.sandbox.chats_root).resolve() / chat / "note"
        assert note.stat().st_uid == offset[0] + 10001
        assert (await http.delete(f"{API}/sandboxes/{chat}")).status_code == 200
    driver.close()
    client.close()
