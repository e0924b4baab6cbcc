"""Pure decisions of pause/resume, the idle timeout and the reaper's deadlines and warnings."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import msgspec

from services.reaper.decisions import (
    ExpirySchedule,
    PauseOrder,
    ReaperPolicy,
    StopOrder,
    WarnOrder,
    order_for,
)
from services.runtime.decisions import (
    Extend,
    Pause,
    Reject,
    Resume,
    Reuse,
    Warn,
    decide_create,
    decide_keepalive,
    decide_pause,
    decide_resume,
    decide_stop,
    decide_warn,
)
from shared.contracts import (
    PauseReason,
    PauseSandbox,
    RejectReason,
    ResumeSandbox,
    SandboxRunning,
    SessionRecord,
    SessionStatus,
    StopReason,
    WarnSandbox,
)
from shared.deadlines import deadlines
from tests.support.records import session_record
from tests.unit.test_decide import NOW, POLICY, create, keepalive, last, stop

IDLE = 60


def running(status: SessionStatus = SessionStatus.RUNNING, **fields: Any) -> SessionRecord:
    return session_record(now=NOW - timedelta(seconds=10), status=status, **fields)


def pause(**kw: object) -> PauseSandbox:
    return msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(uuid.uuid4()), **kw}, PauseSandbox)


def resume(**kw: object) -> ResumeSandbox:
    return msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(uuid.uuid4()), **kw}, ResumeSandbox)


def test_pause_freezes_a_running_session_and_only_that() -> None:
    s = running()
    decision = decide_pause(last(SandboxRunning, s), pause(), NOW, POLICY)
    assert isinstance(decision, Pause)
    assert decision.session.status == SessionStatus.PAUSED
    assert decision.session.paused_at == NOW
    frozen = decision.session
    again = decide_pause(last(SandboxRunning, frozen), pause(), NOW, POLICY)
    assert isinstance(again, Reject)
    assert again.reason == RejectReason.NOT_RUNNING
    stale = decide_pause(last(SandboxRunning, s), pause(session_id=str(uuid.uuid4())), NOW, POLICY)
    assert isinstance(stale, Reject)
    assert stale.reason == RejectReason.STALE_SESSION
    expired = decide_pause(last(SandboxRunning, s), pause(), s.expires_at, POLICY)
    assert isinstance(expired, Reject)
    assert expired.reason == RejectReason.EXPIRED
    none = decide_pause(None, pause(), NOW, POLICY)
    assert isinstance(none, Reject)
    assert none.reason == RejectReason.NO_LIVE_SESSION


def test_an_idle_pause_pauses_only_an_idle_session() -> None:
    s = running(idle_ttl_seconds=IDLE, last_active_at=NOW - timedelta(seconds=IDLE - 1))
    busy = decide_pause(last(SandboxRunning, s), pause(reason=PauseReason.IDLE), NOW, POLICY)
    assert isinstance(busy, Reject)
    assert busy.reason == RejectReason.NOT_IDLE
    at_deadline = decide_pause(last(SandboxRunning, s), pause(reason="idle"), NOW + timedelta(seconds=1), POLICY)
    assert isinstance(at_deadline, Pause)


def test_resume_thaws_a_paused_session_and_records_activity() -> None:
    frozen = running(status=SessionStatus.PAUSED, paused_at=NOW, idle_ttl_seconds=IDLE)
    decision = decide_resume(last(SandboxRunning, frozen), resume(), NOW + timedelta(seconds=5), POLICY)
    assert isinstance(decision, Resume)
    assert decision.session.status == SessionStatus.RUNNING
    assert decision.session.paused_at is None
    assert decision.session.last_active_at == NOW + timedelta(seconds=5)
    not_paused = decide_resume(last(SandboxRunning, running()), resume(), NOW, POLICY)
    assert isinstance(not_paused, Reject)
    assert not_paused.reason == RejectReason.NOT_PAUSED


def test_a_create_resumes_a_paused_session_and_replaces_an_expired_one() -> None:
    frozen = running(status=SessionStatus.PAUSED, paused_at=NOW)
    decision = decide_create(last(SandboxRunning, frozen), create(), NOW, POLICY, "new")
    assert isinstance(decision, Resume)
    assert decision.session.session_id == frozen.session_id
    expired = decide_create(last(SandboxRunning, frozen), create(), frozen.expires_at, POLICY, "new")
    assert type(expired).__name__ == "ClaimReplace"


def test_reuse_records_activity_only_for_a_session_with_an_idle_timeout() -> None:
    plain = running()
    reused = decide_create(last(SandboxRunning, plain), create(), NOW, POLICY, "new")
    assert isinstance(reused, Reuse)
    assert reused.session == plain, "nothing changes without an idle timeout"
    idle = running(idle_ttl_seconds=IDLE)
    reused = decide_create(last(SandboxRunning, idle), create(), NOW, POLICY, "new")
    assert isinstance(reused, Reuse)
    assert reused.session.last_active_at == NOW


def test_a_create_names_its_idle_timeout_or_gets_the_default() -> None:
    claim = decide_create(None, create(idle_ttl_seconds=30), NOW, POLICY, "s1")
    assert claim.session.idle_ttl_seconds == 30  # type: ignore[union-attr]
    default = decide_create(None, create(), NOW, replace(POLICY, default_idle_ttl=timedelta(seconds=9)), "s1")
    assert default.session.idle_ttl_seconds == 9  # type: ignore[union-attr]
    off = decide_create(None, create(idle_ttl_seconds=0), NOW, POLICY, "s1")
    assert off.session.idle_ttl_seconds == 0  # type: ignore[union-attr]


def test_a_keepalive_extends_a_paused_session_and_is_activity() -> None:
    frozen = running(status=SessionStatus.PAUSED, paused_at=NOW, idle_ttl_seconds=IDLE)
    decision = decide_keepalive(last(SandboxRunning, frozen), keepalive(ttl_seconds=1800), NOW, POLICY)
    assert isinstance(decision, Extend)
    assert decision.session.status == SessionStatus.PAUSED
    assert decision.session.last_active_at == NOW


def test_the_reapers_stops_check_their_reason_again() -> None:
    active = running(idle_ttl_seconds=IDLE, last_active_at=NOW)
    early = decide_stop(last(SandboxRunning, active), stop(reason=StopReason.IDLE), NOW, POLICY)
    assert isinstance(early, Reject)
    assert early.reason == RejectReason.NOT_IDLE
    due = decide_stop(last(SandboxRunning, active), stop(reason="idle"), NOW + timedelta(seconds=IDLE), POLICY)
    assert not isinstance(due, Reject)
    frozen = running(status=SessionStatus.PAUSED, paused_at=NOW)
    soon = decide_stop(last(SandboxRunning, frozen), stop(reason=StopReason.PAUSED_TTL), NOW, POLICY)
    assert isinstance(soon, Reject)
    later = decide_stop(last(SandboxRunning, frozen), stop(reason="paused_ttl"), NOW + POLICY.paused_ttl, POLICY)
    assert not isinstance(later, Reject)
    not_expired = decide_stop(last(SandboxRunning, frozen), stop(reason=StopReason.EXPIRED), NOW, POLICY)
    assert isinstance(not_expired, Reject)
    assert not_expired.reason == RejectReason.NOT_EXPIRED


# --------------------------------------------------------------------------- the reaper

WARN = ReaperPolicy(on_idle="stop", paused_ttl=timedelta(seconds=300), warning=timedelta(seconds=30))


def test_deadlines_of_running_and_paused_sessions() -> None:
    s = running(idle_ttl_seconds=IDLE, last_active_at=NOW)
    kinds = {d.kind: d.at for d in deadlines(s, WARN.paused_ttl, WARN.warning)}
    assert kinds["expired"] == s.expires_at
    assert kinds["idle"] == NOW + timedelta(seconds=IDLE)
    assert kinds["warn"] == NOW + timedelta(seconds=IDLE - 30), "the warning is for the earliest deadline"
    frozen = msgspec.structs.replace(s, status=SessionStatus.PAUSED, paused_at=NOW)
    kinds = {d.kind: d.at for d in deadlines(frozen, WARN.paused_ttl, WARN.warning)}
    assert "idle" not in kinds
    assert kinds["paused_ttl"] == NOW + timedelta(seconds=300)
    claimed = msgspec.structs.replace(s, status=SessionStatus.STOPPING)
    assert deadlines(claimed, WARN.paused_ttl, WARN.warning) == []


def test_a_deadline_is_warned_of_once_and_not_when_set_closer_than_the_warning() -> None:
    s = running(idle_ttl_seconds=IDLE, last_active_at=NOW)
    (warn,) = [d for d in deadlines(s, WARN.paused_ttl, WARN.warning) if d.kind == "warn"]
    warned = msgspec.structs.replace(s, warned_deadline=warn.deadline)
    assert not [d for d in deadlines(warned, WARN.paused_ttl, WARN.warning) if d.kind == "warn"]
    short = running(idle_ttl_seconds=20, last_active_at=NOW)
    assert not [d for d in deadlines(short, WARN.paused_ttl, WARN.warning) if d.kind == "warn"], (
        "set 20 s ahead: no 30 s warning"
    )


def test_orders_for_each_deadline_follow_the_policy() -> None:
    s = running(idle_ttl_seconds=IDLE, last_active_at=NOW)
    by_kind = {d.kind: d for d in deadlines(s, WARN.paused_ttl, WARN.warning)}
    stop_idle = order_for(s, by_kind["idle"], WARN)
    assert isinstance(stop_idle, StopOrder)
    assert stop_idle.reason == StopReason.IDLE
    pausing = ReaperPolicy(on_idle="pause", paused_ttl=WARN.paused_ttl, warning=WARN.warning)
    assert isinstance(order_for(s, by_kind["idle"], pausing), PauseOrder)
    warn = order_for(s, by_kind["warn"], WARN)
    assert isinstance(warn, WarnOrder)
    assert warn.reason == "idle"
    assert warn.deadline == by_kind["idle"].at
    assert order_for(s, by_kind["idle"], WARN) == stop_idle, "the same command id for every reaper"


def test_the_schedule_follows_activity_and_compacts() -> None:
    schedule = ExpirySchedule(WARN)
    s = running(idle_ttl_seconds=IDLE, last_active_at=NOW)
    schedule.put(s)
    later = msgspec.structs.replace(s, last_active_at=NOW + timedelta(seconds=50))
    schedule.put(later)
    assert schedule.pop_due(NOW + timedelta(seconds=IDLE)) == [], "the first idle deadline moved with the activity"
    due = schedule.pop_due(NOW + timedelta(seconds=50 + IDLE - 30))
    assert [d.kind for _, d in due] == ["warn"]
    for i in range(5000):  # a busy chat: every update pushes its deadlines again
        schedule.put(msgspec.structs.replace(later, last_active_at=NOW + timedelta(seconds=51 + i)))
    assert len(schedule._heap) <= 8 * len(schedule) + 1024 + 4


def test_a_warn_command_appends_only_for_the_earliest_deadline_not_yet_warned_of() -> None:
    policy = replace(POLICY, warning=timedelta(seconds=30))
    s = running(idle_ttl_seconds=IDLE, last_active_at=NOW)
    deadline = NOW + timedelta(seconds=IDLE)

    def warn(**kw: object) -> WarnSandbox:
        body = {"command_id": str(uuid.uuid4()), "chat_id": s.chat_id, "session_id": s.session_id}
        body |= {"deadline": deadline.isoformat(), "reason": "idle"}
        return msgspec.convert(body | kw, WarnSandbox)

    decision = decide_warn(last(SandboxRunning, s), warn(), policy)
    assert isinstance(decision, Warn)
    assert decision.session.warned_deadline == deadline
    assert decision.due.reason == "idle"
    warned = decision.session
    again = decide_warn(last(SandboxRunning, warned), warn(), policy)
    assert isinstance(again, Reject)
    assert again.reason == RejectReason.NOT_DUE
    moved = decide_warn(last(SandboxRunning, s), warn(deadline=(deadline + timedelta(seconds=1)).isoformat()), policy)
    assert isinstance(moved, Reject)
    wrong_kind = decide_warn(last(SandboxRunning, s), warn(reason="expired"), policy)
    assert isinstance(wrong_kind, Reject)
    stale = decide_warn(last(SandboxRunning, s), warn(session_id=str(uuid.uuid4())), policy)
    assert isinstance(stale, Reject)
    assert stale.reason == RejectReason.STALE_SESSION
