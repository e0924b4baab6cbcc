"""The HTTP facade against a real nats-server, the real runtime and the real Docker engine."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import nats

from shared.config import Settings
from shared.contracts import decode_record
from shared.subjects import SESSIONS_BUCKET
from tests.support.eventually import eventually, past
from tests.support.processes import make_sandbox_dirs

Client = httpx.AsyncClient


async def kv_record(settings: Settings, chat_id: str) -> dict[str, Any] | None:
    nc = await nats.connect(settings.nats.url or "")
    try:
        kv = await nc.jetstream().key_value(SESSIONS_BUCKET)
        try:
            entry = await kv.get(chat_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        record = decode_record(entry.value or b"")
        return {"session_id": record.session_id, "status": str(record.status), "container_id": record.container_id}
    finally:
        await nc.close()


async def test_create_reuse_stop_over_http(
    api: Client, settings: Settings, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    chat = str(uuid.uuid4())
    created = await api.post("/api/v1/sandboxes", json={"chat_id": chat, "labels": {"team": "qa"}})
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["result"] == "created"
    assert view["status"] == "running"
    assert view["chat_id"] == chat
    assert view["node_id"] == settings.runtime.node_id

    container = docker_client.containers.get(view["container_id"])
    assert container.status == "running"
    assert container.name == f"sandboxd-{view['session_id']}"
    labels = container.labels
    assert labels["sandboxd.managed"] == "true"
    assert labels["sandboxd.chat_id"] == chat
    assert labels["sandboxd.session_id"] == view["session_id"]
    assert labels["sandboxd.node_id"] == settings.runtime.node_id
    assert labels["sandboxd.label.team"] == "qa"
    host = container.attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Init"] is True
    assert host["ReadonlyRootfs"] is True
    assert host["PidsLimit"] == settings.sandbox.pids_limit
    assert host["Memory"] == 512 * 1024 * 1024
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts["/workspace/chat"]["RW"] is True
    assert mounts["/workspace/chat"]["Source"] == str(tmp_path / "chats" / chat)
    assert mounts["/opt/dependencies"]["RW"] is False
    assert mounts["/opt/lambda-tools"]["RW"] is False
    # The chat directory is writable from inside, the others are not.
    assert container.exec_run(["sh", "-c", "echo hi > /workspace/chat/f"]).exit_code == 0
    assert (tmp_path / "chats" / chat / "f").read_text() == "hi\n"
    assert container.exec_run(["sh", "-c", "echo x > /opt/dependencies/f"]).exit_code != 0
    want = {"session_id": view["session_id"], "status": "running", "container_id": view["container_id"]}
    await eventually(lambda: kv_record(settings, chat), lambda got: got == want, what="the registry has the session")

    reused = await api.post("/api/v1/sandboxes", json={"chat_id": chat})
    assert reused.status_code == 200, reused.text
    assert reused.json()["result"] == "reused"
    assert reused.json()["session_id"] == view["session_id"]

    got = await api.get(f"/api/v1/sandboxes/{chat}")
    assert got.status_code == 200
    assert got.json()["session_id"] == view["session_id"]
    listed = await api.get("/api/v1/sandboxes", params={"status": "running"})
    assert chat in [s["chat_id"] for s in listed.json()["sessions"]]

    stopped = await api.delete(f"/api/v1/sandboxes/{chat}")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped"
    assert not docker_client.containers.list(all=True, filters={"name": f"sandboxd-{view['session_id']}"})
    assert (tmp_path / "chats" / chat / "f").exists(), "the chat directory outlives the sandbox"
    await eventually(lambda: kv_record(settings, chat), lambda got: got is None, what="the registry forgets it")
    assert (await api.get(f"/api/v1/sandboxes/{chat}")).status_code == 404
    again = await api.delete(f"/api/v1/sandboxes/{chat}")
    assert again.status_code == 404
    assert "no live sandbox" in again.json()["detail"]

    history = (await api.get(f"/api/v1/sandboxes/{chat}/events")).json()["events"]
    types = [e["event"]["type"] for e in history]
    # The reuse was answered from the chat's last event: no command, no event.
    assert types == ["provisioning", "running", "stopping", "stopped", "rejected"]
    assert [e["seq"] for e in history] == sorted(e["seq"] for e in history)
    assert all(e["event"]["chat_id"] == chat for e in history)


async def test_seed_create_endpoint_and_uuid_normalisation(api: Client) -> None:
    chat = uuid.uuid4()
    first = await api.post("/api/v1/create", json={"chat_id": str(chat).upper()})
    assert first.status_code == 201, first.text
    body = first.json()
    assert set(body) == {"session_id", "chat_id", "container_id", "status", "created_at", "expires_at"}
    assert body["chat_id"] == str(chat)
    second = await api.post("/api/v1/create", json={"chat_id": chat.hex})
    assert second.status_code == 200
    assert second.json()["session_id"] == body["session_id"]
    by_braces = await api.get(f"/api/v1/sandboxes/{{{str(chat).upper()}}}")
    assert by_braces.status_code == 200
    assert by_braces.json()["chat_id"] == str(chat)


async def test_expired_session_is_replaced(api: Client, docker_client: docker.DockerClient) -> None:
    chat = str(uuid.uuid4())
    old = (await api.post("/api/v1/sandboxes", json={"chat_id": chat, "ttl_seconds": 1})).json()
    await past(datetime.fromisoformat(old["expires_at"]))  # no reaper here: it stays, expired
    new = await api.post("/api/v1/sandboxes", json={"chat_id": chat})
    assert new.status_code == 201, new.text
    assert new.json()["result"] == "replaced"
    assert new.json()["session_id"] != old["session_id"]
    assert not docker_client.containers.list(all=True, filters={"id": old["container_id"]})
    assert docker_client.containers.get(new.json()["container_id"]).status == "running"
    events = (await api.get(f"/api/v1/sandboxes/{chat}/events")).json()["events"]
    running = [e["event"] for e in events if e["event"]["type"] == "running"]
    assert running[-1]["previous"] == {"session_id": old["session_id"], "container_id": old["container_id"]}


async def test_auth(api: Client) -> None:
    chat = str(uuid.uuid4())
    no_token = await api.post("/api/v1/sandboxes", json={"chat_id": chat}, headers={"X-API-Token": ""})
    assert no_token.status_code == 401
    wrong = await api.get("/api/v1/sandboxes", headers={"X-API-Token": "wrong"})
    assert wrong.status_code == 401
    assert "X-API-Token" in wrong.json()["detail"]
    assert (await api.get("/api/v1/health", headers={"X-API-Token": ""})).json() == {"status": "ok"}
    assert (await api.get("/api/v1/ready", headers={"X-API-Token": ""})).status_code == 200


async def test_bad_input_is_refused_and_changes_nothing(
    api: Client, docker_client: docker.DockerClient, node_id: str
) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"chat_id": "not-a-uuid"}, 400, "not a UUID"),
        ({"chat_id": str(uuid.uuid4()), "ttl_seconds": "soon"}, 400, "ttl_seconds"),
        ({"chat_id": str(uuid.uuid4()), "ttl_seconds": 0}, 400, "ttl_seconds"),
        ({"chat_id": str(uuid.uuid4()), "surprise": 1}, 400, "surprise"),
        ({"chat_id": str(uuid.uuid4()), "labels": {"ok": 5}}, 400, "labels"),
        ({"chat_id": str(uuid.uuid4()), "ttl_seconds": 29 * 24 * 3600}, 422, "ttl_seconds"),
    ]
    for body, status, needle in cases:
        response = await api.post("/api/v1/sandboxes", json=body)
        assert response.status_code == status, (body, response.text)
        assert needle in response.text, (body, response.text)
    assert (await api.get("/api/v1/sandboxes/nope")).status_code == 400
    assert (await api.get("/api/v1/sandboxes")).json()["count"] == 0
    assert not docker_client.containers.list(all=True, filters={"label": f"sandboxd.node_id={node_id}"})


async def test_docker_failure_is_an_error_that_says_so(
    nats: Any, tmp_path: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None
) -> None:
    from services.runtime.service import running_runtime  # noqa: PLC0415
    from tests.conftest import TEST_TOKEN, settings_for  # noqa: PLC0415
    from tests.support.api_server import serving_api  # noqa: PLC0415

    make_sandbox_dirs(tmp_path)
    bad = settings_for(nats.url, tmp_path, node_id, SANDBOXD_SANDBOX_IMAGE="sandboxd-no-such-image:never")
    async with running_runtime(bad), serving_api(bad) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        chat = str(uuid.uuid4())
        response = await client.post("/api/v1/sandboxes", json={"chat_id": chat}, headers={"X-API-Token": TEST_TOKEN})
        assert response.status_code == 502, response.text
        assert "sandbox_start_failed" in response.json()["detail"]
        assert "sandboxd-no-such-image:never" in response.json()["detail"]
        assert response.json()["error"]["type"] == "sandbox_start_failed"
        assert (await client.get(f"/api/v1/sandboxes/{chat}", headers={"X-API-Token": TEST_TOKEN})).status_code == 404
    assert not docker_client.containers.list(all=True, filters={"label": f"sandboxd.node_id={node_id}"})


async def test_nats_down_gives_503(api: Client, nats: Any) -> None:
    nats.stop()
    await eventually(lambda: api.get("/api/v1/ready"), lambda r: r.status_code == 503, what="the API sees NATS gone")
    response = await api.post("/api/v1/sandboxes", json={"chat_id": str(uuid.uuid4())})
    assert response.status_code == 503, response.text
    assert "NATS" in response.json()["detail"]
    # The server comes back on its port and store: the API is ready again (and the runtime
    # and the API stop on a live connection, not waiting out requests to a dead one).
    nats.start()
    await eventually(lambda: api.get("/api/v1/ready"), lambda r: r.status_code == 200, what="the API sees NATS back")
