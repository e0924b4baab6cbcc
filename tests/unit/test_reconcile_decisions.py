"""Node reconciliation decisions for one chat, without Docker or NATS."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.runtime.docker_driver import ObservedContainer
from services.runtime.losses import MarkLost
from services.runtime.reconcile import Adopt, RemoveOrphan, decide_for_chat
from shared.contracts import AnyEvent, SandboxProvisioning, SandboxRunning, SandboxStopped, SessionRecord, SessionStatus
from shared.event_store import ChatState
from tests.support.records import session_record

NOW = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
TIMEOUT = timedelta(seconds=60)


def rec(status: SessionStatus, *, node: str = "me", sid: str = "s1") -> SessionRecord:
    return session_record(session_id=sid, chat_id="chat", node_id=node, status=status, now=NOW)


def state(cls: type[AnyEvent], session: SessionRecord, *, age: float = 0) -> ChatState:
    event = cls(
        event_id="e",
        chat_id="chat",
        session_id=session.session_id,
        causation_id="cmd",
        occurred_at=NOW - timedelta(seconds=age),
        node_id="me",
        session=session,
    )
    return ChatState(5, event)


def box(sid: str = "s1", state_: str = "running") -> ObservedContainer:
    return ObservedContainer(f"id-{sid}", f"sandboxd-{sid}", "chat", sid, state_, state_)


def decide(st: ChatState, containers: list[ObservedContainer]) -> list[object]:
    return list(decide_for_chat(st, containers, "me", NOW, TIMEOUT))


def test_a_running_session_with_its_container_needs_nothing() -> None:
    assert decide(state(SandboxRunning, rec(SessionStatus.RUNNING)), [box()]) == []


def test_a_missing_or_stopped_container_makes_the_session_lost() -> None:
    missing = decide(state(SandboxRunning, rec(SessionStatus.RUNNING)), [])
    assert [type(a) for a in missing] == [MarkLost]
    exited = decide(state(SandboxRunning, rec(SessionStatus.RUNNING)), [box(state_="exited")])
    assert len(exited) == 1
    assert isinstance(exited[0], MarkLost)
    assert exited[0].reason == "container_not_running"
    assert exited[0].container_id == "id-s1"


def test_other_nodes_sessions_are_not_ours_to_judge() -> None:
    assert decide(state(SandboxRunning, rec(SessionStatus.RUNNING, node="other")), []) == []


def test_an_abandoned_provisioning_claim_with_a_running_container_is_adopted() -> None:
    young = state(SandboxProvisioning, rec(SessionStatus.PROVISIONING), age=59)
    assert decide(young, [box()]) == []
    old = state(SandboxProvisioning, rec(SessionStatus.PROVISIONING), age=60)
    actions = decide(old, [box()])
    assert len(actions) == 1
    assert isinstance(actions[0], Adopt)
    assert actions[0].container.container_id == "id-s1"
    assert decide(old, []) == [], "no container: the claim is left to be taken over"


def test_containers_no_live_session_owns_are_orphans() -> None:
    actions = decide(state(SandboxRunning, rec(SessionStatus.RUNNING)), [box(), box("s0")])
    assert [(type(a), a.container.session_id) for a in actions if isinstance(a, RemoveOrphan)] == [(RemoveOrphan, "s0")]
    after_stop = decide(state(SandboxStopped, rec(SessionStatus.STOPPED)), [box()])
    assert [type(a) for a in after_stop] == [RemoveOrphan]
