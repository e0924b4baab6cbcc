"""Requests over one reply subscription per connection: JetStream publishes (appends, KV
writes), direct gets and pulls, without nats-py's per-request costs.

nats-py's `request` pays for a `wait_for` (a second future, a timer and callbacks) and a
random token per request, and its `JetStreamContext.publish` parses the PubAck into a
dataclass; a subscription of its own (a batched direct get, a pull) costs a SUB, an UNSUB
and a task. Under load — every command is three or four of these — that is most of the
runtime's time. Here one wildcard subscription (`<inbox>.*`) per connection takes every
answer, and each request waits on one future (timeouts: one sweep for all).

Errors are nats-py's, as its own calls raise them: `nats.errors.TimeoutError` when no
answer came in time, `NoRespondersError` (`NoStreamResponseError` for a JetStream
publish) when nothing listens, `APIError` subclasses (with `err_code`) when JetStream
refused the publish, and ConnectionReconnectingError for a request that was waiting when
the connection dropped (failed when it is back, see nats_connection.py).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionReconnectingError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import Header
from nats.js.errors import APIError, NoStreamResponseError

from shared.nats_client import subscribe_taking

_NO_RESPONDERS = "503"
T = TypeVar("T")

# Takes each message of a request's answer; True when the answer is complete.
Collector = Callable[[Msg], bool]


class PubAck(msgspec.Struct):
    """What JetStream answers a publish: its stream sequence, or why it was refused."""

    seq: int = 0
    duplicate: bool = False
    error: dict[str, object] | None = None


_PUB_ACK = msgspec.json.Decoder(PubAck)


@dataclass(slots=True)
class _Waiter:
    collect: Collector
    done: asyncio.Future[Any]
    deadline: float  # on the loop's clock


class Requests:
    """The requests of one connection; `requests_of(nc)` gives the connection's one.

    Requests time out by a sweep of the waiting ones every SWEEP_SECONDS (while there are
    any), not by a timer each: a timeout comes up to that much late."""

    SWEEP_SECONDS = 0.1

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = f"{nc.new_inbox()}."
        self._tokens = itertools.count(1)
        self._waiting: dict[str, _Waiter] = {}
        self._subscribed: asyncio.Future[None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._lost: list[str] = []  # tokens waiting when the connection dropped

    async def _subscribe(self) -> None:
        if self._subscribed is None:
            self._subscribed = asyncio.get_running_loop().create_future()
            try:
                await subscribe_taking(self._nc, f"{self._prefix}*", self._take)
            except BaseException as exc:
                self._subscribed.set_exception(exc)
                self._subscribed.exception()  # retrieved: the next request subscribes again
                self._subscribed = None
                raise
            self._subscribed.set_result(None)
        await self._subscribed

    def disconnected(self) -> None:
        """The connection dropped: the replies of requests waiting now will never come."""
        self._lost = list(self._waiting)

    def reconnected(self) -> int:
        """Fail the requests that were waiting when the connection dropped (their callers
        retry at once instead of waiting out their time-out); requests made while it was
        down were buffered and sent on reconnect: not touched. How many failed."""
        failed = 0
        for token in self._lost:
            waiter = self._waiting.pop(token, None)
            if waiter is not None and not waiter.done.done():
                waiter.done.set_exception(ConnectionReconnectingError())
                failed += 1
        self._lost = []
        return failed

    def _take(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) :]
        waiter = self._waiting.get(token)
        if waiter is not None and waiter.collect(msg):
            del self._waiting[token]

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for token, waiter in list(self._waiting.items()):
            if waiter.deadline <= now:
                del self._waiting[token]
                if not waiter.done.done():
                    waiter.done.set_exception(NatsTimeoutError())
        if self._waiting:
            self._sweeper = loop.call_later(self.SWEEP_SECONDS, self._sweep)

    async def _ask(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        *,
        collect: Collector,
        done: asyncio.Future[T],
        timeout: float,
    ) -> T:
        """Publish with a reply token; `collect` takes the answers until it returns True."""
        await self._subscribe()
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        self._waiting[token] = _Waiter(collect, done, loop.time() + timeout)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.SWEEP_SECONDS, self._sweep)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            return await done
        finally:
            self._waiting.pop(token, None)

    async def collect(
        self, subject: str, payload: bytes, collect: Collector, done: asyncio.Future[None], timeout: float
    ) -> None:
        """Publish a request whose answer may be many messages: `collect` takes each (it
        returns True at the message that ends the answer, and settles `done` by then); until
        `done` is settled. NatsTimeoutError when it is not within `timeout`."""
        await self._ask(subject, payload, None, collect=collect, done=done, timeout=timeout)

    async def request(
        self, subject: str, payload: bytes, *, headers: dict[str, str] | None = None, timeout: float
    ) -> Msg:
        """One answer; NoRespondersError when nothing listens on `subject`."""
        answer: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()

        def take(msg: Msg) -> bool:
            if not answer.done():
                answer.set_result(msg)
            return True

        msg = await self._ask(subject, payload, headers, collect=take, done=answer, timeout=timeout)
        if not msg.data and msg.headers and msg.headers.get(Header.STATUS.value) == _NO_RESPONDERS:
            raise NoRespondersError
        return msg

    async def publish(
        self, subject: str, payload: bytes, *, headers: dict[str, str] | None = None, timeout: float
    ) -> PubAck:
        """A JetStream publish, acknowledged: as `JetStreamContext.publish` (which see)."""
        try:
            msg = await self.request(subject, payload, headers=headers, timeout=timeout)
        except NoRespondersError:
            raise NoStreamResponseError from None
        ack = _PUB_ACK.decode(msg.data)
        if ack.error is not None:
            raise APIError.from_error(ack.error)
        return ack


_KEY = re.compile(r"^[-/_=\.a-zA-Z0-9]+$")  # nats-py's own rule for a KV key


def valid_key(key: str) -> bool:
    """A KV key nats-py would write (it refuses others with InvalidKeyError)."""
    return _KEY.match(key) is not None and not key.startswith(".") and not key.endswith(".")


_OF: weakref.WeakKeyDictionary[Client, Requests] = weakref.WeakKeyDictionary()


def requests_of(nc: Client) -> Requests:
    """The connection's Requests (made on first use; its subscription on the first request)."""
    requests = _OF.get(nc)
    if requests is None:
        requests = _OF[nc] = Requests(nc)
    return requests
