from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from shared.config import Settings
from tests.conftest import TEST_TOKEN
from tests.support.api_server import serving_api

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(settings: Settings, runtime: None) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serving_api(settings) as base_url,
        httpx.AsyncClient(base_url=base_url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as client,
    ):
        yield client
