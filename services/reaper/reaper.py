"""The reaper: watches `sandbox_sessions`, publishes `stop` and `pause` commands and
`expiring` warnings, never touches Docker.

- deadlines: an in-memory schedule of every settled session's deadlines (`expires_at`, the
  idle deadline, a paused session's `paused_ttl`), fed by a KV watch (which replays every
  current record first, so a restarted reaper rebuilds it), wakes at the earliest and
  publishes `stop {reason: expired | idle | paused_ttl, session_id}` — or, for idleness with
  `sandbox.on_idle = pause`, `pause {reason: idle}` — and, `sandbox.expiry_warning_seconds`
  before the earliest deadline, appends `expiring` on the chat (at the record's version, so
  never on a chat that moved on);
- re-drive: a session left `provisioning` or `stopping` longer than the grace gets
  `stop {reason: stuck_<status>}`.
Each mechanism has a kill switch. A failure of one item or one tick is logged and counted,
never fatal; the status block (`last_run_ts`, counts, last action) is written to the
`sandbox_status` bucket under `reaper.<reaper_id>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from opentelemetry.trace import SpanKind

from services.reaper.decisions import (
    ExpirySchedule,
    Order,
    PauseOrder,
    ReaperPolicy,
    StopOrder,
    WarnOrder,
    order_for,
    redrive_order,
)
from shared.clock import Clock
from shared.config import ReaperSettings
from shared.contracts import PauseReason, PauseSandbox, StopReason, StopSandbox, WarnSandbox, encode
from shared.event_store import with_nats_retry
from shared.poison import PoisonSource, Quarantine
from shared.registry import check_record
from shared.subjects import COMMANDS_STREAM, MSG_ID_HEADER, command_subject
from shared.telemetry import Telemetry, inject
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)


_STUCK_REASONS = frozenset({StopReason.STUCK_PROVISIONING, StopReason.STUCK_STOPPING})


def _describe(order: Order) -> tuple[str, str]:
    """(chat, what) for logs."""
    match order:
        case StopOrder():
            return order.chat_id, f"stop ({order.reason})"
        case PauseOrder():
            return order.chat_id, "pause (idle)"
        case WarnOrder():
            return order.chat_id, f"warn ({order.reason})"


class LastAction(msgspec.Struct):
    at: datetime
    chat_id: str
    session_id: str
    reason: str
    command_id: str


class ReaperStatus(msgspec.Struct):
    """What an operator reads with `nats kv get sandbox_status reaper.<id>`."""

    reaper_id: str
    started_at: datetime
    last_run_ts: datetime | None = None
    sessions_tracked: int = 0
    next_expiry: datetime | None = None
    expiry_enabled: bool = True
    redrive_enabled: bool = True
    expired_published: int = 0
    redrive_published: int = 0
    idle_published: int = 0  # idle stops and pauses
    warnings_published: int = 0
    item_errors: int = 0
    tick_errors: int = 0
    last_action: LastAction | None = None
    last_error: str | None = None


@dataclass
class Reaper:
    js: JetStreamContext
    sessions: KeyValue
    status_bucket: KeyValue
    settings: ReaperSettings
    clock: Clock
    telemetry: Telemetry = field(default_factory=telemetry_disabled)
    policy: ReaperPolicy = field(default_factory=ReaperPolicy)
    schedule: ExpirySchedule = field(init=False)
    quarantine: Quarantine = field(init=False)
    status: ReaperStatus = field(init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _redriven: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.schedule = ExpirySchedule(self.policy)
        self.quarantine = Quarantine(self.telemetry.metrics)
        self.status = ReaperStatus(
            reaper_id=self.settings.reaper_id,
            started_at=self.clock.now(),
            expiry_enabled=self.settings.expiry_enabled,
            redrive_enabled=self.settings.redrive_enabled,
        )

    async def run(self, stopping: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._watch(stopping), name="reaper-watch"),
            asyncio.create_task(self._ticks(stopping), name="reaper-ticks"),
            asyncio.create_task(self._publish_status(stopping), name="reaper-status"),
        ]
        try:
            await stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._write_status()

    async def ready(self) -> None:
        """Returns once the watch has replayed every current record."""
        await self._ready.wait()

    # ------------------------------------------------------------------ the schedule

    async def _watch(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                watcher = await self.sessions.watchall()
                async for entry in watcher:
                    if entry is None:
                        self._ready.set()
                        continue
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        self.schedule.remove(entry.key)
                    else:
                        checked = check_record(entry.key, entry.value)
                        if isinstance(checked, str):  # poison: what was scheduled for the chat stays
                            self.quarantine.report(PoisonSource.RECORD, entry.key, entry.revision or 0, checked)
                            continue
                        self.schedule.put(checked)
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("registry watch failed; watching again")
                await asyncio.sleep(1.0)

    async def _ticks(self, stopping: asyncio.Event) -> None:
        await self._ready.wait()
        while not stopping.is_set():
            try:
                await self.tick()
            except Exception as exc:
                self.status.tick_errors += 1
                self.telemetry.metrics.increment("sandbox.reaper.error.total", {"scope": "tick"})
                self.status.last_error = f"tick: {exc!r}"
                log.exception("reaper tick failed")
            await self._sleep_until_due()

    async def _sleep_until_due(self) -> None:
        timeout = self.settings.tick_seconds
        due = self.schedule.next_due() if self.settings.expiry_enabled else None
        if due is not None:
            timeout = min(timeout, max((due - self.clock.now()).total_seconds(), 0.0))
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def tick(self) -> list[Order]:
        """One pass: publish what is due. What was published, for tests and logs."""
        now = self.clock.now()
        orders: list[Order] = []
        if self.settings.expiry_enabled:
            orders += [order_for(session, due, self.policy) for session, due in self.schedule.pop_due(now)]
        if self.settings.redrive_enabled:
            grace = timedelta(seconds=self.settings.redrive_grace_seconds)
            for session in list(self.schedule.sessions.values()):
                redrive = redrive_order(session, now, grace)
                if redrive is not None and redrive.command_id not in self._redriven:
                    orders.append(redrive)
        published: list[Order] = []
        for order in orders:
            try:
                done = await self._carry_out(order)
            except Exception as exc:  # noqa: BLE001 - one item's failure must not stop the others
                chat, what = _describe(order)
                self.status.item_errors += 1
                self.telemetry.metrics.increment("sandbox.reaper.error.total", {"scope": "item"})
                self.status.last_error = f"{what} {chat}: {exc!r}"
                log.warning("reaper could not publish %s for chat %s: %s", what, chat, exc)
                held = self.schedule.sessions.get(chat)
                if not (isinstance(order, StopOrder) and order.reason in _STUCK_REASONS) and held is not None:
                    self.schedule.put(held)  # try again on the next tick
                continue
            if done:
                published.append(order)
        self.status.last_run_ts = now
        self.status.sessions_tracked = len(self.schedule)
        self.status.next_expiry = self.schedule.next_due()
        return published

    async def _carry_out(self, order: Order) -> bool:
        match order:
            case StopOrder():
                await self._publish(order)
            case PauseOrder():
                await self._publish_pause(order)
            case WarnOrder():
                return await self._warn(order)
        return True

    async def _publish_pause(self, order: PauseOrder) -> None:
        command = PauseSandbox(
            command_id=uuid.UUID(order.command_id),
            chat_id=uuid.UUID(order.chat_id),
            session_id=uuid.UUID(order.session_id),
            reason=PauseReason.IDLE,
            requested_at=self.clock.now(),
            requested_by=f"reaper:{self.settings.reaper_id}",
        )
        await self._send(command, "idle")
        self.telemetry.metrics.increment("sandbox.reaper.action.total", {"reason": "pause_idle"})
        self.status.idle_published += 1
        self._note(order.chat_id, order.session_id, "pause_idle", order.command_id)
        log.info("reaper: pause (idle) session %s of chat %s", order.session_id, order.chat_id)

    async def _warn(self, order: WarnOrder) -> bool:
        command = WarnSandbox(
            command_id=uuid.UUID(order.command_id),
            chat_id=uuid.UUID(order.chat_id),
            session_id=uuid.UUID(order.session_id),
            deadline=order.deadline,
            reason=order.reason,
            requested_at=self.clock.now(),
            requested_by=f"reaper:{self.settings.reaper_id}",
        )
        await self._send(command, order.reason)
        self.telemetry.metrics.increment("sandbox.reaper.action.total", {"reason": f"warn_{order.reason}"})
        self.status.warnings_published += 1
        self._note(order.chat_id, order.session_id, f"warn ({order.reason})", order.command_id)
        return True

    async def _send(self, command: StopSandbox | PauseSandbox | WarnSandbox, reason: str) -> None:
        """Publish one of the reaper's commands (its id as the message id, with trace context)."""
        chat_id, command_id = command.chat_key, command.command_key
        subject = command_subject(command.kind, chat_id)
        attributes = {"chat.id": chat_id, "session.id": str(command.session_id), "sandbox.reason": reason}
        with self.telemetry.tracer.span(f"reaper.publish_{command.kind}", attributes, kind=SpanKind.PRODUCER):
            headers = inject({MSG_ID_HEADER: command_id})
            payload = encode(command)

            async def publish() -> None:
                await self.js.publish(subject, payload, stream=COMMANDS_STREAM, headers=headers)

            await with_nats_retry(publish, what=f"publish {subject}")

    def _note(self, chat_id: str, session_id: str, reason: str, command_id: str) -> None:
        self.status.last_action = LastAction(
            at=self.clock.now(), chat_id=chat_id, session_id=session_id, reason=reason, command_id=command_id
        )

    async def _publish(self, order: StopOrder) -> None:
        command = StopSandbox(
            command_id=uuid.UUID(order.command_id),
            chat_id=uuid.UUID(order.chat_id),
            session_id=uuid.UUID(order.session_id),
            reason=order.reason,
            requested_at=self.clock.now(),
            requested_by=f"reaper:{self.settings.reaper_id}",
        )
        await self._send(command, order.reason)
        self.telemetry.metrics.increment("sandbox.reaper.action.total", {"reason": order.reason})
        if order.reason == StopReason.EXPIRED:
            lateness_ms = (self.clock.now() - order.due_at).total_seconds() * 1000.0
            self.telemetry.metrics.record("sandbox.reaper.expiry_lateness_ms", lateness_ms)
            self.status.expired_published += 1
        elif order.reason in (StopReason.IDLE, StopReason.PAUSED_TTL):
            self.status.idle_published += 1
        else:
            self.status.redrive_published += 1
            self._redriven.add(order.command_id)
        self.status.last_action = LastAction(
            at=self.clock.now(),
            chat_id=order.chat_id,
            session_id=order.session_id,
            reason=order.reason,
            command_id=order.command_id,
        )
        log.info("reaper: stop %s for session %s of chat %s", order.reason, order.session_id, order.chat_id)

    # ------------------------------------------------------------------ status

    def status_key(self) -> str:
        return f"reaper.{self.settings.reaper_id}"

    async def _write_status(self) -> None:
        await self.status_bucket.put(self.status_key(), encode(self.status))

    async def _publish_status(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self._write_status()
            except Exception as exc:  # noqa: BLE001 - status is best effort and must not stop the reaper
                log.warning("reaper status not written: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.settings.status_interval_seconds)
