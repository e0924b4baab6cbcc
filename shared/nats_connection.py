"""Connecting to NATS the same way in every process."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client

from shared.config import NKEY_FILE_KEY, ConfigError, NatsSettings
from shared.nats_credentials import NkeyFileError, read_user_seed
from shared.nats_roles import OUTSIDE_INBOX, Role, inbox_prefix

log = logging.getLogger(__name__)

DEFAULT_URL = "nats://127.0.0.1:4222"


def nats_url(settings: NatsSettings) -> str:
    return settings.url or f"nats://127.0.0.1:{settings.embedded_port}"


def _seed(settings: NatsSettings) -> str | None:
    if settings.nkey_file is None:
        return None
    try:
        return read_user_seed(settings.nkey_file)
    except NkeyFileError as exc:
        raise ConfigError(f"{NKEY_FILE_KEY}: {exc}") from exc


async def connect(settings: NatsSettings, name: str, *, role: Role | None = None) -> Client:
    """A client that reconnects forever once connected; the first connect fails fast.

    It authenticates with `nats.nkey_file` when set (a ConfigError naming the key if the file
    is missing or not a seed) and uses `role`'s private inbox prefix, which is what that role's
    NATS user may subscribe to."""
    seed = _seed(settings)

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
        nkeys_seed_str=seed,
        inbox_prefix=inbox_prefix(role) if role is not None else OUTSIDE_INBOX,
    )
