"""Connecting to NATS the same way in every process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.errors import AuthorizationError, ConnectionReconnectingError

from shared.config import NKEY_FILE_KEY, ConfigError, NatsSettings
from shared.nats_client import Client as HeadersClient
from shared.nats_credentials import NkeyFileError, read_user_seed
from shared.nats_requests import requests_of
from shared.nats_roles import OUTSIDE_INBOX, Role, inbox_prefix
from shared.service import StartupError

log = logging.getLogger(__name__)


def nats_servers(settings: NatsSettings) -> list[str]:
    """The server URLs a process connects to: `nats.url`'s comma-separated list, or the
    embedded server(s) `sandboxctl up` starts on loopback."""
    if settings.url is not None:
        return [url.strip() for url in settings.url.split(",") if url.strip()]
    return [f"nats://127.0.0.1:{settings.embedded_port + i}" for i in range(settings.embedded_cluster_size)]


def nats_url(settings: NatsSettings) -> str:
    """The servers as one string (`nats.url`'s form), for messages and child processes."""
    return ",".join(nats_servers(settings))


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


class _LostRequests:
    """Requests (JetStream publishes, API calls, direct gets) sent over a connection that then
    dropped: their replies will never come, yet nats-py would wait out each one's whole
    time-out (`nats.request_timeout_seconds`) after the connection is back. They are failed
    with ConnectionReconnectingError the moment it is back (nats-py's own and those on our
    shared reply subscription, nats_requests.py), so the caller's retry
    (`with_nats_retry`; a publish keeps its `Nats-Msg-Id`) runs at once on the new connection.
    Requests made while disconnected are buffered and sent on reconnect: not touched."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._tokens: list[str] = []

    def _pending(self) -> dict[str, asyncio.Future[Any]]:
        # nats-py keeps each request's future under its reply token (Client._resp_map).
        pending: dict[str, asyncio.Future[Any]] = getattr(self._nc, "_resp_map", {})
        return pending

    def disconnected(self) -> None:
        self._tokens = list(self._pending())
        requests_of(self._nc).disconnected()

    def reconnected(self) -> None:
        pending = self._pending()
        failed = requests_of(self._nc).reconnected()  # ours, on the shared reply subscription
        for token in self._tokens:
            future = pending.get(token)
            if future is not None and not future.done():
                future.set_exception(ConnectionReconnectingError())
                failed += 1
        self._tokens = []
        if failed:
            log.info("%d requests sent before the connection dropped are retried", failed)


def _reconnected_callback(lost: _LostRequests, hook: Callable[[], None] | None) -> Callable[[], Awaitable[None]]:
    async def reconnected() -> None:
        log.info("nats reconnected")
        lost.reconnected()
        if hook is not None:
            hook()

    return reconnected


async def connect(
    settings: NatsSettings,
    name: str,
    *,
    role: Role | None = None,
    on_reconnected: Callable[[], None] | None = None,
) -> Client:
    """A client of every server `nats.url` names (a cluster's: it moves to another when its
    server goes), that reconnects forever once connected. The first connection fails fast:
    NatsRefused when the server rejects the credentials or does not answer within
    `nats.connect_timeout_seconds` (nats-py alone would retry both forever).

    It authenticates with `nats.nkey_file` when set (a ConfigError naming the key if the file
    is missing or not a seed) and uses `role`'s private inbox prefix, which is what that role's
    NATS user may subscribe to. `on_reconnected` is called (synchronously: start a task for
    anything slow) each time the connection is back, after nats-py has re-sent its core
    subscriptions; JetStream consumers that lived in the server's memory are gone by then.
    Requests that were waiting for a reply when the connection dropped fail then (_LostRequests)."""
    seed = _seed(settings)
    servers = nats_servers(settings)
    url = ",".join(servers)
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
        lost.disconnected()
        if connected and not (nc.is_closed or nc.is_draining):  # not our own shutdown
            log.warning("nats disconnected")

    nc: Client = HeadersClient()  # nats-py's, with a faster header parser (nats_client.py)
    lost = _LostRequests(nc)
    # nats-py types the time-outs as int; it takes seconds as float.
    options: dict[str, Any] = {
        "name": name,
        "connect_timeout": settings.connect_timeout_seconds,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": _reconnected_callback(lost, on_reconnected),
        "nkeys_seed_str": seed,
        "inbox_prefix": inbox_prefix(role) if role is not None else OUTSIDE_INBOX,
    }
    connecting: asyncio.Future[Any] = asyncio.ensure_future(nc.connect(servers, **options))
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
async def service_connection(
    settings: NatsSettings, name: str, *, role: Role, on_reconnected: Callable[[], None] | None = None
) -> AsyncIterator[Client]:
    """A service's connection for the block, drained when it ends (closed when it cannot be:
    nats-py refuses to drain while reconnecting, and would go on reconnecting); a first
    connection that fails is a StartupError naming the server."""
    try:
        nc = await connect(settings, name, role=role, on_reconnected=on_reconnected)
    except Exception as exc:
        raise StartupError(f"cannot connect to NATS at {nats_url(settings)}: {exc}") from exc
    try:
        yield nc
    finally:
        try:
            await nc.drain()
        except Exception:  # noqa: BLE001 - reconnecting (NATS gone) or already closed
            with contextlib.suppress(Exception):
                await nc.close()
