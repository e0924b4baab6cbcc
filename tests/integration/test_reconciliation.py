"""What a dead writer leaves behind, repaired by the real stack (nats-server, runtime, reaper,
Docker): a claim taken over by the next command, a claim stuck past the re-drive grace
stopped by the reaper's re-drive, a container whose `running` never landed adopted by node
reconciliation, and managed containers no live session owns removed (only those)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client

from services.reaper.decisions import redrive_command_id
from services.reaper.reaper import Reaper
from services.runtime.containers import ContainerIdentity, container_name, container_spec
from services.runtime.decisions import stopping
from services.runtime.docker_driver import DockerDriver
from services.runtime.service import RuntimeHandle
from shared.config import Settings
from shared.contracts import (
    CreateResult,
    PreviousSession,
    SandboxProvisioning,
    SandboxRunning,
    SandboxStopped,
    SandboxStopping,
    SessionRecord,
    SessionStatus,
    decode_record,
)
from shared.event_store import ChatState, EventStore
from shared.subjects import SESSIONS_BUCKET
from tests.conftest import TEST_IMAGE, settings_for
from tests.support.appends import append_event, outcomes_of
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs
from tests.support.records import session_record

API = "/api/v1"
CLAIM_TIMEOUT_SECONDS = 1


@pytest.fixture
def settings(nats: NatsServer, tmp_path: Path, node_id: str) -> Settings:
    """A claim is abandoned after a second here (the default is two minutes)."""
    make_sandbox_dirs(tmp_path)
    return settings_for(nats.url, tmp_path, node_id, SANDBOXD_RUNTIME_CLAIM_TIMEOUT_SECONDS=str(CLAIM_TIMEOUT_SECONDS))


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats.url or "")
    yield client
    await client.close()


@pytest.fixture
async def dead_writer(docker_client: docker.DockerClient, node_containers: None) -> AsyncIterator[DockerDriver]:
    """The Docker side of a runtime that claimed, started its container and died."""
    driver = DockerDriver.from_env(60.0)
    yield driver
    driver.close()


async def kv_record(nc: Client, chat: str) -> SessionRecord | None:
    kv = await nc.jetstream().key_value(SESSIONS_BUCKET)
    try:
        entry = await kv.get(chat)
    except nats.js.errors.KeyNotFoundError:
        return None
    return decode_record(entry.value or b"")


def containers_of(docker_client: docker.DockerClient, chat: str) -> list[str]:
    found = docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})
    return [c.id or "" for c in found]


def is_running(docker_client: docker.DockerClient, container_id: str) -> bool:
    return docker_client.api.inspect_container(container_id)["State"]["Running"] is True


def long_ago() -> datetime:
    return datetime.now(UTC) - timedelta(hours=1)


async def start_as_dead_writer(driver: DockerDriver, settings: Settings, claim: SessionRecord) -> str:
    """The claim's container, exactly as the runtime would have started it."""
    identity = ContainerIdentity(claim.chat_id, claim.session_id, claim.node_id)
    return await driver.ensure_running(container_spec(identity, claim, settings.sandbox))


# --------------------------------------------------------------------------- claim takeover


async def test_a_create_takes_over_a_claim_whose_writer_died(
    api: httpx.AsyncClient, nc: Client, node_id: str, docker_client: docker.DockerClient
) -> None:
    store = EventStore(nc.jetstream())
    chat = str(uuid.uuid4())
    now = datetime.now(UTC)
    # A claim in flight when its writer died: no container, and no outcome will ever follow.
    dead = session_record(now=now, status=SessionStatus.PROVISIONING, chat_id=chat, node_id=node_id, image=TEST_IMAGE)
    await append_event(store, SandboxProvisioning, dead, occurred_at=now)

    created = await api.post(f"{API}/sandboxes", json={"chat_id": chat})

    assert created.status_code == 201, created.text
    view = created.json()
    assert (view["result"], view["status"]) == ("replaced", "running")
    assert view["session_id"] != dead.session_id
    history = [s.event for s in await store.history(chat)]
    assert [e.type for e in history] == ["provisioning", "stopping", "provisioning", "running"]
    command_id = history[-1].causation_id
    assert command_id is not None
    assert {e.causation_id for e in history[1:]} == {command_id}, "the create's own claims, then its outcome"
    (outcome,) = await outcomes_of(store, chat, command_id)
    assert isinstance(outcome, SandboxRunning)
    assert outcome.result == CreateResult.REPLACED
    assert outcome.previous == PreviousSession(dead.session_id, None)
    assert containers_of(docker_client, chat) == [view["container_id"]]
    assert is_running(docker_client, view["container_id"])
    record = await eventually(
        lambda: kv_record(nc, chat), lambda r: r is not None and r.status == SessionStatus.RUNNING, what="the record"
    )
    assert record is not None
    assert (record.session_id, record.container_id) == (view["session_id"], view["container_id"])


