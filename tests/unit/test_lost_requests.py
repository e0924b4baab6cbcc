"""Requests sent over a connection that dropped fail the moment it is back (their replies
will never come), so the caller retries at once instead of waiting out its time-out; requests
made while disconnected (buffered, sent on reconnect) and answered ones are left alone."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from nats.aio.client import Client
from nats.errors import ConnectionReconnectingError

from shared.event_store import with_nats_retry
from shared.nats_connection import _LostRequests
from shared.nats_requests import requests_of
from tests.support.eventually import until


class FakeClient:
    """What _LostRequests and our shared reply subscription touch of a connection."""

    def __init__(self) -> None:
        self._resp_map: dict[str, asyncio.Future[Any]] = {}
        self.published: list[str] = []

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, **_: Any) -> None:
        pass

    async def publish(self, subject: str, *_: Any, **__: Any) -> None:
        self.published.append(subject)


async def test_only_requests_sent_before_the_drop_fail_at_reconnect() -> None:
    loop = asyncio.get_running_loop()
    nc = FakeClient()
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
    nc = FakeClient()
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


async def test_so_do_those_on_the_shared_reply_subscription() -> None:
    nc = FakeClient()
    lost = _LostRequests(cast("Client", nc))
    requests = requests_of(cast("Client", nc))
    sent = asyncio.create_task(requests.request("a", b"", timeout=60))
    await until(lambda: nc.published == ["a"], what="the request sent")
    lost.disconnected()
    buffered = asyncio.create_task(requests.request("b", b"", timeout=60))
    await until(lambda: nc.published == ["a", "b"], what="the request buffered")
    lost.reconnected()
    with pytest.raises(ConnectionReconnectingError):
        await asyncio.wait_for(sent, 10)  # the bound only keeps a regression from hanging
    assert not buffered.done()
    lost.reconnected()  # a later reconnect fails nothing twice
    await asyncio.sleep(0)
    assert not buffered.done()
    buffered.cancel()
