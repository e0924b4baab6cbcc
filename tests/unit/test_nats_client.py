"""Our client parses and sends message headers as nats-py does, for any headers."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from shared.nats_client import Client

# Bytes that matter to the parser: separators, every kind of whitespace (ASCII and the
# \x1c-\x1f that str.isspace also counts), non-ASCII and invalid UTF-8, and letters.
_PIECES = st.sampled_from(
    [
        b":",
        b" ",
        b"\t",
        b"\x0b",
        b"\x0c",
        b"\x1c",
        b"\x1f",
        b"\r",
        b"\n",
        b"\r\n",
        b"\xc3\xa9",
        b"\xff",
        b"a",
        b"Z",
        b"-",
    ]
)
_LINE = st.lists(st.one_of(_PIECES, st.binary(max_size=4)), max_size=12).map(b"".join)


@settings(max_examples=2000)
@given(st.lists(_LINE, max_size=8))
def test_the_same_headers_as_nats_py(lines: list[bytes]) -> None:
    raw = b"\r\n".join(lines)
    assert Client._parse_header_lines(raw) == NatsClient._parse_header_lines(raw)


def test_a_direct_get_answer_and_a_status_line() -> None:
    raw = (
        b"NATS/1.0\r\nNats-Stream: SANDBOX_EVENTS\r\nNats-Subject: sandbox.events.c\r\nNats-Sequence: 12\r\n"
        b"Bad Name: x\r\n: empty\r\nno-colon\r\nName:\tvalue \r\n\r\n"
    )

    async def both() -> tuple[object, object]:
        ours, theirs = Client(), NatsClient()
        return await ours._process_headers(raw), await theirs._process_headers(raw)

    ours, theirs = asyncio.run(both())
    assert ours == theirs
    assert ours == {
        "Nats-Stream": "SANDBOX_EVENTS",
        "Nats-Subject": "sandbox.events.c",
        "Nats-Sequence": "12",
        "": "empty",
        "Name": "value",
    }


async def _sent(send: Any, headers: dict[str, Any] | None, subject: str = "s.x", reply: str = "_INBOX.r.1") -> object:
    """What a publish puts on the wire (or the error it raises), through `send`."""
    client = Client()
    wire: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        wire.append(cmd)

    client._send_command = capture  # type: ignore[method-assign]
    try:
        await send(client, subject, reply, b'{"a":1}', 7, headers)
    except Exception as exc:  # noqa: BLE001 - the error is the result compared
        return type(exc)
    return wire, client.stats["out_msgs"], client.stats["out_bytes"]


_NAMES = st.one_of(
    st.sampled_from(["Nats-Msg-Id", "traceparent", " Sandbox-Event ", "", " ", "Bad Name", "a:b", "é"]),
    st.text(max_size=6),
)
_VALUES = st.one_of(st.sampled_from(["1", " v ", "a\r\nPUB x 1", "é", ""]), st.text(max_size=8))


@settings(max_examples=1000)
@given(st.dictionaries(_NAMES, _VALUES, max_size=5))
def test_a_publish_with_headers_sends_the_bytes_nats_py_sends(headers: dict[str, str]) -> None:
    async def both() -> tuple[object, object]:
        return await _sent(Client._send_publish, headers), await _sent(NatsClient._send_publish, headers)

    ours, theirs = asyncio.run(both())
    assert ours == theirs


def test_a_publish_without_headers_or_subject_is_nats_py_s_own() -> None:
    async def both(headers: dict[str, str] | None, subject: str) -> tuple[object, object]:
        return (
            await _sent(Client._send_publish, headers, subject),
            await _sent(NatsClient._send_publish, headers, subject),
        )

    for headers, subject in ((None, "s.x"), ({"a": "b"}, "")):
        ours, theirs = asyncio.run(both(headers, subject))
        assert ours == theirs