# --------------------------------------------------------------------------- re-drive


async def test_the_reaper_redrives_a_stuck_provisioning_claim_to_stopped(
    runtime: RuntimeHandle,
    reaper: Reaper,
    nc: Client,
    settings: Settings,
    node_id: str,
    docker_client: docker.DockerClient,
    dead_writer: DockerDriver,
) -> None:
    store = EventStore(nc.jetstream())
    chat = str(uuid.uuid4())
    then = long_ago()
    stuck = session_record(
        now=then, ttl=timedelta(hours=2), status=SessionStatus.PROVISIONING, chat_id=chat, node_id=node_id
    )
    # Its container first: the reaper acts as soon as the claim is in the registry.
    container_id = await start_as_dead_writer(dead_writer, settings, stuck)
    claim_seq = await append_event(store, SandboxProvisioning, stuck, occurred_at=then)

    state = await eventually(
        lambda: store.read(chat), lambda s: isinstance(s.last, SandboxStopped), what="the stuck claim stopped"
    )

    stopped = state.last
    assert isinstance(stopped, SandboxStopped)
    assert stopped.reason == "stuck_provisioning"
    # The reaper's stop, for the record as projected (its version is the claim's sequence).
    assert stopped.causation_id == redrive_command_id(msgspec.structs.replace(stuck, version=claim_seq))
    assert stopped.session is not None
    assert (stopped.session.session_id, stopped.session.status) == (stuck.session_id, SessionStatus.STOPPED)
    assert [s.event.type for s in await store.history(chat)] == ["provisioning", "stopping", "stopped"]
    assert containers_of(docker_client, chat) == [], f"container {container_id} is removed with its session"
    await eventually(lambda: kv_record(nc, chat), lambda r: r is None, what="the record leaves the registry")
    assert reaper.status.redrive_published >= 1


async def test_the_reaper_redrives_a_stuck_stop_claim_to_stopped(
    api: httpx.AsyncClient, reaper: Reaper, nc: Client, docker_client: docker.DockerClient
) -> None:
    store = EventStore(nc.jetstream())
    chat = str(uuid.uuid4())
    view = (await api.post(f"{API}/sandboxes", json={"chat_id": chat})).json()
    running = (await store.read(chat)).session
    assert running is not None
    # A stop claimed long ago whose writer died before removing the container.
    then = long_ago()
    claim_seq = await append_event(store, SandboxStopping, stopping(running, then), occurred_at=then, reason="api")

    state = await eventually(
        lambda: store.read(chat), lambda s: isinstance(s.last, SandboxStopped), what="the stuck stop finished"
    )

    stopped = state.last
    assert isinstance(stopped, SandboxStopped)
    assert stopped.reason == "stuck_stopping"
    claimed = msgspec.structs.replace(stopping(running, then), version=claim_seq)
    assert stopped.causation_id == redrive_command_id(claimed)
    assert stopped.session is not None
    assert (stopped.session.session_id, stopped.session.status) == (view["session_id"], SessionStatus.STOPPED)
    assert containers_of(docker_client, chat) == []
    await eventually(lambda: kv_record(nc, chat), lambda r: r is None, what="the record leaves the registry")
    assert (await api.get(f"{API}/sandboxes/{chat}")).status_code == 404


# --------------------------------------------------------------------------- adoption and orphans


