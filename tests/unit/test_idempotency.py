"""Idempotency keys, over fakes: which keys are accepted, what makes two requests the same,
and what a retry gets (the stored answer, a refusal, or the same command sent again)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import pytest

from services.api.gateway import OutcomePending
from services.api.idempotency import REPLAYED_HEADER, Answer, IdempotencyKeyReused, IdempotentRequests, KeyedRequest
from shared.contracts import AnyCommand, AnyEvent, CreateResult, CreateSandbox, SandboxReused
from shared.idempotency import (
    MAX_KEY_LENGTH,
    IdempotentRequest,
    InvalidIdempotencyKey,
    check_key,
    derive_command_id,
    fingerprint,
    record_key,
)
from tests.support.records import session_record
from tests.unit.fakes_runtime import FakeClock

CHAT = "6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40"
ROUTE = "POST /api/v1/sandboxes"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("key", ["k", "a b", "order-42/attempt:1", "x" * MAX_KEY_LENGTH, "~!@#$%^&*()"])
def test_printable_keys_up_to_the_limit_are_accepted(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "empty"),
        ("x" * (MAX_KEY_LENGTH + 1), "at most 255"),
        (" k", "printable ASCII without leading or trailing blanks"),
        ("k ", "printable ASCII without leading or trailing blanks"),
        ("caf\u00e9", "printable ASCII"),
        ("a\tb", "printable ASCII"),
        ("a\x00b", "printable ASCII"),
    ],
)
def test_junk_keys_are_refused_saying_why(key: str, why: str) -> None:
    with pytest.raises(InvalidIdempotencyKey, match=why):
        check_key(key)


def test_the_record_key_is_a_hash_any_key_maps_to() -> None:
    assert record_key("k") != record_key("K")
    assert len(record_key("x" * MAX_KEY_LENGTH)) == 64
    assert set(record_key("a.b*>")) <= set("0123456789abcdef")  # never a subject wildcard


def test_the_same_meaning_is_the_same_request() -> None:
    base = fingerprint(ROUTE, CHAT, {"ttl_seconds": 60, "labels": {"a": "1", "b": "2"}})
    assert fingerprint(ROUTE, CHAT, {"labels": {"b": "2", "a": "1"}, "ttl_seconds": 60}) == base
    assert fingerprint(ROUTE, CHAT, {"ttl_seconds": 61, "labels": {"a": "1", "b": "2"}}) != base
    assert fingerprint("POST /api/v1/create", CHAT, {"ttl_seconds": 60, "labels": {"a": "1", "b": "2"}}) != base
    assert fingerprint(ROUTE, str(uuid.uuid4()), {"ttl_seconds": 60, "labels": {"a": "1", "b": "2"}}) != base


def test_the_command_id_follows_the_key_the_request_and_the_first_use() -> None:
    first = derive_command_id("k", ROUTE, CHAT, NOW)
    assert derive_command_id("k", ROUTE, CHAT, NOW) == first
    later = NOW.replace(year=2027)
    others = {
        derive_command_id("k2", ROUTE, CHAT, NOW),
        derive_command_id("k", "DELETE /api/v1/sandboxes/{chat_id}", CHAT, NOW),
        derive_command_id("k", ROUTE, str(uuid.uuid4()), NOW),
        derive_command_id("k", ROUTE, CHAT, later),  # the key reused after its record expired
    }
    assert first not in others
    assert len(others) == 4


# --------------------------------------------------------------------------- answering


@dataclass
class FakeRecords:
    records: dict[str, IdempotentRequest] = field(default_factory=dict)

    async def claim(self, key: str, record: IdempotentRequest) -> IdempotentRequest | None:
        if key in self.records:
            return self.records[key]
        self.records[key] = record
        return None

    async def settle(self, key: str, record: IdempotentRequest) -> None:
        self.records[key] = record


@dataclass
class FakeSender:
    outcome: AnyEvent | None = None  # None: no outcome in time (202)
    sent: list[tuple[str, AnyCommand]] = field(default_factory=list)

    async def send(self, command: AnyCommand) -> AnyEvent:
        return self._answer("send", command)

    async def send_again(self, command: AnyCommand) -> AnyEvent:
        return self._answer("send_again", command)

    def _answer(self, how: str, command: AnyCommand) -> AnyEvent:
        self.sent.append((how, command))
        if self.outcome is None:
            raise OutcomePending(command, 0.1)
        return self.outcome


def reused(command_id: uuid.UUID) -> SandboxReused:
    record = session_record(chat_id=CHAT)
    return SandboxReused(
        event_id="e",
        chat_id=CHAT,
        session_id=record.session_id,
        causation_id=str(command_id),
        occurred_at=NOW,
        node_id="n",
        session=record,
        result=CreateResult.REUSED,
    )


def respond(outcome: AnyEvent) -> Answer:
    return Answer(200, msgspec.json.encode({"session_id": outcome.session_id}), {"X-Extra": "1"})


def keyed(ttl: int | None = None, key: str = "k") -> KeyedRequest:
    return KeyedRequest(key=key, request=ROUTE, chat_id=CHAT, fields={"ttl_seconds": ttl})


def command(ttl: int | None = None) -> CreateSandbox:
    return CreateSandbox(command_id=uuid.uuid4(), chat_id=uuid.UUID(CHAT), ttl_seconds=ttl)


async def test_a_first_request_sends_its_command_under_the_keys_id_and_stores_the_answer() -> None:
    records, clock = FakeRecords(), FakeClock()
    sender = FakeSender()
    expected_id = derive_command_id("k", ROUTE, CHAT, clock.now())
    sender.outcome = reused(expected_id)
    response = await IdempotentRequests(records, sender, clock).answer(keyed(), command(), respond)
    assert response.status_code == 200
    assert [(how, c.command_id) for how, c in sender.sent] == [("send", expected_id)]
    stored = records.records["k"]
    assert stored.command_id == str(expected_id)
    assert stored.answer is not None
    assert stored.answer.status == 200
    assert REPLAYED_HEADER not in response.headers


async def test_a_retry_gets_the_stored_answer_without_a_command() -> None:
    records, clock, sender = FakeRecords(), FakeClock(), FakeSender()
    sender.outcome = reused(derive_command_id("k", ROUTE, CHAT, clock.now()))
    requests = IdempotentRequests(records, sender, clock)
    first = await requests.answer(keyed(), command(), respond)
    clock.advance(3600)
    again = await requests.answer(keyed(), command(), respond)
    assert (again.status_code, again.content, again.headers["X-Extra"]) == (200, first.content, "1")
    assert again.headers[REPLAYED_HEADER] == "true"
    assert len(sender.sent) == 1


async def test_the_same_key_for_another_request_is_refused_naming_the_first() -> None:
    records, clock, sender = FakeRecords(), FakeClock(), FakeSender()
    sender.outcome = reused(uuid.uuid4())
    requests = IdempotentRequests(records, sender, clock)
    await requests.answer(keyed(), command(), respond)
    with pytest.raises(IdempotencyKeyReused, match=f"first used for {ROUTE} on chat {CHAT} with another body"):
        await requests.answer(keyed(ttl=60), command(ttl=60), respond)
    other = KeyedRequest(key="k", request="POST /api/v1/create", chat_id=CHAT, fields={})
    with pytest.raises(IdempotencyKeyReused, match=f"first used for {ROUTE};"):
        await requests.answer(other, command(), respond)
    assert len(sender.sent) == 1


async def test_a_request_without_an_answer_yet_is_sent_again_as_the_same_command() -> None:
    records, clock, sender = FakeRecords(), FakeClock(), FakeSender()
    requests = IdempotentRequests(records, sender, clock)
    with pytest.raises(OutcomePending):  # a 202: not an answer
        await requests.answer(keyed(), command(), respond)
    assert records.records["k"].answer is None
    first_id = sender.sent[0][1].command_id
    sender.outcome = reused(first_id)
    clock.advance(5)
    response = await requests.answer(keyed(), command(), respond)
    assert response.status_code == 200
    assert [(how, c.command_id) for how, c in sender.sent] == [("send", first_id), ("send_again", first_id)]
    assert records.records["k"].answer is not None
