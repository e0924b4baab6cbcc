"""Names of the public NATS topology: streams, subjects, the KV bucket and headers."""

from __future__ import annotations

import enum
import re
import uuid

COMMANDS_STREAM = "SANDBOX_COMMANDS"
NODE_COMMANDS_STREAM = "SANDBOX_NODE_COMMANDS"  # the nodes' queues (see NODE_COMMAND_PREFIX)
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
# Commands a runtime forwarded to the node that must carry them out (the node a create was
# placed on, or the node whose container a command touches), in SANDBOX_NODE_COMMANDS:
# `sandbox.node.<node token>.<kind>.<chat_id>`. Only runtimes publish here.
NODE_COMMAND_PREFIX = "sandbox.node"
NODE_COMMAND_SUBJECTS = f"{NODE_COMMAND_PREFIX}.>"
# Node lifecycle events (`node_dead`, `node_returned`), in SANDBOX_EVENTS beside the chats'.
NODE_EVENT_PREFIX = f"{EVENT_PREFIX}.node"
EVENT_SUBJECTS = f"{EVENT_PREFIX}.>"
# Rejections of commands whose subject names no valid chat id land here.
INVALID_EVENTS_SUBJECT = f"{EVENT_PREFIX}.invalid"


class ConsumerName(enum.StrEnum):
    """The system's durable consumers (permissions, status and lag metrics name them too)."""

    RUNTIME = "sandboxd-runtime"  # the runtimes' shared queue on SANDBOX_COMMANDS
    PROJECTOR = "sandboxd-projector"  # the registry projector on SANDBOX_EVENTS


NODE_CONSUMER_PREFIX = "sandboxd-node-"  # + node token: one node's queue on SANDBOX_NODE_COMMANDS


def node_token(node_id: str) -> str:
    """A node id as one subject token and consumer-name part: node ids may hold dots, which
    neither allows; `~` is not allowed in node ids, so the mapping is one to one."""
    return node_id.replace(".", "~")


def node_consumer(node_id: str) -> str:
    return NODE_CONSUMER_PREFIX + node_token(node_id)


def node_command_subject(node_id: str, kind: str, chat_id: str) -> str:
    return f"{NODE_COMMAND_PREFIX}.{node_token(node_id)}.{kind}.{chat_id}"


def node_commands_of(node_id: str) -> str:
    """The filter of one node's queue."""
    return f"{NODE_COMMAND_PREFIX}.{node_token(node_id)}.>"


def public_command_subject(subject: str) -> str:
    """The public subject a forwarded command was published on (unchanged for public ones)."""
    prefix = NODE_COMMAND_PREFIX + "."
    if not subject.startswith(prefix):
        return subject
    _node, _, rest = subject[len(prefix) :].partition(".")
    return f"{COMMAND_PREFIX}.{rest}"


def node_event_subject(node_id: str) -> str:
    return f"{NODE_EVENT_PREFIX}.{node_token(node_id)}"


def is_node_event_subject(subject: str) -> bool:
    return subject.startswith(NODE_EVENT_PREFIX + ".")


EVENT_TYPE_HEADER = "Sandbox-Event"
MSG_ID_HEADER = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ_HEADER = "Nats-Expected-Last-Subject-Sequence"


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_chat_id(raw: str) -> str:
    """The canonical (lowercase, hyphenated) spelling of a UUID; ValueError if it is none."""
    if _CANONICAL_UUID.fullmatch(raw):  # already canonical (nearly always): no parse
        return raw
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
