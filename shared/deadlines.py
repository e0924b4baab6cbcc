"""A session's deadlines, pure: when it expires, becomes idle or has been paused too long,
and when the `expiring` warning before the earliest of those is due. The reaper schedules
them; the runtime checks a `warn` command against them before it appends `expiring`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.contracts import ExpiringReason, SessionRecord, SessionStatus

WARN = "warn"


@dataclass(frozen=True, slots=True)
class Due:
    """One deadline of a session: `kind` is expired, idle or paused_ttl, or warn (the
    warning before the earliest of those)."""

    at: datetime
    kind: str
    deadline: datetime  # the deadline itself (a warning's is later than its `at`)
    reason: ExpiringReason
    set_at: datetime  # when the deadline was set (a warning needs it set that far ahead)


def deadlines(session: SessionRecord, paused_ttl: timedelta, warning: timedelta) -> list[Due]:
    """Every deadline of a settled (running or paused) session, and the warning of the
    earliest one unless it was already given (the record's `warned_deadline`) or the deadline
    was set less than `warning` ahead (its setter knows it is near). 0 `warning`: none."""
    found: list[Due] = []
    if session.status in (SessionStatus.RUNNING, SessionStatus.PAUSED):
        expires = session.expires_at
        found.append(Due(expires, "expired", expires, ExpiringReason.EXPIRED, session.updated_at))
    idle = session.idle_deadline
    if session.status == SessionStatus.RUNNING and idle is not None:
        found.append(Due(idle, "idle", idle, ExpiringReason.IDLE, session.active_at))
    if session.status == SessionStatus.PAUSED:
        paused_at = session.paused_at or session.updated_at
        until = paused_at + paused_ttl
        found.append(Due(until, "paused_ttl", until, ExpiringReason.PAUSED_TTL, paused_at))
    if found and warning > timedelta(0):
        first = min(found, key=lambda d: d.at)
        if session.warned_deadline != first.deadline and first.deadline - first.set_at > warning:
            found.append(Due(first.deadline - warning, WARN, first.deadline, first.reason, first.set_at))
    return found


def warning_due(session: SessionRecord, paused_ttl: timedelta, warning: timedelta) -> Due | None:
    """The warning the session still has to get, if any."""
    return next((d for d in deadlines(session, paused_ttl, warning) if d.kind == WARN), None)
