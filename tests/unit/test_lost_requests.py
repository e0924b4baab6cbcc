"""Requests sent over a connection that dropped fail the moment it is back (their replies
will never come), so the caller retries at once instead of waiting out its time-out; requests
made while disconnected (buffered, sent on reconnect) and answered ones are left alone."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest
from nats.aio.client import Client
from nats.errors import ConnectionReconnectingError

from shared.event_store import with_nats_retry
from shared.nats_connection import _LostRequests
from tests.support.eventually import until


async def test_only_requests_sent_before_the_drop_fail_at_reconnect() -> None:
    loop = asyncio.get_running_loop()
    nc = SimpleNamespace(_resp_map={})
    lost = _LostRequests(cast("Client", nc))
    sent, answered = loop.create_future(), loop.create_future()
    nc._resp_map.update({"sent": sent, "answered": answered})
    answered.set_result("reply")
    lost.disconnected()
    buffered = loop.create_future()
    nc._resp_map["buffered"] = buffered
    lost.reconnected()
    with pytest.raises(ConnectionReconnectingError):
        sent.result()
    assert answered.result() == "reply"
    assert not buffered.done()
    lost.reconnected()  # a later reconnect fails nothing twice
    assert not buffered.done()


async def test_a_failed_request_is_retried_at_once() -> None:
    loop = asyncio.get_running_loop()
    nc = SimpleNamespace(_resp_map={})
    lost = _LostRequests(cast("Client", nc))
    attempts: list[asyncio.Future[Any]] = []

    async def request() -> Any:
        future = loop.create_future()
        nc._resp_map[f"t{len(attempts)}"] = future
        attempts.append(future)
        return await future

    call = asyncio.create_task(with_nats_retry(request, what="test"))
    try:
        await until(lambda: len(attempts) == 1, what="the first attempt waiting for its reply")
        lost.disconnected()
        lost.reconnected()
        await until(lambda: len(attempts) == 2, timeout=5, what="the retry")
        attempts[1].set_result("reply")
        assert await call == "reply"
    finally:
        call.cancel()
