"""The shared reply subscription (shared/nats_requests.py) on a real nats-server: answers
reach the request that asked, whatever the order; a JetStream publish is acknowledged or
refused as nats-py's own; nothing listening and no answer are the errors nats-py raises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats as nats_client
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, NoStreamResponseError

from shared.nats_client import Client as HandlerClient
from shared.nats_requests import requests_of, valid_key
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer


@pytest.fixture(params=["nats-py", "handlers"])
async def nc(nats: NatsServer, request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    """nats-py's client (answers through a callback's queue and task) and ours (answers
    taken in the read loop, shared/nats_client.py): Requests works the same on both."""
    if request.param == "nats-py":
        client = await nats_client.connect(nats.url)
    else:
        client = HandlerClient()
        await client.connect(nats.url)
    yield client
    await client.close()


async def test_a_handler_takes_each_message_in_order_in_the_read_loop(nats: NatsServer) -> None:
    nc = HandlerClient()
    await nc.connect(nats.url)
    try:
        taken: list[bytes] = []

        def take(msg: Msg) -> None:
            if msg.data == b"bad":
                raise ValueError("a handler's bug")
            taken.append(msg.data)

        sub = await nc.subscribe_handler("in.order", take)
        assert sub._wait_for_msgs_task is None  # no task of the subscription's own
        for i in range(200):
            await nc.publish("in.order", b"bad" if i == 100 else str(i).encode())
        await nc.flush()
        await eventually(lambda: asyncio.sleep(0, len(taken)), lambda n: n == 199, what="all taken")
        assert taken == [str(i).encode() for i in range(200) if i != 100]
        assert nc.is_connected, "a handler that raised does not end the connection"
        await sub.unsubscribe()
        await nc.publish("in.order", b"late")
        await nc.flush()
        assert taken[-1] == b"199"
        assert not nc._handlers  # the handler went with its subscription
    finally:
        await nc.close()


async def test_each_answer_reaches_the_request_that_asked(nc: Client) -> None:
    bodies = [str(i).encode() for i in range(50)]
    asked: list[Msg] = []

    async def echo_backwards(msg: Msg) -> None:
        asked.append(msg)
        if len(asked) == len(bodies):  # all asked: answered last first
            for each in reversed(asked):
                await each.respond(b"re:" + each.data)

    await nc.subscribe("echo", cb=echo_backwards)
    requests = requests_of(nc)
    assert requests_of(nc) is requests, "one per connection"
    answers = await asyncio.gather(*(requests.request("echo", body, timeout=5.0) for body in bodies))
    assert [a.data for a in answers] == [b"re:" + body for body in bodies]


async def test_a_request_nothing_listens_to_and_one_never_answered(nc: Client) -> None:
    requests = requests_of(nc)
    with pytest.raises(NoRespondersError):
        await requests.request("nobody.listens", b"", timeout=5.0)
    await nc.subscribe("silent", cb=_ignore)
    # The outer bound only keeps a broken timeout from hanging the test.
    with pytest.raises(NatsTimeoutError):
        await asyncio.wait_for(requests.request("silent", b"", timeout=0.2), 10)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(NatsTimeoutError):
        await asyncio.wait_for(requests.collect("silent", b"", lambda _: False, done, timeout=0.2), 10)


async def test_a_many_message_answer_is_collected_until_its_last(nc: Client) -> None:
    async def three(msg: Msg) -> None:
        for part in (b"1", b"2", b"end"):
            await nc.publish(msg.reply, part)

    await nc.subscribe("three", cb=three)
    got: list[bytes] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def collect(msg: Msg) -> bool:
        got.append(msg.data)
        if msg.data == b"end":
            done.set_result(None)
            return True
        return False

    await requests_of(nc).collect("three", b"", collect, done, timeout=5.0)
    assert got == [b"1", b"2", b"end"]


async def test_a_jetstream_publish_is_acknowledged_or_refused_as_nats_py_does(nc: Client) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="REQ", subjects=["req.>"]))
    requests = requests_of(nc)
    first = await requests.publish("req.a", b"1", headers={"Nats-Msg-Id": "m1"}, timeout=5.0)
    again = await requests.publish("req.a", b"1", headers={"Nats-Msg-Id": "m1"}, timeout=5.0)
    assert (first.seq, first.duplicate) == (1, False)
    assert (again.seq, again.duplicate) == (1, True)
    with pytest.raises(BadRequestError) as refused:
        await requests.publish("req.a", b"2", headers={"Nats-Expected-Last-Subject-Sequence": "7"}, timeout=5.0)
    assert refused.value.err_code == 10071
    with pytest.raises(NoStreamResponseError):
        await requests.publish("no.stream.here", b"", timeout=5.0)


def test_kv_keys_follow_nats_py_s_rule() -> None:
    assert valid_key("0b9c1f7e-5a43-4c2e-9a61-3f0d2b8e7c11.5d2e")
    assert not valid_key("")
    assert not valid_key(".a")
    assert not valid_key("a.")
    assert not valid_key("a b")
    assert not valid_key("a.*")


async def _ignore(_: Msg) -> None:
    """Takes a request and never answers."""
