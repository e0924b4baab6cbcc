"""Pure reaper decisions: which sessions get a `stop` command now, and with which id.

Command ids are derived from what they act on (session, expiry or version), so several
reapers — or one reaper after a restart — publish the same command, which the commands
stream's `Nats-Msg-Id` de-duplication and the runtime's outcome check collapse into one.
"""

from __future__ import annotations

import heapq
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from shared.contracts import SessionRecord, SessionStatus, StopReason

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
    reason: StopReason  # expired, stuck_provisioning or stuck_stopping
    command_id: str
    due_at: datetime


def expiry_command_id(session: SessionRecord) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"expire:{session.session_id}:{session.expires_at.isoformat()}"))


def redrive_command_id(session: SessionRecord) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"redrive:{session.session_id}:{session.version}"))


def expiry_order(session: SessionRecord) -> StopOrder:
    return StopOrder(
        session.chat_id, session.session_id, StopReason.EXPIRED, expiry_command_id(session), session.expires_at
    )


def redrive_order(session: SessionRecord, now: datetime, grace: timedelta) -> StopOrder | None:
    """A stop for a session stuck in a claim state for longer than `grace`, else None."""
    reason = _STUCK.get(session.status)
    if reason is None or now - session.updated_at < grace:
        return None
    return StopOrder(session.chat_id, session.session_id, reason, redrive_command_id(session), now)


@dataclass
class ExpirySchedule:
    """The registry's running sessions ordered by `expires_at` (lazy deletion: an entry is
    valid only while it still matches the session the registry holds for its chat)."""

    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    _heap: list[tuple[datetime, str, str]] = field(default_factory=list)

    def put(self, session: SessionRecord) -> None:
        self.sessions[session.chat_id] = session
        if session.status == SessionStatus.RUNNING:
            heapq.heappush(self._heap, (session.expires_at, session.chat_id, session.session_id))

    def remove(self, chat_id: str) -> None:
        self.sessions.pop(chat_id, None)

    def _valid(self, entry: tuple[datetime, str, str]) -> SessionRecord | None:
        expires_at, chat, session_id = entry
        held = self.sessions.get(chat)
        if held is None or held.session_id != session_id or held.expires_at != expires_at:
            return None
        return held if held.status == SessionStatus.RUNNING else None

    def next_due(self) -> datetime | None:
        while self._heap and self._valid(self._heap[0]) is None:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: datetime) -> list[SessionRecord]:
        due: list[SessionRecord] = []
        while self._heap and self._heap[0][0] <= now:
            held = self._valid(heapq.heappop(self._heap))
            if held is not None:
                due.append(held)
        return due

    def __len__(self) -> int:
        return len(self.sessions)
