from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.reaper.reaper import Reaper
from services.reaper.service import running_reaper
from services.runtime.service import RuntimeHandle
from shared.config import Settings
from tests.conftest import TEST_TOKEN
from tests.support.api_server import serving_api


@pytest.fixture
async def api(settings: Settings, runtime: RuntimeHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serving_api(settings) as base_url,
        httpx.AsyncClient(base_url=base_url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as client,
    ):
        yield client


@pytest.fixture
async def reaper(settings: Settings) -> AsyncIterator[Reaper]:
    async with running_reaper(settings) as running:
        await running.ready()
        yield running
