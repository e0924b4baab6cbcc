"""`sandbox.oci_runtime` against the real engine: `auto` runs sandboxes under gVisor when the
engine lists runsc (and says so at start-up; the warm pool works under it too), an explicit
runtime the engine lacks stops start-up naming the key, and the pids and memory limits hold
under runc and under gVisor (under gVisor a sandbox that exceeds one is ended as a whole)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import httpx
import nats
import pytest

from services.runtime.containers import LABEL_POOL
from services.runtime.oci import GVISOR, RuntimeUnavailable
from services.runtime.service import RuntimeHandle, running_runtime
from shared.config import Settings
from shared.contracts import SessionStatus
from shared.event_store import EventStore
from tests.conftest import missing, settings_for
from tests.integration.test_container_options import oci_runtime, run_in
from tests.integration.test_warm_pool import until
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs

API = "/api/v1"
# Under gVisor the pids limit counts the sandbox's host threads (about 45 idle, some 10 per
# process); runc counts the sandbox's processes.
PIDS = {"runc": 77, GVISOR: 256}


@pytest.fixture(params=["runc", GVISOR, "auto"])
def settings(
    request: pytest.FixtureRequest, nats: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient
) -> Settings:
    make_sandbox_dirs(tmp_path)
    wanted = request.param
    if wanted == "auto" and GVISOR not in (docker_client.info().get("Runtimes") or {}):
        missing(f"the Docker engine lists no {GVISOR} (gVisor): run infra/gvisor/register-runsc")
    name = wanted if wanted == "auto" else oci_runtime(docker_client, wanted)
    return settings_for(
        nats.url,
        tmp_path,
        node_id,
        SANDBOXD_SANDBOX_OCI_RUNTIME=name,
        SANDBOXD_SANDBOX_MEMORY_LIMIT="96m",
        SANDBOXD_SANDBOX_PIDS_LIMIT=str(PIDS.get(wanted, PIDS[GVISOR])),
        SANDBOXD_SANDBOX_WARM_POOL_SIZE="2",
    )


@pytest.fixture(autouse=True)
def start_up_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Autouse: set before the runtime fixture starts, so its start-up lines are captured."""
    caplog.set_level(logging.INFO, logger="services.runtime.service")


@pytest.fixture
def under_gvisor(settings: Settings) -> bool:
    return settings.sandbox.oci_runtime in {"auto", GVISOR}  # `auto` on an engine that lists runsc


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[EventStore]:
    client = await nats.connect(settings.nats.url or "")
    yield EventStore(client.jetstream())
    await client.close()


async def create(api: httpx.AsyncClient) -> tuple[str, str]:
    chat = str(uuid.uuid4())
    created = await api.post(f"{API}/sandboxes", json={"chat_id": chat})
    assert created.status_code == 201, created.text
    return chat, created.json()["container_id"]


def start_detached(client: docker.DockerClient, container_id: str, script: str) -> str:
    """An exec that is not waited for (one in a gVisor sandbox that ends never returns)."""
    exec_id: str = client.api.exec_create(container_id, ["sh", "-c", script])["Id"]
    client.api.exec_start(exec_id, detach=True)
    return exec_id


