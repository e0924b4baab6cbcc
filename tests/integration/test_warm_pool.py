"""The warm pool against the real Docker engine: a create takes a pre-started container and
gets its chat's directory attached (a host bind mount into the container's slot); the chat's
files land in the chat's directory, no other chat's are visible, the pool refills, a stop
releases the slot, reconciliation and the death watch know claimed warm containers, and a
runtime that is gone leaves nothing behind once another starts. The isolation test runs
under runc and gVisor (runsc)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
import httpx
import nats
import pytest
from msgspec.structs import replace

from services.runtime.containers import LABEL_POOL, LABEL_POOL_OWNER, ContainerIdentity, container_spec, warm_spec
from services.runtime.docker_driver import DockerDriver
from services.runtime.oci import GVISOR
from services.runtime.service import RuntimeHandle, running_runtime
from services.runtime.slots import SlotMounts, unmount_all
from shared.config import Settings
from shared.contracts import SessionRecord, SessionStatus
from shared.errors import SandboxStartFailed
from shared.event_store import EventStore
from tests.conftest import TEST_TOKEN, settings_for
from tests.integration.test_container_deaths import lost_event
from tests.integration.test_container_options import run_in
from tests.support.api_server import serving_api
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs, sandboxd_env, spawn, stop

API = "/api/v1"
HEADERS = {"X-API-Token": TEST_TOKEN}
POOL = 3


async def until(condition: Callable[[], bool], timeout: float) -> None:
    """Poll a blocking check (Docker, the host) off the event loop until it holds."""
    await eventually(lambda: asyncio.to_thread(condition), timeout=timeout)


@pytest.fixture
def oci_runtime_name() -> str:
    """runc; the isolation test runs under gVisor too (parametrized)."""
    return "runc"


@pytest.fixture
def settings(nats: NatsServer, tmp_path: Path, node_id: str, oci_runtime_name: str) -> Settings:
    make_sandbox_dirs(tmp_path)
    return settings_for(
        nats.url,
        tmp_path,
        node_id,
        SANDBOXD_SANDBOX_WARM_POOL_SIZE=str(POOL),
        SANDBOXD_SANDBOX_OCI_RUNTIME=oci_runtime_name,
    )


def warm(docker_client: docker.DockerClient, node_id: str, *, claimed: bool | None = None) -> list[str]:
    """Session ids of this node's warm containers that are running (claimed or not)."""
    found = docker_client.containers.list(
        filters={"label": [f"sandboxd.node_id={node_id}", f"{LABEL_POOL}=true"], "status": "running"}
    )
    return [c.labels["sandboxd.session_id"] for c in found]


def unclaimed(docker_client: docker.DockerClient, node_id: str, tmp_path: Path) -> set[str]:
    return {s for s in warm(docker_client, node_id) if not (tmp_path / "slots" / f"{s}.chat").exists()}


@pytest.fixture
async def filled(
    runtime: RuntimeHandle, docker_client: docker.DockerClient, settings: Settings, tmp_path: Path
) -> set[str]:
    """The pool, full: its containers' session ids."""
    node = settings.runtime.node_id
    await until(lambda: len(unclaimed(docker_client, node, tmp_path)) == POOL, timeout=60)
    return unclaimed(docker_client, node, tmp_path)


