"""The HTTP facade against a real nats-server with no runtime behind it: what it answers on
its own (a command accepted but not carried out yet, the chat id of the path)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats as nats_client
import pytest

from shared.subjects import COMMANDS_STREAM
from shared.topology import ensure_topology
from tests.conftest import TEST_TOKEN, settings_for
from tests.support.api_server import serving_api
from tests.support.nats_server import NatsServer


@pytest.fixture
async def api(nats: NatsServer, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(nats.url, tmp_path, "no-runtime", SANDBOXD_API_WAIT_SECONDS="0.2")
    nc = await nats_client.connect(nats.url)
    await ensure_topology(nc.jetstream(), settings.streams)
    await nc.close()
    async with (
        serving_api(settings) as base,
        httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=10) as client,
    ):
        yield client


async def queued_commands(nats: NatsServer) -> int:
    nc = await nats_client.connect(nats.url)
    try:
        return (await nc.jetstream().stream_info(COMMANDS_STREAM)).state.messages
    finally:
        await nc.close()


async def test_a_command_without_an_outcome_in_time_is_accepted(api: httpx.AsyncClient, nats: NatsServer) -> None:
    chat = str(uuid.uuid4())
    for method, path, body in (
        ("POST", "/api/v1/sandboxes", {"chat_id": chat}),
        ("POST", "/api/v1/create", {"chat_id": chat}),
        ("DELETE", f"/api/v1/sandboxes/{chat}", None),
        ("POST", f"/api/v1/sandboxes/{chat}/keepalive", {"ttl_seconds": 60}),
    ):
        response = await api.request(method, path, json=body)
        assert response.status_code == 202, (path, response.text)
        accepted = response.json()
        assert str(uuid.UUID(accepted["command_id"])) == accepted["command_id"]
        assert accepted["chat_id"] == chat
        assert accepted["status_url"] == f"/api/v1/sandboxes/{chat}/events"
        assert "did not arrive within 0.2s" in accepted["detail"]
    assert await queued_commands(nats) == 4


async def test_the_chat_id_of_a_path_is_normalised_or_refused_by_name(api: httpx.AsyncClient) -> None:
    chat = uuid.uuid4()
    for spelling in (str(chat).upper(), chat.hex, f"{{{chat}}}"):
        history = await api.get(f"/api/v1/sandboxes/{spelling}/events")
        assert history.status_code == 200, (spelling, history.text)
        assert history.json() == {"chat_id": str(chat), "events": []}
        missing = await api.get(f"/api/v1/sandboxes/{spelling}")
        assert missing.status_code == 404, (spelling, missing.text)
        assert missing.json()["detail"] == f"chat {chat} has no live sandbox"
    for method, path in (
        ("GET", "/api/v1/sandboxes/nope"),
        ("DELETE", "/api/v1/sandboxes/nope"),
        ("POST", "/api/v1/sandboxes/nope/keepalive"),
        ("GET", "/api/v1/sandboxes/nope/events"),
    ):
        refused = await api.request(method, path)
        assert refused.status_code == 400, (path, refused.text)
        assert refused.json() == {"status_code": 400, "detail": "chat_id 'nope' is not a UUID"}
