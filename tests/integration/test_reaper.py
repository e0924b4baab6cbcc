"""The reaper against a real nats-server (no runtime, no Docker): what it publishes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats
from nats.aio.client import Client

from services.reaper.service import running_reaper
from shared.config import Settings, StreamSettings
from shared.contracts import SessionRecord, SessionStatus, encode
from shared.subjects import COMMANDS_STREAM
from shared.topology import ensure_topology
from tests.conftest import settings_for
from tests.support.nats_server import NatsServer


def record(chat: str, status: SessionStatus, *, expires_in: float, updated_ago: float = 0) -> SessionRecord:
    now = datetime.now(UTC)
    return SessionRecord(
        session_id=str(uuid.uuid4()),
        chat_id=chat,
        node_id="n",
        container_id="c",
        image="i",
        status=status,
        created_at=now,
        expires_at=now + timedelta(seconds=expires_in),
        updated_at=now - timedelta(seconds=updated_ago),
        version=3,
    )


async def commands(nc: Client) -> list[tuple[str, dict[str, Any]]]:
    js = nc.jetstream()
    info = await js.stream_info(COMMANDS_STREAM)
    if not info.state.messages:
        return []
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(COMMANDS_STREAM, seq)
        out.append((msg.subject or "", json.loads(msg.data or b"{}")))
    return out


async def setup(nats_url: str) -> tuple[Client, Any]:
    nc = await nats.connect(nats_url)
    kv = await ensure_topology(nc.jetstream(), StreamSettings())
    return nc, kv


async def test_expiry_and_redrive_with_kill_switches(nats: NatsServer, tmp_path: Any) -> None:
    nc, kv = await setup(nats.url)
    expiring, stuck, fine = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    await kv.put(expiring, encode(record(expiring, SessionStatus.RUNNING, expires_in=0.3)))
    await kv.put(stuck, encode(record(stuck, SessionStatus.STOPPING, expires_in=60, updated_ago=30)))
    await kv.put(fine, encode(record(fine, SessionStatus.RUNNING, expires_in=60)))

    base = settings_for(
        nats.url, tmp_path, "n", SANDBOXD_REAPER_REDRIVE_GRACE_SECONDS="10", SANDBOXD_RUNTIME_CLAIM_TIMEOUT_SECONDS="5"
    )
    # Two reapers, as on two machines: each publishes, the stream keeps one of each.
    async with (
        running_reaper(base) as first,
        running_reaper(
            msgspec.structs.replace(base, reaper=msgspec.structs.replace(base.reaper, reaper_id="other"))
        ) as second,
    ):
        await first.ready()
        await second.ready()
        await asyncio.sleep(1.0)
        published = await commands(nc)
        assert first.status.expired_published + second.status.expired_published >= 1
    by_chat = {body["chat_id"]: (subject, body) for subject, body in published}
    assert len(published) == 2, published
    assert by_chat[expiring][1]["reason"] == "expired"
    assert by_chat[stuck][1]["reason"] == "stuck_stopping"
    assert by_chat[stuck][0] == f"sandbox.cmd.stop.{stuck}"
    assert fine not in by_chat
    await nc.close()


async def test_kill_switches_stop_each_mechanism(nats: NatsServer, tmp_path: Any) -> None:
    nc, kv = await setup(nats.url)
    expiring, stuck = str(uuid.uuid4()), str(uuid.uuid4())
    await kv.put(expiring, encode(record(expiring, SessionStatus.RUNNING, expires_in=0.1)))
    await kv.put(stuck, encode(record(stuck, SessionStatus.PROVISIONING, expires_in=60, updated_ago=999)))
    off: Settings = settings_for(
        nats.url, tmp_path, "n", SANDBOXD_REAPER_EXPIRY_ENABLED="false", SANDBOXD_REAPER_REDRIVE_ENABLED="false"
    )
    async with running_reaper(off) as reaper:
        await reaper.ready()
        await asyncio.sleep(0.6)
        assert await commands(nc) == []
        assert reaper.status.sessions_tracked == 2
        assert (reaper.status.expiry_enabled, reaper.status.redrive_enabled) == (False, False)
    only_redrive = settings_for(nats.url, tmp_path, "n", SANDBOXD_REAPER_EXPIRY_ENABLED="false")
    async with running_reaper(only_redrive) as reaper:
        await reaper.ready()
        await asyncio.sleep(0.6)
        assert [body["reason"] for _, body in await commands(nc)] == ["stuck_provisioning"]
    await nc.close()


def test_replay_from_the_command_line(nats: NatsServer, tmp_path: Any) -> None:
    async def prepare() -> str:
        nc, kv = await setup(nats.url)
        chat = str(uuid.uuid4())
        await kv.put(chat, encode(record(chat, SessionStatus.RUNNING, expires_in=60)))  # no event behind it
        await nc.close()
        return chat

    chat = asyncio.run(prepare())
    env = {"SANDBOXD_NATS_URL": nats.url, "PATH": "/usr/bin:/bin"}
    dry = subprocess.run(
        [sys.executable, "-m", "services.ctl", "replay", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert dry.returncode == 1, dry.stderr
    assert json.loads(dry.stdout)["extra"] == [chat]
    fixed = subprocess.run(
        [sys.executable, "-m", "services.ctl", "replay"], env=env, capture_output=True, text=True, check=False
    )
    assert fixed.returncode == 0, fixed.stderr
    again = subprocess.run(
        [sys.executable, "-m", "services.ctl", "replay", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stdout
    assert json.loads(again.stdout)["extra"] == []
