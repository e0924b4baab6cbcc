"""Connecting to NATS the same way in every process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.client import Client
from nats.errors import AuthorizationError

from shared.config import NKEY_FILE_KEY, ConfigError, NatsSettings
from shared.nats_credentials import NkeyFileError, read_user_seed
from shared.nats_roles import OUTSIDE_INBOX, Role, inbox_prefix
from shared.service import StartupError

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


class NatsRefused(ConnectionError):
    """The first connection failed: the server refused our credentials or never answered."""


def _refusal(settings: NatsSettings, url: str, exc: Exception) -> str:
    if settings.nkey_file is None:
        return (
            f"NATS at {url} requires authentication ({exc}): set {NKEY_FILE_KEY} to this role's seed "
            "(`sandboxctl up` writes them to .sandboxd/nats/<role>.nk)"
        )
    return f"NATS at {url} refused the user of {NKEY_FILE_KEY} = {settings.nkey_file} ({exc}): not one of its users"


def _is_refusal(exc: Exception) -> bool:
    return isinstance(exc, AuthorizationError) or "authorization violation" in str(exc).lower()


async def connect(settings: NatsSettings, name: str, *, role: Role | None = None) -> Client:
    """A client that reconnects forever once connected. The first connection fails fast:
    NatsRefused when the server rejects the credentials or does not answer within
    `nats.connect_timeout_seconds` (nats-py alone would retry both forever).

    It authenticates with `nats.nkey_file` when set (a ConfigError naming the key if the file
    is missing or not a seed) and uses `role`'s private inbox prefix, which is what that role's
    NATS user may subscribe to."""
    seed = _seed(settings)
    url = nats_url(settings)
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[Exception] = loop.create_future()
    connected = abandoned = False

    async def on_error(exc: Exception) -> None:
        if abandoned:
            return
        if not connected and _is_refusal(exc):
            if not refused.done():
                refused.set_result(exc)
            return
        log.warning("nats error: %s", exc)

    async def on_disconnected() -> None:
        if connected and not (nc.is_closed or nc.is_draining):  # not our own shutdown
            log.warning("nats disconnected")

    async def on_reconnected() -> None:
        log.info("nats reconnected")

    # nats-py types the time-outs as int; it takes seconds as float.
    options: dict[str, Any] = {
        "name": name,
        "connect_timeout": settings.connect_timeout_seconds,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "nkeys_seed_str": seed,
        "inbox_prefix": inbox_prefix(role) if role is not None else OUTSIDE_INBOX,
    }
    nc = Client()
    connecting: asyncio.Future[Any] = asyncio.ensure_future(nc.connect(url, **options))
    waiting: set[asyncio.Future[Any]] = {connecting, refused}
    done, _ = await asyncio.wait(waiting, timeout=settings.connect_timeout_seconds, return_when=asyncio.FIRST_COMPLETED)
    if connecting in done:
        connecting.result()
        connected = True
        return nc
    abandoned = True
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    with contextlib.suppress(Exception):
        await nc.close()
    if refused.done():
        raise NatsRefused(_refusal(settings, url, refused.result()))
    raise NatsRefused(f"no NATS server answered at {url} within {settings.connect_timeout_seconds:g}s")


@contextlib.asynccontextmanager
async def service_connection(settings: NatsSettings, name: str, *, role: Role) -> AsyncIterator[Client]:
    """A service's connection for the block, drained when it ends; a first connection that
    fails is a StartupError naming the server."""
    try:
        nc = await connect(settings, name, role=role)
    except Exception as exc:
        raise StartupError(f"cannot connect to NATS at {nats_url(settings)}: {exc}") from exc
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()
