"""Reading the registry and the event stream for the operator commands, without holding
more than they must: an ordered consumer with a callback (nats-py's `async for` is slow), the
end of the current state told by the consumer's pending count, records handed over one at a
time. `sandboxctl ls` over 100,000 sessions streams them; `top` keeps three fields of each."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.contracts import SessionRecord
from shared.registry import check_record
from shared.subjects import SESSIONS_BUCKET

_KV_STREAM = f"KV_{SESSIONS_BUCKET}"
_KV_PREFIX = f"$KV.{SESSIONS_BUCKET}."
_KV_OPERATION = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"
_HEARTBEAT_SECONDS = 1.0
_PENDING_LIMIT = 1_000_000

OnEntry = Callable[[str, SessionRecord | None], None]
OnMessage = Callable[[Msg], None]


@dataclass
class Subscription:
    """An ordered consumer and when it has delivered everything that was there when it began."""

    caught_up: asyncio.Event = field(default_factory=asyncio.Event)
    sub: object | None = None

    async def stop(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]


async def follow(
    js: JetStreamContext,
    stream: str,
    subject: str,
    on_message: OnMessage,
    *,
    deliver: DeliverPolicy,
    config: ConsumerConfig | None = None,
) -> Subscription:
    """An ordered consumer on `subject` of `stream`; `caught_up` is set once it delivered
    what was pending when it was made (at once when that was nothing)."""
    following = Subscription()

    async def on_msg(msg: Msg) -> None:
        on_message(msg)
        if msg.metadata.num_pending == 0:
            following.caught_up.set()

    sub = await js.subscribe(
        subject,
        stream=stream,
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=deliver,
        config=config,
        idle_heartbeat=_HEARTBEAT_SECONDS,
        pending_msgs_limit=_PENDING_LIMIT,
    )
    following.sub = sub
    try:
        info = await sub.consumer_info()
    except BaseException:
        await following.stop()
        raise
    if info.num_pending == 0 and not (info.delivered and info.delivered.stream_seq):
        following.caught_up.set()
    return following


def _registry_entry(msg: Msg) -> tuple[str, SessionRecord | None]:
    """The key and its record; None when deleted, expired or not a record to trust."""
    key = msg.subject.removeprefix(_KV_PREFIX)
    headers = msg.headers or {}
    if headers.get(_KV_OPERATION) in ("DEL", "PURGE") or _MARKER_REASON in headers or not msg.data:
        return key, None
    checked = check_record(key, msg.data)
    return key, None if isinstance(checked, str) else checked


async def follow_registry(js: JetStreamContext, on_entry: OnEntry) -> Subscription:
    """Every key's current record, then every change (None: the key is gone)."""

    def on_message(msg: Msg) -> None:
        on_entry(*_registry_entry(msg))

    return await follow(js, _KV_STREAM, f"{_KV_PREFIX}>", on_message, deliver=DeliverPolicy.LAST_PER_SUBJECT)


async def scan_registry(js: JetStreamContext, on_record: Callable[[SessionRecord], None], *, timeout: float) -> None:
    """Hand over every live record once (TimeoutError when the scan does not finish)."""

    def on_entry(_: str, record: SessionRecord | None) -> None:
        if record is not None:
            on_record(record)

    following = await follow_registry(js, on_entry)
    try:
        await asyncio.wait_for(following.caught_up.wait(), timeout)
    finally:
        await following.stop()


@dataclass(frozen=True, slots=True)
class Brief:
    """What `top` keeps of a session."""

    node_id: str
    status: str
    expires_at: datetime


@dataclass
class LiveRegistry:
    """The registry as it changes, three fields per chat."""

    sessions: dict[str, Brief] = field(default_factory=dict)

    def apply(self, key: str, record: SessionRecord | None) -> None:
        if record is None:
            self.sessions.pop(key, None)
        else:
            self.sessions[key] = Brief(record.node_id, str(record.status), record.expires_at)
