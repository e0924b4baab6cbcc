"""The embedded server's files, as `sandboxctl up` writes them in `.sandboxd/nats`."""

from __future__ import annotations

import stat
from pathlib import Path

import nats
import pytest

from services.ctl.stack import NATS_DIR, write_embedded_config
from shared.config import NatsSettings, StreamSettings
from shared.nats_credentials import read_user_seed
from shared.nats_roles import Role
from shared.topology import ensure_topology
from tests.conftest import missing
from tests.support.nats_parties import connect_as
from tests.support.nats_server import NatsServer, free_port


def test_a_restart_reuses_the_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = write_embedded_config(NatsSettings(embedded_port=free_port()))
    seeds = {role: read_user_seed(first.seed_file(role)) for role in Role}
    again = write_embedded_config(NatsSettings(embedded_port=free_port()))
    assert {role: read_user_seed(again.seed_file(role)) for role in Role} == seeds
    assert stat.S_IMODE(NATS_DIR.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in NATS_DIR.iterdir() if p.is_file())


async def test_data_of_the_unauthenticated_server_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before roles the embedded server kept its streams in the global account; after the
    upgrade they belong to SANDBOXD, and live sessions and history are still there."""
    monkeypatch.chdir(tmp_path)
    NATS_DIR.mkdir(parents=True)
    old = NatsServer(free_port(), NATS_DIR.resolve())
    try:
        old.start()
    except (OSError, RuntimeError) as exc:
        missing(f"cannot run nats-server: {exc}")
    try:
        nc = await nats.connect(old.url)
        js = nc.jetstream()
        kv = await ensure_topology(js, StreamSettings())
        await js.publish("sandbox.events.chat-1", b'{"type": "running"}')
        await kv.put("chat-1", b'{"status": "running"}')
        await nc.close()
    finally:
        old.stop()

    port = free_port()
    credentials = write_embedded_config(NatsSettings(embedded_port=port))
    new = NatsServer(port, NATS_DIR.resolve(), config=(NATS_DIR / "server.conf").resolve(), credentials=credentials)
    new.start()
    try:
        admin = await connect_as(new, Role.ADMIN)
        js = admin.nc.jetstream()
        assert (await js.get_last_msg("SANDBOX_EVENTS", "sandbox.events.chat-1")).data == b'{"type": "running"}'
        assert (await (await js.key_value("sandbox_sessions")).get("chat-1")).value == b'{"status": "running"}'
        await admin.close()
    finally:
        new.stop()
