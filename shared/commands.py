"""Decoding of commands off the wire, with the reason a malformed one is rejected."""

from __future__ import annotations

import msgspec

from shared.contracts import COMMAND_TYPES, AnyCommand
from shared.subjects import canonical_chat_id, split_command_subject


class MalformedCommand(Exception):
    """A command that can never be carried out; it is rejected once and terminated."""

    def __init__(self, reason: str, detail: str, *, chat_id: str | None, command_id: str | None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.chat_id = chat_id
        self.command_id = command_id


_MAX_ID_LENGTH = 64
_decoders = {kind: msgspec.json.Decoder(cls) for kind, cls in COMMAND_TYPES.items()}


def _loose_command_id(data: bytes) -> str | None:
    """The command id of a payload that failed validation, if one can be read at all."""
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    value = raw.get("command_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and len(value) <= _MAX_ID_LENGTH else None


def decode_command(subject: str, data: bytes) -> AnyCommand:
    """The command on `subject`, or MalformedCommand naming what is wrong with it."""
    kind, chat_token = split_command_subject(subject)
    try:
        subject_chat: str | None = canonical_chat_id(chat_token)
    except ValueError:
        subject_chat = None
    decoder = _decoders.get(kind)
    if decoder is None:
        raise MalformedCommand(
            "unknown_command",
            f"subject {subject!r} names no command kind (one of {', '.join(sorted(_decoders))})",
            chat_id=subject_chat,
            command_id=_loose_command_id(data),
        )
    if subject_chat is None:
        raise MalformedCommand(
            "invalid_subject",
            f"subject {subject!r} does not end in a chat id (a UUID)",
            chat_id=None,
            command_id=_loose_command_id(data),
        )
    try:
        command = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise MalformedCommand(
            "invalid_payload", str(exc), chat_id=subject_chat, command_id=_loose_command_id(data)
        ) from exc
    except msgspec.DecodeError as exc:
        raise MalformedCommand("invalid_json", str(exc), chat_id=subject_chat, command_id=None) from exc
    if str(command.chat_id) != subject_chat:
        raise MalformedCommand(
            "subject_mismatch",
            f"payload chat_id {command.chat_id} does not match the subject's chat id {subject_chat}",
            chat_id=subject_chat,
            command_id=str(command.command_id),
        )
    return command