@pytest.mark.parametrize("oci_runtime_name", ["runc", GVISOR])
async def test_a_create_takes_a_warm_container_and_sees_only_its_own_chat(
    oci_runtime_name: str,
    api: httpx.AsyncClient,
    filled: set[str],
    docker_client: docker.DockerClient,
    settings: Settings,
    tmp_path: Path,
) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    (tmp_path / "chats" / a).mkdir()
    (tmp_path / "chats" / a / "from-host").write_text("before the claim\n")

    views = []
    for chat in (a, b):
        created = await api.post(f"{API}/sandboxes", json={"chat_id": chat, "labels": {"team": "qa"}})
        assert created.status_code == 201, created.text
        views.append(created.json())
    va, vb = views
    assert {va["session_id"], vb["session_id"]} <= filled, "both sessions were served from the pool"
    container = docker_client.containers.get(va["container_id"])
    assert container.labels[LABEL_POOL] == "true"
    assert container.attrs["HostConfig"]["Runtime"] == oci_runtime_name
    assert container.name == f"sandboxd-{va['session_id']}"
    assert va["labels"] == {"team": "qa"}, "request labels live in the session record"
    got = await api.get(f"{API}/sandboxes/{a}")
    assert got.json()["labels"] == {"team": "qa"}

    # The chat's directory is at the chat mount path, as the sandbox's user, writable.
    chat_path = settings.sandbox.chat_mount_path
    assert run_in(docker_client, va["container_id"], f"cat {chat_path}/from-host") == (0, "before the claim")
    assert run_in(docker_client, va["container_id"], f"echo from-a > {chat_path}/written")[0] == 0
    assert (tmp_path / "chats" / a / "written").read_text() == "from-a\n"
    assert run_in(docker_client, va["container_id"], "echo $(id -u):$(id -g)") == (0, settings.sandbox.user)
    assert run_in(docker_client, va["container_id"], "ls /sys/class/net") == (0, "lo")
    assert run_in(docker_client, va["container_id"], "echo x > /opt/dependencies/f")[0] != 0

    # The other chat sees its own (empty) directory, nothing of a's anywhere.
    assert run_in(docker_client, vb["container_id"], f"ls -A {chat_path}") == (0, "")
    status, out = run_in(
        docker_client, vb["container_id"], "find / -xdev -name written -o -name from-host 2>/dev/null; true"
    )
    assert (status, out) == (0, ""), out
    assert run_in(docker_client, vb["container_id"], f"echo from-b > {chat_path}/written")[0] == 0
    assert (tmp_path / "chats" / b / "written").read_text() == "from-b\n"
    assert (tmp_path / "chats" / a / "written").read_text() == "from-a\n"

    # The pool refills to its size with new containers; claimed ones never come back.
    node = settings.runtime.node_id
    await until(lambda: len(unclaimed(docker_client, node, tmp_path)) == POOL, timeout=60)
    assert not unclaimed(docker_client, node, tmp_path) & {va["session_id"], vb["session_id"]}

    # A stop removes the container and releases its slot; the chat's files stay.
    stopped = await api.delete(f"{API}/sandboxes/{a}")
    assert stopped.status_code == 200, stopped.text
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(va["container_id"])
    assert not (tmp_path / "slots" / va["session_id"]).exists()
    assert not (tmp_path / "slots" / f"{va['session_id']}.chat").exists()
    assert (tmp_path / "chats" / a / "written").read_text() == "from-a\n"


async def test_reconciliation_and_the_death_watch_know_warm_containers(
    api: httpx.AsyncClient,
    runtime: RuntimeHandle,
    filled: set[str],
    docker_client: docker.DockerClient,
    settings: Settings,
) -> None:
    chat = str(uuid.uuid4())
    created = await api.post(f"{API}/sandboxes", json={"chat_id": chat})
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["session_id"] in filled

    for _ in range(3):  # more than the confirmations a removal needs
        report = await runtime.reconciler.run_once()
        assert report.orphans_removed == 0, report
        assert report.lost == 0, report
    assert filled <= set(warm(docker_client, settings.runtime.node_id)), "no warm container was touched"
    assert (await api.get(f"{API}/sandboxes/{chat}")).json()["status"] == "running"

    # The claimed container dies: its chat (known only from its slot) records it lost.
    docker_client.containers.get(view["container_id"]).kill()

    nc = await nats.connect(settings.nats.url or "")
    try:
        lost = await lost_event(EventStore(nc.jetstream()), chat)
    finally:
        await nc.close()
    assert lost.session_id == view["session_id"]
    assert (await api.get(f"{API}/sandboxes/{chat}")).status_code == 404


