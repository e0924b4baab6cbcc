"""The projector: keeps `sandbox_sessions` equal to the last event of each chat.

For every chat that appears in a fetched batch it reads the chat's *current* last event
from the stream (not the delivered one) and compare-and-sets the KV key to match. So it is
idempotent, any number of projectors may run at once (each runtime hosts one on a shared
durable consumer), redeliveries are harmless, and the registry never goes backwards: a
write based on an older read loses its CAS and is redone from a newer one.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyWrongLastSequenceError
from opentelemetry.trace import SpanKind

from shared.event_store import EventStore
from shared.registry import Registry
from shared.subjects import EVENT_PREFIX, EVENT_SUBJECTS, EVENTS_STREAM, INVALID_EVENTS_SUBJECT
from shared.telemetry import Telemetry, extract
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)

PROJECTOR_CONSUMER = "sandboxd-projector"
_CAS_ATTEMPTS = 10


class Projector:
    def __init__(
        self,
        js: JetStreamContext,
        store: EventStore,
        registry: Registry,
        durable: str = PROJECTOR_CONSUMER,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._telemetry = telemetry or telemetry_disabled()
        self._js = js
        self._store = store
        self._registry = registry
        self._durable = durable

    async def project_chat(self, chat_id: str) -> str:
        """Make the chat's KV entry match its last event; what was done, for logs and tests."""
        for _ in range(_CAS_ATTEMPTS):
            entry = await self._registry.entry(chat_id)
            state = await self._store.read(chat_id)
            session = state.session
            try:
                if session is None or not session.is_live:
                    if entry.record is None:
                        return "absent"
                    await self._registry.delete(chat_id, last_revision=entry.revision)
                    return "deleted"
                record = msgspec.structs.replace(session, version=state.seq)
                if entry.record is not None and entry.record.version >= state.seq:
                    return "current"
                await self._registry.put(record, last_revision=entry.revision)
                return "written"
            except KeyWrongLastSequenceError:
                continue
        log.warning("projection of chat %s kept losing its CAS; it will be retried", chat_id)
        return "contended"

    async def _traced_project(self, chat_id: str, headers: dict[str, str] | None) -> str:
        with self._telemetry.tracer.span(
            "projector.project_chat", {"chat.id": chat_id}, kind=SpanKind.CONSUMER, parent=extract(headers)
        ) as span:
            result = await self.project_chat(chat_id)
            span.set_attribute("sandbox.result", result)
            self._telemetry.metrics.increment("sandbox.projector.projection.total", {"result": result})
            return result

    async def run(self, stopping: asyncio.Event, batch: int = 256) -> None:
        sub = await self._js.pull_subscribe(
            EVENT_SUBJECTS,
            durable=self._durable,
            stream=EVENTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30,
                max_ack_pending=batch * 4,
                filter_subject=EVENT_SUBJECTS,
            ),
        )
        prefix = EVENT_PREFIX + "."
        try:
            while not stopping.is_set():
                try:
                    msgs = await sub.fetch(batch=batch, timeout=0.5)
                except (NatsTimeoutError, TimeoutError):  # nats-py raises either when nothing came
                    continue
                except Exception:
                    log.exception("fetch from %s failed; retrying", EVENTS_STREAM)
                    await asyncio.sleep(0.5)
                    continue
                last_of = {m.subject[len(prefix) :]: m for m in msgs if m.subject != INVALID_EVENTS_SUBJECT}
                chats = set(last_of)
                results = await asyncio.gather(
                    *(self._traced_project(c, last_of[c].headers) for c in chats), return_exceptions=True
                )
                failed = {
                    c for c, r in zip(chats, results, strict=True) if isinstance(r, BaseException) or r == "contended"
                }
                for chat, result in zip(chats, results, strict=True):
                    if isinstance(result, BaseException):
                        log.warning("projecting chat %s failed: %s", chat, result)
                for m in msgs:
                    if m.subject[len(prefix) :] in failed:
                        await m.nak(delay=0.5)
                    else:
                        await m.ack()
        finally:
            await sub.unsubscribe()
