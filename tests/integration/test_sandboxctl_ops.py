"""`sandboxctl ls|show|events|stop|keepalive|top|doctor` against a real nats-server, a real
runtime and Docker engine, as an operator runs them: piped (plain text, exit codes) and in a
pseudo-terminal (colour, a refreshing `top`, a live `events --follow`)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path

import httpx

from services.runtime.service import RuntimeHandle
from shared.config import Settings
from tests.support.ctl import ctl, ctl_env, in_terminal

ESC = "\x1b["


async def _create(api: httpx.AsyncClient, **labels: str) -> dict[str, str]:
    chat = str(uuid.uuid4())
    answer = await api.post("/api/v1/sandboxes", json={"chat_id": chat, "ttl_seconds": 600, "labels": labels})
    assert answer.status_code == 201, answer.text
    body: dict[str, str] = answer.json()
    return body


async def test_ls_show_keepalive_stop_and_events(
    settings: Settings, runtime: RuntimeHandle, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    env = ctl_env(settings)
    first = await _create(api, team="qa")
    second = await _create(api, team="ops")
    chat = first["chat_id"]

    listed = await ctl(env, tmp_path, "ls")
    assert listed.code == 0, listed.err
    assert ESC not in listed.out  # piped: no colour
    header, *rows = listed.out.splitlines()
    assert header.split()[:3] == ["CHAT", "STATUS", "NODE"]
    by_chat = {row.split()[0]: row.split() for row in rows}
    assert set(by_chat) == {chat, second["chat_id"]}
    assert by_chat[chat][1:3] == ["running", settings.runtime.node_id]
    assert by_chat[chat][-1] == "team=qa"

    qa = await ctl(env, tmp_path, "ls", "--label", "team:qa", "--json")
    assert [json.loads(line)["chat_id"] for line in qa.out.splitlines()] == [chat]
    assert (await ctl(env, tmp_path, "ls", "--status", "stopping", "--json")).out == ""
    one = await ctl(env, tmp_path, "ls", "--limit", "1")
    assert len(one.out.splitlines()) == 2, one.out
    assert "1 of 2 matching sessions shown" in one.err

    shown = await ctl(env, tmp_path, "show", chat.upper())
    assert shown.code == 0, shown.err
    assert first["session_id"] in shown.out
    assert "team=qa" in shown.out
    assert "running" in shown.out.split("recent events")[1]

    before = datetime.fromisoformat(first["expires_at"])
    extended = await ctl(env, tmp_path, "keepalive", chat, "--ttl", "3600", "--json")
    assert extended.code == 0, extended.err
    event = json.loads(extended.out)
    assert event["type"] == "extended"
    assert datetime.fromisoformat(event["session"]["expires_at"]) > before
    stale = await ctl(env, tmp_path, "keepalive", chat, "--session", str(uuid.uuid4()))
    assert stale.code == 4, (stale.out, stale.err)  # refused: not the current session

    stopped = await ctl(env, tmp_path, "stop", chat)
    assert stopped.code == 0, stopped.err
    assert stopped.out.startswith("stopped chat")
    gone = await ctl(env, tmp_path, "show", chat)
    assert gone.code == 3
    assert "no live session" in gone.out
    again = await ctl(env, tmp_path, "stop", chat)
    assert again.code == 3, (again.out, again.err)

    history = await ctl(env, tmp_path, "events", chat, "--json")
    assert history.code == 0, history.err
    types = [json.loads(line)["event"]["type"] for line in history.out.splitlines()]
    assert types[:5] == ["provisioning", "running", "extended", "rejected", "stopping"]
    assert "stopped" in types
    since = await ctl(env, tmp_path, "events", "--since", "10m")
    assert chat in since.out
    assert second["chat_id"] in since.out
    listed_after = await ctl(env, tmp_path, "ls", "--json")
    assert [json.loads(line)["chat_id"] for line in listed_after.out.splitlines()] == [second["chat_id"]]


async def test_events_follow_in_a_terminal(
    settings: Settings, runtime: RuntimeHandle, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    env = ctl_env(settings)
    async with in_terminal(env, tmp_path, "events", "--follow", "--last", "0") as terminal:
        # "New only": a create before the consumer exists would not be shown; it says when.
        await terminal.wait_for("following sandbox.events.> (Ctrl-C to stop)")
        created = await _create(api, team="live")
        await terminal.wait_for(created["chat_id"])
        await terminal.wait_for("running")
        assert f"{ESC}32mrunning" in terminal.screen  # colour on a terminal
        stop = await api.delete(f"/api/v1/sandboxes/{created['chat_id']}")
        assert stop.status_code == 200, stop.text
        await terminal.wait_for("stopped")
        assert await terminal.interrupt() == 0


async def test_top_refreshes_in_a_terminal_and_prints_once_when_piped(
    settings: Settings, runtime: RuntimeHandle, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    env = ctl_env(settings)
    async with in_terminal(env, tmp_path, "top", "--interval", "0.2") as terminal:
        await terminal.wait_for("sandboxd top", settings.runtime.node_id, "NEXT EXPIRIES", "(none)")
        created = await _create(api)
        await terminal.wait_for(created["chat_id"])  # a later screen shows it among the next expiries
        assert terminal.screen.count(f"{ESC}H{ESC}2J") >= 2  # it redraws
        assert "alive" in terminal.screen
        assert await terminal.interrupt() == 0
    once = await ctl(env, tmp_path, "top", "--iterations", "1")
    assert once.code == 0, once.err
    assert ESC not in once.out
    assert "1 live: running 1" in once.out
    assert "sandboxd-runtime" in once.out  # consumer lag
    assert "conflicts n/a" in once.out  # the in-process runtime serves no metrics


async def test_doctor_reports_each_check_with_a_fix_and_an_exit_code(
    settings: Settings, runtime: RuntimeHandle, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    """(The API declares its idempotency bucket: without it doctor fails that check.)"""
    env = ctl_env(settings)
    healthy = await ctl(env, tmp_path, "doctor")
    lines = healthy.out.splitlines()
    assert healthy.code == 0, healthy.out
    for check in ("nats", "stream SANDBOX_EVENTS", "bucket sandbox_sessions", "docker engine", "sandbox image"):
        assert any(line.split()[0] == "ok" and check in line for line in lines), (check, healthy.out)
    assert any(line.startswith("ok") and f"node {settings.runtime.node_id}" in line for line in lines)
    assert any(line.startswith("ok") and f"clock {settings.runtime.node_id}" in line for line in lines)
    assert any(line.startswith("warn") and "reaper" in line for line in lines), healthy.out  # none runs here
    assert (await ctl(env, tmp_path, "doctor", "--strict")).code == 1

    broken = ctl_env(settings, SANDBOXD_SANDBOX_LAMBDA_TOOLS_HOST_PATH=str(tmp_path / "nowhere"))
    missing = await ctl(broken, tmp_path, "doctor")
    assert missing.code == 1
    assert f"fix: mkdir -p {tmp_path / 'nowhere'}" in missing.out

    unreachable = ctl_env(settings, SANDBOXD_NATS_URL="nats://127.0.0.1:1", SANDBOXD_NATS_CONNECT_TIMEOUT_SECONDS="1")
    down = await ctl(unreachable, tmp_path, "doctor")
    assert down.code == 1
    assert down.out.startswith("fail  nats")
    assert "docker engine" in down.out  # the host checks still ran


async def test_events_on_an_empty_stream_wait_for_the_first_one(
    settings: Settings, runtime: RuntimeHandle, api: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A fresh stack has no events yet: the default (`--last 20`) starts at the stream's first
    sequence, not at 0 (which the server refuses as "no start sequence")."""
    env = ctl_env(settings)
    listed = await ctl(env, tmp_path, "events")
    assert listed.code == 0, listed.err
    async with in_terminal(env, tmp_path, "events", "--follow") as terminal:
        await terminal.wait_for("following sandbox.events.> (Ctrl-C to stop)")
        created = await _create(api, team="first")
        await terminal.wait_for(created["chat_id"])
        assert await terminal.interrupt() == 0
