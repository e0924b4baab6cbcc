"""`sandboxctl up` as a user runs it: real processes, embedded nats-server, real Docker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import docker
import httpx
import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.runtime.slots import unmount_all
from shared.nats_roles import Role
from tests.support.eventually import eventually, until
from tests.support.nats_parties import connect_as
from tests.support.nats_server import NatsServer, free_port


@dataclass
class Stack:
    base: str
    token: str
    proc: subprocess.Popen[bytes]
    runtime_metrics: int
    reaper_metrics: int
    nats_port: int
    log: Path


@contextlib.contextmanager
def running_stack(tmp_path: Path, node_id: str, **extra_env: str) -> Iterator[Stack]:
    """`sandboxctl up` in `tmp_path`, ready; stopped (SIGTERM) on the way out."""
    http_port, runtime_metrics, reaper_metrics = free_port(), free_port(), free_port()
    nats_port = int(extra_env.get("SANDBOXD_NATS_EMBEDDED_PORT") or free_port())
    token = uuid.uuid4().hex
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")},
        "SANDBOXD_HTTP_PORT": str(http_port),
        "SANDBOXD_NATS_EMBEDDED_PORT": str(nats_port),
        "SANDBOXD_RUNTIME_NODE_ID": node_id,
        "SANDBOXD_API_TOKEN": token,
        "SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT": str(runtime_metrics),
        "SANDBOXD_TELEMETRY_REAPER_METRICS_PORT": str(reaper_metrics),
        **extra_env,
    }
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.ctl", "up"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/api/v1/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((tmp_path / "up.log").read_text())
        time.sleep(0.1)
    try:
        yield Stack(base, token, proc, runtime_metrics, reaper_metrics, nats_port, tmp_path / "up.log")
    finally:
        # SIGTERM, so that `up` stops its children (they run in their own sessions and would
        # outlive a SIGKILL of `up`); a kill only if it does not stop.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        unmount_all(tmp_path / ".sandboxd" / "slots")  # a runtime killed by a test leaves its slots mounted


@pytest.fixture
def stack(tmp_path: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None) -> Iterator[Stack]:
    with running_stack(tmp_path, node_id) as running:
        yield running


def warm_ready(stack: Stack) -> int:
    """Warm containers ready to be claimed, by the runtimes' status blocks in /status."""
    status = httpx.get(f"{stack.base}/api/v1/status", headers={"X-API-Token": stack.token}, timeout=10).json()
    blocks: dict[str, dict[str, Any]] = status["sections"]["runtime_nodes"].get("data") or {}
    return sum(int(block.get("warm_ready", 0)) for block in blocks.values())


