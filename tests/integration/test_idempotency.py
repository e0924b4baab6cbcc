"""`Idempotency-Key` over HTTP against a real nats-server, runtime and Docker engine: a retry
gets the first request's answer (status and body) and never a second command, whether the
first request is still waiting, was answered 202, or lost its API process to kill -9; a
key used for another request is a 422; junk keys are a 400."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import httpx
import msgspec
import nats as nats_client
import pytest
from nats.aio.client import Client

from services.runtime.service import running_runtime
from shared.config import Settings, StreamSettings
from shared.contracts import OUTCOME_TYPES
from shared.event_store import EventStore
from shared.idempotency import decode_request, record_key
from shared.subjects import COMMANDS_STREAM, IDEMPOTENCY_BUCKET
from shared.topology import ensure_topology
from tests.conftest import TEST_TOKEN, settings_for
from tests.support.api_server import serving_api
from tests.support.eventually import eventually, holds
from tests.support.nats_server import NatsServer
from tests.support.processes import api_base, make_sandbox_dirs, sandboxd_env, spawn, stop, until_ready

OUTCOMES = {t.__struct_config__.tag for t in OUTCOME_TYPES}
KEY = "Idempotency-Key"
TOKEN = "idempotency-token"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_sandbox_dirs(tmp_path)
    return tmp_path


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[Client]:
    client = await nats_client.connect(nats.url)
    await ensure_topology(client.jetstream(), StreamSettings())
    yield client
    await client.close()


async def history(nc: Client, chat: str) -> list[dict[str, Any]]:
    return [json.loads(msgspec.json.encode(s.event)) for s in await EventStore(nc.jetstream()).history(chat)]


async def outcomes_of(nc: Client, chat: str, command_id: str) -> list[str]:
    return [e["type"] for e in await history(nc, chat) if e["causation_id"] == command_id and e["type"] in OUTCOMES]


async def commands_stored(nc: Client) -> int:
    """Every command the work queue ever stored (consumed ones included)."""
    return (await nc.jetstream().stream_info(COMMANDS_STREAM)).state.last_seq


async def command_of(nc: Client, key: str) -> str:
    """The command id the API recorded for an idempotency key."""
    entry = await (await nc.jetstream().key_value(IDEMPOTENCY_BUCKET)).get(record_key(key))
    return decode_request(entry.value or b"").command_id


# --------------------------------------------------------------------------- real processes


async def test_a_retry_after_the_api_was_killed_mid_wait_gets_the_same_answer_and_no_second_command(
    nats: NatsServer, nc: Client, root: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None
) -> None:
    env = sandboxd_env(nats.url, root, node_id, TOKEN, SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0")
    chat, key = str(uuid.uuid4()), f"create-{uuid.uuid4()}"
    body = {"chat_id": chat, "ttl_seconds": 600}
    first_api = spawn("services.api", env, root / "api-1.log")
    runtime = second_api = None
    try:
        base = api_base(first_api)
        await until_ready(base)
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=60) as http:
            # No runtime yet: the request waits for its outcome, its command in the queue.
            first = asyncio.create_task(http.post("/api/v1/sandboxes", json=body, headers={KEY: key}))
            await eventually(lambda: commands_stored(nc), lambda n: n == 1, what="the create in the work queue")
            first_api.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(first_api.wait, 30) == -signal.SIGKILL
            with pytest.raises(httpx.HTTPError):
                await first  # the client's connection dropped mid-wait
        command_id = await command_of(nc, key)

        second_api = spawn("services.api", env, root / "api-2.log")
        base = api_base(second_api)
        await until_ready(base)
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=60) as http:
            retry = asyncio.create_task(http.post("/api/v1/sandboxes", json=body, headers={KEY: key}))
            runtime = spawn("services.runtime", env, root / "runtime.log")
            answer = await retry
            assert answer.status_code == 201, answer.text
            assert answer.json()["chat_id"] == chat
            assert answer.json()["result"] == "created"

            # The same answer again, from the record; one command, one outcome, one container.
            again = await http.post("/api/v1/sandboxes", json=body, headers={KEY: key})
            assert (again.status_code, again.json()) == (201, answer.json())
            assert again.headers["Idempotent-Replayed"] == "true"
            assert await commands_stored(nc) == 1
            await holds(
                lambda: outcomes_of(nc, chat, command_id),
                lambda seen: seen == ["running"],
                seconds=2,
                what="one outcome",
            )
            containers = docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})
            assert [c.id for c in containers] == [answer.json()["container_id"]]

            # The key stands for that request only.
            for method, path, other in (
                ("POST", "/api/v1/sandboxes", {"chat_id": chat, "ttl_seconds": 601}),
                ("POST", "/api/v1/sandboxes", {"chat_id": str(uuid.uuid4()), "ttl_seconds": 600}),
                ("POST", f"/api/v1/sandboxes/{chat}/keepalive", {}),
                ("DELETE", f"/api/v1/sandboxes/{chat}", None),
            ):
                refused = await http.request(method, path, json=other, headers={KEY: key})
                assert refused.status_code == 422, (path, refused.text)
                assert "Idempotency-Key was first used for POST /api/v1/sandboxes" in refused.json()["detail"]

            # A DELETE retried after it succeeded answers as it did (without a key: 404).
            stop_key = f"stop-{uuid.uuid4()}"
            stopped = await http.delete(f"/api/v1/sandboxes/{chat}", headers={KEY: stop_key})
            assert stopped.status_code == 200, stopped.text
            assert stopped.json()["status"] == "stopped"
            retried = await http.delete(f"/api/v1/sandboxes/{chat}", headers={KEY: stop_key})
            assert (retried.status_code, retried.json()) == (200, stopped.json())
            assert (await http.delete(f"/api/v1/sandboxes/{chat}")).status_code == 404
            assert await outcomes_of(nc, chat, await command_of(nc, stop_key)) == ["stopped"]
    finally:
        stop(first_api, second_api, runtime)


# --------------------------------------------------------------------------- in the test's process


@pytest.fixture
def quick(nats: NatsServer, root: Path, node_id: str) -> Settings:
    """An API that answers 202 when an outcome is not there within 0.3 s."""
    return settings_for(nats.url, root, node_id, SANDBOXD_API_WAIT_SECONDS="0.3")


@pytest.fixture
async def http(quick: Settings, nc: Client) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serving_api(quick) as base,
        httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as client,
    ):
        yield client


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (b"", "empty"),
        (b"k" * 256, "at most 255"),
        (b"caf\xe9", "printable ASCII"),
    ],
)
async def test_a_junk_key_is_refused_and_nothing_is_sent(
    http: httpx.AsyncClient, nc: Client, key: bytes, why: str
) -> None:
    chat = str(uuid.uuid4())
    for method, path, body in (
        ("POST", "/api/v1/sandboxes", {"chat_id": chat}),
        ("POST", "/api/v1/create", {"chat_id": chat}),
        ("POST", f"/api/v1/sandboxes/{chat}/keepalive", {}),
        ("DELETE", f"/api/v1/sandboxes/{chat}", None),
    ):
        refused = await http.request(method, path, json=body, headers=[(b"Idempotency-Key", key)])
        assert refused.status_code == 400, (path, refused.text)
        assert why in refused.json()["detail"]
    assert await commands_stored(nc) == 0


async def test_a_202_is_not_the_answer_a_retry_gets_the_outcome_once_it_exists(
    http: httpx.AsyncClient, nc: Client, quick: Settings, docker_client: docker.DockerClient, node_containers: None
) -> None:
    chat, key = str(uuid.uuid4()), "retry-after-202"
    body = {"chat_id": chat}
    # No runtime: both wait at once (the second without sending the command again), both 202.
    first, second = await asyncio.gather(
        http.post("/api/v1/sandboxes", json=body, headers={KEY: key}),
        http.post("/api/v1/sandboxes", json=body, headers={KEY: key}),
    )
    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    command_id = first.json()["command_id"]
    assert second.json()["command_id"] == command_id == await command_of(nc, key)

    async with running_runtime(quick):
        await eventually(lambda: outcomes_of(nc, chat, command_id), what="the create carried out")
        # The outcome is in the chat's log, nothing will deliver it again: the retry reads it.
        created = await http.post("/api/v1/sandboxes", json=body, headers={KEY: key})
    assert created.status_code == 201, created.text
    assert await outcomes_of(nc, chat, command_id) == ["running"]
    assert await commands_stored(nc) == 1
    again = await http.post("/api/v1/sandboxes", json=body, headers={KEY: key})
    assert (again.status_code, again.json()) == (201, created.json())


async def test_while_nats_is_down_a_keyed_request_is_refused_at_once(http: httpx.AsyncClient, nats: NatsServer) -> None:
    nats.stop()
    await eventually(lambda: http.get("/api/v1/ready"), lambda r: r.status_code == 503, what="the API seeing NATS gone")
    refused = await http.post("/api/v1/sandboxes", json={"chat_id": str(uuid.uuid4())}, headers={KEY: "while-down"})
    assert refused.status_code == 503, refused.text
    # Refused for want of a connection, not after waiting for NATS to answer the key's claim.
    assert refused.json()["detail"] == "NATS is unreachable, nothing was done: NATS is not connected"
