"""The Docker engine stopped under a running stack: clear failures, no hung commands, a
failed stop kept and retried, and reconciliation converging once the engine is back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from services.runtime.docker_driver import DockerDriver
from services.runtime.service import running_runtime
from shared.config import Settings
from tests.conftest import TEST_IMAGE, TEST_TOKEN, missing
from tests.support.api_server import serving_api
from tests.support.private_dockerd import PrivateDockerd, private_dockerd_with_image


@pytest.fixture
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDockerd]:
    # A short path: unix socket paths are limited to ~100 bytes.
    root = Path(tmp_path_factory.mktemp("dkr"))
    try:
        with private_dockerd_with_image(root, TEST_IMAGE) as started:
            yield started
    except RuntimeError as exc:
        missing(f"cannot run a private dockerd: {exc}")


async def test_docker_outage(settings: Settings, engine: PrivateDockerd) -> None:
    driver = DockerDriver(engine.client())
    # A node limit makes every create list the engine's containers first: that, too, must
    # fail fast when the engine is down. The death watch is off: the engine's shutdown kills
    # the containers, which it would record `lost` at once (test_container_deaths.py); here the
    # failed stop and the reconciliation backstop are under test.
    runtime_settings = msgspec.structs.replace(settings.runtime, max_sessions=20, death_watch_enabled=False)
    settings = msgspec.structs.replace(settings, runtime=runtime_settings)
    async with (
        running_runtime(settings, driver=driver) as runtime,
        serving_api(settings) as url,
        httpx.AsyncClient(base_url=url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        kept, dropped = str(uuid.uuid4()), str(uuid.uuid4())
        for chat in (kept, dropped):
            assert (await http.post("/api/v1/sandboxes", json={"chat_id": chat})).status_code == 201

        await asyncio.to_thread(engine.stop)
        fresh = [str(uuid.uuid4()) for _ in range(5)]
        answers = await asyncio.gather(*(http.post("/api/v1/sandboxes", json={"chat_id": c}) for c in fresh))
        for answer in answers:
            # An outcome, not the 202 the API answers when none came within api.wait_seconds:
            # no command hangs while Docker is down.
            assert answer.status_code == 503, answer.text
            assert "Docker engine is unavailable" in answer.json()["detail"]
            assert answer.json()["error"]["type"] == "docker_unavailable"
        refused_stop = await http.delete(f"/api/v1/sandboxes/{kept}")
        assert refused_stop.status_code == 503, refused_stop.text
        status = await http.get("/api/v1/status")
        assert status.status_code == 200, "the status endpoint answers while Docker is down"
        assert status.json()["sections"]["registry"]["data"]["sessions"] >= 1
        assert status.json()["sections"]["nats"]["ok"] is True
        record = (await http.get(f"/api/v1/sandboxes/{kept}")).json()
        assert record["status"] == "stopping", "a failed stop keeps the record on its container"
        assert record["container_id"]

        await asyncio.to_thread(engine.start)
        assert (await http.delete(f"/api/v1/sandboxes/{kept}")).status_code == 200, "the stop is retried"
        # The engine stopped the other container on shutdown: reconciliation marks it lost.
        for _ in range(2):
            await runtime.reconciler.run_once()
        assert (await http.get(f"/api/v1/sandboxes/{dropped}")).status_code == 404
        events = (await http.get(f"/api/v1/sandboxes/{dropped}/events")).json()["events"]
        assert events[-1]["event"]["type"] == "lost"
        assert events[-1]["event"]["reason"] == "container_not_running"
        for chat in fresh:
            assert (await http.get(f"/api/v1/sandboxes/{chat}")).status_code == 404
        client = engine.client()
        assert client.containers.list(all=True) == [], "nothing leaked"
        client.close()
        assert (await runtime.reconciler.run_once()).actions == []
    driver.close()
