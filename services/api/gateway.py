"""Commands in, outcomes back: the facade's request/reply over JetStream.

One ordered JetStream consumer on `SANDBOX_EVENTS` is opened before any command is
published; each request registers its command id, publishes the command with
`Nats-Msg-Id = command_id`, and waits for the outcome event carrying that causation id on
that chat (a command id reused on another chat, by accident or not, answers nobody else).
It must be a stream consumer, not a core subscription: a core subscriber on
`sandbox.events.>` also sees appends the stream refused (lost optimistic-concurrency races).

The consumer lives in the server's memory, so a nats-server restart loses it. The waiter
does not wait for nats-py to notice missed heartbeats (10 s and more): the connection's
reconnected callback recreates the consumer at once, starting at the stream sequence after
the last one it saw, so nothing stored meanwhile is missed, and every request still waiting
then re-reads its chat's last event in case its outcome is already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from opentelemetry.trace import SpanKind

from shared.contracts import OUTCOME_TYPES, AnyCommand, AnyEvent, encode, is_outcome
from shared.errors import NatsUnavailable
from shared.event_store import EventStore, check_event, with_nats_retry
from shared.poison import DECODE_ERRORS
from shared.subjects import COMMANDS_STREAM, EVENT_SUBJECTS, EVENTS_STREAM, MSG_ID_HEADER, chat_of, command_subject
from shared.telemetry import Telemetry, elapsed_ms, inject

log = logging.getLogger(__name__)

_OUTCOME_NAMES = frozenset(t.__struct_config__.tag for t in OUTCOME_TYPES)
# Re-creating the consumer after a reconnect: JetStream may need a moment after the server
# is back (stream recovery, leader election); retry quickly, then every second.
_RESUBSCRIBE_FIRST_DELAY = 0.05
_RESUBSCRIBE_MAX_DELAY = 1.0
# The consumer's idle heartbeat. In a cluster it may live on another server than the
# connection: when that server dies no reconnect says so, and nats-py re-creates the
# consumer only after two missed heartbeats (with its default of 5 s, creates waited up to
# 20 s after a server's kill -9; tests/bench/cluster.py).
_HEARTBEAT_SECONDS = 1.0
# Requests whose chat is re-read at once after a reconnect (each read is one direct get).
_RECHECKS_AT_ONCE = 32


class _Head(msgspec.Struct):
    """Just enough of an event to route it without decoding all of it."""

    type: str
    chat_id: str = ""
    causation_id: str | None = None


_head_decoder = msgspec.json.Decoder(_Head)
_Key = tuple[str, str]  # (chat_id, command_id)


@dataclass(slots=True)
class _Waiting:
    """One command's outcome, awaited by one request or more (an idempotent retry waits for
    the same outcome as the request it repeats)."""

    future: asyncio.Future[AnyEvent]
    requests: int = 0


class OutcomeWaiter:
    def __init__(self) -> None:
        self._pending: dict[_Key, _Waiting] = {}
        self._js: JetStreamContext | None = None
        self._events: EventStore | None = None
        self._sub: JetStreamContext.PushSubscription | None = None
        # The next stream sequence the consumer must deliver: where a new consumer starts.
        self._next_seq = 1
        self._resuming: asyncio.Task[None] | None = None
        self._resume_again = False
        self._stopped = False

    async def start(self, js: JetStreamContext, events: EventStore) -> None:
        """Follow SANDBOX_EVENTS from what is stored next (nothing older is an answer to a
        request of this process)."""
        self._js = js
        self._events = events
        info = await js.stream_info(EVENTS_STREAM)
        self._next_seq = info.state.last_seq + 1
        self._sub = await self._subscribe()

    async def stop(self) -> None:
        self._stopped = True
        if self._resuming is not None:
            self._resuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resuming
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for waiting in self._pending.values():
            waiting.future.cancel()

    def reconnected(self) -> None:
        """The connection is back: re-create the consumer now (the connection's callback)."""
        if self._stopped or self._js is None:
            return
        if self._resuming is not None and not self._resuming.done():
            self._resume_again = True  # another outage meanwhile: go round once more
            return
        self._resuming = asyncio.get_running_loop().create_task(self._resume())

    def expect(self, chat_id: str, command_id: str) -> tuple[asyncio.Future[AnyEvent], bool]:
        """The command's outcome to await, and whether this is the first request waiting for
        it in this process (a later one waits for the same outcome, it need not send again).
        Every `expect` is paired with a `forget`."""
        key = (chat_id, command_id)
        waiting = self._pending.get(key)
        if waiting is None:
            waiting = self._pending[key] = _Waiting(asyncio.get_running_loop().create_future())
        waiting.requests += 1
        return waiting.future, waiting.requests == 1

    def forget(self, chat_id: str, command_id: str) -> None:
        key = (chat_id, command_id)
        waiting = self._pending.get(key)
        if waiting is None:
            return
        waiting.requests -= 1
        if waiting.requests <= 0:
            del self._pending[key]

    def deliver(self, chat_id: str, command_id: str, outcome: AnyEvent) -> None:
        """An outcome found by reading the log rather than through the consumer."""
        waiting = self._pending.get((chat_id, command_id))
        if waiting is not None and not waiting.future.done():
            waiting.future.set_result(outcome)

    # ------------------------------------------------------------------- the consumer

    async def _subscribe(self) -> JetStreamContext.PushSubscription:
        if self._js is None:
            raise RuntimeError("the outcome waiter was not started")
        start = self._next_seq
        sub = await self._js.subscribe(
            EVENT_SUBJECTS,
            stream=EVENTS_STREAM,
            cb=self._on_event,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=ConsumerConfig(opt_start_seq=start),
            idle_heartbeat=_HEARTBEAT_SECONDS,
            pending_msgs_limit=1_000_000,
        )
        # nats-py re-creates an ordered consumer on its own after missed heartbeats, from
        # the last stream sequence it delivered + 1, which is 0 + 1 before its first
        # message: it would replay the whole stream. Tell it where this one started.
        jsi = getattr(getattr(sub, "_sub", None), "_jsi", None)
        if jsi is not None and getattr(jsi, "_sseq", None) == 0:
            jsi._sseq = start - 1  # noqa: SLF001 - see above; nats-py has no option for it
        return sub

    async def _resume(self) -> None:
        while not self._stopped:
            self._resume_again = False
            old, self._sub = self._sub, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.unsubscribe()
            await self._resubscribe()
            await self._recheck_pending()
            if not self._resume_again:
                return

    async def _resubscribe(self) -> None:
        delay = _RESUBSCRIBE_FIRST_DELAY
        started = time.perf_counter()
        while not self._stopped:
            try:
                self._sub = await self._subscribe()
            except Exception as exc:  # noqa: BLE001 - whatever it was, the waiter must come back
                level = logging.INFO if isinstance(exc, NatsError | TimeoutError) else logging.ERROR
                log.log(level, "outcome consumer not re-created yet (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RESUBSCRIBE_MAX_DELAY)
                continue
            log.info(
                "outcome consumer re-created from stream sequence %d in %.0f ms",
                self._next_seq,
                elapsed_ms(started),
            )
            return

    async def _recheck_pending(self) -> None:
        """A request whose outcome is already the chat's last event gets it now."""
        if self._events is None or not self._pending:
            return
        events = self._events
        limit = asyncio.Semaphore(_RECHECKS_AT_ONCE)

        async def recheck(chat_id: str, command_id: str) -> None:
            async with limit:
                try:
                    last = (await events.read(chat_id)).last
                except Exception:  # noqa: BLE001 - only a shortcut: the consumer delivers it anyway
                    return
            if last is not None and last.causation_id == command_id and is_outcome(last):
                self.deliver(chat_id, command_id, last)

        await asyncio.gather(*(recheck(chat, command) for chat, command in list(self._pending)))

    async def _on_event(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):  # a message without JetStream metadata
            self._next_seq = max(self._next_seq, msg.metadata.sequence.stream + 1)
        if not self._pending:
            return
        try:
            head = _head_decoder.decode(msg.data)
        except DECODE_ERRORS:
            return
        if head.causation_id is None or head.type not in _OUTCOME_NAMES:
            return
        waiting = self._pending.get((head.chat_id, head.causation_id))
        if waiting is None or waiting.future.done() or chat_of(msg.subject) != head.chat_id:
            return
        checked = check_event(head.chat_id, msg.data)
        if isinstance(checked, str):
            log.warning(
                "an outcome for command %s on chat %s cannot be trusted: %s", head.causation_id, head.chat_id, checked
            )
            return
        waiting.future.set_result(checked)


class OutcomePending(Exception):
    """The command is in the stream but its outcome did not come within the wait; it will
    still come (the command is durable), so the request is accepted, not failed."""

    def __init__(self, command: AnyCommand, wait_seconds: float) -> None:
        super().__init__(f"no outcome for command {command.command_id} within {wait_seconds:g}s")
        self.command = command
        self.wait_seconds = wait_seconds


class CommandGateway:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        waiter: OutcomeWaiter,
        events: EventStore,
        telemetry: Telemetry,
        *,
        wait_seconds: float,
    ) -> None:
        self._nc = nc
        self._js = js
        self._waiter = waiter
        self._events = events
        self._telemetry = telemetry
        self._wait_seconds = wait_seconds

    def require_connection(self) -> None:
        """NatsUnavailable at once while the connection is down (a request made then would
        only wait for it, up to nats.request_timeout_seconds per attempt)."""
        if not self._nc.is_connected:
            raise NatsUnavailable("NATS is not connected")

    async def send(self, command: AnyCommand) -> AnyEvent:
        """Publish and wait for the outcome; OutcomePending when it did not come in time."""
        outcome = await self._publish_and_wait(command, self._wait_seconds, again=False)
        if outcome is None:
            raise OutcomePending(command, self._wait_seconds)
        return outcome

    async def send_again(self, command: AnyCommand) -> AnyEvent:
        """The same command once more (an idempotent retry: same command id): its outcome if
        the chat's log already holds it; else wait for it, publishing the command again
        unless a request of this process is already waiting for it. A second publish is
        harmless: the stream drops it within its duplicate window, and beyond that the
        runtime's `sandbox_handled` index never carries a command id out twice."""
        outcome = await self._publish_and_wait(command, self._wait_seconds, again=True)
        if outcome is None:
            raise OutcomePending(command, self._wait_seconds)
        return outcome

    async def logged_outcome(self, chat_id: str, command_id: str) -> AnyEvent | None:
        """The command's outcome if the chat's history holds it."""
        for stored in reversed(await self._events.history(chat_id)):
            if stored.event.causation_id == command_id and is_outcome(stored.event):
                return stored.event
        return None

    async def _publish_and_wait(self, command: AnyCommand, wait_seconds: float, *, again: bool) -> AnyEvent | None:
        self.require_connection()
        command_id = command.command_key
        chat_id = command.chat_key
        fut, first = self._waiter.expect(chat_id, command_id)
        try:
            subject = command_subject(command.kind, command.chat_key)
            attributes = {"chat.id": command.chat_key, "command.id": command_id, "messaging.destination": subject}
            started = time.perf_counter()
            with self._telemetry.tracer.span("api.send_command", attributes, kind=SpanKind.PRODUCER) as span:
                # Waiting already (above), so an outcome stored after this read is delivered.
                logged = await self.logged_outcome(chat_id, command_id) if again else None
                if logged is not None:
                    span.set_attribute("sandbox.event", logged.type)
                    return logged
                if first:
                    await self._publish(subject, command, command_id)
                done, _ = await asyncio.wait({fut}, timeout=wait_seconds)
                if not done:
                    span.set_attribute("sandbox.event", "timeout")
                    return None
                outcome = fut.result()
                span.set_attribute("sandbox.event", outcome.type)
                self._telemetry.metrics.record(
                    "sandbox.api.command.duration_ms",
                    elapsed_ms(started),
                    {"kind": command.kind, "outcome": outcome.type},
                )
                return outcome
        finally:
            self._waiter.forget(chat_id, command_id)

    async def _publish(self, subject: str, command: AnyCommand, command_id: str) -> None:
        payload = encode(command)
        headers = inject({MSG_ID_HEADER: command_id})

        async def publish() -> None:
            await self._js.publish(subject, payload, stream=COMMANDS_STREAM, headers=headers)

        await with_nats_retry(publish, what=f"publish {subject}")
