"""The reaper against a real nats-server (no runtime, no Docker): what it publishes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats
from nats.aio.client import Client

from services.reaper.reaper import Reaper
from services.reaper.service import running_reaper
from shared.config import Settings, StreamSettings
from shared.contracts import SessionRecord, SessionStatus, encode
from shared.subjects import COMMANDS_STREAM
from shared.topology import ensure_topology
from tests.conftest import settings_for
from tests.support.eventually import eventually, holds, until
from tests.support.nats_server import NatsServer
from tests.support.records import session_record


def record(chat: str, status: SessionStatus, *, expires_in: float, updated_ago: float = 0) -> SessionRecord:
    """A session of `chat` last changed `updated_ago` seconds ago, expiring in `expires_in`."""
    changed = datetime.now(UTC) - timedelta(seconds=updated_ago)
    return session_record(
        chat_id=chat, status=status, now=changed, ttl=timedelta(seconds=updated_ago + expires_in), version=3
    )


def pass_after(reaper: Reaper, moment: datetime) -> bool:
    """Whether a whole pass of `reaper` began after `moment` (what it publishes is out then)."""
    return reaper.status.last_run_ts is not None and reaper.status.last_run_ts > moment


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


async def test_two_reapers_both_act_and_each_stop_is_kept_once(nats: NatsServer, tmp_path: Any) -> None:
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

        async def published_by_each() -> list[tuple[int, int]]:
            return [(r.status.expired_published, r.status.redrive_published) for r in (first, second)]

        # Both saw the expired and the stuck session, and both published a stop for each ...
        await eventually(
            published_by_each, lambda counts: min(min(c) for c in counts) >= 1, what="a stop of each kind from each"
        )
        # ... once: no reaper publishes the same stop again on its next passes.
        await holds(published_by_each, lambda counts: counts == [(1, 1), (1, 1)], seconds=1.0, what="one of each")
        published = await commands(nc)
    # Four publishes, two commands: the stream kept one stop per session (the message id is
    # the command id, which both reapers derive from the session alike).
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
    due = record(expiring, SessionStatus.RUNNING, expires_in=0.1)
    await kv.put(expiring, encode(due))
    await kv.put(stuck, encode(record(stuck, SessionStatus.PROVISIONING, expires_in=60, updated_ago=999)))
    off: Settings = settings_for(
        nats.url, tmp_path, "n", SANDBOXD_REAPER_EXPIRY_ENABLED="false", SANDBOXD_REAPER_REDRIVE_ENABLED="false"
    )
    async with running_reaper(off) as reaper:
        await reaper.ready()
        # A pass after the session was due to expire and past the stuck one's grace: nothing.
        await until(lambda: pass_after(reaper, due.expires_at), what="a reaper pass after the expiry")
        assert await commands(nc) == []
        assert reaper.status.sessions_tracked == 2
        assert (reaper.status.expiry_enabled, reaper.status.redrive_enabled) == (False, False)
    only_redrive = settings_for(nats.url, tmp_path, "n", SANDBOXD_REAPER_EXPIRY_ENABLED="false")
    async with running_reaper(only_redrive) as reaper:
        await reaper.ready()
        await until(lambda: pass_after(reaper, due.expires_at), what="a reaper pass after the expiry")
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
    env = {
        "SANDBOXD_NATS_URL": nats.url,
        "PATH": "/usr/bin:/bin",
        # Under `just test`, coverage measures child processes through these.
        **{k: v for k, v in os.environ.items() if k.startswith("COVERAGE_")},
    }
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
