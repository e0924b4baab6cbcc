"""The reaper's composition root."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from services.reaper.decisions import ReaperPolicy
from services.reaper.reaper import Reaper
from shared.clock import Clock, SystemClock
from shared.config import Settings
from shared.nats_connection import service_connection
from shared.nats_roles import Role
from shared.status_blocks import prometheus_endpoint
from shared.telemetry import Telemetry, setup_telemetry
from shared.topology import STATUS, attach_bucket, attach_topology

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def running_reaper(
    settings: Settings, *, clock: Clock | None = None, telemetry: Telemetry | None = None
) -> AsyncIterator[Reaper]:
    telemetry = telemetry or setup_telemetry("sandboxd-reaper", otlp_endpoint=settings.telemetry.otlp_endpoint)
    async with contextlib.AsyncExitStack() as stack:
        name = f"sandboxd-reaper:{settings.reaper.reaper_id}"
        nc = await stack.enter_async_context(service_connection(settings.nats, name, role=Role.REAPER))
        js = nc.jetstream(timeout=settings.nats.request_timeout_seconds)
        sessions = await attach_topology(js, settings.streams)
        status = await attach_bucket(js, STATUS, settings.streams)
        policy = ReaperPolicy(
            on_idle=settings.sandbox.on_idle,
            paused_ttl=timedelta(seconds=settings.sandbox.paused_ttl_seconds),
            warning=timedelta(seconds=settings.sandbox.expiry_warning_seconds),
        )
        reaper = Reaper(js, sessions, status, settings.reaper, clock or SystemClock(), telemetry, policy)
        _start(stack, reaper)
        log.info(
            "reaper %s started (expiry %s, re-drive %s)",
            settings.reaper.reaper_id,
            "on" if settings.reaper.expiry_enabled else "OFF",
            "on" if settings.reaper.redrive_enabled else "OFF",
        )
        yield reaper


def _start(stack: contextlib.AsyncExitStack, reaper: Reaper) -> None:
    """Run the reaper until the stack unwinds, then wait for it to stop."""
    stopping = asyncio.Event()
    task = asyncio.create_task(reaper.run(stopping), name="reaper")

    async def stop() -> None:
        stopping.set()
        await task

    stack.push_async_callback(stop)


async def serve(settings: Settings, stopping: asyncio.Event) -> None:
    with prometheus_endpoint(settings.telemetry.metrics_host, settings.telemetry.reaper_metrics_port):
        async with running_reaper(settings):
            await stopping.wait()