async def test_reconciliation_adopts_the_container_of_a_claim_whose_running_never_landed(
    runtime: RuntimeHandle,
    api: httpx.AsyncClient,
    nc: Client,
    settings: Settings,
    node_id: str,
    docker_client: docker.DockerClient,
    dead_writer: DockerDriver,
) -> None:
    store = EventStore(nc.jetstream())
    chat, command_id = str(uuid.uuid4()), str(uuid.uuid4())
    then = long_ago()
    claim = session_record(
        now=then,
        ttl=timedelta(hours=2),
        status=SessionStatus.PROVISIONING,
        chat_id=chat,
        node_id=node_id,
        labels={"team": "qa"},
    )
    await append_event(store, SandboxProvisioning, claim, occurred_at=then, causation_id=command_id)
    container_id = await start_as_dead_writer(dead_writer, settings, claim)

    first = await runtime.reconciler.run_once()
    assert (first.adopted, first.pending_confirmation) == (0, 1), "one observation is not enough"
    assert isinstance((await store.read(chat)).last, SandboxProvisioning)
    second = await runtime.reconciler.run_once()
    assert second.adopted == 1, second

    adopted = (await store.read(chat)).last
    assert isinstance(adopted, SandboxRunning)
    assert (adopted.causation_id, adopted.reason, adopted.result) == (command_id, "adopted", CreateResult.CREATED)
    assert adopted.session is not None
    session = adopted.session
    assert (session.session_id, session.status, session.container_id) == (
        claim.session_id,
        SessionStatus.RUNNING,
        container_id,
    )
    assert (session.expires_at, session.labels) == (claim.expires_at, claim.labels), "the claim's own session"
    assert len(await outcomes_of(store, chat, command_id)) == 1, "the crashed create's one outcome"
    record = await eventually(
        lambda: kv_record(nc, chat), lambda r: r is not None and r.status == SessionStatus.RUNNING, what="the record"
    )
    assert record is not None
    assert (record.session_id, record.container_id) == (claim.session_id, container_id)
    assert containers_of(docker_client, chat) == [container_id]
    assert is_running(docker_client, container_id)
    # The adopted session is the chat's: the next create reuses it.
    reused = await api.post(f"{API}/sandboxes", json={"chat_id": chat})
    assert reused.status_code == 200, reused.text
    assert (reused.json()["result"], reused.json()["container_id"]) == ("reused", container_id)
    assert (await runtime.reconciler.run_once()).actions == []


async def test_reconciliation_removes_only_containers_made_for_a_session_no_live_record_owns(
    runtime: RuntimeHandle, api: httpx.AsyncClient, nc: Client, node_id: str, docker_client: docker.DockerClient
) -> None:
    store = EventStore(nc.jetstream())
    chat = str(uuid.uuid4())
    live = (await api.post(f"{API}/sandboxes", json={"chat_id": chat})).json()

    def managed(chat_id: str, session_id: str, name: str) -> str:
        labels = {
            "sandboxd.managed": "true",
            "sandboxd.node_id": node_id,
            "sandboxd.chat_id": chat_id,
            "sandboxd.session_id": session_id,
        }
        container = docker_client.containers.run(
            TEST_IMAGE, ["sleep", "infinity"], detach=True, init=True, network_mode="none", labels=labels, name=name
        )
        return container.id or ""

    # An earlier session's container of the same chat, left running (a remove that never ran).
    old_session = str(uuid.uuid4())
    stale = managed(chat, old_session, container_name(old_session))
    # Labelled as ours, but not named for its session: not made by sandboxd, never touched.
    foreign_chat, foreign_session = str(uuid.uuid4()), str(uuid.uuid4())
    foreign = managed(foreign_chat, foreign_session, f"not-sandboxd-{foreign_session}")
    before: ChatState = await store.read(chat)

    first = await runtime.reconciler.run_once()
    assert (first.orphans_removed, first.pending_confirmation) == (0, 1), first
    second = await runtime.reconciler.run_once()
    assert second.orphans_removed == 1, second
    assert (await runtime.reconciler.run_once()).actions == []

    assert containers_of(docker_client, chat) == [live["container_id"]], "the stale container is gone, not the live"
    assert is_running(docker_client, live["container_id"])
    assert is_running(docker_client, foreign)
    assert await store.history(foreign_chat) == []
    removed = (await store.read(chat)).last
    assert isinstance(removed, SandboxStopped)
    assert (removed.reason, removed.session_id, removed.causation_id) == ("orphan_removed", old_session, None)
    assert before.session is not None
    assert removed.session == msgspec.structs.replace(before.session, version=before.seq), "the live session, as it was"
    got = await api.get(f"{API}/sandboxes/{chat}")
    assert (got.status_code, got.json()["session_id"], got.json()["status"]) == (200, live["session_id"], "running")
    assert stale not in containers_of(docker_client, chat)
