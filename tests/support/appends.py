"""Events written straight to the real `SANDBOX_EVENTS` stream, as a writer that then died
(or an operator) leaves them, and the outcomes a command got there."""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec

from shared.contracts import AnyEvent, SessionRecord, is_outcome
from shared.event_store import EventStore
from tests.support.eventually import eventually


async def append_event(
    store: EventStore,
    cls: type[AnyEvent],
    session: SessionRecord,
    *,
    occurred_at: datetime,
    causation_id: str | None = None,
    **fields: object,
) -> int:
    """Append `cls` carrying `session` on its chat, after the chat's current last event; its
    sequence. Without a causation id it reads as a command's claim that never came back."""
    state = await store.read(session.chat_id)
    event = cls(
        event_id=str(uuid.uuid4()),
        chat_id=session.chat_id,
        session_id=session.session_id,
        causation_id=causation_id or str(uuid.uuid4()),
        occurred_at=occurred_at,
        node_id=session.node_id,
        session=msgspec.structs.replace(session, version=state.seq),
        **fields,  # type: ignore[arg-type]
    )
    return (await store.append(event, expected_seq=state.seq, msg_id=event.event_id)).seq


async def outcomes_of(store: EventStore, chat_id: str, command_id: str) -> list[AnyEvent]:
    return [s.event for s in await store.history(chat_id) if s.event.causation_id == command_id and is_outcome(s.event)]


async def the_outcome(store: EventStore, chat_id: str, command_id: str, *, timeout: float = 30.0) -> AnyEvent:
    """The command's outcome once it is there; fails if it never comes or comes twice."""
    found = await eventually(
        lambda: outcomes_of(store, chat_id, command_id), timeout=timeout, what=f"the outcome of {command_id}"
    )
    assert len(found) == 1, found
    return found[0]
