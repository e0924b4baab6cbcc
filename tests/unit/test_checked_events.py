"""The event store's memo of check_event: the same answer as check_event, each decode once."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from shared.contracts import (
    EVENT_TYPES,
    ErrorInfo,
    PreviousSession,
    SandboxRunning,
    decode_event,
    encode,
)
from shared.event_store import CheckedEvents, check_event
from tests.support.records import T0, session_record


def _event(cls: type, chat: str, **fields: object) -> Any:
    session = session_record(chat_id=chat, labels={"team": "a"})
    return cls(
        event_id=str(uuid.uuid4()),
        chat_id=chat,
        session_id=session.session_id,
        causation_id=str(uuid.uuid4()),
        occurred_at=T0 + timedelta(microseconds=123457),
        node_id="node-a",
        session=session,
        **fields,
    )


@pytest.mark.parametrize("cls", EVENT_TYPES)
def test_an_event_the_runtime_appends_checks_as_itself(cls: type) -> None:
    """What `prime` keeps for an append is what check_event makes of its bytes."""
    chat = str(uuid.uuid4())
    event = _event(cls, chat, error=ErrorInfo("e", "m", exit_code=137), reason="api")
    data = encode(event)
    assert check_event(chat, data) == event
    checked = CheckedEvents()
    checked.prime(event, data)
    assert checked.check(chat, data) is event


def test_the_same_answer_as_check_event_each_bytes_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []

    def counting(data: bytes) -> object:
        decoded.append(data)
        return decode_event(data)

    monkeypatch.setattr("shared.event_store.decode_event", counting)
    chat, other = str(uuid.uuid4()), str(uuid.uuid4())
    good = encode(_event(SandboxRunning, chat, previous=PreviousSession("s", "c")))
    foreign = encode(_event(SandboxRunning, other))
    inputs = [(chat, good), (chat, b"{not json"), (chat, foreign), (other, foreign)]
    checked = CheckedEvents()
    for chat_id, data in inputs * 3:
        ours = checked.check(chat_id, data)
        assert ours == check_event(chat_id, data)
    assert len(decoded) == len(inputs) * 3 + len(inputs)  # ours once per input, check_event every time


def test_an_event_whose_session_names_another_chat_is_not_primed() -> None:
    chat = str(uuid.uuid4())
    event = msgspec.structs.replace(_event(SandboxRunning, chat), session=session_record())
    data = encode(event)
    checked = CheckedEvents()
    checked.prime(event, data)
    assert isinstance(checked.check(chat, data), str)  # poison, as check_event says


def test_only_the_last_size_results_are_kept() -> None:
    chat = str(uuid.uuid4())
    events = [encode(_event(SandboxRunning, chat)) for _ in range(3)]
    checked = CheckedEvents(size=2)
    first = checked.check(chat, events[0])
    checked.check(chat, events[1])
    assert checked.check(chat, events[0]) is first  # kept, and now the newest
    checked.check(chat, events[2])  # evicts events[1], the oldest used
    assert len(checked._kept) == 2
    assert (chat, events[1]) not in checked._kept
