"""sandboxd against a nats-server it did not start (SANDBOXD_NATS_URL): one run by
testcontainers, in a container on the host network, on a random loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from pathlib import Path

import docker
import httpx
from testcontainers.core.container import DockerContainer

from services.runtime.service import running_runtime
from tests.conftest import TEST_TOKEN, settings_for
from tests.support.api_server import serving_api
from tests.support.nats_image import ensure_nats_image
from tests.support.nats_server import free_port
from tests.support.processes import make_sandbox_dirs


def _wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"containerised nats-server did not listen on {port}")


async def test_stack_on_a_containerised_nats_server(
    docker_client: docker.DockerClient, tmp_path: Path, node_id: str, node_containers: None
) -> None:
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # its reaper image cannot be pulled here
    port = free_port()
    container = (
        DockerContainer(ensure_nats_image(docker_client))
        .with_command(f"-js -a 127.0.0.1 -p {port} -sd /tmp/js")
        .with_kwargs(network_mode="host")
        .with_tmpfs_mount("/tmp")
    )
    with container:
        _wait_listening(port)
        make_sandbox_dirs(tmp_path)
        settings = settings_for(f"nats://127.0.0.1:{port}", tmp_path, node_id)
        async with (
            running_runtime(settings),
            serving_api(settings) as url,
            httpx.AsyncClient(base_url=url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
        ):
            chat = str(uuid.uuid4())
            created = await http.post("/api/v1/sandboxes", json={"chat_id": chat})
            assert created.status_code == 201, created.text
            assert (await http.get(f"/api/v1/sandboxes/{chat}")).json()["session_id"] == created.json()["session_id"]
            assert (await http.delete(f"/api/v1/sandboxes/{chat}")).status_code == 200
            await asyncio.sleep(0)
        assert "JetStream" in container.get_logs()[1].decode() + container.get_logs()[0].decode()
