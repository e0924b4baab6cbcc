"""The create gate on a real engine: a create beyond `runtime.max_concurrent_creates` waits
in the runtime, not in the engine, while a stop goes straight in."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import docker

from services.runtime.containers import ContainerIdentity, ContainerSpec, container_spec
from services.runtime.docker_driver import DockerDriver
from services.runtime.service import running_runtime
from shared.config import DEFAULT_MAX_CONCURRENT_CREATES, Settings
from shared.contracts import SessionStatus
from tests.conftest import settings_for
from tests.integration.test_container_deaths import gone
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs
from tests.support.records import session_record


def spec_for(settings: Settings) -> ContainerSpec:
    """A new session's container spec on the test's node."""
    node = settings.runtime.node_id
    record = session_record(
        now=datetime.now(UTC), status=SessionStatus.PROVISIONING, node_id=node, image=settings.sandbox.image
    )
    return container_spec(ContainerIdentity(record.chat_id, record.session_id, node), record, settings.sandbox)


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
            assert await asyncio.to_thread(gone, docker_client, waiting.name), "it waited outside the engine"
            # A stop is not held behind the creates.
            await asyncio.wait_for(driver.remove(running.identity, 0), 30)
            assert await asyncio.to_thread(gone, docker_client, running.name)
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
