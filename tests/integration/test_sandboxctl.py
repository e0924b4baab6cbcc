"""`sandboxctl`'s read-only commands against a real nats-server: they attach, never create."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest

from shared.config import StreamSettings
from shared.contracts import NodeBeat, encode
from shared.nodes import node_key
from shared.subjects import COMMANDS_STREAM, EVENTS_STREAM, INSTANCES_BUCKET, SESSIONS_BUCKET, STATUS_BUCKET
from shared.topology import STATUS, ensure_bucket, ensure_topology
from tests.support.nats_server import NatsServer

READ_ONLY = [["status"], ["replay", "--dry-run"]]


def sandboxctl(server: NatsServer, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # In a directory of its own: no `.sandboxd/nats/admin.nk` of a developer's stack is picked up.
    env = {"SANDBOXD_NATS_URL": server.url, "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "services.ctl", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)


async def _streams(server: NatsServer) -> list[str]:
    """Every stream on the server (a KV bucket is the stream `KV_<bucket>`)."""
    nc = await nats.connect(server.url)
    try:
        return sorted(info.config.name or "" for info in await nc.jetstream().streams_info())
    finally:
        await nc.close()


def streams(server: NatsServer) -> list[str]:
    return asyncio.run(_streams(server))


async def _declare(server: NatsServer, *, status_bucket: bool) -> None:
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, StreamSettings())
        if status_bucket:
            await ensure_bucket(js, STATUS, StreamSettings())
    finally:
        await nc.close()


async def _beat(server: NatsServer, node: str, *, at: datetime) -> None:
    """A node's beat, as its runtimes write it."""
    nc = await nats.connect(server.url)
    try:
        kv = await nc.jetstream().key_value(INSTANCES_BUCKET)
        beat = NodeBeat(node_id=node, instance_id=str(uuid.uuid4()), beat_at=at, live_sessions=3, max_sessions=10)
        await kv.put(node_key(node), encode(beat))
    finally:
        await nc.close()


@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_a_read_only_command_on_a_bare_server_creates_nothing_and_says_why(
    nats: NatsServer, tmp_path: Path, args: list[str]
) -> None:
    done = sandboxctl(nats, tmp_path, *args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    for name in (COMMANDS_STREAM, EVENTS_STREAM, SESSIONS_BUCKET):
        assert name in done.stderr, done.stderr
    assert "creates nothing" in done.stderr, done.stderr
    assert "run `sandboxctl declare`" in done.stderr, done.stderr
    assert streams(nats) == []


def test_status_needs_the_status_bucket_too_and_reads_once_declared(nats: NatsServer, tmp_path: Path) -> None:
    asyncio.run(_declare(nats, status_bucket=False))
    declared = streams(nats)
    refused = sandboxctl(nats, tmp_path, "status")
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert f"{STATUS_BUCKET} not found" in refused.stderr, refused.stderr
    assert streams(nats) == declared
    assert f"KV_{STATUS_BUCKET}" not in declared
    asyncio.run(_declare(nats, status_bucket=True))
    status = sandboxctl(nats, tmp_path, "status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {"registry": {"sessions": 0}, "nodes": {}}
    asyncio.run(_beat(nats, "node-x", at=datetime.now(UTC)))
    asyncio.run(_beat(nats, "node-y", at=datetime.now(UTC) - timedelta(hours=1)))
    nodes = json.loads(sandboxctl(nats, tmp_path, "status").stdout)["nodes"]
    assert {n: (v["state"], v["live_sessions"], v["max_sessions"]) for n, v in nodes.items()} == {
        "node-x": ("alive", 3, 10),
        "node-y": ("dead", 3, 10),
    }

    dry = sandboxctl(nats, tmp_path, "replay", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["chats"] == 0
