"""The projector: keeps `sandbox_sessions` equal to the last event of each chat.

For every chat that appears in a fetched batch it reads the chat's *current* last event
from the stream (not the delivered one) and compare-and-sets the KV key to match. So it is
idempotent, any number of projectors may run at once (each runtime hosts one on a shared
durable consumer), redeliveries are harmless, and the registry never goes backwards: a
write based on an older read loses its CAS and is redone from a newer one. A batch is read
in two round trips whatever its size: the keys of all its chats (one batched direct get),
then their last events (another); the key is always read before the event, as one chat's
projection does. The writes go out together; a chat whose CAS is lost is read again alone.

A key holding poison, or a record that is not exactly what the chat's last event says (a
forged `version` included), is overwritten or deleted. Events on subjects that name no chat
are quarantined and acknowledged; a chat whose projection keeps failing is given up after
`max_deliver` deliveries (replay repairs it), so nothing can hold the consumer's window.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyWrongLastSequenceError
from opentelemetry.trace import SpanKind

from shared.consumers import declare_durable, pull_batch
from shared.event_store import ChatState, EventStore, connection_of
from shared.poison import PoisonSource, Quarantine
from shared.registry import Registry, RegistryEntry
from shared.subjects import (
    EVENT_SUBJECTS,
    EVENTS_STREAM,
    INVALID_EVENTS_SUBJECT,
    ConsumerName,
    chat_of,
    is_node_event_subject,
)
from shared.telemetry import Telemetry, extract
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)

_CAS_ATTEMPTS = 10
# With the back-off below, a chat is retried for about 20 minutes (a NATS outage) before
# it is given up; replay repairs it then.
PROJECTOR_MAX_DELIVER = 50


def retry_delay(deliveries: int) -> float:
    return float(min(0.5 * 2 ** max(deliveries - 1, 0), 30.0))


def projector_consumer_config(durable: str, batch: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=30,
        max_ack_pending=batch * 4,
        max_deliver=PROJECTOR_MAX_DELIVER,
        filter_subject=EVENT_SUBJECTS,
    )


class Projector:
    def __init__(
        self,
        js: JetStreamContext,
        store: EventStore,
        registry: Registry,
        *,
        durable: str = ConsumerName.PROJECTOR,
        telemetry: Telemetry | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self._telemetry = telemetry or telemetry_disabled()
        self._quarantine = quarantine or Quarantine(self._telemetry.metrics)
        self._js = js
        self._store = store
        self._registry = registry
        self._durable = durable

    @property
    def store(self) -> EventStore:
        return self._store

    async def project_chat(self, chat_id: str, read: tuple[RegistryEntry, ChatState] | None = None) -> str:
        """Make the chat's KV entry match its last event; what was done, for logs and tests.
        `read`: the key and then the last event, already read (by a batch); later attempts
        read them again."""
        for attempt in range(_CAS_ATTEMPTS):
            if attempt == 0 and read is not None:
                entry, state = read
            else:
                entry = await self._registry.entry(chat_id)
                state = await self._store.read(chat_id)
            if entry.record is not None and entry.record.version > state.seq:
                # The key claims a newer event than this read saw: a replica answering the
                # direct get may lag. The leader knows; if it agrees, the key is bogus.
                state = await self._store.read(chat_id, leader=True)
            session = state.session
            try:
                if session is None or not session.is_live:
                    if entry.record is None and not entry.corrupt:
                        return "absent"
                    await self._registry.delete(chat_id, last_revision=entry.revision)
                    return "deleted"
                record = msgspec.structs.replace(session, version=state.seq)
                if entry.record == record:
                    return "current"
                await self._registry.put(record, last_revision=entry.revision)
                return "written"
            except KeyWrongLastSequenceError:
                continue
        log.warning("projection of chat %s kept losing its CAS; it will be retried", chat_id)
        return "contended"

    async def _traced_project(
        self, chat_id: str, headers: dict[str, str] | None, read: tuple[RegistryEntry, ChatState] | None
    ) -> str:
        with self._telemetry.tracer.span(
            "projector.project_chat", {"chat.id": chat_id}, kind=SpanKind.CONSUMER, parent=extract(headers)
        ) as span:
            result = await self.project_chat(chat_id, read)
            span.set_attribute("sandbox.result", result)
            return result

    async def run(self, stopping: asyncio.Event, batch: int = 256) -> None:
        await declare_durable(self._js, EVENTS_STREAM, projector_consumer_config(self._durable, batch))
        nc = connection_of(self._js)
        while not stopping.is_set():
            try:
                msgs = await pull_batch(nc, EVENTS_STREAM, self._durable, batch, expires=0.5, stopping=stopping)
            except Exception:
                log.exception("fetch from %s failed; retrying", EVENTS_STREAM)
                await asyncio.sleep(0.5)
                continue
            if msgs:
                await self._project_batch(msgs)

    async def _project_batch(self, msgs: list[Msg]) -> None:
        """Project every chat of the batch once (from its current last event), then settle
        each message: acked, or handed back when its chat's projection failed."""
        last_of: dict[str, Msg] = {}
        for m in msgs:
            chat = chat_of(m.subject)
            if chat is not None:
                last_of[chat] = m
            elif m.subject != INVALID_EVENTS_SUBJECT and not is_node_event_subject(m.subject):
                seq = m.metadata.sequence.stream
                self._quarantine.report(PoisonSource.EVENT, m.subject, seq, "its subject names no chat")
        chats = list(last_of)
        reads = await self._read_batch(chats)
        results = await asyncio.gather(
            *(self._traced_project(c, last_of[c].headers, reads.get(c)) for c in chats), return_exceptions=True
        )
        failed: set[str] = set()
        counted: Counter[str] = Counter()  # counted once per batch: a counter's add is not free
        for chat, result in zip(chats, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("projecting chat %s failed: %s", chat, result)
            else:
                counted[result] += 1
            if isinstance(result, BaseException) or result == "contended":
                failed.add(chat)
        for result, n in counted.items():
            self._telemetry.metrics.increment("sandbox.projector.projection.total", {"result": result}, n)
        for m in msgs:
            try:
                await _settle(m, failed)
            except Exception as exc:  # noqa: BLE001 - an unsettled message is redelivered; the loop goes on
                log.warning("could not settle %s: %s", m.subject, exc)

    async def _read_batch(self, chats: list[str]) -> dict[str, tuple[RegistryEntry, ChatState]]:
        """The keys, then the last events, of the batch's chats; nothing when either batched
        read fails (each chat is then read on its own)."""
        if not chats:
            return {}
        try:
            entries = await self._registry.entries(chats)
            states = await self._store.read_many(chats)
        except Exception as exc:  # noqa: BLE001 - the chats are read one by one instead
            log.warning("batched read of %d chats failed (%s); reading them one by one", len(chats), exc)
            return {}
        return {chat: (entries[chat], states[chat]) for chat in chats}


async def _settle(m: Msg, failed: set[str]) -> None:
    chat = chat_of(m.subject)
    deliveries = m.metadata.num_delivered
    if chat not in failed:
        await m.ack()
    elif deliveries >= PROJECTOR_MAX_DELIVER:
        log.error("giving up projecting chat %s after %d tries; replay repairs it", chat, deliveries)
        await m.term()
    else:
        await m.nak(delay=retry_delay(deliveries))
