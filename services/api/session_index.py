"""The API's in-memory index of the session registry, for `GET /sandboxes`.

`SessionIndex` holds every live record of `sandbox_sessions` ordered by chat id, with
postings (chat ids, also ordered) per status and per label, so a page is a binary search
into the shortest matching list and a walk of at most that list; nothing reads the bucket
per request. `RegistryFollower` keeps it current: an ordered consumer on the bucket's stream
from the first sequence on (the bucket keeps one revision per key, so that is its current
state), then every change. After a reconnect it resumes from the last sequence it applied.

Consistency: the list is as fresh as the follower. It answers only while the follower has
caught up since the connection was last (re)established; until then `require_fresh` raises
`IndexNotReady` (HTTP 503), so a list never silently omits sessions it has not seen yet.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.contracts import SessionRecord, SessionStatus
from shared.poison import PoisonSource, Quarantine
from shared.registry import check_record
from shared.subjects import SESSIONS_BUCKET, canonical_chat_id
from shared.telemetry import elapsed_ms

log = logging.getLogger(__name__)

_Posting = TypeVar("_Posting", SessionStatus, tuple[str, str])

LIST_DEFAULT_LIMIT = 100
LIST_MAX_LIMIT = 1000
LIST_MAX_LABEL_FILTERS = 32  # a record holds at most 32 labels
_CURSOR_PREFIX = "c1:"

_HEARTBEAT_SECONDS = 1.0
_RESUBSCRIBE_FIRST_DELAY = 0.05
_RESUBSCRIBE_MAX_DELAY = 1.0
_KV_OPERATION = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"  # nats-server 2.11+: expiry / purge markers


# --------------------------------------------------------------------------- queries


class InvalidListQuery(ValueError):
    """A list parameter that cannot be read (HTTP 400); the message says which and why."""


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """What a list asks for: every label must match, and the status if given."""

    status: SessionStatus | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, record: SessionRecord) -> bool:
        if self.status is not None and record.status != self.status:
            return False
        return all(record.labels.get(key) == value for key, value in self.labels)


def parse_label_filter(raw: str) -> tuple[str, str]:
    """`key:value` (the value may be empty and may hold `:`) as a (key, value) pair."""
    key, colon, value = raw.partition(":")
    if not colon or not key:
        raise InvalidListQuery(f"label must be written key:value, not {raw[:80]!r}")
    return key, value


def encode_cursor(chat_id: str) -> str:
    """Opaque to clients: where the next page starts (after this chat id)."""
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + chat_id).encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> str:
    """The chat id a cursor from `encode_cursor` names; InvalidListQuery for anything else."""
    refused = InvalidListQuery(f"cursor {raw[:80]!r} is not one this API returned (pass next_cursor as given)")
    if len(raw) > 128:  # noqa: PLR2004 - a real cursor is 52 characters
        raise refused
    try:
        text = base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):
        raise refused from None
    if not text.startswith(_CURSOR_PREFIX):
        raise refused
    chat_id = text.removeprefix(_CURSOR_PREFIX)
    try:
        if canonical_chat_id(chat_id) != chat_id:
            raise refused
    except ValueError:
        raise refused from None
    return chat_id


@dataclass(frozen=True, slots=True)
class SessionPage:
    records: list[SessionRecord]
    next_cursor: str | None  # None: nothing matches after this page


# --------------------------------------------------------------------------- the index


def _remove_sorted(keys: list[str], key: str) -> None:
    at = bisect_left(keys, key)
    if at < len(keys) and keys[at] == key:
        del keys[at]


def _unpost(postings: dict[_Posting, list[str]], posting: _Posting, key: str) -> None:
    keys = postings.get(posting)
    if keys is None:
        return
    _remove_sorted(keys, key)
    if not keys:
        del postings[posting]


@dataclass
class SessionIndex:
    """Every live record by chat id, with ordered postings by status and by label.

    The ordered lists are built lazily: while a bulk load runs (`put` without a page in
    between) they are dropped and rebuilt by one sort on the next `page`/`build`, instead of
    100k sorted inserts."""

    _records: dict[str, SessionRecord] = field(default_factory=dict)
    _order: list[str] | None = None
    _by_status: dict[SessionStatus, list[str]] = field(default_factory=dict)
    _by_label: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._records)

    def count_by_status(self) -> dict[str, int]:
        """How many records have each status (an in-memory pass, ~10 ms per 100k)."""
        counts: dict[str, int] = {}
        for record in self._records.values():
            counts[record.status] = counts.get(record.status, 0) + 1
        return counts

    def get(self, chat_id: str) -> SessionRecord | None:
        return self._records.get(chat_id)

    def put(self, record: SessionRecord) -> None:
        key = record.chat_id
        old = self._records.get(key)
        self._records[key] = record
        if self._order is None:
            return
        if old is None:
            insort(self._order, key)
        else:
            self._unpost(old)
        self._post(record)

    def remove(self, chat_id: str) -> None:
        old = self._records.pop(chat_id, None)
        if old is None or self._order is None:
            return
        _remove_sorted(self._order, chat_id)
        self._unpost(old)

    def clear(self) -> None:
        self._records.clear()
        self.invalidate()

    def invalidate(self) -> None:
        """Drop the ordered lists (a bulk load follows); the next page rebuilds them."""
        self._order = None
        self._by_status = {}
        self._by_label = {}

    def build(self) -> None:
        if self._order is not None:
            return
        self._order = sorted(self._records)
        by_status: dict[SessionStatus, list[str]] = {}
        by_label: dict[tuple[str, str], list[str]] = {}
        for key in self._order:  # in order, so every posting is appended sorted
            record = self._records[key]
            by_status.setdefault(record.status, []).append(key)
            for label in record.labels.items():
                by_label.setdefault(label, []).append(key)
        self._by_status, self._by_label = by_status, by_label

    def _post(self, record: SessionRecord) -> None:
        insort(self._by_status.setdefault(record.status, []), record.chat_id)
        for label in record.labels.items():
            insort(self._by_label.setdefault(label, []), record.chat_id)

    def _unpost(self, record: SessionRecord) -> None:
        _unpost(self._by_status, record.status, record.chat_id)
        for label in record.labels.items():
            _unpost(self._by_label, label, record.chat_id)

    def _candidates(self, query: SessionQuery) -> list[str]:
        """The shortest ordered list every match is in."""
        self.build()
        assert self._order is not None  # noqa: S101 - build() set it
        lists: list[list[str]] = [self._order]
        if query.status is not None:
            lists.append(self._by_status.get(query.status, []))
        lists += [self._by_label.get(label, []) for label in query.labels]
        return min(lists, key=len)

    def page(self, query: SessionQuery, *, limit: int, after: str | None = None) -> SessionPage:
        """Up to `limit` matching records with chat id > `after`, in chat id order; a cursor
        when (and only when) another match follows them."""
        candidates = self._candidates(query)
        start = bisect_right(candidates, after) if after is not None else 0
        found: list[SessionRecord] = []
        for key in _from(candidates, start):
            record = self._records[key]
            if not query.matches(record):
                continue
            if len(found) == limit:  # one more match exists: there is a next page
                return SessionPage(found, encode_cursor(found[-1].chat_id))
            found.append(record)
        return SessionPage(found, None)


def _from(keys: list[str], start: int) -> Iterable[str]:
    for i in range(start, len(keys)):
        yield keys[i]


# --------------------------------------------------------------------------- the follower


class IndexNotReady(Exception):
    """The index has not caught up with the registry since the connection was (re)made."""


class RegistryFollower:
    """Keeps a SessionIndex equal to `sandbox_sessions`: load, then follow, resume after a
    reconnect from the last applied sequence (the bucket keeps one revision per key and its
    delete markers, so the messages after that sequence are exactly what changed)."""

    def __init__(self, index: SessionIndex, quarantine: Quarantine | None = None) -> None:
        self.index = index
        self._quarantine = quarantine or Quarantine()
        self._stream = f"KV_{SESSIONS_BUCKET}"
        self._prefix = f"$KV.{SESSIONS_BUCKET}."
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PushSubscription | None = None
        self._applied_seq = 0  # the last stream sequence applied to the index
        self._generation = 0  # one per subscription; stale callbacks are ignored
        self._caught_up = asyncio.Event()
        self._synced_reconnects = -1  # the connection's reconnect count when last caught up
        self._subscribed_reconnects = -1  # ... when the consumer was last (re)created
        self._resuming: asyncio.Task[None] | None = None
        self._resume_again = False
        self._stopped = False
        self._load_started = 0.0

    @property
    def fresh(self) -> bool:
        """Caught up since the connection was last (re)established, and connected."""
        nc = self._nc
        return (
            nc is not None
            and nc.is_connected
            and self._caught_up.is_set()
            and self._synced_reconnects == nc.stats["reconnects"]
        )

    def require_fresh(self) -> None:
        if self.fresh:
            return
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise IndexNotReady("NATS is not connected: the API's session index cannot be kept current")
        resuming = self._resuming is not None and not self._resuming.done()
        if not resuming and self._subscribed_reconnects != nc.stats["reconnects"]:
            self.reconnected()  # a reconnect whose callback has not run yet: resume now
        what = "loading" if self._applied_seq == 0 else "catching up with"
        raise IndexNotReady(
            f"the API's session index is still {what} the registry ({len(self.index)} sessions so far); "
            "try again shortly"
        )

    async def start(self, nc: Client, js: JetStreamContext, *, wait_seconds: float) -> None:
        """Subscribe, and wait up to `wait_seconds` for the initial load (it goes on after)."""
        self._nc, self._js = nc, js
        self._load_started = time.perf_counter()
        await self._subscribe()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._caught_up.wait(), wait_seconds)
        if not self._caught_up.is_set():
            log.warning(
                "session index: %d records loaded after %.0f s; lists answer 503 until it is complete",
                len(self.index),
                wait_seconds,
            )

    async def stop(self) -> None:
        self._stopped = True
        if self._resuming is not None:
            self._resuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resuming
        await self._unsubscribe()

    def reconnected(self) -> None:
        """The connection is back: re-create the consumer from where it was (idempotent)."""
        if self._stopped or self._js is None:
            return
        self._caught_up.clear()
        if self._resuming is not None and not self._resuming.done():
            self._resume_again = True
            return
        self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def wait_fresh(self, timeout: float) -> None:
        """For tests and start-up: returns once the index has caught up."""
        await asyncio.wait_for(self._caught_up.wait(), timeout)

    # ------------------------------------------------------------------- the consumer

    async def _resume(self) -> None:
        while not self._stopped:
            self._resume_again = False
            await self._unsubscribe()
            delay = _RESUBSCRIBE_FIRST_DELAY
            while not self._stopped:
                try:
                    await self._subscribe()
                    break
                except Exception as exc:  # noqa: BLE001 - the index must come back whatever it was
                    level = logging.INFO if isinstance(exc, NatsError | TimeoutError) else logging.ERROR
                    log.log(level, "session index consumer not re-created yet (%s: %s)", type(exc).__name__, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RESUBSCRIBE_MAX_DELAY)
            if not self._resume_again:
                return

    async def _unsubscribe(self) -> None:
        old, self._sub = self._sub, None
        self._generation += 1
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()

    async def _subscribe(self) -> None:
        if self._js is None or self._nc is None:
            raise RuntimeError("the registry follower was not started")
        self._caught_up.clear()
        self._generation += 1
        generation = self._generation
        reconnects = self._subscribed_reconnects = self._nc.stats["reconnects"]
        start = self._applied_seq + 1

        async def on_message(msg: Msg) -> None:
            if generation == self._generation:
                self._apply(msg, reconnects)

        sub = await self._js.subscribe(
            f"{self._prefix}>",
            stream=self._stream,
            cb=on_message,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=ConsumerConfig(opt_start_seq=start),
            idle_heartbeat=_HEARTBEAT_SECONDS,
            pending_msgs_limit=1_000_000,
        )
        # nats-py re-creates an ordered consumer after missed heartbeats from the last
        # sequence it delivered + 1 (0 + 1 before its first message): tell it where we are.
        jsi = getattr(getattr(sub, "_sub", None), "_jsi", None)
        if jsi is not None and getattr(jsi, "_sseq", None) == 0:
            jsi._sseq = start - 1  # noqa: SLF001 - nats-py has no option for it
        self._sub = sub
        try:
            info = await sub.consumer_info()
        except BaseException:
            await self._unsubscribe()  # the caller tries again with a new one
            raise
        delivered = info.delivered.stream_seq if info.delivered is not None else 0
        if info.num_pending == 0 and (delivered or 0) <= self._applied_seq:
            self._mark_caught_up(reconnects)  # nothing (more) to deliver

    def _apply(self, msg: Msg, reconnects: int) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq > self._applied_seq:  # an ordered consumer's reset may deliver some again
            self._applied_seq = seq
            key = msg.subject.removeprefix(self._prefix)
            headers = msg.headers or {}
            deleted = headers.get(_KV_OPERATION) in ("DEL", "PURGE") or _MARKER_REASON in headers or not msg.data
            if deleted:
                self.index.remove(key)
            else:
                checked = check_record(key, msg.data)
                if isinstance(checked, str):  # poison: skipped by lists, as it always was
                    self._quarantine.report(PoisonSource.RECORD, key, seq, checked)
                    self.index.remove(key)
                else:
                    self.index.put(checked)
        if meta.num_pending == 0 and not self._caught_up.is_set():
            self._mark_caught_up(reconnects)

    def _mark_caught_up(self, reconnects: int) -> None:
        self.index.build()
        self._synced_reconnects = reconnects
        self._caught_up.set()
        if self._load_started:
            log.info(
                "session index caught up: %d sessions, stream sequence %d, %.0f ms",
                len(self.index),
                self._applied_seq,
                elapsed_ms(self._load_started),
            )
            self._load_started = 0.0
