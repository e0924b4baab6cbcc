"""Crash safety with real processes: kill -9 at the dangerous points, restart, and check
that nothing accepted is lost, nothing leaks, and every command has exactly one outcome.
(Several runtimes and APIs racing on one chat: test_cross_process.py.)"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from pathlib import Path
from typing import Any

import docker
import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from shared.config import StreamSettings
from shared.contracts import OUTCOME_TYPES
from shared.event_store import EventStore
from shared.failpoints import FAILPOINT_ENV
from shared.subjects import COMMANDS_STREAM, command_subject
from shared.topology import ensure_topology
from tests.support.consistency import assert_consistent
from tests.support.eventually import eventually, holds
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs, sandboxd_env, spawn, stop

OUTCOMES = {t.__struct_config__.tag for t in OUTCOME_TYPES}
TOKEN = "crash-token"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_sandbox_dirs(tmp_path)
    return tmp_path


async def history(js: JetStreamContext, chat: str) -> list[dict[str, Any]]:
    return [json.loads(json.dumps(msgspec.to_builtins(s.event))) for s in await EventStore(js).history(chat)]


def outcomes_of(events: list[dict[str, Any]], command_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["causation_id"] == command_id and e["type"] in OUTCOMES]


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
        assert await asyncio.to_thread(victim.wait, 30) == -signal.SIGKILL, victim.log.read_text()
    finally:
        stop(victim)
    survivor = spawn("services.runtime", env, root / "runtime-2.log")
    try:
        events = await eventually(
            lambda: history(js, chat),
            lambda events: bool(outcomes_of(events, command_id)),
            timeout=30,
            what=f"an outcome for {command_id}",
        )
        assert [e["type"] for e in outcomes_of(events, command_id)] == ["running"], events
        assert [e["type"] for e in events].count("provisioning") == 1
        await assert_consistent(js, docker_client, chat)

        # The command leaves the work queue (after a kill past the outcome, once its
        # redelivery finds the outcome), and nothing comes back: watched for longer than the
        # 2 s ack wait, so a message still held unacknowledged would be redelivered meanwhile.
        async def queue_and_outcomes() -> tuple[int, int]:
            queued = (await js.stream_info(COMMANDS_STREAM)).state.messages
            return queued, len([e for e in await history(js, chat) if e["type"] in OUTCOMES])

        await eventually(queue_and_outcomes, lambda seen: seen == (0, 1), what="an empty work queue")
        await holds(
            queue_and_outcomes,
            lambda seen: seen == (0, 1),
            seconds=3,
            what="an empty work queue and one outcome",
        )
        assert survivor.poll() is None, survivor.log.read_text()
    finally:
        stop(survivor)
        await nc.close()


async def nats_connect(url: str) -> Client:
    return await nats.connect(url)
