"""Pure lifecycle decisions: (chat's last event, its open claim and the liveness of the
instance that made it, command, now) -> what to do.

Nothing here performs I/O; the handlers carry decisions out and come back here after every
lost race. The chat's open claim is the `provisioning` or `stopping` event of a command that
has had no outcome since: usually the chat's last event, but other commands' answers
(`rejected`, `reused`, `failed`) may have landed on top of it, and it stays the command's own
to resume (`find_open_claim`). Another command's open claim is "in flight" — waited on —
unless the instance that made it is known to be dead, and never once it is older than the
claim timeout (the backstop when the instance's liveness is unknown). Claims no longer in
flight are taken over, which is safe because every Docker step is idempotent by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec

from shared.contracts import (
    AnyEvent,
    CreateSandbox,
    KeepaliveSandbox,
    PauseReason,
    PauseSandbox,
    PreviousSession,
    RejectReason,
    ResumeSandbox,
    SandboxProvisioning,
    SandboxStopping,
    SessionRecord,
    SessionStatus,
    StopReason,
    StopSandbox,
    WarnSandbox,
    is_outcome,
)
from shared.deadlines import Due, warning_due
from shared.instances import Liveness


@dataclass(frozen=True, slots=True)
class Policy:
    node_id: str
    image: str
    default_ttl: timedelta
    max_ttl: timedelta
    claim_timeout: timedelta
    # No keepalive moves a session's expiry past created_at + max_lifetime.
    max_lifetime: timedelta = timedelta(days=7)
    default_idle_ttl: timedelta = timedelta(0)  # 0: no idle timeout unless a create asks
    # A paused session is stopped after this (the reaper's `paused_ttl` stop checks it here).
    paused_ttl: timedelta = timedelta(days=1)
    warning: timedelta = timedelta(0)  # sandbox.expiry_warning_seconds (a `warn` is checked with it)


# --------------------------------------------------------------------------- open claims

ClaimEvent = SandboxProvisioning | SandboxStopping
_CLAIM_STATES = frozenset({SessionStatus.PROVISIONING, SessionStatus.STOPPING})


@dataclass(frozen=True, slots=True)
class OpenClaim:
    """The chat's open claim and what is known of the instance that made it."""

    event: ClaimEvent
    liveness: Liveness = Liveness.UNKNOWN

    @property
    def command_id(self) -> str | None:
        return self.event.causation_id


def under_claim(last: AnyEvent | None) -> bool:
    """Whether the chat's state may have an open claim: its live session is in a claim state."""
    session = last.session if last is not None else None
    return session is not None and session.status in _CLAIM_STATES


