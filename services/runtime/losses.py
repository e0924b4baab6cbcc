"""Recording a live session as `lost`: the death watch, node reconciliation and the node
watch (a dead node's sessions) all come here. The append names the sequence the decision
was read at, so a command handled meanwhile wins and the loss is decided again."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import msgspec

from shared.contracts import ErrorInfo, ErrorType, LostReason, SandboxLost, SessionRecord, SessionStatus
from shared.errors import AppendConflict
from shared.event_store import ChatState, EventLog

_NODE_LOST_TRIES = 5


@dataclass(frozen=True, slots=True)
class MarkLost:
    session: SessionRecord
    reason: LostReason
    docker_state: str
    container_id: str | None
    exit_code: int | None = None  # as the engine reported it, when it did
    oom_killed: bool | None = None
    error_type: ErrorType = ErrorType.CONTAINER_STATE

    @property
    def error(self) -> ErrorInfo:
        return ErrorInfo(self.error_type, self.docker_state, self.exit_code, self.oom_killed)


async def append_lost(
    store: EventLog,
    chat: str,
    state: ChatState,
    action: MarkLost,
    *,
    node_id: str,
    now: datetime,
    event_id: str,
    msg_id: str | None = None,
) -> SandboxLost:
    """Record the session of `action` as `lost`, decided from `state` (AppendConflict when the
    chat moved on meanwhile)."""
    lost = msgspec.structs.replace(action.session, status=SessionStatus.LOST, updated_at=now)
    event = SandboxLost(
        event_id=event_id,
        chat_id=chat,
        session_id=action.session.session_id,
        causation_id=None,
        occurred_at=now,
        node_id=node_id,
        reason=action.reason,
        error=action.error,
        session=msgspec.structs.replace(lost, version=state.seq),
    )
    await store.append(event, expected_seq=state.seq, msg_id=msg_id or event_id)
    return event


async def mark_node_lost(
    store: EventLog, chat: str, dead_node: str, *, here: str, now: datetime, event_id: str
) -> SandboxLost | None:
    """Record the chat's live session as `lost {reason: node_lost}` if it still lives on
    `dead_node`; None when it does not (any more). Several runtimes may do this for one chat
    at once: the expected sequence lets one of them, and the message id de-duplicates."""
    for _ in range(_NODE_LOST_TRIES):
        state = await store.read(chat)
        session = state.session
        if session is None or not session.is_live or session.node_id != dead_node:
            return None
        action = MarkLost(
            session,
            LostReason.NODE_LOST,
            f"node {dead_node} is dead: all its runtimes were silent for runtime.node_dead_after_seconds",
            session.container_id,
            error_type=ErrorType.NODE_UNAVAILABLE,
        )
        try:
            return await append_lost(
                store,
                chat,
                state,
                action,
                node_id=here,
                now=now,
                event_id=event_id,
                msg_id=f"{chat}:{session.session_id}:node_lost",
            )
        except AppendConflict:
            continue
    return None
