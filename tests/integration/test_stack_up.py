"""`sandboxctl up` as a user runs it: real processes, embedded nats-server, real Docker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from tests.support.nats_server import free_port


@pytest.fixture
def stack(
    tmp_path: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None
) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    http_port, nats_port = free_port(), free_port()
    token = uuid.uuid4().hex
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")},
        "SANDBOXD_HTTP_PORT": str(http_port),
        "SANDBOXD_NATS_EMBEDDED_PORT": str(nats_port),
        "SANDBOXD_RUNTIME_NODE_ID": node_id,
        "SANDBOXD_API_TOKEN": token,
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
        yield base, token, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_up_serves_the_readme_flow_and_stops_cleanly(
    stack: tuple[str, str, subprocess.Popen[bytes]], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    base, token, proc = stack
    headers = {"X-API-Token": token}
    chat = str(uuid.uuid4())
    created = httpx.post(f"{base}/api/v1/sandboxes", json={"chat_id": chat}, headers=headers, timeout=30)
    assert created.status_code == 201, created.text
    container = docker_client.containers.get(created.json()["container_id"])
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"
    assert (tmp_path / ".sandboxd" / "chats" / chat).is_dir()
    assert (
        httpx.post(f"{base}/api/v1/sandboxes", json={"chat_id": chat}, headers=headers, timeout=30).status_code == 200
    )
    assert httpx.delete(f"{base}/api/v1/sandboxes/{chat}", headers=headers, timeout=30).status_code == 200
    assert not docker_client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    log = (tmp_path / "up.log").read_text()
    assert "sandboxd is up" in log
    assert token in log
    assert log.rstrip().endswith("sandboxctl: stopped")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/api/v1/health", timeout=1)


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
