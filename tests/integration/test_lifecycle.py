"""Lifecycle with real parts: the reaper, keepalive, replay and node reconciliation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import nats
import pytest
from nats.aio.client import Client

from services.reaper.reaper import Reaper
from services.runtime.replay import replay
from services.runtime.service import RuntimeHandle
from shared.config import Settings
from shared.contracts import decode_record
from shared.event_store import EventStore
from shared.registry import Registry
from shared.subjects import SESSIONS_BUCKET, STATUS_BUCKET
from shared.topology import ensure_topology
from tests.support.eventually import eventually, holds


async def events_of(api: httpx.AsyncClient, chat: str) -> list[dict[str, Any]]:
    return [e["event"] for e in (await api.get(f"/api/v1/sandboxes/{chat}/events")).json()["events"]]


async def connect(settings: Settings) -> Client:
    return await nats.connect(settings.nats.url or "")


async def test_a_two_second_sandbox_is_stopped_as_expired(
    api: httpx.AsyncClient, reaper: Reaper, docker_client: docker.DockerClient
) -> None:
    chat = str(uuid.uuid4())
    created = (await api.post("/api/v1/sandboxes", json={"chat_id": chat, "ttl_seconds": 2})).json()

    await eventually(
        lambda: api.get(f"/api/v1/sandboxes/{chat}"), lambda r: r.status_code == 404, what="the expired sandbox gone"
    )
    stopped = [e for e in await events_of(api, chat) if e["type"] == "stopped"]
    assert len(stopped) == 1
    assert stopped[0]["reason"] == "expired"
    # Stopped because it expired, never before its time (how late is the bench's business).
    assert datetime.fromisoformat(stopped[0]["occurred_at"]) >= datetime.fromisoformat(created["expires_at"])
    assert not docker_client.containers.list(all=True, filters={"id": created["container_id"]})
    assert reaper.status.expired_published >= 1
    assert reaper.status.last_action is not None
    assert reaper.status.last_action.session_id == created["session_id"]


async def test_keepalive_moves_expiry_and_the_reaper_follows(api: httpx.AsyncClient, reaper: Reaper) -> None:
    chat = str(uuid.uuid4())
    created = (await api.post("/api/v1/sandboxes", json={"chat_id": chat, "ttl_seconds": 2})).json()
    kept = await api.post(
        f"/api/v1/sandboxes/{chat}/keepalive", json={"ttl_seconds": 30, "session_id": created["session_id"]}
    )
    assert kept.status_code == 200, kept.text
    assert kept.json()["expires_at"] > created["expires_at"]
    # No expiry at the old time: still running until a second (five reaper ticks) past it.
    old_expiry = datetime.fromisoformat(created["expires_at"])
    await holds(
        lambda: api.get(f"/api/v1/sandboxes/{chat}"),
        lambda r: r.status_code == 200 and r.json()["status"] == "running",
        seconds=max((old_expiry - datetime.now(UTC)).total_seconds(), 0.0) + 1.0,
        what="the kept-alive sandbox running past its old expiry",
    )
    stale = await api.post(f"/api/v1/sandboxes/{chat}/keepalive", json={"session_id": str(uuid.uuid4())})
    assert stale.status_code == 409
    none = await api.post(f"/api/v1/sandboxes/{uuid.uuid4()}/keepalive", json={})
    assert none.status_code == 404
    too_long = await api.post(f"/api/v1/sandboxes/{chat}/keepalive", json={"ttl_seconds": 10**9})
    assert too_long.status_code == 400


async def test_the_reaper_status_block_is_readable(settings: Settings, reaper: Reaper) -> None:
    await reaper.tick()
    nc = await connect(settings)
    try:
        bucket = await nc.jetstream().key_value(STATUS_BUCKET)
        await eventually(
            lambda: bucket.get(reaper.status_key()),
            lambda entry: b"last_run_ts" in (entry.value or b""),
            what="the reaper's status block",
        )
    finally:
        await nc.close()


async def test_replay_restores_a_deleted_bucket_and_reports_drift(
    api: httpx.AsyncClient, runtime: RuntimeHandle, settings: Settings
) -> None:
    chats = [str(uuid.uuid4()) for _ in range(3)]
    sessions = {c: (await api.post("/api/v1/sandboxes", json={"chat_id": c})).json()["session_id"] for c in chats}
    assert (await api.delete(f"/api/v1/sandboxes/{chats[2]}")).status_code == 200
    nc = await connect(settings)
    try:
        js = nc.jetstream()
        await js.delete_key_value(SESSIONS_BUCKET)
        kv = await ensure_topology(js, settings.streams)
        registry = Registry(js, kv)
        from services.runtime.projector import Projector  # noqa: PLC0415

        report = await replay(js, registry, Projector(js, EventStore(js), registry))
        assert sorted(report.missing) == sorted(chats[:2])
        assert (report.stale, report.extra, report.live, report.chats) == ([], [], 2, 3)
        for chat in chats[:2]:
            record = decode_record((await kv.get(chat)).value or b"")
            assert record.session_id == sessions[chat]
            assert record.status == "running"
        again = await replay(js, registry, Projector(js, EventStore(js), registry))
        assert again.drift == 0
    finally:
        await nc.close()


@pytest.mark.without_death_watch
async def test_reconciliation_marks_lost_and_removes_orphans(
    api: httpx.AsyncClient, runtime: RuntimeHandle, docker_client: docker.DockerClient, node_id: str, tmp_path: Path
) -> None:
    chat = str(uuid.uuid4())
    created = (await api.post("/api/v1/sandboxes", json={"chat_id": chat})).json()
    docker_client.containers.get(created["container_id"]).remove(force=True)
    orphan_chat, orphan_session = str(uuid.uuid4()), str(uuid.uuid4())
    labels: dict[str, str] = {
        "sandboxd.managed": "true",
        "sandboxd.node_id": node_id,
        "sandboxd.chat_id": orphan_chat,
        "sandboxd.session_id": orphan_session,
    }
    orphan = docker_client.containers.run(
        "sandboxd-sandbox:latest",
        ["sleep", "infinity"],
        detach=True,
        init=True,
        network_mode="none",
        labels=labels,
        name=f"sandboxd-{orphan_session}",  # as sandboxd names a session's container
    )
    first = await runtime.reconciler.run_once()
    assert (first.lost, first.orphans_removed, first.pending_confirmation) == (0, 0, 2), "one observation is not enough"
    second = await runtime.reconciler.run_once()
    assert (second.lost, second.orphans_removed) == (1, 1), second
    lost = [e for e in await events_of(api, chat) if e["type"] == "lost"]
    assert len(lost) == 1
    assert lost[0]["reason"] == "container_missing"
    assert lost[0]["session"]["status"] == "lost"
    assert (await api.get(f"/api/v1/sandboxes/{chat}")).status_code == 404
    assert not docker_client.containers.list(all=True, filters={"id": orphan.id or ""})
    removed = await events_of(api, orphan_chat)
    assert [(e["type"], e["reason"], e["session"]) for e in removed] == [("stopped", "orphan_removed", None)]
    assert (await runtime.reconciler.run_once()).actions == []
