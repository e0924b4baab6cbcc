"""Commands off the wire: normalisation and the reason a malformed one is rejected."""

from __future__ import annotations

import json
import uuid

import pytest

from shared.commands import MalformedCommand, decode_command
from shared.contracts import CreateSandbox, KeepaliveSandbox, StopSandbox
from shared.subjects import canonical_chat_id

CHAT = "6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40"
CMD = "0d9c1c62-5f0e-4a8e-9d55-3b8f0f2f6a11"


def body(**kw: object) -> bytes:
    return json.dumps({"command_id": CMD, "chat_id": CHAT, **kw}).encode()


def test_each_kind_decodes_from_its_subject() -> None:
    assert isinstance(decode_command(f"sandbox.cmd.create.{CHAT}", body(ttl_seconds=5)), CreateSandbox)
    stop = decode_command(f"sandbox.cmd.stop.{CHAT}", body(reason="expired"))
    assert isinstance(stop, StopSandbox)
    assert stop.reason == "expired"
    assert isinstance(decode_command(f"sandbox.cmd.keepalive.{CHAT}", body()), KeepaliveSandbox)


def test_non_canonical_uuids_are_normalised() -> None:
    upper = CHAT.upper()
    command = decode_command(f"sandbox.cmd.create.{upper}", body(chat_id=uuid.UUID(CHAT).hex))
    assert str(command.chat_id) == CHAT
    assert str(command.command_id) == CMD


def test_a_chat_id_has_one_canonical_spelling() -> None:
    for spelling in (CHAT, CHAT.upper(), uuid.UUID(CHAT).hex, f"{{{CHAT}}}", f"urn:uuid:{CHAT}", f" {CHAT}\n"):
        assert canonical_chat_id(spelling) == CHAT, spelling
    for bad in (CHAT[:-1] + "g", CHAT + "0", CHAT[:-1], CHAT.replace("-", "_"), ""):
        with pytest.raises(ValueError):  # noqa: PT011 - uuid.UUID says only "badly formed"
            canonical_chat_id(bad)


@pytest.mark.parametrize(
    ("subject", "data", "reason", "chat_id", "needle"),
    [
        (f"sandbox.cmd.create.{CHAT}", b"{nope", "invalid_json", CHAT, "malformed"),
        (f"sandbox.cmd.create.{CHAT}", body(ttl_seconds="x"), "invalid_payload", CHAT, "$.ttl_seconds"),
        (f"sandbox.cmd.create.{CHAT}", body(ttl_seconds=0), "invalid_payload", CHAT, "$.ttl_seconds"),
        (f"sandbox.cmd.create.{CHAT}", body(labels={"k": 1}), "invalid_payload", CHAT, "$.labels"),
        (f"sandbox.cmd.create.{CHAT}", json.dumps({"chat_id": CHAT}).encode(), "invalid_payload", CHAT, "command_id"),
        (f"sandbox.cmd.stop.{CHAT}", body(chat_id=str(uuid.uuid4())), "subject_mismatch", CHAT, "does not match"),
        ("sandbox.cmd.create.not-a-uuid", body(), "invalid_subject", None, "not-a-uuid"),
        (f"sandbox.cmd.delete.{CHAT}", body(), "unknown_command", CHAT, "create, keepalive, pause, resume, stop"),
    ],
)
def test_malformed_commands_say_why(subject: str, data: bytes, reason: str, chat_id: str | None, needle: str) -> None:
    with pytest.raises(MalformedCommand) as caught:
        decode_command(subject, data)
    assert caught.value.reason == reason
    assert caught.value.chat_id == chat_id
    assert needle in caught.value.detail


def test_a_rejection_keeps_the_command_id_when_it_can_be_read() -> None:
    with pytest.raises(MalformedCommand) as caught:
        decode_command(f"sandbox.cmd.create.{CHAT}", body(ttl_seconds="x"))
    assert caught.value.command_id == CMD


@pytest.mark.parametrize(
    ("data", "reason", "needle"),
    [
        (body(ttl_second=5), "invalid_payload", "ttl_second"),  # a misspelt field never falls back to a default
        (body(image="evil:latest"), "invalid_payload", "image"),
        (body()[:-1] + b', "requested_by": "\xff"}', "invalid_json", "utf-8"),
        (b"[" * 5000 + b"]" * 5000, "invalid_payload", "object"),
        (body(labels={})[:-3] + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", "invalid_payload", "$.labels"),
        (body(labels={"team": "a\nb"}), "invalid_payload", "$.labels"),
        (body(labels={"bad key!": "v"}), "invalid_payload", "$.labels"),
    ],
)
def test_strict_decoding_refuses_what_it_does_not_know(data: bytes, reason: str, needle: str) -> None:
    with pytest.raises(MalformedCommand) as caught:
        decode_command(f"sandbox.cmd.create.{CHAT}", data)
    assert caught.value.reason == reason
    assert needle in caught.value.detail


def test_a_rejection_names_a_command_id_only_when_it_is_a_uuid() -> None:
    with pytest.raises(MalformedCommand) as caught:
        decode_command(f"sandbox.cmd.create.{CHAT}", json.dumps({"command_id": "../x", "chat_id": 5}).encode())
    assert caught.value.command_id is None
