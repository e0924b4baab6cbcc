"""Names of the public NATS topology: streams, subjects, the KV bucket and headers."""

from __future__ import annotations

import enum
import uuid

COMMANDS_STREAM = "SANDBOX_COMMANDS"
EVENTS_STREAM = "SANDBOX_EVENTS"
SESSIONS_BUCKET = "sandbox_sessions"
STATUS_BUCKET = "sandbox_status"
# Which commands have had their outcome (key `<chat_id>.<command_id>`): exactly once,
# beyond the event stream's de-duplication window.
HANDLED_BUCKET = "sandbox_handled"
# The HTTP facade's idempotency keys (key: SHA-256 of the client's key): the request and
# the answer it got, so a retry gets the same answer.
IDEMPOTENCY_BUCKET = "sandbox_idempotency"
# One heartbeat per running runtime instance (key `<instance_id>`): claims name their
# instance, and a claim whose instance is gone is taken over at once.
INSTANCES_BUCKET = "sandbox_instances"

COMMAND_PREFIX = "sandbox.cmd"
EVENT_PREFIX = "sandbox.events"
COMMAND_SUBJECTS = f"{COMMAND_PREFIX}.>"
EVENT_SUBJECTS = f"{EVENT_PREFIX}.>"
# Rejections of commands whose subject names no valid chat id land here.
INVALID_EVENTS_SUBJECT = f"{EVENT_PREFIX}.invalid"


class ConsumerName(enum.StrEnum):
    """The system's durable consumers (permissions, status and lag metrics name them too)."""

    RUNTIME = "sandboxd-runtime"  # the runtimes' shared queue on SANDBOX_COMMANDS
    PROJECTOR = "sandboxd-projector"  # the registry projector on SANDBOX_EVENTS


EVENT_TYPE_HEADER = "Sandbox-Event"
MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ_HEADER = "Nats-Expected-Last-Subject-Sequence"


def canonical_chat_id(raw: str) -> str:
    """The canonical (lowercase, hyphenated) spelling of a UUID; ValueError if it is none."""
    return str(uuid.UUID(raw.strip()))


def command_subject(kind: str, chat_id: str) -> str:
    return f"{COMMAND_PREFIX}.{kind}.{chat_id}"


def event_subject(chat_id: str) -> str:
    return f"{EVENT_PREFIX}.{chat_id}"


def split_command_subject(subject: str) -> tuple[str, str]:
    """(kind, chat token) of a command subject, tokens as published (not validated)."""
    prefix = COMMAND_PREFIX + "."
    rest = subject[len(prefix) :] if subject.startswith(prefix) else ""
    kind, _, chat = rest.partition(".")
    return kind, chat


def chat_of(subject: str) -> str | None:
    """The chat an event subject names (canonical spelling only), or None for `invalid` and
    anything else that is not a chat id."""
    prefix = EVENT_PREFIX + "."
    token = subject[len(prefix) :] if subject.startswith(prefix) else ""
    try:
        return token if canonical_chat_id(token) == token else None
    except ValueError:
        return None
