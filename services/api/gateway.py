"""Commands in, outcomes back: the facade's request/reply over JetStream.

One ordered JetStream consumer on `SANDBOX_EVENTS` (new messages only) is opened before any
command is published; each request registers its command id, publishes the command with
`Nats-Msg-Id = command_id`, and waits for the outcome event carrying that causation id on
that chat (a command id reused on another chat, by accident or not, answers nobody else).
It must be a stream consumer, not a core subscription: a core subscriber on
`sandbox.events.>` also sees appends the stream refused (lost optimistic-concurrency races).
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from opentelemetry.trace import SpanKind

from shared.contracts import OUTCOME_TYPES, AnyCommand, AnyEvent, encode
from shared.errors import NatsUnavailable
from shared.event_store import check_event, with_nats_retry
from shared.poison import DECODE_ERRORS
from shared.subjects import COMMANDS_STREAM, EVENT_SUBJECTS, EVENTS_STREAM, MSG_ID_HEADER, chat_of, command_subject
from shared.telemetry import Telemetry, elapsed_ms, inject

log = logging.getLogger(__name__)

_OUTCOME_NAMES = frozenset(t.__struct_config__.tag for t in OUTCOME_TYPES)


class _Head(msgspec.Struct):
    """Just enough of an event to route it without decoding all of it."""

    type: str
    chat_id: str = ""
    causation_id: str | None = None


_head_decoder = msgspec.json.Decoder(_Head)
_Key = tuple[str, str]  # (chat_id, command_id)


class OutcomeWaiter:
    def __init__(self) -> None:
        self._pending: dict[_Key, asyncio.Future[AnyEvent]] = {}
        self._sub: Subscription | None = None

    async def start(self, js: JetStreamContext) -> None:
        self._sub = await js.subscribe(
            EVENT_SUBJECTS,
            stream=EVENTS_STREAM,
            cb=self._on_event,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            pending_msgs_limit=1_000_000,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        for fut in self._pending.values():
            fut.cancel()

    def expect(self, chat_id: str, command_id: str) -> asyncio.Future[AnyEvent]:
        fut: asyncio.Future[AnyEvent] = asyncio.get_running_loop().create_future()
        self._pending[(chat_id, command_id)] = fut
        return fut

    def forget(self, chat_id: str, command_id: str) -> None:
        self._pending.pop((chat_id, command_id), None)

    async def _on_event(self, msg: Msg) -> None:
        if not self._pending:
            return
        try:
            head = _head_decoder.decode(msg.data)
        except DECODE_ERRORS:
            return
        if head.causation_id is None or head.type not in _OUTCOME_NAMES:
            return
        fut = self._pending.get((head.chat_id, head.causation_id))
        if fut is None or fut.done() or chat_of(msg.subject) != head.chat_id:
            return
        checked = check_event(head.chat_id, msg.data)
        if isinstance(checked, str):
            log.warning(
                "an outcome for command %s on chat %s cannot be trusted: %s", head.causation_id, head.chat_id, checked
            )
            return
        fut.set_result(checked)


class OutcomePending(Exception):
    """The command is in the stream but its outcome did not come within the wait; it will
    still come (the command is durable), so the request is accepted, not failed."""

    def __init__(self, command: AnyCommand, wait_seconds: float) -> None:
        super().__init__(f"no outcome for command {command.command_id} within {wait_seconds:g}s")
        self.command = command
        self.wait_seconds = wait_seconds


class CommandGateway:
    def __init__(
        self, nc: Client, js: JetStreamContext, waiter: OutcomeWaiter, telemetry: Telemetry, *, wait_seconds: float
    ) -> None:
        self._nc = nc
        self._js = js
        self._waiter = waiter
        self._telemetry = telemetry
        self._wait_seconds = wait_seconds

    async def send(self, command: AnyCommand) -> AnyEvent:
        """Publish and wait for the outcome; OutcomePending when it did not come in time."""
        outcome = await self._publish_and_wait(command, self._wait_seconds)
        if outcome is None:
            raise OutcomePending(command, self._wait_seconds)
        return outcome

    async def _publish_and_wait(self, command: AnyCommand, wait_seconds: float) -> AnyEvent | None:
        if not self._nc.is_connected:
            raise NatsUnavailable("NATS is not connected")
        command_id = str(command.command_id)
        chat_id = str(command.chat_id)
        fut = self._waiter.expect(chat_id, command_id)
        try:
            subject = command_subject(command.kind, str(command.chat_id))
            payload = encode(command)
            attributes = {"chat.id": str(command.chat_id), "command.id": command_id, "messaging.destination": subject}
            started = time.perf_counter()
            with self._telemetry.tracer.span("api.send_command", attributes, kind=SpanKind.PRODUCER) as span:
                headers = inject({MSG_ID_HEADER: command_id})

                async def publish() -> None:
                    await self._js.publish(subject, payload, stream=COMMANDS_STREAM, headers=headers)

                await with_nats_retry(publish, what=f"publish {subject}")
                try:
                    outcome = await asyncio.wait_for(fut, wait_seconds)
                except TimeoutError:
                    span.set_attribute("sandbox.event", "timeout")
                    return None
                span.set_attribute("sandbox.event", outcome.type)
                self._telemetry.metrics.record(
                    "sandbox.api.command.duration_ms",
                    elapsed_ms(started),
                    {"kind": command.kind, "outcome": outcome.type},
                )
                return outcome
        finally:
            self._waiter.forget(chat_id, command_id)
