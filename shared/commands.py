"""Decoding of commands off the wire, with the reason a malformed one is rejected."""

from __future__ import annotations

import msgspec

from shared.contracts import COMMAND_TYPES, AnyCommand, RejectReason
from shared.poison import DECODE_ERRORS
from shared.subjects import canonical_chat_id, split_command_subject


class MalformedCommand(Exception):
    """A command that can never be carried out; it is rejected once and terminated."""

    def __init__(self, reason: RejectReason, detail: str, *, chat_id: str | None, command_id: str | None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.chat_id = chat_id
        self.command_id = command_id


_MAX_ID_LENGTH = 64
_decoders = {kind: msgspec.json.Decoder(cls) for kind, cls in COMMAND_TYPES.items()}


class _Ids(msgspec.Struct):
    command_id: str | None = None


_ids_decoder = msgspec.json.Decoder(_Ids)


def _loose_command_id(data: bytes) -> str | None:
    """The command id of a payload that failed validation, if it reads as a UUID at all."""
    try:
        value = _ids_decoder.decode(data).command_id
    except DECODE_ERRORS:
        return None
    if value is None or len(value) > _MAX_ID_LENGTH:
        return None
    try:
        return canonical_chat_id(value)
    except ValueError:
        return None


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
            RejectReason.UNKNOWN_COMMAND,
            f"subject {subject!r} names no command kind (one of {', '.join(sorted(_decoders))})",
            chat_id=subject_chat,
            command_id=_loose_command_id(data),
        )
    if subject_chat is None:
        raise MalformedCommand(
            RejectReason.INVALID_SUBJECT,
            f"subject {subject!r} does not end in a chat id (a UUID)",
            chat_id=None,
            command_id=_loose_command_id(data),
        )
    try:
        command = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise MalformedCommand(
            RejectReason.INVALID_PAYLOAD, str(exc), chat_id=subject_chat, command_id=_loose_command_id(data)
        ) from exc
    except DECODE_ERRORS as exc:  # not JSON, invalid UTF-8, nested too deep
        detail = f"{exc}" if isinstance(exc, msgspec.DecodeError) else f"not valid JSON: {exc}"
        raise MalformedCommand(RejectReason.INVALID_JSON, detail, chat_id=subject_chat, command_id=None) from exc
    if command.chat_key != subject_chat:
        raise MalformedCommand(
            RejectReason.SUBJECT_MISMATCH,
            f"payload chat_id {command.chat_id} does not match the subject's chat id {subject_chat}",
            chat_id=subject_chat,
            command_id=command.command_key,
        )
    return command
