"""Our client's header parser gives what nats-py's gives, for any header block."""

from __future__ import annotations

import asyncio

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
