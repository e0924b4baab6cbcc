"""The README's HTTP table where the existing tests do not reach, against a real nats-server,
runtime and Docker engine: 202 with a `status_url` when the outcome is late, every refusal
of a keepalive with its status and `detail`, and a stop whose container is already gone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import nats
import pytest
from nats.aio.client import Client

from services.runtime.decisions import stopping
from services.runtime.service import running_runtime
from shared.config import Settings
from shared.contracts import SandboxRunning, SandboxStopping, SessionStatus
from shared.event_store import EventStore
from shared.subjects import SESSIONS_BUCKET
from tests.conftest import TEST_TOKEN, settings_for
from tests.support.api_server import serving_api
from tests.support.appends import append_event
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs
from tests.support.records import session_record

API = "/api/v1"
OUTCOMES = {"running", "reused", "extended", "stopped", "failed", "rejected"}


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats.url or "")
    yield client
    await client.close()


async def kv_has(nc: Client, chat: str) -> bool:
    kv = await nc.jetstream().key_value(SESSIONS_BUCKET)
    try:
        await kv.get(chat)
    except nats.js.errors.KeyNotFoundError:
        return False
    return True


def outcomes_in(history: dict[str, Any], command_id: str) -> list[dict[str, Any]]:
    events = [e["event"] for e in history["events"]]
    return [e for e in events if e["causation_id"] == command_id and e["type"] in OUTCOMES]


# --------------------------------------------------------------------------- 202


async def test_an_outcome_later_than_the_wait_is_a_202_whose_status_url_serves_it(
    nats: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient, node_containers: None
) -> None:
    make_sandbox_dirs(tmp_path)
    # No runtime runs at first: no outcome can come within the wait, however short.
    settings = settings_for(nats.url, tmp_path, node_id, SANDBOXD_API_WAIT_SECONDS="0.5")
    async with (
        serving_api(settings) as url,
        httpx.AsyncClient(base_url=url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as api,
    ):
        chat = str(uuid.uuid4())

        accepted = await api.post(f"{API}/sandboxes", json={"chat_id": chat})

        assert accepted.status_code == 202, accepted.text
        body = accepted.json()
        command_id = body["command_id"]
        assert str(uuid.UUID(command_id)) == command_id
        assert body["chat_id"] == chat
        assert body["status_url"] == f"{API}/sandboxes/{chat}/events"
        assert "0.5s" in body["detail"]
        pending = await api.get(body["status_url"])
        assert pending.status_code == 200, pending.text
        assert outcomes_in(pending.json(), command_id) == [], "nothing has handled it yet"
        assert (await api.get(f"{API}/sandboxes/{chat}")).status_code == 404

        async with running_runtime(settings):  # the command waited in the stream for a runtime

            async def history() -> dict[str, Any]:
                return dict((await api.get(body["status_url"])).json())

            done = await eventually(history, lambda h: outcomes_in(h, command_id) != [], what="the create's outcome")
            (outcome,) = outcomes_in(done, command_id)
            assert (outcome["type"], outcome["result"]) == ("running", "created")
            live = await api.get(f"{API}/sandboxes/{chat}")
            assert live.status_code == 200
            assert (live.json()["session_id"], live.json()["status"]) == (outcome["session_id"], "running")

        # A stop sent while no runtime runs is accepted the same way, and carried out later.
        stop = await api.delete(f"{API}/sandboxes/{chat}")
        assert stop.status_code == 202, stop.text
        assert stop.json()["status_url"] == body["status_url"]
        async with running_runtime(settings):

            async def stop_history() -> dict[str, Any]:
                return dict((await api.get(stop.json()["status_url"])).json())

            done = await eventually(
                stop_history, lambda h: outcomes_in(h, stop.json()["command_id"]) != [], what="the stop's outcome"
            )
            (stopped,) = outcomes_in(done, stop.json()["command_id"])
            assert (stopped["type"], stopped["reason"]) == ("stopped", "api")
        assert (await api.get(f"{API}/sandboxes/{chat}")).status_code == 404


# --------------------------------------------------------------------------- keepalive refusals


async def test_keepalive_refusals_answer_as_the_readme_says(
    api: httpx.AsyncClient, nc: Client, settings: Settings, node_id: str
) -> None:
    store = EventStore(nc.jetstream())
    chat = str(uuid.uuid4())
    live = (await api.post(f"{API}/sandboxes", json={"chat_id": chat})).json()
    session_id = live["session_id"]
    stale = str(uuid.uuid4())
    max_ttl = settings.sandbox.max_ttl_seconds

    async def keepalive(on: str, body: object) -> httpx.Response:
        if isinstance(body, bytes):
            return await api.post(
                f"{API}/sandboxes/{on}/keepalive", content=body, headers={"content-type": "application/json"}
            )
        return await api.post(f"{API}/sandboxes/{on}/keepalive", json=body)

    # Refused by the runtime: the status by rejection reason, `detail` and `error` say which.
    stopped_chat = str(uuid.uuid4())
    assert (await api.post(f"{API}/sandboxes", json={"chat_id": stopped_chat})).status_code == 201
    assert (await api.delete(f"{API}/sandboxes/{stopped_chat}")).status_code == 200
    refused: list[tuple[str, object, int, str, list[str]]] = [
        (str(uuid.uuid4()), {}, 404, "no_live_session", ["has no live sandbox"]),
        (stopped_chat, {"ttl_seconds": 60}, 404, "no_live_session", ["has no live sandbox"]),
        (chat, {"session_id": stale}, 409, "stale_session", [stale, session_id, "not the chat's current session"]),
        (chat, {"ttl_seconds": max_ttl + 1}, 422, "ttl_too_long", [str(max_ttl + 1), f"maximum of {max_ttl}"]),
    ]
    # A session that is not running (a stop claimed) and one that has expired, forged on the stream.
    now = datetime.now(UTC)
    claimed = session_record(now=now, chat_id=str(uuid.uuid4()), node_id=node_id)
    await append_event(store, SandboxStopping, stopping(claimed, now), occurred_at=now)
    refused.append((claimed.chat_id, {}, 409, "not_running", [claimed.session_id, "is stopping"]))
    expired = session_record(now=now - timedelta(hours=2), chat_id=str(uuid.uuid4()), node_id=node_id)
    await append_event(store, SandboxRunning, expired, occurred_at=now - timedelta(hours=2))
    refused.append((expired.chat_id, {"session_id": expired.session_id}, 409, "expired", ["expired at"]))

    for on, body, status, reason, needles in refused:
        response = await keepalive(on, body)
        assert response.status_code == status, (reason, response.text)
        answer = response.json()
        assert answer["status_code"] == status
        assert answer["detail"].startswith(f"refused ({reason}): "), answer
        assert all(needle in answer["detail"] for needle in needles), (needles, answer)
        assert answer["error"]["type"] == reason, answer

    # Refused by the API before any command: a 400 naming what is wrong.
    malformed: list[tuple[object, str]] = [
        ({"ttl_seconds": "600"}, "invalid request body"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": 31 * 24 * 3600}, "ttl_seconds"),
        ({"ttl": 60}, "ttl"),
        ({"session_id": "not-a-session"}, "session_id 'not-a-session' is not a UUID"),
        (b"{not json", "not valid JSON"),
    ]
    for body, needle in malformed:
        response = await keepalive(chat, body)
        assert response.status_code == 400, (body, response.text)
        assert needle in response.json()["detail"], (body, response.text)
    assert (await keepalive("not-a-chat", {})).status_code == 400

    # Nothing of that moved the live session; a keepalive that is right still does.
    unchanged = (await api.get(f"{API}/sandboxes/{chat}")).json()
    assert (unchanged["session_id"], unchanged["expires_at"]) == (session_id, live["expires_at"])
    kept = await keepalive(chat, {"session_id": session_id, "ttl_seconds": max_ttl})
    assert kept.status_code == 200, kept.text
    assert kept.json()["expires_at"] > live["expires_at"]


# --------------------------------------------------------------------------- stop of a missing container


@pytest.mark.without_death_watch
async def test_a_stop_whose_container_was_removed_behind_our_back_ends_stopped(
    api: httpx.AsyncClient, nc: Client, docker_client: docker.DockerClient
) -> None:
    chat = str(uuid.uuid4())
    live = (await api.post(f"{API}/sandboxes", json={"chat_id": chat})).json()
    docker_client.containers.get(live["container_id"]).remove(force=True)

    response = await api.delete(f"{API}/sandboxes/{chat}")

    assert response.status_code == 200, response.text
    view = response.json()
    assert (view["session_id"], view["status"], view["container_id"]) == (
        live["session_id"],
        "stopped",
        live["container_id"],
    )
    events = [e["event"] for e in (await api.get(f"{API}/sandboxes/{chat}/events")).json()["events"]]
    assert [e["type"] for e in events] == ["provisioning", "running", "stopping", "stopped"], "no failed, no retry"
    assert (events[-1]["reason"], events[-1]["session"]["status"]) == ("api", SessionStatus.STOPPED)
    assert (await api.get(f"{API}/sandboxes/{chat}")).status_code == 404
    await eventually(lambda: kv_has(nc, chat), lambda has: not has, what="the record leaves the registry")


# --------------------------------------------------------------------------- 413


async def test_a_body_over_the_limit_is_refused_before_it_is_read(api: httpx.AsyncClient) -> None:
    """A client announcing a huge body gets 413 without uploading it (nor a 408 after the
    body timeout): the server answers without waiting for a single body byte."""
    url = httpx.URL(str(api.base_url))
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            f"POST {API}/sandboxes HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nX-API-Token: {TEST_TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {5 * 1024 * 1024}\r\n\r\n".encode()
        )
        await writer.drain()
        # No body byte is ever sent: a server that waited for the body would answer 408 once
        # http.body_timeout_seconds ran out.
        status_line = await reader.readline()
        assert status_line.split()[1] == b"413", status_line
    finally:
        writer.close()
    just_over = await api.post(
        f"{API}/sandboxes",
        content=b'{"chat_id": "' + b"a" * (1024 * 1024) + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert just_over.status_code == 413
    assert just_over.json()["detail"]
