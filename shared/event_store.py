"""The chat-keyed event log on `SANDBOX_EVENTS`: read a chat's last event, append with
optimistic concurrency, read a chat's history.

Only events that decode and belong to their subject's chat are ever returned. A chat whose
last message is poison (it does not decode, or its `chat_id` / `session.chat_id` names
another chat) reads as its last *valid* event at the subject's real last sequence: the
state is the last one sandboxd can trust, and appends still name the true sequence."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from shared.contracts import AnyEvent, SessionRecord, decode_event, encode
from shared.errors import AppendConflict, NatsUnavailable
from shared.nats_requests import requests_of
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
# Messages per batched direct get of a chat's history (more are read in further batches).
HISTORY_BATCH = 1000
_END_OF_BATCH = ("204", "404")  # EOB; nothing matched
_HISTORY_CATCH_UP_TRIES = 7  # 10 ms doubling: about 1.3 s in all
# Subjects per `multi_last` direct get: the server answers at most 1024 messages to one.
MULTI_LAST_MAX = 1024


@dataclass(frozen=True, slots=True)
class ChatState:
    """The chat's last event and its stream sequence (0 and None when it has none).
    `poisoned`: the subject's last message is poison, `last` is the last valid event before it."""

    seq: int
    last: AnyEvent | None
    poisoned: bool = False

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


def connection_of(js: JetStreamContext) -> Client:
    """The connection under a JetStream context (nats-py keeps it private)."""
    nc: Client = js._nc  # noqa: SLF001 - no public accessor; raw requests (batched direct gets) need it
    return nc


def timeout_of(js: JetStreamContext) -> float:
    """The JetStream context's request timeout (nats-py keeps it private)."""
    timeout: float = js._timeout  # noqa: SLF001 - no public accessor; our own requests honour it
    return timeout


async def direct_batch(nc: Client, stream: str, request: dict[str, object], timeout: float) -> list[Msg]:
    """The messages a batched direct get answers (nats-server 2.11+: `batch` with `seq` and
    `next_by_subj`, or `multi_last`). Any replica answers and no consumer is made, so a
    clustered server that is down costs nothing. NatsTimeoutError when the whole answer did
    not come within `timeout`, NatsUnavailable on an error status.

    The answer is gathered as it comes (on the connection's one reply subscription, see
    nats_requests.py) and awaited once: a read of a thousand messages costs one wait on the
    event loop, not one per message (which, on a busy loop, is one turn of every other task
    each)."""
    found: list[Msg] = []
    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_msg(msg: Msg) -> bool:
        if answered.done():
            return True
        headers = msg.headers or {}
        status = headers.get(Header.STATUS.value)
        if status in _END_OF_BATCH:
            answered.set_result(None)
        elif status is not None:
            description = headers.get("Description", "")
            answered.set_exception(NatsUnavailable(f"direct get on {stream} answered {status} {description}"))
        else:
            found.append(msg)
            return False
        return True

    subject = f"$JS.API.DIRECT.GET.{stream}"
    await requests_of(nc).collect(subject, json.dumps(request).encode(), on_msg, answered, timeout)
    return found


def stream_seq(msg: Msg) -> int:
    """A direct get's message's stream sequence."""
    return int((msg.headers or {}).get("Nats-Sequence", "0"))


async def last_of_subjects(
    nc: Client, stream: str, subjects: list[str], timeout: float, *, retry: bool = True
) -> dict[str, Msg]:
    """The last message of each subject that has one, by subject: `multi_last` direct gets
    of up to MULTI_LAST_MAX subjects each, one round trip per chunk. Retried like any read
    across a leader election (unless `retry` is False: the caller retries); NatsUnavailable
    after that."""
    found: dict[str, Msg] = {}
    for start in range(0, len(subjects), MULTI_LAST_MAX):
        chunk = subjects[start : start + MULTI_LAST_MAX]
        request: dict[str, object] = {"multi_last": chunk, "batch": len(chunk)}
        read = functools.partial(direct_batch, nc, stream, request, timeout)
        msgs = await (with_nats_retry(read, what=f"last of {len(chunk)} subjects") if retry else read())
        for msg in msgs:
            subject = (msg.headers or {}).get("Nats-Subject")
            if subject is not None:
                found[subject] = msg
    return found


