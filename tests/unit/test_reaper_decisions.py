"""The reaper's schedule and orders, without NATS."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from services.reaper.decisions import ExpirySchedule, expiry_order, redrive_order
from shared.contracts import SessionRecord, SessionStatus
from tests.support.records import session_record

NOW = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)


def rec(chat: str, *, expires_in: float = 60, status: SessionStatus = SessionStatus.RUNNING) -> SessionRecord:
    return session_record(chat_id=chat, now=NOW, ttl=timedelta(seconds=expires_in), status=status, version=7)


def test_due_sessions_come_out_in_expiry_order_and_only_once() -> None:
    schedule = ExpirySchedule()
    for chat, seconds in (("a", 30), ("b", 10), ("c", 20), ("d", 99)):
        schedule.put(rec(chat, expires_in=seconds))
    assert schedule.next_due() == NOW + timedelta(seconds=10)
    assert [s.chat_id for s, _ in schedule.pop_due(NOW + timedelta(seconds=30))] == ["b", "c", "a"]
    assert schedule.pop_due(NOW + timedelta(seconds=30)) == []
    assert schedule.next_due() == NOW + timedelta(seconds=99)


def test_boundary_expires_at_equal_to_now_is_due() -> None:
    schedule = ExpirySchedule()
    schedule.put(rec("a", expires_in=5))
    assert schedule.pop_due(NOW + timedelta(seconds=4.999)) == []
    assert len(schedule.pop_due(NOW + timedelta(seconds=5))) == 1


def test_a_keepalive_or_a_removal_cancels_the_old_entry() -> None:
    schedule = ExpirySchedule()
    first = rec("a", expires_in=5)
    schedule.put(first)
    schedule.put(msgspec.structs.replace(first, expires_at=NOW + timedelta(seconds=50)))
    schedule.put(rec("b", expires_in=5))
    schedule.remove("b")
    schedule.put(rec("c", expires_in=5, status=SessionStatus.STOPPING))
    assert schedule.pop_due(NOW + timedelta(seconds=10)) == []
    assert [s.chat_id for s, _ in schedule.pop_due(NOW + timedelta(seconds=50))] == ["a"]


def test_command_ids_are_the_same_for_every_reaper_and_change_with_what_they_act_on() -> None:
    session = rec("a")
    assert expiry_order(session).command_id == expiry_order(msgspec.structs.replace(session)).command_id
    extended = msgspec.structs.replace(session, expires_at=session.expires_at + timedelta(seconds=1))
    assert expiry_order(extended).command_id != expiry_order(session).command_id
    assert expiry_order(session).reason == "expired"


def test_redrive_only_stuck_claim_states_past_the_grace() -> None:
    grace = timedelta(seconds=180)
    stuck = rec("a", status=SessionStatus.STOPPING)
    assert redrive_order(stuck, NOW + timedelta(seconds=179), grace) is None
    order = redrive_order(stuck, NOW + timedelta(seconds=180), grace)
    assert order is not None
    assert order.reason == "stuck_stopping"
    assert redrive_order(rec("b", status=SessionStatus.PROVISIONING), NOW + grace, grace) is not None
    assert redrive_order(rec("c"), NOW + grace * 10, grace) is None
    newer = msgspec.structs.replace(stuck, version=8)
    again = redrive_order(newer, NOW + grace, grace)
    assert again is not None
    assert again.command_id != order.command_id, "a new version (e.g. another failed stop) is re-driven again"
