"""Crash safety with real processes: kill -9 at the dangerous points, restart, and check
that nothing accepted is lost, nothing leaks, and every command has exactly one outcome."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import httpx
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from shared.config import StreamSettings
from shared.contracts import OUTCOME_TYPES
from shared.event_store import EventStore
from shared.failpoints import FAILPOINT_ENV
from shared.subjects import SESSIONS_BUCKET, command_subject
from shared.topology import ensure_topology
from tests.support.nats_server import NatsServer, free_port
from tests.support.processes import sandboxd_env, spawn, stop, until_ready

OUTCOMES = {t.__struct_config__.tag for t in OUTCOME_TYPES}
TOKEN = "crash-token"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for sub in ("chats", "deps", "tools"):
        (tmp_path / sub).mkdir()
    return tmp_path


async def history(js: JetStreamContext, chat: str) -> list[dict[str, Any]]:
    return [
        json.loads(json.dumps(__import__("msgspec").to_builtins(s.event))) for s in await EventStore(js).history(chat)
    ]


async def wait_for_outcome(
    js: JetStreamContext, chat: str, command_id: str, timeout: float = 30.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = await history(js, chat)
        if any(e["causation_id"] == command_id and e["type"] in OUTCOMES for e in events):
            return events
        await asyncio.sleep(0.1)
    raise AssertionError(f"no outcome for {command_id}: {await history(js, chat)}")


async def assert_consistent(js: JetStreamContext, docker_client: docker.DockerClient, chat: str) -> None:
    """One live record and its running container, or neither; the KV agrees."""
    state = await EventStore(js).read(chat)
    session = state.session if state.session is not None and state.session.is_live else None
    containers = docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})
    if session is None:
        assert containers == [], "a container without a live record"
    else:
        assert [c.id for c in containers] == [session.container_id], "a live record without its container"
        assert containers[0].status == "running"
    kv = await js.key_value(SESSIONS_BUCKET)
    deadline = time.monotonic() + 10
    while True:
        try:
            held = json.loads((await kv.get(chat)).value or b"null")
        except nats.js.errors.KeyNotFoundError:
            held = None
        want = session.session_id if session else None
        if (held["session_id"] if held else None) == want or time.monotonic() > deadline:
            assert (held["session_id"] if held else None) == want
            return
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("point", ["after_claim", "after_start", "after_outcome"])
async def test_kill_9_during_a_create_then_restart(
    point: str, nats: NatsServer, root: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None
) -> None:
    env = sandboxd_env(nats.url, root, node_id, TOKEN, SANDBOXD_RUNTIME_ACK_WAIT_SECONDS="2")
    nc = await nats_connect(nats.url)
    js = nc.jetstream()
    await ensure_topology(js, StreamSettings())
    victim = spawn("services.runtime", {**env, FAILPOINT_ENV: point}, root / "runtime-1.log")
    try:
        chat, command_id = str(uuid.uuid4()), str(uuid.uuid4())
        body = json.dumps({"command_id": command_id, "chat_id": chat}).encode()
        await js.publish(command_subject("create", chat), body, headers={"Nats-Msg-Id": command_id})
        assert await asyncio.to_thread(victim.wait, 30) == -signal.SIGKILL, (root / "runtime-1.log").read_text()
    finally:
        stop(victim)
    survivor = spawn("services.runtime", env, root / "runtime-2.log")
    try:
        events = await wait_for_outcome(js, chat, command_id)
        outcomes = [e for e in events if e["causation_id"] == command_id and e["type"] in OUTCOMES]
        assert [e["type"] for e in outcomes] == ["running"], events
        assert [e["type"] for e in events].count("provisioning") == 1
        await assert_consistent(js, docker_client, chat)
        # The command left the work queue: nothing is redelivered later.
        await asyncio.sleep(2.5)
        assert (await js.stream_info("SANDBOX_COMMANDS")).state.messages == 0
        assert len([e for e in await history(js, chat) if e["type"] in OUTCOMES]) == 1
    finally:
        stop(survivor)
        await nc.close()


async def test_two_apis_and_two_runtimes_make_one_container(
    nats: NatsServer, root: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None
) -> None:
    env = sandboxd_env(nats.url, root, node_id, TOKEN)
    ports = [free_port(), free_port()]
    procs = [spawn("services.runtime", env, root / f"runtime-{i}.log") for i in range(2)]
    procs += [spawn("services.api", {**env, "SANDBOXD_HTTP_PORT": str(p)}, root / f"api-{p}.log") for p in ports]
    try:
        async with httpx.AsyncClient(headers={"X-API-Token": TOKEN}, timeout=30) as http:
            for port in ports:
                await until_ready(f"http://127.0.0.1:{port}")
            chat = str(uuid.uuid4())
            answers = await asyncio.gather(
                *(
                    http.post(f"http://127.0.0.1:{ports[i % 2]}/api/v1/sandboxes", json={"chat_id": chat})
                    for i in range(40)
                )
            )
        assert sorted({a.status_code for a in answers}) == [200, 201]
        assert [a.status_code for a in answers].count(201) == 1
        assert len({a.json()["session_id"] for a in answers}) == 1
        assert len({a.json()["container_id"] for a in answers}) == 1
        assert len(docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})) == 1
    finally:
        for proc in procs:
            stop(proc)


async def nats_connect(url: str) -> Client:
    return await nats.connect(url)
