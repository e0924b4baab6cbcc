"""The command consumer: a durable pull consumer on `SANDBOX_COMMANDS`.

This is the one place that acks, naks, terms and reports progress. A command is kept in
progress while its handler runs (five times within `ack_wait`, through long Docker calls and
waits alike), so a short `ack_wait` redelivers the commands of a runtime that went silent
within seconds and never those of one that is working. Handlers only raise:
a malformed command is rejected once and terminated; a transient failure is nak'd with a
growing delay; a command another node must carry out is forwarded to that node's queue
(`sandbox.node.<node>.<kind>.<chat_id>`, see routing.py) and acked; anything else ends the
command with a `failed` outcome and is acked. The
consumer bounds deliveries (`runtime.max_deliveries`): the last one that would be handed
back ends the command with a `failed` outcome (`gave_up`) instead, so nothing spins forever
and nothing accepted is left without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Self

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry.trace import SpanKind

from services.runtime.handlers import CommandHandlers, Delivery, Progress
from services.runtime.routing import MAX_HOPS, delivery_of, forward
from shared.commands import MalformedCommand, decode_command
from shared.consumers import declare_durable, pull_batch
from shared.contracts import COMMAND_TYPES, AnyCommand
from shared.errors import Forward, TransientError, WrongNode
from shared.event_store import connection_of
from shared.logs import bound_log_context
from shared.subjects import (
    COMMAND_SUBJECTS,
    COMMANDS_STREAM,
    ConsumerName,
    public_command_subject,
    split_command_subject,
)
from shared.telemetry import Telemetry, extract
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)


# In-progress reports per ack_wait while a command is handled.
PROGRESS_PER_ACK_WAIT = 5


def nak_delay(deliveries: int) -> float:
    return float(min(0.5 * 2 ** max(deliveries - 1, 0), 30.0))


def runtime_consumer_config(
    durable: str, max_in_flight: int, ack_wait: float, max_deliver: int, filter_subject: str = COMMAND_SUBJECTS
) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_ack_pending=max(1000, max_in_flight * 4),
        # One more than the runtime tries: a runtime that dies during a command's last try
        # leaves it one delivery in which to give it its `failed` outcome.
        max_deliver=max_deliver + 1,
        filter_subject=filter_subject,
    )


def metric_kind(subject: str) -> str:
    """The command kind as a metric label: one of the known kinds, never what a subject says."""
    kind = split_command_subject(public_command_subject(subject))[0]
    return kind if kind in COMMAND_TYPES else "unknown"


def wait_for_node_delay(deliveries: int) -> float:
    """A command for a silent node's container waits for the node to beat again or be
    declared dead: a second at first, backing off."""
    return min(float(deliveries), 10.0)


class CommandConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        handlers: CommandHandlers,
        *,
        max_in_flight: int,
        ack_wait_seconds: float,
        max_deliveries: int = 100,
        durable: str = ConsumerName.RUNTIME,
        stream: str = COMMANDS_STREAM,
        filter_subject: str = COMMAND_SUBJECTS,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._telemetry = telemetry or telemetry_disabled()
        self._js = js
        self._handlers = handlers
        self._max_in_flight = max_in_flight
        self._ack_wait = ack_wait_seconds
        self._max_deliveries = max_deliveries
        self._durable = durable
        self._stream = stream
        self._filter = filter_subject
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stopping: asyncio.Event) -> None:
        config = runtime_consumer_config(
            self._durable, self._max_in_flight, self._ack_wait, self._max_deliveries, self._filter
        )
        await declare_durable(self._js, self._stream, config)
        nc = connection_of(self._js)
        log.info("consuming %s as %s", self._stream, self._durable)
        try:
            while not stopping.is_set():
                free = self._free_slots()
                if free == 0:
                    await asyncio.sleep(0.005)
                    continue
                try:
                    msgs = await pull_batch(nc, self._stream, self._durable, free, expires=0.5, stopping=stopping)
                except Exception:
                    log.exception("fetch from %s failed; retrying", self._stream)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    await self._slots.acquire()
                    task = asyncio.create_task(self._dispatch(msg))
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
        finally:
            await self.drain()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def _free_slots(self) -> int:
        return self._max_in_flight - len(self._tasks)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def drain(self, timeout: float = 10.0, offline_timeout: float = 1.0) -> None:
        """Let handlers in flight finish (each ends with an ack, nak or term); cancel what is
        still running after `timeout` (a command waiting on another's claim, say), or after
        `offline_timeout` when NATS is not connected (nothing in flight can finish then): its
        message stays unacknowledged and is redelivered, and its claim, if any, is resumed."""
        if not self._tasks:
            return
        if not connection_of(self._js).is_connected:
            timeout = min(timeout, offline_timeout)
        _, pending = await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("cancelled %d command(s) still in flight at shutdown; they will be redelivered", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def _dispatch(self, msg: Msg) -> None:
        try:
            await settle(
                msg,
                self._handlers,
                self._telemetry,
                self._max_deliveries,
                progress_every=self._ack_wait / PROGRESS_PER_ACK_WAIT,
                js=self._js,
            )
        except Exception:
            log.exception("settling %s failed", msg.subject)


class InProgress:
    """Reports a message in progress every `every` seconds while it is handled (None: not
    at all), on a timer of the event loop rather than a task of its own: whatever the
    handler awaits, the server does not redeliver the message. `report` is the handler's
    own call after a slow step; it is skipped when a report (or the delivery) is recent."""

    def __init__(self, msg: Msg, every: float | None) -> None:
        self._msg = msg
        self._every = every
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def __enter__(self) -> Self:
        if self._every is not None:
            self._timer = self._loop.call_later(self._every, self._tick)
        return self

    def __exit__(self, *_: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._sending:  # nothing is reported once the message is settled
            task.cancel()

    def _tick(self) -> None:
        assert self._every is not None  # noqa: S101 - only scheduled with an interval
        self._timer = self._loop.call_later(self._every, self._tick)
        task = self._loop.create_task(self._send())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self) -> None:
        self._last = self._loop.time()
        # Best effort: a lost in-progress only risks an early redelivery, which is harmless.
        with contextlib.suppress(Exception):
            await self._msg.in_progress()

    async def report(self) -> None:
        if self._every is not None and self._loop.time() - self._last < self._every:
            return  # reported (or delivered) within the interval: the timer reports next
        await self._send()


async def settle(
    msg: Msg,
    handlers: CommandHandlers,
    telemetry: Telemetry,
    max_deliveries: int,
    *,
    progress_every: float | None = None,
    js: JetStreamContext | None = None,
) -> None:
    """Handle one command message, in the trace its publisher started, keeping it in
    progress every `progress_every` seconds meanwhile (`js`: where to forward it)."""
    kind = metric_kind(msg.subject)
    with (
        telemetry.tracer.span(
            "runtime.handle_command",
            {"messaging.destination": msg.subject},
            kind=SpanKind.CONSUMER,
            parent=extract(msg.headers),
        ),
        InProgress(msg, progress_every) as in_progress,
    ):
        outcome = await _settle(msg, handlers, max_deliveries, js, in_progress.report)
    queued_at = msg.metadata.timestamp
    if queued_at is not None:
        latency_ms = (datetime.now(UTC) - queued_at).total_seconds() * 1000.0
        telemetry.metrics.record("sandbox.command.duration_ms", latency_ms, {"kind": kind, "outcome": outcome})


async def _settle(
    msg: Msg, handlers: CommandHandlers, max_deliveries: int, js: JetStreamContext | None, progress: Progress
) -> str:
    """Decide the message's ack, nak or term; what became of it, for the latency metric."""
    deliveries = msg.metadata.num_delivered
    last_try = deliveries >= max_deliveries
    try:
        command = decode_command(public_command_subject(msg.subject), msg.data)
    except MalformedCommand as bad:
        return await _reject(msg, handlers, bad, last_try=last_try)

    with bound_log_context(chat_id=command.chat_key, command_id=command.command_key):
        delivery = delivery_of(msg)
        try:
            outcome = await handlers.handle(command, progress, delivery)
        except Forward as to:
            return await _forward(msg, command, to, delivery, js)
        except (WrongNode, TransientError) as exc:
            if last_try:
                return await _give_up(msg, handlers, command, exc)
            if isinstance(exc, WrongNode):
                log.info("command on %s waits for its node: %s", msg.subject, exc)
                await msg.nak(delay=wait_for_node_delay(deliveries))
                return "handed_over"
            await _nak(msg, deliveries, exc)
            return "retried"
        except Exception as exc:
            log.exception("command %s on %s failed unexpectedly", command.command_id, msg.subject)
            try:
                await handlers.fail_unexpected(command, exc)
            except Exception as again:  # noqa: BLE001 - the last resort must not lose the message
                if last_try:
                    return await _give_up(msg, handlers, command, again)
                await _nak(msg, deliveries, again)
                return "retried"
            outcome = None
    await msg.ack()
    return outcome.type if outcome is not None else "none"


async def _forward(msg: Msg, command: AnyCommand, to: Forward, delivery: Delivery, js: JetStreamContext | None) -> str:
    """Forward the command to its node's queue, then ack it; hand it back when it cannot be
    forwarded (NATS busy, or it went round too often)."""
    deliveries = msg.metadata.num_delivered
    if js is None or delivery.hops >= MAX_HOPS:
        log.warning("command on %s not forwarded again (%d hops): %s", msg.subject, delivery.hops, to)
        await msg.nak(delay=wait_for_node_delay(deliveries))
        return "handed_over"
    try:
        await forward(js, msg, command, to, delivery)
    except TransientError as exc:
        await _nak(msg, deliveries, exc)
        return "retried"
    await msg.ack()
    return "forwarded"


async def _reject(msg: Msg, handlers: CommandHandlers, bad: MalformedCommand, *, last_try: bool) -> str:
    """A malformed command: one `rejected` event, then terminated (never redelivered)."""
    log.info("rejecting command on %s: %s", msg.subject, bad)
    handlers.count_malformed(bad)
    try:
        await handlers.reject_malformed(bad)
    except TransientError as exc:
        if not last_try:
            await _nak(msg, msg.metadata.num_delivered, exc)
            return "retried"
        log.warning("could not record the rejection of %s before its last delivery; terminating it", msg.subject)
    except Exception:
        log.exception("could not record the rejection of %s; terminating it anyway", msg.subject)
    await msg.term()
    return "rejected"


async def _give_up(msg: Msg, handlers: CommandHandlers, command: AnyCommand, exc: Exception) -> str:
    """The last delivery: end the command with a `failed` outcome and terminate it."""
    deliveries = msg.metadata.num_delivered
    log.error(
        "command %s on %s still failing after %d deliveries (%s); giving up",
        command.command_id,
        msg.subject,
        deliveries,
        exc,
    )
    try:
        await handlers.give_up(command, exc, deliveries)
    except Exception:
        log.exception("could not record that command %s was given up", command.command_id)
    await msg.term()
    return "gave_up"


async def _nak(msg: Msg, deliveries: int, exc: Exception) -> None:
    delay = nak_delay(deliveries)
    log.warning("command on %s hit a transient error (%s); redelivery in %.1fs", msg.subject, exc, delay)
    await msg.nak(delay=delay)
