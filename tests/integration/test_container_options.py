"""The container a session gets carries the configured options: a runtime configured with
values other than the defaults, a sandbox created through the API, and Docker's own view of
the container (`inspect`) compared with the settings and the session record."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import docker
import httpx
import nats
import pytest

from services.runtime.containers import LABEL_EXPIRES, LABEL_POOL
from services.runtime.service import RuntimeHandle
from shared.config import Settings
from shared.event_store import EventStore
from tests.conftest import settings_for
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs

API = "/api/v1"
OPTIONS = {
    "SANDBOXD_SANDBOX_CPUS": "0.25",
    "SANDBOXD_SANDBOX_MEMORY_LIMIT": "96m",
    "SANDBOXD_SANDBOX_PIDS_LIMIT": "77",
    "SANDBOXD_SANDBOX_TMPFS_SIZE": "12m",
    "SANDBOXD_SANDBOX_USER": "10007:10009",
    "SANDBOXD_SANDBOX_CHAT_MOUNT_PATH": "/home/chat",
    "SANDBOXD_SANDBOX_DEPENDENCIES_MOUNT_PATH": "/deps",
    "SANDBOXD_SANDBOX_LAMBDA_TOOLS_MOUNT_PATH": "/tools",
}


@pytest.fixture(params=["cold", "warm"])
def settings(
    request: pytest.FixtureRequest, nats: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient
) -> Settings:
    """Every option, on a container made for the session (cold) and on a warm one."""
    make_sandbox_dirs(tmp_path)
    pool = "1" if request.param == "warm" else "0"
    return settings_for(
        nats.url,
        tmp_path,
        node_id,
        **OPTIONS,
        SANDBOXD_SANDBOX_OCI_RUNTIME=oci_runtime(docker_client),
        SANDBOXD_SANDBOX_WARM_POOL_SIZE=pool,
    )


def oci_runtime(docker_client: docker.DockerClient) -> str:
    """runc, preferably under a name other than the engine's default runtime: an option
    dropped on its way to Docker then shows as the default instead."""
    info = docker_client.info()
    runtimes = info.get("Runtimes") or {}
    assert "runc" in runtimes, f"the engine has no runc: {sorted(runtimes)}"
    alias = "io.containerd.runc.v2"
    return alias if alias in runtimes and info.get("DefaultRuntime") != alias else "runc"


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[EventStore]:
    client = await nats.connect(settings.nats.url or "")
    yield EventStore(client.jetstream())
    await client.close()


async def test_a_sandbox_has_the_configured_limits_mounts_user_runtime_and_labels(
    api: httpx.AsyncClient,
    runtime: RuntimeHandle,
    store: EventStore,
    settings: Settings,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    warm = settings.sandbox.warm_pool_size > 0
    if warm:
        assert runtime.pool is not None
        pool = runtime.pool
        await eventually(lambda: asyncio.sleep(0, pool.ready), timeout=60, what="a warm container")
    chat = str(uuid.uuid4())
    created = await api.post(f"{API}/sandboxes", json={"chat_id": chat, "ttl_seconds": 321})
    assert created.status_code == 201, created.text
    view = created.json()

    inspected = docker_client.api.inspect_container(view["container_id"])

    host, config = inspected["HostConfig"], inspected["Config"]
    assert host["NanoCpus"] == 250_000_000
    assert host["Memory"] == 96 * 1024 * 1024
    assert host["PidsLimit"] == 77
    assert host["Tmpfs"] == {"/tmp": "rw,noexec,nosuid,nodev,size=12m,mode=1777"}
    assert host["Runtime"] == settings.sandbox.oci_runtime
    assert host["NetworkMode"] == "none"
    assert set(inspected["NetworkSettings"]["Networks"]) == {"none"}
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert (host["Init"], host["ReadonlyRootfs"]) == (True, True)
    assert config["User"] == "10007:10009"
    assert config["WorkingDir"] == "/home/chat"
    mounts = {m["Destination"]: (m["Source"], m["RW"], m["Type"]) for m in inspected["Mounts"]}
    # A warm container binds its slot (where the chat's directory is mounted on the host).
    chat_source = tmp_path / "slots" / view["session_id"] if warm else tmp_path / "chats" / chat
    assert mounts == {
        "/home/chat": (str(chat_source), True, "bind"),
        "/deps": (str(tmp_path / "deps"), False, "bind"),
        "/tools": (str(tmp_path / "tools"), False, "bind"),
    }
    record = (await store.read(chat)).session
    assert record is not None
    assert (record.session_id, record.container_id) == (view["session_id"], view["container_id"])
    assert (record.expires_at - record.created_at).total_seconds() == 321
    if warm:  # made before its chat: what it serves is in the session record, not in labels
        assert config["Labels"][LABEL_POOL] == "true"
        assert LABEL_EXPIRES not in config["Labels"]
    else:
        assert datetime.fromisoformat(config["Labels"][LABEL_EXPIRES]) == record.expires_at
        assert f"SANDBOXD_SESSION_ID={record.session_id}" in config["Env"]

    # Inside, the processes run as that user, without a network, writing only where allowed.
    assert run_in(docker_client, view["container_id"], "echo $(id -u):$(id -g)") == (0, "10007:10009")
    assert run_in(docker_client, view["container_id"], "ls /sys/class/net") == (0, "lo")
    assert run_in(docker_client, view["container_id"], "echo x > /home/chat/f && echo x > /tmp/f")[0] == 0
    assert (tmp_path / "chats" / chat / "f").read_text() == "x\n"
    assert run_in(docker_client, view["container_id"], "echo x > /deps/f")[0] != 0
    assert run_in(docker_client, view["container_id"], "echo x > /f")[0] != 0


def run_in(docker_client: docker.DockerClient, container_id: str, script: str) -> tuple[int, str]:
    result = docker_client.containers.get(container_id).exec_run(["sh", "-c", script])
    output = result.output if isinstance(result.output, bytes) else b"".join(result.output)
    return int(result.exit_code or 0), output.decode(errors="replace").strip()