def test_up_serves_the_readme_flow_and_stops_cleanly(
    stack: Stack, tmp_path: Path, docker_client: docker.DockerClient, node_id: str
) -> None:
    base, token, proc = stack.base, stack.token, stack.proc
    headers = {"X-API-Token": token}
    # The pool fills in the background after start-up (under gVisor a container takes ~0.4 s).
    asyncio.run(eventually(lambda: asyncio.to_thread(warm_ready, stack), lambda n: n > 0, what="a warm container"))
    chat = str(uuid.uuid4())
    created = httpx.post(f"{base}/api/v1/sandboxes", json={"chat_id": chat}, headers=headers, timeout=30)
    assert created.status_code == 201, created.text
    container = docker_client.containers.get(created.json()["container_id"])
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"
    assert (tmp_path / ".sandboxd" / "chats" / chat).is_dir()
    assert (
        httpx.post(f"{base}/api/v1/sandboxes", json={"chat_id": chat}, headers=headers, timeout=30).status_code == 200
    )
    # The default stack: gVisor where the engine has it, else runc; a warm pool under either.
    assert container.attrs["HostConfig"]["Runtime"] == created.json()["oci_runtime"]
    assert container.labels.get("sandboxd.pool") == "true"
    assert httpx.delete(f"{base}/api/v1/sandboxes/{chat}", headers=headers, timeout=30).status_code == 200
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(created.json()["container_id"])

    # Every process serves the seed's metrics in Prometheus text.
    api = scrape(f"{base}/metrics")
    assert api[("sandbox_api_command_duration_ms_count", "kind=create,outcome=running")] == 1
    assert api[("sandbox_api_reuse_fast_path_total", "result=reused")] == 1  # a read, not a command
    runtime = scrape(f"http://127.0.0.1:{stack.runtime_metrics}/metrics")
    assert runtime[("sandbox_create_total", "result=created")] == 1
    assert ("sandbox_create_total", "result=reused") not in runtime
    docker_creates = runtime[("sandbox_runtime_create_duration_ms_count", "operation=create,result=created")]
    assert runtime[("sandbox_pool_take_total", "result=warm")] == 1
    # Docker creates: the pool's (4 by default, then one refill), none for the session itself.
    assert docker_creates >= 4
    assert runtime[("sandbox_pool_made_total", "")] == docker_creates
    assert runtime[("sandbox_runtime_stop_duration_ms_count", "operation=stop,result=stopped")] == 1
    assert runtime[("sandbox_active_count", "")] == 0
    reaper = scrape(f"http://127.0.0.1:{stack.reaper_metrics}/metrics")
    assert any(name.startswith("python_") for name, _ in reaper)
    status = httpx.get(f"{base}/api/v1/status", headers=headers, timeout=10).json()
    assert status["schema_version"] == 1
    assert status["sections"]["nats"]["ok"] is True
    assert any(key.startswith("reaper.") for key in status["sections"]["reapers"]["data"])
    supervisor = status["sections"]["supervisors"]["data"][f"supervisor.{node_id}"]
    assert set(supervisor["children"]) == {"nats-server", "runtime", "reaper", "api"}
    assert all(c["running"] and c["restarts"] == 0 for c in supervisor["children"].values()), supervisor

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    log = (tmp_path / "up.log").read_text()
    assert "sandboxd is up" in log
    assert token in log
    assert log.rstrip().endswith("sandboxctl: stopped")
    json_lines = [line for line in log.splitlines() if line.startswith("{")]
    assert json_lines, "the processes log JSON"
    assert all(token not in line for line in json_lines), "the API token is never logged"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/api/v1/health", timeout=1)


async def test_up_runs_nats_with_a_user_per_role(stack: Stack, tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{stack.nats_port}"
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, connect_timeout=5)

    seeds = tmp_path / ".sandboxd" / "nats"
    assert stat.S_IMODE(seeds.stat().st_mode) == 0o700
    for role in Role:
        assert stat.S_IMODE((seeds / f"{role.value}.nk").stat().st_mode) == 0o600, role

    # The agent's seed: a create straight over NATS gets its outcome; a forged event is refused.
    agent = await connect_as(NatsServer(stack.nats_port, seeds), seed_file=seeds / "agent.nk")
    chat = str(uuid.uuid4())
    events: list[dict[str, object]] = []

    async def on_event(msg: Msg) -> None:
        events.append(json.loads(msg.data))

    await agent.js.subscribe(
        f"sandbox.events.{chat}",
        stream="SANDBOX_EVENTS",
        cb=on_event,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        config=ConsumerConfig(name=f"agent-{uuid.uuid4().hex[:8]}"),
    )
    command_id = str(uuid.uuid4())
    body = json.dumps({"command_id": command_id, "chat_id": chat}).encode()
    await agent.nc.jetstream(timeout=10).publish(
        f"sandbox.cmd.create.{chat}", body, headers={"Nats-Msg-Id": command_id}
    )
    await until(lambda: any(e.get("causation_id") == command_id and e["type"] == "running" for e in events), timeout=30)
    forged = json.dumps({"type": "stopped", "chat_id": chat}).encode()
    assert await agent.attempt(f"sandbox.events.{chat}", forged)

    # The API, with the token, serves the session the agent created, then stops it.
    headers = {"X-API-Token": stack.token}
    async with httpx.AsyncClient(base_url=f"{stack.base}/api/v1", headers=headers, timeout=30) as http:
        got = (await http.get(f"/sandboxes/{chat}")).json()
        running = next(e for e in events if e["type"] == "running")
        assert got["session_id"] == running["session_id"]
        status = (await http.get("/status")).json()
        assert all(section["ok"] for section in status["sections"].values()), status
        assert (await http.delete(f"/sandboxes/{chat}")).status_code == 200
    await until(lambda: any(e["type"] == "stopped" for e in events), timeout=30)
    await agent.close()
    log = (tmp_path / "up.log").read_text()
    assert "agent seed .sandboxd/nats/agent.nk" in log