@pytest.fixture
def spawned_env(settings: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = sandboxd_env(
        settings.nats.url or "",
        tmp_path,
        settings.runtime.node_id,
        settings.api.token or "",
        SANDBOXD_SANDBOX_WARM_POOL_SIZE=str(POOL),
        SANDBOXD_RUNTIME_RECONCILE_ENABLED="false",
    )
    yield env
    unmount_all(tmp_path / "slots")


async def test_a_killed_runtimes_warm_containers_are_removed_and_its_sessions_kept(
    settings: Settings,
    spawned_env: dict[str, str],
    docker_client: docker.DockerClient,
    node_containers: None,
    tmp_path: Path,
) -> None:
    node = settings.runtime.node_id
    child = spawn("services.runtime", spawned_env, tmp_path / "runtime-1.log")
    try:
        await until(lambda: len(unclaimed(docker_client, node, tmp_path)) == POOL, timeout=60)
        first = unclaimed(docker_client, node, tmp_path)
        owners = {docker_client.containers.get(f"sandboxd-{s}").labels[LABEL_POOL_OWNER] for s in first}
        assert len(owners) == 1
        async with serving_api(settings) as base, httpx.AsyncClient(base_url=base, headers=HEADERS, timeout=30) as api:
            chat = str(uuid.uuid4())
            created = await api.post(f"{API}/sandboxes", json={"chat_id": chat})
            assert created.status_code == 201, created.text
        claimed = created.json()["session_id"]
        assert claimed in first, "the spawned runtime served it from its pool"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        stop(child)
    assert (tmp_path / "slots" / f"{claimed}.chat").read_text() == chat

    # A new runtime: the dead instance's unclaimed warm containers go, new ones come; the
    # session it served stays running, and reconciliation leaves it (and the pool) alone.
    async with running_runtime(settings) as handle:
        await until(lambda: not ((first - {claimed}) & set(warm(docker_client, node))), timeout=60)
        await until(lambda: len(unclaimed(docker_client, node, tmp_path)) == POOL, timeout=60)
        for _ in range(3):
            report = await handle.reconciler.run_once()
            assert report.orphans_removed == 0, report
            assert report.lost == 0, report
        assert docker_client.containers.get(f"sandboxd-{claimed}").status == "running"
        mine = unclaimed(docker_client, node, tmp_path)
    # A clean stop removes the runtime's own warm containers, and only those.
    assert not unclaimed(docker_client, node, tmp_path) & mine
    assert docker_client.containers.get(f"sandboxd-{claimed}").status == "running"


async def test_a_claim_resumed_after_a_crash_finds_its_warm_container_and_attaches_the_chat(
    settings: Settings, docker_client: docker.DockerClient, node_containers: None, tmp_path: Path
) -> None:
    """A claim that landed before its runtime died is resumed by another instance, which does
    not know the warm container: the start finds it by name, checks it is the session's, and
    attaches the chat; another chat's claim of the same container is refused."""
    slots = SlotMounts(tmp_path / "slots")
    assert slots.prepare() is None
    driver = DockerDriver.from_env(30.0, slots=slots)
    try:
        session_id, node = str(uuid.uuid4()), settings.runtime.node_id
        spec = warm_spec(session_id, node, "gone-instance", slots.make(session_id), settings.sandbox)
        warm_id = await driver.ensure_running(spec)
        chat, other = str(uuid.uuid4()), str(uuid.uuid4())
        now = datetime.now(UTC)
        record = SessionRecord(
            session_id=session_id,
            chat_id=chat,
            node_id=node,
            container_id=None,
            image=settings.sandbox.image,
            status=SessionStatus.PROVISIONING,
            created_at=now,
            expires_at=now + timedelta(hours=1),
            updated_at=now,
        )
        session_spec = container_spec(ContainerIdentity(chat, session_id, node), record, settings.sandbox)
        assert await driver.ensure_running(session_spec) == warm_id
        assert await driver.ensure_running(session_spec) == warm_id, "again: the same, still attached"
        path = settings.sandbox.chat_mount_path
        assert run_in(docker_client, warm_id, f"echo resumed > {path}/f")[0] == 0
        assert (tmp_path / "chats" / chat / "f").read_text() == "resumed\n"

        other_spec = container_spec(
            ContainerIdentity(other, session_id, node), replace(record, chat_id=other), settings.sandbox
        )
        with pytest.raises(SandboxStartFailed, match="serves chat"):
            await driver.ensure_running(other_spec)
        assert run_in(docker_client, warm_id, f"cat {path}/f") == (0, "resumed")

        await driver.remove(ContainerIdentity(chat, session_id, node), 0)
        assert not (tmp_path / "slots" / session_id).exists()
        assert (tmp_path / "chats" / chat / "f").exists()
    finally:
        driver.close()
