"""nats-py's client, with a faster parser of message headers (the same result) and
subscriptions whose messages a handler takes right in the read loop.

A busy runtime receives several messages with headers per command (the command, each direct
get's answer carries ~9); nats-py parses each header line with a per-character generator to
refuse a name with whitespace in it, ~23 µs for a direct get's headers, about a tenth of a
runtime's CPU under load. `Client._parse_header_lines` here gives the same dictionary for
every input (tests/unit/test_nats_client.py compares the two on generated input) in a
fraction of the time: `key.split() != [key]` is "some character of `key` is whitespace"
(`str.split` splits on exactly the characters `str.isspace` names); a block that is all
ASCII (nearly every one) is decoded once rather than twice per line, and a name seen before
is not checked again: ~3.3 µs for a direct get's headers.

A publish with headers builds its header block as one string (nats-py extends a bytearray
piece by piece and checks each name against a regex every time; here a name is checked once
per process), the same bytes (tests/unit/test_nats_client.py compares them).

A subscription made with `subscribe_handler` has no queue and no task: nats-py puts each
message of a subscription with a callback on an asyncio queue, and a task of the
subscription awaits the callback for it, a queue round and a task switch per message. The
runtime's answers all come on one such subscription (nats_requests.py), several per command.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from nats import errors
from nats.aio.client import _HEADER_KEY_RE, _HEADER_VALUE_NEWLINES
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

_CRLF = b"\r\n"
# Header names as they came, and as a key (a process sees a handful of names).
_NAMES_SEEN: dict[str, str] = {}
_NAMES_SEEN_KEPT = 1024
# What bytes.strip() strips (str.strip() also strips \x1c-\x1f, which it must not here).
_BYTES_WHITESPACE = " \t\n\r\x0b\x0c"

# Takes a message in the read loop: quick, never awaiting (what it raises is logged).
Handler = Callable[[Msg], None]

_CHECKED_NAMES: set[str] = set()  # header names found valid (a process uses a handful)
_CHECKED_NAMES_KEPT = 1024


def header_block(headers: dict[str, Any]) -> bytes:
    """The header block nats-py sends for `headers`: names stripped (empty ones skipped,
    invalid ones refused with BadHeaderError), values stripped with CR and LF made spaces."""
    lines = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        key = name.strip()
        if not key:
            continue
        if key not in _CHECKED_NAMES:
            if not _HEADER_KEY_RE.fullmatch(key):
                raise errors.BadHeaderError(key)
            if len(_CHECKED_NAMES) < _CHECKED_NAMES_KEPT:
                _CHECKED_NAMES.add(key)
        lines.append(f"{key}: {value.strip().translate(_HEADER_VALUE_NEWLINES)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


async def subscribe_taking(nc: NatsClient, subject: str, handler: Handler) -> Subscription:
    """Subscribe with `handler` taking each message: in the read loop on our client, through
    nats-py's callback (its queue and task) on any other."""
    if isinstance(nc, Client):
        return await nc.subscribe_handler(subject, handler)

    async def callback(msg: Msg) -> None:
        handler(msg)

    return await nc.subscribe(subject, cb=callback, pending_msgs_limit=-1)


class Client(NatsClient):
    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[int, Handler] = {}

    async def subscribe_handler(self, subject: str, handler: Handler) -> Subscription:
        """Subscribe with `handler` taking each message in the read loop, in order."""
        sub = await self.subscribe(subject)  # no callback: nats-py starts no task for it
        self._handlers[sub._id] = handler  # noqa: SLF001 - the sid: nats-py has no public accessor
        return sub

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, Any] | None
    ) -> None:
        if headers is None or not subject:  # nats-py's own (it refuses an empty subject)
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        block = header_block(headers)
        line = f"HPUB {subject} {reply} {len(block)} {len(block) + len(payload)}\r\n".encode()
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(line + block + payload + _CRLF)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._handlers.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        handler = self._handlers.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        msg = self._build_message(sid, subject, reply, data, await self._process_headers(headers))
        try:
            handler(msg)
        except Exception:  # a handler's bug must not end the connection (the read loop's error)
            log.exception("handling a message on %s failed", msg.subject)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        try:
            text = raw.decode("ascii")  # nearly always: then one decode, not two per line
        except UnicodeDecodeError:
            return Client._parse_byte_lines(raw)
        out: dict[str, str] = {}
        for line in text.split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep:
                continue
            key = _NAMES_SEEN.get(name)
            if key is None:
                key = name.strip(_BYTES_WHITESPACE)
                if key and key.split() != [key]:
                    continue
                if len(_NAMES_SEEN) < _NAMES_SEEN_KEPT:
                    _NAMES_SEEN[name] = key
            out[key] = value.strip(_BYTES_WHITESPACE)
        return out

    @staticmethod
    def _parse_byte_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(_CRLF):
            name, sep, value = line.partition(b":")
            if not sep:
                continue  # also an empty line
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue  # a name that is not ASCII: skipped, as nats-py does
            if key and key.split() != [key]:
                continue  # whitespace inside a name: not a header
            out[key] = value.strip().decode("utf-8", "replace")
        return out
