"""Every line the API process writes (stdout and stderr) is one JSON object: uvicorn's
start-up, access and shutdown lines, our error lines, a configuration error, a start-up
that fails. The API token is never in them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer, free_port
from tests.support.processes import api_base, make_sandbox_dirs, sandboxd_env, spawn, stop, until_ready

TOKEN = "log-token-" + uuid.uuid4().hex


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_sandbox_dirs(tmp_path)
    return tmp_path


def json_lines(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text().splitlines()
    assert lines, f"{log.name} is empty"
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line in {log.name}: {line!r}")
        assert isinstance(entry, dict), line
        assert {"ts", "level", "service", "logger", "message"} <= entry.keys(), entry
        entries.append(entry)
    assert TOKEN not in log.read_text()
    return entries


def access(entries: list[dict[str, Any]], method: str, path: str) -> list[dict[str, Any]]:
    return [
        e for e in entries if e["logger"] == "uvicorn.access" and (e.get("method"), e.get("path")) == (method, path)
    ]


async def test_every_line_of_a_serving_api_is_json_access_lines_included(nats: NatsServer, root: Path) -> None:
    env = sandboxd_env(nats.url, root, "logs", TOKEN, SANDBOXD_API_WAIT_SECONDS="0.2")
    api = spawn("services.api", env, root / "api.log")
    chat = str(uuid.uuid4())
    try:
        base = api_base(api)
        await until_ready(base)
        async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=30) as http:
            assert (await http.get("/api/v1/health")).status_code == 200
            assert (await http.post("/api/v1/sandboxes", json={"chat_id": "nope"})).status_code == 400
            assert (await http.post("/api/v1/sandboxes", json={"chat_id": chat})).status_code == 202  # no runtime
            assert (await http.get("/api/v1/status", headers={"X-API-Token": "wrong"})).status_code == 401
            nats.stop()
            await eventually(lambda: http.get("/api/v1/ready"), lambda r: r.status_code == 503, what="NATS gone")
            assert (await http.post("/api/v1/sandboxes", json={"chat_id": chat})).status_code == 503
    finally:
        stop(api)
    entries = json_lines(api.log)
    messages = [e["message"] for e in entries]
    assert any(m.startswith("Uvicorn running on") for m in messages)
    assert any(m.startswith("Finished server process") for m in messages)
    assert [e["status"] for e in access(entries, "GET", "/api/v1/health")] == [200]
    assert [e["status"] for e in access(entries, "POST", "/api/v1/sandboxes")] == [400, 202, 503]
    assert [e["status"] for e in access(entries, "GET", "/api/v1/status")] == [401]
    refused = [e for e in entries if e["level"] == "warning" and "answered 503" in e["message"]]
    assert refused, messages
    assert refused[0]["trace_id"] == access(entries, "POST", "/api/v1/sandboxes")[-1]["trace_id"]


async def test_a_configuration_error_is_a_json_line(root: Path) -> None:
    env = sandboxd_env("nats://127.0.0.1:1", root, "logs", TOKEN, SANDBOXD_HTTP_PORT="not-a-port")
    api = spawn("services.api", env, root / "api.log")
    assert api.wait(60) == 2
    [entry] = json_lines(api.log)
    assert entry["level"] == "error"
    assert "configuration error" in entry["message"]
    assert "SANDBOXD_HTTP_PORT" in entry["message"]


async def test_a_start_up_that_fails_writes_json_lines(root: Path) -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"
    env = sandboxd_env(nowhere, root, "logs", TOKEN, SANDBOXD_NATS_CONNECT_TIMEOUT_SECONDS="0.5")
    api = spawn("services.api", env, root / "api.log")
    assert api.wait(60) != 0
    entries = json_lines(api.log)
    failed = [e for e in entries if e["level"] == "error"]
    assert failed, entries
    assert any(nowhere in e.get("exception", "") + e["message"] for e in failed), failed
