"""The create gate on a real engine: a create beyond `runtime.max_concurrent_creates` waits
in the runtime, not in the engine, while a stop goes straight in."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
from docker.errors import NotFound

from services.runtime.containers import ContainerIdentity, ContainerSpec, container_spec
from services.runtime.docker_driver import DockerDriver
from services.runtime.service import running_runtime
from shared.config import DEFAULT_MAX_CONCURRENT_CREATES, Settings
from shared.contracts import SessionRecord, SessionStatus
from tests.conftest import settings_for
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs


def spec_for(settings: Settings) -> ContainerSpec:
    chat, session_id, node = str(uuid.uuid4()), str(uuid.uuid4()), settings.runtime.node_id
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
    return container_spec(ContainerIdentity(chat, session_id, node), record, settings.sandbox)


def exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.containers.get(name)
    except NotFound:
        return False
    return True


async def test_a_create_beyond_the_limit_waits_and_a_stop_does_not(
    settings: Settings, docker_client: docker.DockerClient, node_containers: None
) -> None:
    driver = DockerDriver.from_env(30.0, max_concurrent_creates=1)
    try:
        running = spec_for(settings)
        await driver.ensure_running(running)
        waiting = spec_for(settings)
        async with driver._creates.turn():  # the gate's one place, held by the test
            create = asyncio.create_task(driver.ensure_running(waiting))
            await asyncio.sleep(1.0)
            assert not create.done()
            assert not await asyncio.to_thread(exists, docker_client, waiting.name), "it waited outside the engine"
            # A stop is not held behind the creates.
            await asyncio.wait_for(driver.remove(running.identity, 0), 30)
            assert not await asyncio.to_thread(exists, docker_client, running.name)
        container_id = await asyncio.wait_for(create, 60)
        found = await asyncio.to_thread(docker_client.containers.get, container_id)
        assert found.name == waiting.name
        assert found.status == "running"
        assert driver._creates.running == 0
    finally:
        driver.close()


async def test_the_runtime_gives_its_engine_the_configured_limit(
    nats: NatsServer, tmp_path: Path, node_id: str, docker_client: docker.DockerClient, node_containers: None
) -> None:
    assert Settings().runtime.max_concurrent_creates == DEFAULT_MAX_CONCURRENT_CREATES == 4
    make_sandbox_dirs(tmp_path)
    settings = settings_for(nats.url, tmp_path, node_id, SANDBOXD_RUNTIME_MAX_CONCURRENT_CREATES="2")
    async with running_runtime(settings) as handle:
        driver = handle.handlers._d.driver
        assert isinstance(driver, DockerDriver)
        assert driver._creates._limit == 2
