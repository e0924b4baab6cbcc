"""Connecting to NATS the same way in every process."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client

from shared.config import NatsSettings

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"


def nats_url(settings: NatsSettings) -> str:
    return settings.url or f"nats://127.0.0.1:{settings.embedded_port}"


async def connect(settings: NatsSettings, name: str) -> Client:
    """A client that reconnects forever once connected; the first connect fails fast."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnected() -> None:
        log.warning("nats disconnected")

    async def on_reconnected() -> None:
        log.info("nats reconnected")

    return await nats.connect(
        nats_url(settings),
        name=name,
        connect_timeout=settings.connect_timeout_seconds,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