# --------------------------------------------------------------------------- supervision


def supervision(stack: Stack, node_id: str) -> dict[str, Any]:
    status = httpx.get(f"{stack.base}/api/v1/status", headers={"X-API-Token": stack.token}, timeout=10).json()
    block: dict[str, Any] = status["sections"]["supervisors"]["data"][f"supervisor.{node_id}"]
    return block


async def test_a_killed_runtime_is_restarted_and_status_shows_it(stack: Stack, node_id: str) -> None:
    # Read until the supervisor's status block is there (a /status section can fail once
    # under load; a failed section carries an error and no data).
    runtime = await eventually(
        lambda: asyncio.to_thread(supervised_child, stack, node_id, "runtime"),
        lambda c: c["running"],
        what="the supervised runtime in /status",
    )
    os.kill(runtime["pid"], signal.SIGKILL)

    restarted = await eventually(
        lambda: asyncio.to_thread(supervised_child, stack, node_id, "runtime"),
        lambda c: c["restarts"] == 1 and c["running"] and c["pid"] != runtime["pid"],
        what="the restart",
    )
    assert restarted["last_exit_code"] == -signal.SIGKILL
    async with httpx.AsyncClient(base_url=stack.base, headers={"X-API-Token": stack.token}, timeout=60) as http:
        created = await http.post("/api/v1/sandboxes", json={"chat_id": str(uuid.uuid4())})
    assert created.status_code == 201, created.text
    assert stack.proc.poll() is None
    log = [json.loads(line) for line in _log_lines(stack) if line.startswith("{")]
    assert any(e.get("child") == "runtime" and "restarting it" in e["message"] for e in log), "a JSON log line"


async def test_a_child_that_keeps_dying_stops_the_whole_stack(
    tmp_path: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None
) -> None:
    with running_stack(tmp_path, node_id, SANDBOXD_SUPERVISOR_MAX_RESTARTS="1") as stack:
        for restarts in (0, 1):
            reaper = await eventually(
                lambda: asyncio.to_thread(supervised_child, stack, node_id, "reaper"),
                partial(_running_after, restarts),
                what=f"the reaper running after {restarts} restarts",
            )
            os.kill(reaper["pid"], signal.SIGKILL)

        assert await asyncio.to_thread(stack.proc.wait, 60) == 1
        log = (tmp_path / "up.log").read_text()
        assert "sandboxctl: reaper died 2 times within 60s (last exit code -9); not serving without it" in log
        assert log.rstrip().endswith("sandboxctl: stopped")
        async with httpx.AsyncClient(timeout=1) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(f"{stack.base}/api/v1/health")


def supervised_child(stack: Stack, node_id: str, name: str) -> dict[str, Any]:
    child: dict[str, Any] = supervision(stack, node_id)["children"][name]
    return child


def _running_after(restarts: int, child: dict[str, Any]) -> bool:
    return bool(child["restarts"] == restarts and child["running"])


def _log_lines(stack: Stack) -> list[str]:
    return stack.log.read_text().splitlines()


def scrape(url: str) -> dict[tuple[str, str], float]:
    """Prometheus text as {(name, "k=v,..." without the otel_scope labels): value}."""
    out: dict[tuple[str, str], float] = {}
    for line in httpx.get(url, timeout=5).text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        pairs = [p.split("=", 1) for p in labels.rstrip("}").split('",') if "=" in p]
        quote = '"'
        kept = ",".join(k + "=" + v.strip(quote) for k, v in sorted(pairs) if not k.startswith("otel_scope"))
        out[(name, kept)] = float(value)
    return out


def run_up(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`sandboxctl up` expected to refuse to start (it returns instead of serving)."""
    return subprocess.run(
        [sys.executable, "-m", "services.ctl", "up"],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_up_without_docker_says_what_to_do(tmp_path: Path) -> None:
    result = run_up(tmp_path, DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    assert result.returncode == 1
    assert "no Docker engine" in result.stderr
    assert "dockerd --bridge=none --iptables=false" in result.stderr


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    result = run_up(tmp_path, SANDBOXD_HTTP_PORT="eighty")
    assert result.returncode == 2
    assert "SANDBOXD_HTTP_PORT" in result.stderr
    assert "http.port" in result.stderr
