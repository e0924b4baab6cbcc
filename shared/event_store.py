"""The chat-keyed event log on `SANDBOX_EVENTS`: read a chat's last event, append with
optimistic concurrency, read a chat's history.

Only events that decode and belong to their subject's chat are ever returned. A chat whose
last message is poison (it does not decode, or its `chat_id` / `session.chat_id` names
another chat) reads as its last *valid* event at the subject's real last sequence: the
state is the last one sandboxd can trust, and appends still name the true sequence."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from shared.contracts import AnyEvent, SessionRecord, decode_event, encode
from shared.errors import AppendConflict, NatsUnavailable
from shared.poison import DECODE_ERRORS, PoisonSource, Quarantine
from shared.subjects import (
    EVENT_TYPE_HEADER,
    EVENTS_STREAM,
    EXPECTED_LAST_SUBJECT_SEQ_HEADER,
    MSG_ID_HEADER,
    event_subject,
)
from shared.telemetry import inject

log = logging.getLogger(__name__)

# 10071: wrong last subject sequence; 10164: wrong last sequence (constant form).
CONFLICT_CODES = frozenset({10071, 10164})
_UNAVAILABLE = (
    NatsTimeoutError,
    NoRespondersError,
    # A JetStream publish that found no responder: the stream's leader is being elected
    # (a clustered server went) or its server is down.
    NoStreamResponseError,
    ServiceUnavailableError,
    ConnectionClosedError,
    ConnectionReconnectingError,
    OutboundBufferLimitError,
    asyncio.TimeoutError,
)
T = TypeVar("T")
_FALLBACKS_KEPT = 1024


@dataclass(frozen=True, slots=True)
class ChatState:
    """The chat's last event and its stream sequence (0 and None when it has none)."""

    seq: int
    last: AnyEvent | None

    @property
    def session(self) -> SessionRecord | None:
        return self.last.session if self.last is not None else None


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event: AnyEvent


async def with_nats_retry(call: Callable[[], Awaitable[T]], *, attempts: int = 4, what: str = "nats") -> T:
    """Retry a request across a leader election or a reconnect; NatsUnavailable after that."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return await call()
        except _UNAVAILABLE as exc:
            if attempt == attempts - 1:
                raise NatsUnavailable(f"{what}: NATS did not answer ({type(exc).__name__})") from exc
            await asyncio.sleep(delay)
            delay *= 3
    raise AssertionError("unreachable")  # pragma: no cover


class EventLog(Protocol):
    """What the command handlers need of the event log (EventStore; fakes in unit tests)."""

    async def read(self, chat_id: str) -> ChatState: ...

    async def append(self, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended: ...

    async def append_to(self, subject: str, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended: ...

    async def history(self, chat_id: str, *, limit: int | None = None) -> list[StoredEvent]: ...


def check_event(chat_id: str, data: bytes) -> AnyEvent | str:
    """The event stored on `chat_id`'s subject, or why it cannot be trusted."""
    try:
        event = decode_event(data)
    except DECODE_ERRORS as exc:
        return f"does not decode: {exc}"
    if event.chat_id != chat_id:
        return f"its chat_id {event.chat_id!r} is not its subject's chat"
    if event.session is not None and event.session.chat_id != chat_id:
        return f"its session's chat_id {event.session.chat_id!r} is not its subject's chat"
    return event


class EventStore:
    def __init__(self, js: JetStreamContext, stream: str = EVENTS_STREAM, quarantine: Quarantine | None = None) -> None:
        self._js = js
        self._stream = stream
        self._quarantine = quarantine or Quarantine()
        # chat -> (sequence of its poisoned last message, the last valid event before it)
        self._fallbacks: OrderedDict[str, tuple[int, AnyEvent | None]] = OrderedDict()

    async def _last(self, subject: str, *, leader: bool = False) -> tuple[int, bytes] | None:
        """The subject's last message (sequence, data), or None when it has none. `leader`
        asks the stream leader rather than any replica (direct get may answer from one that
        lags a little)."""

        async def get() -> tuple[int, bytes] | None:
            try:
                raw = await self._js.get_last_msg(self._stream, subject, direct=not leader)
            except NotFoundError:
                return None
            return raw.seq or 0, raw.data or b""

        return await with_nats_retry(get, what=f"read {subject}")

    async def read(self, chat_id: str, *, leader: bool = False) -> ChatState:
        subject = event_subject(chat_id)
        last = await self._last(subject, leader=leader)
        if last is None:
            return ChatState(0, None)
        seq, data = last
        checked = check_event(chat_id, data)
        if not isinstance(checked, str):
            return ChatState(seq, checked)
        self._quarantine.report(PoisonSource.EVENT, subject, seq, checked)
        return ChatState(seq, await self._last_valid(chat_id, seq))

    async def _last_valid(self, chat_id: str, poisoned_seq: int) -> AnyEvent | None:
        cached = self._fallbacks.get(chat_id)
        if cached is not None and cached[0] == poisoned_seq:
            return cached[1]
        valid = [s.event for s in await self.history(chat_id) if s.seq < poisoned_seq]
        fallback = valid[-1] if valid else None
        self._fallbacks[chat_id] = (poisoned_seq, fallback)
        if len(self._fallbacks) > _FALLBACKS_KEPT:
            self._fallbacks.popitem(last=False)
        return fallback

    async def append(self, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended:
        """Append to the event's chat subject; AppendConflict when `expected_seq` is not the
        subject's last sequence any more. `expected_seq=None` appends unconditionally."""
        return await self.append_to(event_subject(event.chat_id), event, expected_seq=expected_seq, msg_id=msg_id)

    async def append_to(self, subject: str, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended:
        headers = inject({MSG_ID_HEADER: msg_id, EVENT_TYPE_HEADER: event.type})
        if expected_seq is not None:
            headers[EXPECTED_LAST_SUBJECT_SEQ_HEADER] = str(expected_seq)
        payload = encode(event)

        async def publish() -> Appended:
            try:
                ack = await self._js.publish(subject, payload, stream=self._stream, headers=headers)
            except APIError as exc:
                if exc.err_code in CONFLICT_CODES:
                    raise AppendConflict(f"{subject}: last sequence is not {expected_seq}") from exc
                raise
            return Appended(ack.seq, bool(ack.duplicate))

        return await with_nats_retry(publish, what=f"append to {subject}")

    async def history(self, chat_id: str, *, limit: int | None = None) -> list[StoredEvent]:
        """The chat's valid events in order (the last `limit` of them when given); poison is
        quarantined and skipped."""
        subject = event_subject(chat_id)
        last = await self._last(subject)
        if last is None:
            return []
        end = last[0]
        out: list[StoredEvent] = []
        try:
            sub = await self._js.subscribe(
                subject, stream=self._stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
            )
            try:
                while True:
                    msg = await sub.next_msg(timeout=5.0)
                    seq = msg.metadata.sequence.stream
                    checked = check_event(chat_id, msg.data)
                    if isinstance(checked, str):
                        self._quarantine.report(PoisonSource.EVENT, subject, seq, checked)
                    else:
                        out.append(StoredEvent(seq, checked))
                    if seq >= end or msg.metadata.num_pending == 0:
                        break
            finally:
                await sub.unsubscribe()
        except _UNAVAILABLE as exc:
            raise NatsUnavailable(f"history of {subject}: NATS did not answer ({type(exc).__name__})") from exc
        return out[-limit:] if limit else out