async def test_the_chosen_runtime_is_logged_recorded_and_runs_the_sandbox(
    api: httpx.AsyncClient,
    runtime: RuntimeHandle,
    store: EventStore,
    settings: Settings,
    under_gvisor: bool,
    docker_client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    choice = runtime.oci_runtime
    assert choice is not None
    expected = GVISOR if under_gvisor else settings.sandbox.oci_runtime
    assert choice.name == expected
    setup = caplog.get_records("setup")  # the runtime started in a fixture
    logged = [r.getMessage() for r in setup if r.name == "services.runtime.service"]
    assert f"OCI runtime: {expected} ({choice.why})" in logged
    assert not [m for m in logged if m.startswith("warm pool off")], logged
    # The pool works under gVisor too: a create takes a warm container, whose chat directory
    # (mounted inside its slot on the host after it started) the sandbox sees and writes.
    assert runtime.pool is not None
    pool = runtime.pool
    await until(lambda: pool.ready == 2, timeout=60)
    chat, container_id = await create(api)
    inspected = docker_client.api.inspect_container(container_id)
    assert inspected["HostConfig"]["Runtime"] == expected
    assert inspected["Config"]["Labels"][LABEL_POOL] == "true", "served from the warm pool"
    path = settings.sandbox.chat_mount_path
    assert run_in(docker_client, container_id, f"echo in-sandbox > {path}/written; ls -A {path}") == (0, "written")
    assert (Path(settings.sandbox.chats_root) / chat / "written").read_text() == "in-sandbox\n"
    parent = str(Path(path).parent)  # the slot: only the chat's mount point, not writable
    assert run_in(docker_client, container_id, f"ls -A {parent}") == (0, Path(path).name)
    assert run_in(docker_client, container_id, f"touch {parent}/x")[0] != 0
    record = (await store.read(chat)).session
    assert record is not None
    assert record.oci_runtime == expected
    assert (await api.get(f"{API}/sandboxes/{chat}")).json()["oci_runtime"] == expected


async def test_the_memory_limit_holds(
    api: httpx.AsyncClient,
    runtime: RuntimeHandle,
    store: EventStore,
    under_gvisor: bool,
    docker_client: docker.DockerClient,
) -> None:
    chat, container_id = await create(api)
    exec_id = start_detached(docker_client, container_id, "dd if=/dev/zero of=/dev/null bs=200M count=1")
    if under_gvisor:  # the whole sandbox is OOM-killed, and the session recorded lost
        state = await eventually(
            lambda: _state(docker_client, container_id), lambda s: s["Status"] == "exited", what="the sandbox ended"
        )
        assert state["OOMKilled"] is True
        await _lost(store, chat)
    else:  # the process that went over is killed; the sandbox runs on
        done = await eventually(
            lambda: _exec(docker_client, exec_id), lambda e: not e["Running"], what="dd to be killed"
        )
        assert done["ExitCode"] == 137
        assert (await _state(docker_client, container_id))["Status"] == "running"


async def test_the_pids_limit_holds(
    api: httpx.AsyncClient,
    runtime: RuntimeHandle,
    store: EventStore,
    under_gvisor: bool,
    docker_client: docker.DockerClient,
) -> None:
    chat, container_id = await create(api)
    script = "for i in $(seq 1 150); do sleep 60 & done; sleep 1; ls /proc | grep -c '^[0-9]'"
    exec_id = start_detached(docker_client, container_id, script)
    if under_gvisor:  # the sandbox's host threads hit the limit: it ends as a whole
        await eventually(
            lambda: _state(docker_client, container_id), lambda s: s["Status"] == "exited", what="the sandbox ended"
        )
        await _lost(store, chat)
    else:  # forks beyond the limit fail; the sandbox runs on with at most the limit
        await eventually(lambda: _exec(docker_client, exec_id), lambda e: not e["Running"], what="the forks")
        stats = docker_client.api.inspect_container(container_id)
        assert stats["State"]["Status"] == "running"
        # At the limit, even one more fork fails.
        more = docker_client.containers.get(container_id).exec_run(["sh", "-c", "sleep 1 & wait"])
        assert b"can't fork" in more.output, more.output


async def test_an_explicit_runtime_the_engine_lacks_stops_start_up(
    nats: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient, node_containers: None
) -> None:
    make_sandbox_dirs(tmp_path)
    absent = settings_for(nats.url, tmp_path, node_id, SANDBOXD_SANDBOX_OCI_RUNTIME="no-such-runtime")
    with pytest.raises(RuntimeUnavailable, match=r"sandbox\.oci_runtime .*'no-such-runtime'.*no such runtime"):
        async with running_runtime(absent):
            pass


async def _state(client: docker.DockerClient, container_id: str) -> dict[str, object]:
    state: dict[str, object] = client.api.inspect_container(container_id)["State"]
    return state


async def _exec(client: docker.DockerClient, exec_id: str) -> dict[str, object]:
    inspected: dict[str, object] = client.api.exec_inspect(exec_id)
    return inspected


async def _lost(store: EventStore, chat: str) -> None:
    async def status() -> SessionStatus | None:
        last = (await store.read(chat)).last
        return None if last is None or last.session is None else last.session.status

    await eventually(status, lambda s: s == SessionStatus.LOST, what="the session recorded lost")