class LastMessages:
    """Direct gets of subjects' last messages in one stream, coalesced: the reads asked for
    in the same turn of the event loop go out together, as one `multi_last` batched direct
    get (one plain direct get when there is only one). Under load — hundreds of commands in
    flight, each reading its chat — that is one round trip for all of them instead of one
    each; alone, a read waits one turn of the loop. Any replica answers, as with any direct
    get; NatsTimeoutError or NatsUnavailable reach every read of a failed batch."""

    def __init__(self, js: JetStreamContext, stream: str, timeout: float = 5.0) -> None:
        self._js = js
        self._stream = stream
        self._timeout = timeout
        self._waiting: dict[str, list[asyncio.Future[Msg | None]]] = {}
        self._flushes: set[asyncio.Task[None]] = set()

    async def last(self, subject: str) -> Msg | None:
        """The subject's last message (its headers carry `Nats-Sequence`), None when it has none."""
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._flush)
        answer: asyncio.Future[Msg | None] = loop.create_future()
        self._waiting.setdefault(subject, []).append(answer)
        return await answer

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, {}
        task = asyncio.get_running_loop().create_task(self._answer(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _answer(self, batch: dict[str, list[asyncio.Future[Msg | None]]]) -> None:
        try:
            lasts = await self._read(list(batch))
        except Exception as exc:  # noqa: BLE001 - every read of the batch gets the error
            for answers in batch.values():
                for answer in answers:
                    if not answer.done():
                        answer.set_exception(exc)
            return
        for subject, answers in batch.items():
            for answer in answers:
                if not answer.done():
                    answer.set_result(lasts.get(subject))

    async def _read(self, subjects: list[str]) -> dict[str, Msg]:
        nc = connection_of(self._js)
        if len(subjects) > 1:
            return await last_of_subjects(nc, self._stream, subjects, self._timeout, retry=False)
        request = json.dumps({"last_by_subj": subjects[0]}).encode()
        msg = await requests_of(nc).request(f"$JS.API.DIRECT.GET.{self._stream}", request, timeout=self._timeout)
        headers = msg.headers or {}
        status = headers.get(Header.STATUS.value)
        if status == "404":
            return {}
        if status is not None:
            raise NatsUnavailable(f"direct get on {self._stream} answered {status} {headers.get('Description', '')}")
        return {subjects[0]: msg}


class EventLog(Protocol):
    """What the command handlers need of the event log (EventStore; fakes in unit tests)."""

    async def read(self, chat_id: str) -> ChatState: ...

    async def append(self, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended: ...

    async def append_to(self, subject: str, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended: ...

    async def history(
        self, chat_id: str, *, limit: int | None = None, through: int | None = None
    ) -> list[StoredEvent]: ...


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


class CheckedEvents:
    """`check_event` with the last `size` results kept, by chat and exact bytes: the same
    bytes on the same chat always check the same, and events are immutable, so a result is
    shared. A runtime reads back what it appended (the next command's read, the projector's)
    and reads a chat's last event more than once; each saves a decode (~5-8 µs). Appends
    put their own event in (`prime`)."""

    def __init__(self, size: int = 2048) -> None:
        self._size = size
        self._kept: OrderedDict[tuple[str, bytes], AnyEvent | str] = OrderedDict()

    def check(self, chat_id: str, data: bytes) -> AnyEvent | str:
        key = (chat_id, data)
        found = self._kept.get(key)
        if found is not None:
            self._kept.move_to_end(key)
            return found
        checked = check_event(chat_id, data)
        self._keep(key, checked)
        return checked

    def prime(self, event: AnyEvent, data: bytes) -> None:
        """`event` is what `data` (its encoding) checks as on its own chat (an event whose
        session names another chat is poison there: not kept)."""
        if event.session is None or event.session.chat_id == event.chat_id:
            self._keep((event.chat_id, data), event)

    def _keep(self, key: tuple[str, bytes], checked: AnyEvent | str) -> None:
        self._kept[key] = checked
        if len(self._kept) > self._size:
            self._kept.popitem(last=False)


class EventStore:
    def __init__(
        self,
        js: JetStreamContext,
        stream: str = EVENTS_STREAM,
        quarantine: Quarantine | None = None,
        *,
        timeout: float = 5.0,
    ) -> None:
        self._js = js
        self._timeout = timeout  # of one batch of a history read
        self._stream = stream
        self._lasts = LastMessages(js, stream, timeout)
        self._quarantine = quarantine or Quarantine()
        # chat -> (sequence of its poisoned last message, the last valid event before it)
        self._fallbacks: OrderedDict[str, tuple[int, AnyEvent | None]] = OrderedDict()
        self._checked = CheckedEvents()

    async def _last(self, subject: str, *, leader: bool = False) -> tuple[int, bytes] | None:
        """The subject's last message (sequence, data), or None when it has none. `leader`
        asks the stream leader rather than any replica (direct get may answer from one that
        lags a little)."""

        async def get() -> tuple[int, bytes] | None:
            if not leader:
                msg = await self._lasts.last(subject)
                return None if msg is None else (stream_seq(msg), msg.data or b"")
            try:
                raw = await self._js.get_last_msg(self._stream, subject, direct=False)
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
        checked = self._checked.check(chat_id, data)
        if not isinstance(checked, str):
            return ChatState(seq, checked)
        self._quarantine.report(PoisonSource.EVENT, subject, seq, checked)
        return ChatState(seq, await self._last_valid(chat_id, seq), poisoned=True)

    async def read_many(self, chat_ids: list[str]) -> dict[str, ChatState]:
        """`read` for many chats at once: one batched direct get per MULTI_LAST_MAX chats
        (any replica answers, as for `read`). A chat whose last message is poison is read on
        its own (its last valid event is looked for in its history)."""
        subjects = {event_subject(chat): chat for chat in chat_ids}
        lasts = await last_of_subjects(connection_of(self._js), self._stream, list(subjects), self._timeout)
        states: dict[str, ChatState] = {}
        for subject, chat in subjects.items():
            msg = lasts.get(subject)
            if msg is None:
                states[chat] = ChatState(0, None)
                continue
            checked = self._checked.check(chat, msg.data)
            if isinstance(checked, str):
                states[chat] = await self.read(chat)  # poison: quarantined there, its fallback found
            else:
                states[chat] = ChatState(stream_seq(msg), checked)
        return states

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
        headers[Header.EXPECTED_STREAM.value] = self._stream
        payload = encode(event)
        if subject == event_subject(event.chat_id):
            self._checked.prime(event, payload)
        requests = requests_of(connection_of(self._js))
        timeout = timeout_of(self._js)

        async def publish() -> Appended:
            try:
                ack = await requests.publish(subject, payload, headers=headers, timeout=timeout)
            except APIError as exc:
                if exc.err_code in CONFLICT_CODES:
                    raise AppendConflict(f"{subject}: last sequence is not {expected_seq}") from exc
                raise
            return Appended(ack.seq, ack.duplicate)

        return await with_nats_retry(publish, what=f"append to {subject}")

    async def history(self, chat_id: str, *, limit: int | None = None, through: int | None = None) -> list[StoredEvent]:
        """The chat's valid events in order (the last `limit` of them when given); poison is
        quarantined and skipped. Batched direct gets: no consumer, any replica answers. A
        replica may lag a little: `through` (a sequence already read from the chat, say its
        state's) is waited for, so a history is never older than what it is read beside;
        NatsUnavailable if no replica has it within a second."""
        for attempt in range(_HISTORY_CATCH_UP_TRIES):
            history, last = await self._history(chat_id)
            if through is None or last >= through:
                return history[-limit:] if limit else history
            await asyncio.sleep(0.01 * 2**attempt)
        raise NatsUnavailable(f"history of chat {chat_id}: no replica has reached sequence {through}")

    async def _history(self, chat_id: str) -> tuple[list[StoredEvent], int]:
        """The valid events, and the last sequence read (poison included; 0: none)."""
        subject = event_subject(chat_id)
        nc = connection_of(self._js)
        out: list[StoredEvent] = []
        start = 1
        last = 0
        while True:
            msgs = await with_nats_retry(
                functools.partial(
                    direct_batch,
                    nc,
                    self._stream,
                    {"seq": start, "next_by_subj": subject, "batch": HISTORY_BATCH},
                    self._timeout,
                ),
                what=f"history of {subject}",
            )
            for msg in msgs:
                seq = stream_seq(msg)
                checked = check_event(chat_id, msg.data)
                if isinstance(checked, str):
                    self._quarantine.report(PoisonSource.EVENT, subject, seq, checked)
                else:
                    out.append(StoredEvent(seq, checked))
                last, start = seq, seq + 1
            if not msgs or int((msgs[-1].headers or {}).get("Nats-Num-Pending", "0")) == 0:
                return out, last
