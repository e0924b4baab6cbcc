"""Pure reaper decisions: which sessions get a `stop` or `pause` command or an `expiring`
warning now, and with which id.

Command ids are derived from what they act on (session, expiry or version), so several
reapers — or one reaper after a restart — publish the same command, which the commands
stream's `Nats-Msg-Id` de-duplication and the runtime's outcome check collapse into one.
"""

from __future__ import annotations

import heapq
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from shared.contracts import ExpiringReason, SessionRecord, SessionStatus, StopReason
from shared.deadlines import Due, deadlines

# The heap is rebuilt from the records when it holds this many entries per record (and more).
_COMPACT_FACTOR = 8
_COMPACT_SLACK = 1024
_NAMESPACE = uuid.UUID("8a0d3c39-1d2a-4f0e-9a59-2f1e5c7b6a10")
# The claim states a session can be stuck in, and the stop that re-drives each.
_STUCK = {
    SessionStatus.PROVISIONING: StopReason.STUCK_PROVISIONING,
    SessionStatus.STOPPING: StopReason.STUCK_STOPPING,
}


@dataclass(frozen=True, slots=True)
class StopOrder:
    chat_id: str
    session_id: str
    reason: StopReason  # expired, idle, paused_ttl, stuck_provisioning or stuck_stopping
    command_id: str
    due_at: datetime


@dataclass(frozen=True, slots=True)
class PauseOrder:
    """sandbox.on_idle = pause: pause an idle session (the runtime checks it still is)."""

    chat_id: str
    session_id: str
    command_id: str
    due_at: datetime


@dataclass(frozen=True, slots=True)
class WarnOrder:
    """A `warn` command: the runtime appends `expiring` for `deadline` (reason: which one)
    when it is still the session's earliest and not yet warned of."""

    chat_id: str
    session_id: str
    reason: ExpiringReason
    deadline: datetime
    command_id: str


Order = StopOrder | PauseOrder | WarnOrder


@dataclass(frozen=True, slots=True)
class ReaperPolicy:
    """What the reaper does at a session's deadlines (from the `sandbox` settings)."""

    on_idle: str = "stop"  # stop | pause
    paused_ttl: timedelta = timedelta(days=1)
    warning: timedelta = timedelta(0)  # 0: no `expiring` events


def _command_id(kind: str, session: SessionRecord, at: datetime) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{kind}:{session.session_id}:{at.isoformat()}"))


def expiry_command_id(session: SessionRecord) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"expire:{session.session_id}:{session.expires_at.isoformat()}"))


def redrive_command_id(session: SessionRecord) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"redrive:{session.session_id}:{session.version}"))


def expiry_order(session: SessionRecord) -> StopOrder:
    return StopOrder(
        session.chat_id, session.session_id, StopReason.EXPIRED, expiry_command_id(session), session.expires_at
    )


def order_for(session: SessionRecord, due: Due, policy: ReaperPolicy) -> Order:
    """What the reaper publishes when `due` comes (command ids: the same for every reaper)."""
    match due.kind:
        case "expired":
            return expiry_order(session)
        case "idle" if policy.on_idle == "pause":
            return PauseOrder(session.chat_id, session.session_id, _command_id("pause-idle", session, due.at), due.at)
        case "idle":
            return StopOrder(
                session.chat_id, session.session_id, StopReason.IDLE, _command_id("idle", session, due.at), due.at
            )
        case "paused_ttl":
            command_id = _command_id("paused-ttl", session, due.at)
            return StopOrder(session.chat_id, session.session_id, StopReason.PAUSED_TTL, command_id, due.at)
        case _:
            command_id = _command_id("warn", session, due.deadline)
            return WarnOrder(session.chat_id, session.session_id, due.reason, due.deadline, command_id)


def redrive_order(session: SessionRecord, now: datetime, grace: timedelta) -> StopOrder | None:
    """A stop for a session stuck in a claim state for longer than `grace`, else None."""
    reason = _STUCK.get(session.status)
    if reason is None or now - session.updated_at < grace:
        return None
    return StopOrder(session.chat_id, session.session_id, reason, redrive_command_id(session), now)


@dataclass
class ExpirySchedule:
    """The registry's settled sessions' deadlines in time order (lazy deletion: an entry is
    valid only while the session the registry holds for its chat still has that deadline)."""

    policy: ReaperPolicy = field(default_factory=ReaperPolicy)
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    _heap: list[tuple[datetime, str, str, str]] = field(default_factory=list)

    def put(self, session: SessionRecord) -> None:
        self.sessions[session.chat_id] = session
        for due in deadlines(session, self.policy.paused_ttl, self.policy.warning):
            heapq.heappush(self._heap, (due.at, session.chat_id, session.session_id, due.kind))
        if len(self._heap) > _COMPACT_FACTOR * len(self.sessions) + _COMPACT_SLACK:
            self._compact()

    def _compact(self) -> None:
        """Drop the entries records have outdated (every update of a record pushes its
        deadlines again; busy chats would otherwise grow the heap without bound)."""
        self._heap = [
            (due.at, chat, held.session_id, due.kind)
            for chat, held in self.sessions.items()
            for due in deadlines(held, self.policy.paused_ttl, self.policy.warning)
        ]
        heapq.heapify(self._heap)

    def remove(self, chat_id: str) -> None:
        self.sessions.pop(chat_id, None)

    def _valid(self, entry: tuple[datetime, str, str, str]) -> tuple[SessionRecord, Due] | None:
        at, chat, session_id, kind = entry
        held = self.sessions.get(chat)
        if held is None or held.session_id != session_id:
            return None
        found = deadlines(held, self.policy.paused_ttl, self.policy.warning)
        due = next((d for d in found if d.kind == kind and d.at == at), None)
        return None if due is None else (held, due)

    def next_due(self) -> datetime | None:
        while self._heap and self._valid(self._heap[0]) is None:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: datetime) -> list[tuple[SessionRecord, Due]]:
        due: list[tuple[SessionRecord, Due]] = []
        seen: set[tuple[datetime, str, str, str]] = set()
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            valid = self._valid(entry)
            if valid is not None and entry not in seen:  # a record put twice pushed it twice
                seen.add(entry)
                due.append(valid)
        return due

    def __len__(self) -> int:
        return len(self.sessions)
