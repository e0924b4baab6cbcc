"""Docker tells us when a sandbox dies (real nats-server, real Docker, the runtime's death
watch; periodic reconciliation is off in tests, so nothing else records `lost`): a container
killed, removed or OOM-killed behind the system's back becomes `lost` with how it ended, the
next create makes a new session and a keepalive is refused; our own stops and replaces
record no `lost`; and the watch catches up on what it missed while the engine was away."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path

import docker
import httpx
import nats
import pytest
from docker.errors import NotFound
from nats.aio.client import Client

from services.runtime.docker_driver import DockerDriver
from services.runtime.service import RuntimeHandle, running_runtime
from shared.config import Settings
from shared.contracts import AnyEvent, LostReason, SandboxLost
from shared.event_store import EventStore
from tests.conftest import TEST_IMAGE, TEST_TOKEN, missing, settings_for
from tests.support.api_server import serving_api
from tests.support.eventually import eventually, holds, past
from tests.support.private_dockerd import PrivateDockerd, private_dockerd_with_image

API = "/api/v1"


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats.url or "")
    yield client
    await client.close()


@pytest.fixture
def store(nc: Client) -> EventStore:
    return EventStore(nc.jetstream())


@pytest.fixture
async def watched(runtime: RuntimeHandle) -> RuntimeHandle:
    """The runtime, once its death watch follows the engine."""
    assert runtime.deaths is not None, "the runtime follows the engine's events"
    await asyncio.wait_for(runtime.deaths.connected.wait(), 30)
    return runtime


async def history(store: EventStore, chat: str) -> list[AnyEvent]:
    return [s.event for s in await store.history(chat)]


async def lost_event(store: EventStore, chat: str) -> SandboxLost:
    events = await eventually(
        lambda: history(store, chat),
        lambda es: any(isinstance(e, SandboxLost) for e in es),
        timeout=20,
        what=f"a lost event on chat {chat}",
    )
    (lost,) = [e for e in events if isinstance(e, SandboxLost)]
    return lost


def gone(docker_client: docker.DockerClient, container_id: str) -> bool:
    try:
        docker_client.containers.get(container_id)
    except NotFound:
        return True
    return False


async def create(http: httpx.AsyncClient, chat: str, **body: object) -> httpx.Response:
    return await http.post(f"{API}/sandboxes", json={"chat_id": chat, **body})


async def killed_behind_our_back_then_replaced(
    http: httpx.AsyncClient, store: EventStore, docker_client: docker.DockerClient, kill: str
) -> SandboxLost:
    chat = str(uuid.uuid4())
    first = await create(http, chat)
    assert first.status_code == 201, first.text
    container = first.json()["container_id"]

    container_obj = docker_client.containers.get(container)
    if kill == "kill":
        await asyncio.to_thread(container_obj.kill)
    else:
        await asyncio.to_thread(container_obj.remove, force=True)

    lost = await lost_event(store, chat)
    assert lost.session_id == first.json()["session_id"]
    assert lost.causation_id is None
    assert lost.session is not None
    assert lost.session.status == "lost"
    assert (await http.get(f"{API}/sandboxes/{chat}")).status_code == 404
    keepalive = await http.post(f"{API}/sandboxes/{chat}/keepalive", json={})
    assert keepalive.status_code == 404, keepalive.text
    assert "no_live_session" in keepalive.json()["detail"]

    second = await create(http, chat)
    assert second.status_code == 201, second.text
    assert second.json()["result"] == "created"
    assert second.json()["session_id"] != first.json()["session_id"]
    assert docker_client.containers.get(second.json()["container_id"]).status == "running"
    await eventually(lambda: asyncio.to_thread(gone, docker_client, container), what="the dead container removed")
    return lost


async def test_a_sandbox_killed_behind_our_back_is_lost_and_the_next_create_is_new(
    watched: RuntimeHandle, api: httpx.AsyncClient, store: EventStore, docker_client: docker.DockerClient
) -> None:
    lost = await killed_behind_our_back_then_replaced(api, store, docker_client, "kill")
    assert lost.reason == LostReason.CONTAINER_EXITED
    assert lost.error is not None
    assert (lost.error.type, lost.error.exit_code, lost.error.oom_killed) == ("container_state", 137, False)


async def test_a_sandbox_removed_behind_our_back_is_lost_and_the_next_create_is_new(
    watched: RuntimeHandle, api: httpx.AsyncClient, store: EventStore, docker_client: docker.DockerClient
) -> None:
    lost = await killed_behind_our_back_then_replaced(api, store, docker_client, "rm -f")
    assert lost.reason == LostReason.CONTAINER_EXITED
    assert lost.error is not None
    assert lost.error.exit_code == 137


async def test_our_own_stop_and_replace_record_no_lost(
    watched: RuntimeHandle, api: httpx.AsyncClient, store: EventStore, docker_client: docker.DockerClient
) -> None:
    stopped, replaced = str(uuid.uuid4()), str(uuid.uuid4())
    assert (await create(api, stopped)).status_code == 201
    assert (await api.delete(f"{API}/sandboxes/{stopped}")).status_code == 200
    short = await create(api, replaced, ttl_seconds=1)
    assert short.status_code == 201, short.text
    await past(datetime.fromisoformat(short.json()["expires_at"]))
    again = await create(api, replaced)
    assert again.status_code == 201, again.text
    assert again.json()["result"] == "replaced"
    # Both killed a container of ours; the engine reported each death.
    assert gone(docker_client, short.json()["container_id"])

    async def types() -> tuple[list[str], list[str]]:
        return [e.type for e in await history(store, stopped)], [e.type for e in await history(store, replaced)]

    await holds(types, lambda t: "lost" not in t[0] + t[1], seconds=1.5, what="no lost for our own stops")
    assert (await types())[1][-1] == "running"
    assert watched.deaths is not None
    assert watched.deaths.pending_count == 0


async def test_an_oom_killed_sandbox_is_lost_with_the_oom_flag(
    settings: Settings,
    tmp_path: Path,
    node_id: str,
    store: EventStore,
    docker_client: docker.DockerClient,
    node_containers: None,
) -> None:
    """A sandbox whose main process eats memory once told to (a file in its /tmp), under a
    tiny memory limit: the kernel's OOM killer ends it."""
    hog = ["sh", "-c", "while [ ! -f /tmp/eat ]; do sleep 0.05; done; tail /dev/zero"]
    oom_settings = settings_for(
        settings.nats.url or "",
        tmp_path,
        node_id,
        SANDBOXD_SANDBOX_MEMORY_LIMIT="8m",
        SANDBOXD_SANDBOX_TMPFS_SIZE="1m",
        SANDBOXD_SANDBOX_COMMAND=json.dumps(hog),
    )
    async with (
        running_runtime(oom_settings) as runtime,
        serving_api(oom_settings) as url,
        httpx.AsyncClient(base_url=url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        assert runtime.deaths is not None
        await asyncio.wait_for(runtime.deaths.connected.wait(), 30)
        chat = str(uuid.uuid4())
        created = await create(http, chat)
        assert created.status_code == 201, created.text
        container = docker_client.containers.get(created.json()["container_id"])
        await asyncio.to_thread(container.exec_run, ["touch", "/tmp/eat"])

        lost = await lost_event(store, chat)
        assert lost.reason == LostReason.CONTAINER_EXITED
        assert lost.error is not None
        assert lost.error.oom_killed is True, lost.error
        assert lost.error.exit_code == 137
        assert "OOM" in lost.error.message
        assert (await create(http, chat)).status_code == 201


# --------------------------------------------------------------------------- the engine goes away


@pytest.fixture
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDockerd]:
    root = Path(tmp_path_factory.mktemp("dkr"))  # a short path: unix socket paths are limited
    try:
        with private_dockerd_with_image(root, TEST_IMAGE) as started:
            yield started
    except RuntimeError as exc:
        missing(f"cannot run a private dockerd: {exc}")


async def test_the_watch_follows_the_engine_across_a_restart(
    settings: Settings, engine: PrivateDockerd, store: EventStore
) -> None:
    """The engine stops (taking its containers with it) and starts again: their deaths are
    recorded (seen as the engine reported them, or found exited once it is back), with no
    reconciliation pass; the stream is followed again, so a later kill is noticed too."""
    driver = DockerDriver(engine.client(), events_client=engine.client)
    async with (
        running_runtime(settings, driver=driver) as runtime,
        serving_api(settings) as url,
        httpx.AsyncClient(base_url=url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        deaths = runtime.deaths
        assert deaths is not None
        await asyncio.wait_for(deaths.connected.wait(), 30)
        chats = [str(uuid.uuid4()) for _ in range(2)]
        for chat in chats:
            assert (await create(http, chat)).status_code == 201

        await asyncio.to_thread(engine.stop)
        await asyncio.to_thread(engine.start)

        for chat in chats:
            lost = await lost_event(store, chat)
            assert lost.reason == LostReason.CONTAINER_EXITED
        await eventually(_value(lambda: deaths.connections), lambda n: n >= 2, what="the stream reconnected")
        await asyncio.wait_for(deaths.connected.wait(), 30)

        later = str(uuid.uuid4())
        created = await create(http, later)
        assert created.status_code == 201, created.text
        client = engine.client()
        await asyncio.to_thread(client.containers.get(created.json()["container_id"]).kill)
        client.close()
        assert (await lost_event(store, later)).error is not None
        for chat in chats:
            assert (await create(http, chat)).status_code == 201
            assert (await http.delete(f"{API}/sandboxes/{chat}")).status_code == 200
    driver.close()


def _value(read: Callable[[], int]) -> Callable[[], Awaitable[int]]:
    async def value() -> int:
        return read()

    return value
