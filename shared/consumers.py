"""Durable pull consumers, declared with the configuration the code needs.

nats-py's `pull_subscribe` keeps an existing consumer's configuration as it finds it; here
the durable is created or updated (a new bound on deliveries reaches consumers that older
versions created), then read with `pull_batch`.

`pull_batch` reads a durable in whole batches. nats-py's `fetch` awaits every message of a
batch on its own, so on a busy event loop a batch of 256 costs 256 turns of every other
task; here a subscription callback gathers the batch and the caller waits once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, Header

from shared.event_store import with_nats_retry
from shared.nats_client import subscribe_taking

_HEARTBEAT = "100"
# The client waits this much longer than a pull's own expiry, so that the server, not the
# client, ends the pull (a pull the client gave up on would take the next messages).
_PULL_GRACE_SECONDS = 1.0
_NO_WAIT_TIMEOUT_SECONDS = 5.0


async def declare_durable(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    durable = config.durable_name or ""

    async def declare() -> None:
        await js.add_consumer(stream, config=config)

    await with_nats_retry(declare, what=f"declare consumer {durable} on {stream}")


async def pull_batch(
    nc: Client, stream: str, durable: str, batch: int, *, expires: float, stopping: asyncio.Event | None = None
) -> list[Msg]:
    """Up to `batch` messages of the durable: what is there now, or else the first that
    comes within `expires` seconds (then the next call takes the rest); [] when none came,
    or at once when `stopping` is set meanwhile (a message delivered to the abandoned pull
    is redelivered after the consumer's ack wait)."""
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
    now: dict[str, object] = {"batch": batch, "no_wait": True}
    msgs = await _pull(nc, subject, now, batch, _NO_WAIT_TIMEOUT_SECONDS, stopping=stopping)
    if msgs:
        return msgs
    first: dict[str, object] = {"batch": 1, "expires": int(expires * 1_000_000_000)}
    return await _pull(nc, subject, first, 1, expires + _PULL_GRACE_SECONDS, stopping=stopping)


async def _pull(
    nc: Client,
    subject: str,
    request: dict[str, object],
    batch: int,
    timeout: float,
    *,
    stopping: asyncio.Event | None = None,
) -> list[Msg]:
    """One pull request on an inbox of its own: its messages, until `batch` came or the
    server ended the request with a status (no messages, expired, ...)."""
    found: list[Msg] = []
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def take(msg: Msg) -> None:
        status = (msg.headers or {}).get(Header.STATUS.value) if not msg.data else None
        if status is None:
            found.append(msg)
            if len(found) >= batch and not ended.done():
                ended.set_result(None)
        elif status != _HEARTBEAT and not ended.done():
            ended.set_result(None)

    sub = await subscribe_taking(nc, nc.new_inbox(), take)
    try:
        await nc.publish(subject, json.dumps(request).encode(), reply=sub.subject)
        # On a timeout what came is returned; the rest is redelivered after the ack_wait.
        if stopping is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended, timeout)
            return found
        stopped = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait((ended, stopped), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        return found
    finally:
        await sub.unsubscribe()
