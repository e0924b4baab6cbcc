"""Pause and resume, the idle timeout and expiry warnings against the real stack: a real
nats-server, the runtime and the reaper, the API, and the Docker engine (whose view of the
container is checked: paused means frozen)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import httpx
import nats as nats_client
import pytest
from nats.aio.client import Client

from services.reaper.reaper import Reaper
from services.reaper.service import running_reaper
from services.runtime.service import RuntimeHandle, running_runtime
from shared.config import Settings
from shared.contracts import AnyEvent, PauseSandbox, ResumeSandbox, SandboxExpiring, encode
from shared.event_store import EventStore
from shared.subjects import MSG_ID_HEADER, command_subject
from tests.conftest import TEST_TOKEN, settings_for
from tests.support.api_server import serving_api
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs

API = "/api/v1"


@pytest.fixture
def settings(nats: NatsServer, tmp_path: Path, node_id: str) -> Settings:
    make_sandbox_dirs(tmp_path)
    return settings_for(
        nats.url,
        tmp_path,
        node_id,
        SANDBOXD_SANDBOX_EXPIRY_WARNING_SECONDS="2",
        SANDBOXD_SANDBOX_ACTIVITY_INTERVAL_SECONDS="0.5",
    )


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[Client]:
    client = await nats_client.connect(nats.url)
    yield client
    await client.close()


async def history(nc: Client, chat: str) -> list[AnyEvent]:
    return [s.event for s in await EventStore(nc.jetstream()).history(chat)]


def docker_state(docker_client: docker.DockerClient, container_id: str) -> dict[str, Any]:
    state: dict[str, Any] = docker_client.api.inspect_container(container_id)["State"]
    return state


async def create(api: httpx.AsyncClient, chat: str, **body: Any) -> dict[str, Any]:
    answer = await api.post(f"{API}/sandboxes", json={"chat_id": chat, **body})
    assert answer.status_code in (200, 201), answer.text
    view: dict[str, Any] = answer.json()
    return view


async def test_pause_freezes_resume_thaws_and_a_create_resumes_a_paused_session(
    api: httpx.AsyncClient, docker_client: docker.DockerClient, settings: Settings
) -> None:
    chat = str(uuid.uuid4())
    view = await create(api, chat)
    container = view["container_id"]
    docker_client.containers.get(container).exec_run(["sh", "-c", "echo kept > /tmp/state"])

    paused = await api.post(f"{API}/sandboxes/{chat}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused"
    assert paused.json()["paused_at"] is not None
    assert docker_state(docker_client, container)["Paused"] is True
    assert (await api.get(f"{API}/sandboxes/{chat}")).json()["status"] == "paused"
    listed = await api.get(f"{API}/sandboxes", params={"status": "paused"})
    await eventually(
        lambda: api.get(f"{API}/sandboxes", params={"status": "paused"}),
        lambda r: chat in {s["chat_id"] for s in r.json()["sessions"]},
        timeout=10,
        what="the paused session listed by status",
    )
    assert listed.status_code == 200

    again = await api.post(f"{API}/sandboxes/{chat}/pause")
    assert again.status_code == 409, again.text
    assert "paused" in again.json()["detail"]

    # A create on the paused session resumes it: same session, memory kept.
    resumed = await api.post(f"{API}/sandboxes", json={"chat_id": chat})
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["result"] == "resumed"
    assert resumed.json()["session_id"] == view["session_id"]
    assert resumed.json()["status"] == "running"
    assert docker_state(docker_client, container)["Paused"] is False
    out = docker_client.containers.get(container).exec_run(["cat", "/tmp/state"]).output
    assert out == b"kept\n", "the paused container's processes and files were kept"

    not_paused = await api.post(f"{API}/sandboxes/{chat}/resume")
    assert not_paused.status_code == 409, not_paused.text
    assert (await api.post(f"{API}/sandboxes/{chat}/pause")).status_code == 200
    thawed = await api.post(f"{API}/sandboxes/{chat}/resume", json={"session_id": view["session_id"]})
    assert thawed.status_code == 200, thawed.text
    assert thawed.json()["status"] == "running"
    assert docker_state(docker_client, container)["Paused"] is False

    # A paused session is stopped like any other.
    assert (await api.post(f"{API}/sandboxes/{chat}/pause")).status_code == 200
    stopped = await api.delete(f"{API}/sandboxes/{chat}")
    assert stopped.status_code == 200, stopped.text
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container)
    missing = await api.post(f"{API}/sandboxes/{chat}/pause")
    assert missing.status_code == 404, missing.text


async def test_pause_and_resume_straight_over_nats_get_one_outcome_each(
    api: httpx.AsyncClient, nc: Client, docker_client: docker.DockerClient
) -> None:
    chat = str(uuid.uuid4())
    view = await create(api, chat)
    js = nc.jetstream()
    for command in (
        PauseSandbox(command_id=uuid.uuid4(), chat_id=uuid.UUID(chat)),
        ResumeSandbox(command_id=uuid.uuid4(), chat_id=uuid.UUID(chat)),
    ):
        for _ in range(2):  # a duplicate publish: one outcome
            await js.publish(
                command_subject(command.kind, chat), encode(command), headers={MSG_ID_HEADER: str(command.command_id)}
            )
        wanted = str(command.command_id)
        await eventually(
            lambda: history(nc, chat),
            lambda events, wanted=wanted: any(e.causation_id == wanted for e in events),  # type: ignore[misc]
            timeout=20,
            what=f"the outcome of {command.kind}",
        )
    types = [e.type for e in await history(nc, chat)]
    assert types[-2:] == ["paused", "resumed"], types
    assert docker_state(docker_client, view["container_id"])["Paused"] is False
    # A payload over NATS is JSON anyone can write by hand (the `nats` CLI).
    raw = json.dumps({"command_id": str(uuid.uuid4()), "chat_id": chat}).encode()
    await js.publish(command_subject("pause", chat), raw)
    await eventually(lambda: history(nc, chat), lambda es: es[-1].type == "paused", timeout=20, what="paused")


async def test_an_idle_session_is_warned_then_stopped_and_activity_defers_it(
    api: httpx.AsyncClient, reaper: Reaper, nc: Client, docker_client: docker.DockerClient
) -> None:
    chat = str(uuid.uuid4())
    view = await create(api, chat, idle_ttl_seconds=4)
    assert view["idle_ttl_seconds"] == 4
    assert view["idle_deadline"] is not None

    # Reuses keep it alive past its idle timeout (activity, recorded at most every 0.5 s).
    for _ in range(6):
        await asyncio.sleep(1)
        reused = await api.post(f"{API}/sandboxes", json={"chat_id": chat})
        assert reused.status_code == 200, reused.text
        assert reused.json()["session_id"] == view["session_id"]
    recorded = [e for e in await history(nc, chat) if e.type == "reused"]
    assert 1 <= len(recorded) <= 6, "activity was recorded through the command path, coalesced"

    # Then left alone: an `expiring {reason: idle}` warning, then a stop with reason idle.
    events = await eventually(
        lambda: history(nc, chat), lambda es: es[-1].type == "stopped", timeout=30, what="the idle stop"
    )
    assert events[-1].reason == "idle"
    warnings = [e for e in events if isinstance(e, SandboxExpiring)]
    assert warnings, [e.type for e in events]
    assert warnings[-1].reason == "idle"
    assert warnings[-1].deadline is not None
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(view["container_id"])


@pytest.fixture
def pausing_settings(nats: NatsServer, tmp_path: Path, node_id: str) -> Settings:
    make_sandbox_dirs(tmp_path)
    return settings_for(
        nats.url,
        tmp_path,
        node_id,
        SANDBOXD_SANDBOX_ON_IDLE="pause",
        SANDBOXD_SANDBOX_PAUSED_TTL_SECONDS="3",
        SANDBOXD_SANDBOX_IDLE_TTL_SECONDS="2",
        SANDBOXD_SANDBOX_EXPIRY_WARNING_SECONDS="0",
    )


async def test_on_idle_pause_pauses_then_stops_after_the_paused_ttl(
    pausing_settings: Settings, nc: Client, docker_client: docker.DockerClient, node_containers: None
) -> None:
    settings = pausing_settings
    async with (
        running_runtime(settings),
        running_reaper(settings),
        serving_api(settings) as base,
        httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as api,
    ):
        chat = str(uuid.uuid4())
        view = await create(api, chat)
        assert view["idle_ttl_seconds"] == 2, "the default idle timeout applies"
        events = await eventually(
            lambda: history(nc, chat), lambda es: es[-1].type == "paused", timeout=20, what="the idle pause"
        )
        assert events[-1].reason == "idle"
        assert docker_state(docker_client, view["container_id"])["Paused"] is True
        events = await eventually(
            lambda: history(nc, chat), lambda es: es[-1].type == "stopped", timeout=20, what="the paused_ttl stop"
        )
        assert events[-1].reason == "paused_ttl"


async def test_reconciliation_sets_docker_to_what_the_session_says(
    api: httpx.AsyncClient, runtime: RuntimeHandle, docker_client: docker.DockerClient
) -> None:
    """A pause or resume that died between Docker and its event leaves them apart: the
    container is paused (unpaused) again to match the session, and nothing is lost."""
    chat = str(uuid.uuid4())
    view = await create(api, chat)
    container = docker_client.containers.get(view["container_id"])
    container.pause()  # behind sandboxd's back: the session says running
    await runtime.reconciler.run_once()  # a first observation: nothing done yet
    assert docker_state(docker_client, view["container_id"])["Paused"] is True
    report = await runtime.reconciler.run_once()
    assert report.refrozen == 1, report
    assert report.lost == 0, report
    assert docker_state(docker_client, view["container_id"])["Paused"] is False

    assert (await api.post(f"{API}/sandboxes/{chat}/pause")).status_code == 200
    container.unpause()  # the session says paused
    await runtime.reconciler.run_once()
    report = await runtime.reconciler.run_once()
    assert report.refrozen == 1, report
    assert docker_state(docker_client, view["container_id"])["Paused"] is True
    assert (await api.get(f"{API}/sandboxes/{chat}")).json()["status"] == "paused"


async def test_an_empty_session_id_is_refused_not_ignored(api: httpx.AsyncClient) -> None:
    """`"session_id": ""` is not a session id: 400, and nothing happens (found by the fuzz)."""
    chat = str(uuid.uuid4())
    await create(api, chat)
    for action in ("keepalive", "pause", "resume"):
        answer = await api.post(f"{API}/sandboxes/{chat}/{action}", json={"session_id": ""})
        assert answer.status_code == 400, (action, answer.text)
        assert "session_id" in answer.json()["detail"]
    assert (await api.get(f"{API}/sandboxes/{chat}")).json()["status"] == "running"
