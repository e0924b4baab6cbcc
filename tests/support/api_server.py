"""The real API app served by uvicorn on a random loopback port, in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn

from services.api.app import create_app
from shared.config import Settings
from shared.telemetry import Telemetry, disabled


@contextlib.asynccontextmanager
async def serving_api(settings: Settings, telemetry: Telemetry | None = None) -> AsyncIterator[str]:
    """Yields the base URL while the server runs."""
    app = create_app(settings, telemetry=telemetry or disabled())
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the API server stopped during start-up")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