def find_open_claim(events: Sequence[AnyEvent]) -> ClaimEvent | None:
    """The open claim of a chat whose events (oldest first) are `events`: the last claim, if
    the chat's current session is the one it claimed and still in a claim state, and its
    command has had no outcome since (a stop that failed leaves its session `stopping`, but
    its claim is over)."""
    if not events or not under_claim(events[-1]):
        return None
    session = events[-1].session
    for i in range(len(events) - 1, -1, -1):
        claim = events[i]
        if isinstance(claim, ClaimEvent):
            if claim.session is None or session is None or claim.session.session_id != session.session_id:
                return None
            answered = any(is_outcome(e) and e.causation_id == claim.causation_id for e in events[i + 1 :])
            return None if answered else claim
    return None


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class AlreadyHandled:
    """The command's outcome is already in the log (a redelivery): acknowledge only."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Another command's claim is in flight; look again shortly."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    reason: RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class Reuse:
    session: SessionRecord


@dataclass(frozen=True, slots=True)
class Extend:
    session: SessionRecord
    capped: bool = False  # the expiry was held at the lifetime cap
    kept: bool = False  # the session already expired later than asked: its expiry was kept


@dataclass(frozen=True, slots=True)
class Pause:
    """Freeze the container, then append `paused` with this session."""

    session: SessionRecord


@dataclass(frozen=True, slots=True)
class Resume:
    """Unfreeze the container, then append `resumed` with this session (a create's outcome
    too: `result: resumed`)."""

    session: SessionRecord


@dataclass(frozen=True, slots=True)
class ClaimProvision:
    """Append `provisioning` for a new session, then start its container."""

    session: SessionRecord
    previous: PreviousSession | None


@dataclass(frozen=True, slots=True)
class ResumeProvision:
    """Our own `provisioning` claim is the chat's open claim (a retry, a redelivery after a
    crash): start or find its container."""

    session: SessionRecord
    previous: PreviousSession | None


@dataclass(frozen=True, slots=True)
class ClaimReplace:
    """A create found an expired or abandoned session: claim `stopping` on it, remove its
    container, then provision a new session that names it as `previous`."""

    old: SessionRecord


@dataclass(frozen=True, slots=True)
class ResumeReplace:
    old: SessionRecord


@dataclass(frozen=True, slots=True)
class ClaimStop:
    session: SessionRecord


@dataclass(frozen=True, slots=True)
class ResumeStop:
    session: SessionRecord


CreateDecision = (
    AlreadyHandled | Wait | Reject | Reuse | Resume | ClaimProvision | ResumeProvision | ClaimReplace | ResumeReplace
)
StopDecision = AlreadyHandled | Wait | Reject | ClaimStop | ResumeStop
KeepaliveDecision = AlreadyHandled | Wait | Reject | Extend


@dataclass(frozen=True, slots=True)
class Warn:
    """Append `expiring` for `due` with this session (its `warned_deadline` set)."""

    session: SessionRecord
    due: Due


WarnDecision = AlreadyHandled | Reject | Warn
PauseDecision = AlreadyHandled | Wait | Reject | Pause
ResumeDecision = AlreadyHandled | Wait | Reject | Resume


# --------------------------------------------------------------------------- helpers


def _claim_in_flight(claim: OpenClaim | None, command_id: str, now: datetime, policy: Policy) -> bool:
    """Another command's claim that may still be carried out: its instance is not known to be
    dead, and it is younger than the claim timeout."""
    return (
        claim is not None
        and claim.command_id != command_id
        and claim.liveness != Liveness.DEAD
        and now - claim.event.occurred_at < policy.claim_timeout
    )


def _own_claim(claim: OpenClaim | None, command_id: str) -> ClaimEvent | None:
    return claim.event if claim is not None and claim.command_id == command_id else None


def _waiting(session: SessionRecord, claim: OpenClaim | None) -> str:
    by = f" (claimed by instance {claim.event.instance_id}: {claim.liveness})" if claim is not None else ""
    return f"session {session.session_id} is {session.status}{by}"


def _live(last: AnyEvent | None) -> SessionRecord | None:
    session = last.session if last is not None else None
    return session if session is not None and session.is_live else None


def _ttl(requested: int | None, policy: Policy) -> timedelta | Reject:
    ttl = timedelta(seconds=requested) if requested is not None else policy.default_ttl
    if ttl > policy.max_ttl:
        return Reject(
            RejectReason.TTL_TOO_LONG,
            f"ttl_seconds {requested} exceeds the maximum of {int(policy.max_ttl.total_seconds())}",
        )
    return ttl


def active(session: SessionRecord, now: datetime) -> SessionRecord:
    """The session with activity recorded now (only a session with an idle timeout keeps
    track: the others' records do not change on reuse)."""
    if not session.idle_ttl_seconds:
        return session
    return msgspec.structs.replace(session, last_active_at=now, warned_deadline=None)


def resumed(session: SessionRecord, now: datetime) -> SessionRecord:
    """A paused session running again: activity, so its idle deadline starts afresh."""
    running = msgspec.structs.replace(session, status=SessionStatus.RUNNING, paused_at=None, updated_at=now)
    return msgspec.structs.replace(running, last_active_at=now, warned_deadline=None)


def paused_until(session: SessionRecord, policy: Policy) -> datetime | None:
    """When a paused session is stopped (sandbox.paused_ttl_seconds after its pause)."""
    if session.status != SessionStatus.PAUSED:
        return None
    return (session.paused_at or session.updated_at) + policy.paused_ttl


def stopping(session: SessionRecord, now: datetime) -> SessionRecord:
    return msgspec.structs.replace(session, status=SessionStatus.STOPPING, updated_at=now)


def new_session(
    command: CreateSandbox, session_id: str, ttl: timedelta, now: datetime, policy: Policy
) -> SessionRecord:
    idle = command.idle_ttl_seconds
    return SessionRecord(
        idle_ttl_seconds=int(policy.default_idle_ttl.total_seconds()) if idle is None else idle,
        session_id=session_id,
        chat_id=command.chat_key,
        node_id=policy.node_id,
        container_id=None,
        image=policy.image,
        status=SessionStatus.PROVISIONING,
        created_at=now,
        expires_at=now + ttl,
        updated_at=now,
        labels=dict(command.labels),
    )


def provision_after_replace(
    command: CreateSandbox, old: SessionRecord, session_id: str, now: datetime, policy: Policy
) -> ClaimProvision | Reject:
    """The claim of the new session once a replace has removed the old one's container."""
    ttl = _ttl(command.ttl_seconds, policy)
    if isinstance(ttl, Reject):
        return ttl
    previous = PreviousSession(old.session_id, old.container_id)
    return ClaimProvision(new_session(command, session_id, ttl, now, policy), previous)


# --------------------------------------------------------------------------- decide


def decide_create(
    last: AnyEvent | None,
    command: CreateSandbox,
    now: datetime,
    policy: Policy,
    new_session_id: str,
    *,
    claim: OpenClaim | None = None,
) -> CreateDecision:
    """`claim`: the chat's open claim (see `find_open_claim`), None when it has none."""
    command_id = command.command_key
    if last is not None and last.causation_id == command_id and is_outcome(last):
        return AlreadyHandled()
    own = _own_claim(claim, command_id)
    if isinstance(own, SandboxStopping) and own.session is not None:
        return ResumeReplace(own.session)
    if isinstance(own, SandboxProvisioning) and own.session is not None:
        return ResumeProvision(own.session, own.previous)
    ttl = _ttl(command.ttl_seconds, policy)
    if isinstance(ttl, Reject):
        return ttl
    session = _live(last)
    if session is None:
        return ClaimProvision(new_session(command, new_session_id, ttl, now, policy), None)
    if _claim_in_flight(claim, command_id, now, policy):
        return Wait(_waiting(session, claim))
    if session.status == SessionStatus.RUNNING and not session.is_expired(now):
        return Reuse(active(session, now))
    if session.status == SessionStatus.PAUSED and not session.is_expired(now):
        return Resume(resumed(session, now))
    # Expired, or a claim that was abandoned: stop what is there and start afresh.
    return ClaimReplace(stopping(session, now))


def decide_stop(
    last: AnyEvent | None,
    command: StopSandbox,
    now: datetime,
    policy: Policy,
    pinned_session_id: str | None = None,
    *,
    claim: OpenClaim | None = None,
) -> StopDecision:
    command_id = command.command_key
    if last is not None and last.causation_id == command_id and is_outcome(last):
        return AlreadyHandled()
    own = _own_claim(claim, command_id)
    if isinstance(own, SandboxStopping) and own.session is not None:
        return ResumeStop(own.session)
    session = _live(last)
    target = pinned_session_id or (str(command.session_id) if command.session_id else None)
    if session is None:
        return Reject(RejectReason.NO_LIVE_SESSION, f"chat {command.chat_id} has no live sandbox")
    if target is not None and session.session_id != target:
        return Reject(
            RejectReason.STALE_SESSION, f"session {target} is not the chat's current session ({session.session_id})"
        )
    settled = session.status in (SessionStatus.RUNNING, SessionStatus.PAUSED)
    if command.reason == StopReason.EXPIRED and settled and not session.is_expired(now):
        # The reaper's stop raced a keepalive: an expiry stop only stops an expired session.
        return Reject(
            RejectReason.NOT_EXPIRED,
            f"session {session.session_id} now expires at {session.expires_at.isoformat()}",
        )
    if (
        command.reason == StopReason.IDLE
        and settled
        and not (session.status == SessionStatus.RUNNING and session.is_idle(now))
    ):
        # The reaper's idle stop raced activity (or a pause): it stops only an idle session.
        return Reject(RejectReason.NOT_IDLE, _not_idle(session))
    until = paused_until(session, policy)
    if command.reason == StopReason.PAUSED_TTL and settled and (until is None or until > now):
        return Reject(RejectReason.NOT_IDLE, f"session {session.session_id} is {session.status}, not paused that long")
    if _claim_in_flight(claim, command_id, now, policy):
        return Wait(_waiting(session, claim))
    return ClaimStop(stopping(session, now))


def decide_keepalive(
    last: AnyEvent | None,
    command: KeepaliveSandbox,
    now: datetime,
    policy: Policy,
    *,
    claim: OpenClaim | None = None,
) -> KeepaliveDecision:
    session = _targeted(last, command)
    if not isinstance(session, SessionRecord):
        return session
    if _claim_in_flight(claim, command.command_key, now, policy) and session.status == SessionStatus.PROVISIONING:
        return Wait(_waiting(session, claim))
    if session.status not in (SessionStatus.RUNNING, SessionStatus.PAUSED):
        return Reject(RejectReason.NOT_RUNNING, f"session {session.session_id} is {session.status}")
    if session.is_expired(now):
        return Reject(RejectReason.EXPIRED, f"session {session.session_id} expired at {session.expires_at.isoformat()}")
    ttl = _ttl(command.ttl_seconds, policy)
    if isinstance(ttl, Reject):
        return ttl
    # Only ever later, never past the lifetime cap (unless it already is: never earlier wins).
    cap = session.created_at + policy.max_lifetime
    asked = min(now + ttl, cap)
    kept = asked <= session.expires_at
    expires_at = session.expires_at if kept else asked
    extended = msgspec.structs.replace(session, expires_at=expires_at, updated_at=now)
    if not kept:
        extended = msgspec.structs.replace(extended, warned_deadline=None)
    return Extend(active(extended, now), capped=not kept and now + ttl > cap, kept=kept)


def _targeted(
    last: AnyEvent | None, command: KeepaliveSandbox | PauseSandbox | ResumeSandbox | WarnSandbox
) -> SessionRecord | AlreadyHandled | Reject:
    """The live session a command on an existing session acts on (the one it names, if it
    names one), or what to do instead: nothing (its outcome is the last event), or a refusal."""
    if last is not None and last.causation_id == command.command_key and is_outcome(last):
        return AlreadyHandled()
    session = _live(last)
    if session is None:
        return Reject(RejectReason.NO_LIVE_SESSION, f"chat {command.chat_id} has no live sandbox")
    if command.session_id is not None and session.session_id != str(command.session_id):
        return Reject(
            RejectReason.STALE_SESSION,
            f"session {command.session_id} is not the chat's current session ({session.session_id})",
        )
    return session


def _not_idle(session: SessionRecord) -> str:
    deadline = session.idle_deadline
    if session.status != SessionStatus.RUNNING:
        return f"session {session.session_id} is {session.status}"
    if deadline is None:
        return f"session {session.session_id} has no idle timeout"
    return f"session {session.session_id} is idle only from {deadline.isoformat()}"


def _settled(
    last: AnyEvent | None, command: PauseSandbox | ResumeSandbox, now: datetime, policy: Policy, claim: OpenClaim | None
) -> SessionRecord | AlreadyHandled | Wait | Reject:
    """The live session a pause or resume acts on, or what to do instead."""
    session = _targeted(last, command)
    if not isinstance(session, SessionRecord):
        return session
    if _claim_in_flight(claim, command.command_key, now, policy):
        return Wait(_waiting(session, claim))
    if session.is_expired(now):
        return Reject(RejectReason.EXPIRED, f"session {session.session_id} expired at {session.expires_at.isoformat()}")
    return session


def decide_warn(last: AnyEvent | None, command: WarnSandbox, policy: Policy) -> WarnDecision:
    """Warn only of the session's earliest deadline, once: a `warn` that is late (the deadline
    moved, or another reaper's warning landed) is refused."""
    session = _targeted(last, command)
    if not isinstance(session, SessionRecord):
        return session
    due = warning_due(session, policy.paused_ttl, policy.warning)
    if due is None or due.deadline != command.deadline or due.reason != command.reason:
        return Reject(
            RejectReason.NOT_DUE,
            f"session {session.session_id} has no {command.reason} deadline at {command.deadline.isoformat()} "
            "to warn of",
        )
    return Warn(msgspec.structs.replace(session, warned_deadline=due.deadline), due)


def decide_pause(
    last: AnyEvent | None, command: PauseSandbox, now: datetime, policy: Policy, *, claim: OpenClaim | None = None
) -> PauseDecision:
    session = _settled(last, command, now, policy, claim)
    if not isinstance(session, SessionRecord):
        return session
    if session.status != SessionStatus.RUNNING:
        return Reject(RejectReason.NOT_RUNNING, f"session {session.session_id} is {session.status}")
    if command.reason == PauseReason.IDLE and not session.is_idle(now):
        return Reject(RejectReason.NOT_IDLE, _not_idle(session))
    return Pause(msgspec.structs.replace(session, status=SessionStatus.PAUSED, paused_at=now, updated_at=now))


def decide_resume(
    last: AnyEvent | None, command: ResumeSandbox, now: datetime, policy: Policy, *, claim: OpenClaim | None = None
) -> ResumeDecision:
    session = _settled(last, command, now, policy, claim)
    if not isinstance(session, SessionRecord):
        return session
    if session.status != SessionStatus.PAUSED:
        return Reject(RejectReason.NOT_PAUSED, f"session {session.session_id} is {session.status}")
    return Resume(resumed(session, now))
