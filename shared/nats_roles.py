"""Who may do what on NATS: the one definition of the roles, their accounts and permissions.

Everything that grants NATS access is generated from this module: the embedded server's
config (`sandboxctl up`), `infra/nats/` for an external server, and chat-scoped agent users.

Three accounts, because subject permissions alone cannot hold a trust boundary inside one
account (verified against nats-server 2.14, see tests/integration/test_nats_permissions.py):
- the server publishes the answer to any request - a stream's PubAck, a direct get, a
  JetStream API response - to the reply subject the client chose, without checking the
  client's permissions. Inside the account that holds the streams, a client allowed a single
  direct get could aim the empty "404" answer at `$JS.API.STREAM.DELETE.<stream>` and the
  server would delete the stream; a PubAck aimed at `sandbox.events.<chat>` is appended as
  an "event". A request that crosses an account boundary gets a server-made reply subject,
  so outside parties live in their own accounts and reach the system only through the
  services `SANDBOXD` exports.
- the legacy consumer-create subject `$JS.API.CONSUMER.CREATE.<stream>` takes the consumer's
  name from the request body, so whoever may use it can rewrite any consumer of the stream
  (filter, limits, even turn the projector's durable into an ephemeral). Outside parties may
  only use the forms that carry the name in the subject, with the system's names denied.
- a push consumer delivers to any subject named in its config once somebody subscribes to
  exactly that subject; a stream that listens there stores the delivery. Outside parties
  therefore cannot subscribe to any subject a stream listens on in `SANDBOXD`: their core
  event feed is a republished copy (`sandboxd.feed.events.>`, imported as `sandbox.events.>`).

Inside `SANDBOXD` the permissions are least privilege against mistakes, not against a
compromised process of ours (the reply-subject route above applies to members).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from shared.subjects import (
    COMMAND_PREFIX,
    COMMAND_SUBJECTS,
    COMMANDS_STREAM,
    EVENT_PREFIX,
    EVENT_SUBJECTS,
    EVENTS_STREAM,
    HANDLED_BUCKET,
    IDEMPOTENCY_BUCKET,
    INSTANCES_BUCKET,
    NODE_COMMAND_SUBJECTS,
    NODE_COMMANDS_STREAM,
    SESSIONS_BUCKET,
    STATUS_BUCKET,
    ConsumerName,
    canonical_chat_id,
)


class Role(StrEnum):
    API = "api"
    RUNTIME = "runtime"
    REAPER = "reaper"
    AGENT = "agent"
    AUDITOR = "auditor"
    ADMIN = "admin"


# The account that holds JetStream (streams, buckets, consumers) and our own processes.
SYSTEM_ACCOUNT = "SANDBOXD"
# Outside parties with the platform-wide roles (agent, auditor).
AGENTS_ACCOUNT = "AGENTS"
# Outside parties limited to one chat each (see chat_agent_permissions).
CHATS_ACCOUNT = "CHATS"
OUTSIDE_ACCOUNTS = (AGENTS_ACCOUNT, CHATS_ACCOUNT)

# SANDBOX_EVENTS republishes every stored event here; outside accounts import it as
# `sandbox.events.>` so `nats sub 'sandbox.events.>'` works for them and shows only what the
# stream stored (never an append it refused).
FEED_PREFIX = "sandboxd.feed.events"
FEED_SUBJECTS = f"{FEED_PREFIX}.>"

# Consumers of the system: outside parties may never create, replace or use them.

SESSIONS_STREAM = f"KV_{SESSIONS_BUCKET}"
STATUS_STREAM = f"KV_{STATUS_BUCKET}"
SESSIONS_KEYS = f"$KV.{SESSIONS_BUCKET}"
STATUS_KEYS = f"$KV.{STATUS_BUCKET}"
HANDLED_STREAM = f"KV_{HANDLED_BUCKET}"
HANDLED_KEYS = f"$KV.{HANDLED_BUCKET}"
IDEMPOTENCY_STREAM = f"KV_{IDEMPOTENCY_BUCKET}"
IDEMPOTENCY_KEYS = f"$KV.{IDEMPOTENCY_BUCKET}"
INSTANCES_STREAM = f"KV_{INSTANCES_BUCKET}"
INSTANCES_KEYS = f"$KV.{INSTANCES_BUCKET}"

# Inboxes. Outside accounts receive their consumers' deliveries through SANDBOXD's `_INBOX.>`
# (AGENTS) and `_INBOX_chat.>` (CHATS); nobody inside SANDBOXD uses those prefixes, so no reply
# meant for one of our processes or the admin ever reaches an outside party.
OUTSIDE_INBOX = "_INBOX"
CHAT_INBOX = "_INBOX_chat"
_INBOX_PREFIXES = {
    Role.API: "_INBOX_api",
    Role.RUNTIME: "_INBOX_runtime",
    Role.REAPER: "_INBOX_reaper",
    Role.ADMIN: "_INBOX_admin",
    Role.AGENT: OUTSIDE_INBOX,  # the standard `nats` CLI works unchanged
    Role.AUDITOR: OUTSIDE_INBOX,
}

_API = "$JS.API"


@dataclass(frozen=True, slots=True)
class Permissions:
    """An allow-list per direction (anything not allowed is denied), with denials on top."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RoleSpec:
    role: Role
    account: str
    permissions: Permissions
    summary: str

    @property
    def inbox_prefix(self) -> str:
        return _INBOX_PREFIXES[self.role]


def inbox_prefix(role: Role) -> str:
    """The inbox prefix a process of `role` connects with (its subscribe permission)."""
    return _INBOX_PREFIXES[role]


def chat_inbox_prefix(chat_id: str) -> str:
    return f"{CHAT_INBOX}.{canonical_chat_id(chat_id)}"


# --------------------------------------------------------------------------- API subjects
# The JetStream API subjects nats-py 2.16 and the `nats` CLI use (nats/js/manager.py,
# nats/js/client.py). Flow control and acks have a v1 form and, behind a server feature flag,
# a v2 form with a domain and an account hash in front of the stream.


def stream_info(stream: str) -> str:
    return f"{_API}.STREAM.INFO.{stream}"


def direct_get(stream: str) -> tuple[str, ...]:
    # `.<stream>` takes a body (sequence, next by subject, batches); `.<stream>.<subject>`
    # is "last message on that subject" with an empty body.
    return (f"{_API}.DIRECT.GET.{stream}", f"{_API}.DIRECT.GET.{stream}.>")


def msg_get(stream: str) -> str:
    return f"{_API}.STREAM.MSG.GET.{stream}"


def legacy_ephemeral_create(stream: str) -> str:
    """The create subject nats-py's ordered consumers use; the body names the consumer."""
    return f"{_API}.CONSUMER.CREATE.{stream}"


def named_create(stream: str, name: str = "*") -> tuple[str, ...]:
    """`<name>` and `<name>.<filter subject>`: the server takes the name from the subject."""
    return (f"{_API}.CONSUMER.CREATE.{stream}.{name}", f"{_API}.CONSUMER.CREATE.{stream}.{name}.>")


def durable_create(stream: str, name: str = "*") -> str:
    return f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.{name}"


def consumer_info(stream: str, name: str = "*") -> str:
    return f"{_API}.CONSUMER.INFO.{stream}.{name}"


def next_message(stream: str, name: str) -> str:
    return f"{_API}.CONSUMER.MSG.NEXT.{stream}.{name}"


def acks(stream: str, name: str) -> tuple[str, ...]:
    return (f"$JS.ACK.{stream}.{name}.>", f"$JS.ACK.*.*.{stream}.{name}.>")


def flow_control(stream: str) -> tuple[str, ...]:
    return (f"$JS.FC.{stream}.>", f"$JS.FC.*.*.{stream}.>")


ACCOUNT_INFO = f"{_API}.INFO"
STREAM_NAMES = f"{_API}.STREAM.NAMES"


# --------------------------------------------------------------------------- capabilities


def _ordered_reads(stream: str, *, direct: bool) -> tuple[str, ...]:
    """What our processes need to read a stream: info, gets, nats-py ordered consumers (push,
    no acks, flow control) and KV watches (which ask for their consumer's info)."""
    gets = (*direct_get(stream), msg_get(stream)) if direct else (msg_get(stream),)
    return (
        stream_info(stream),
        *gets,
        legacy_ephemeral_create(stream),
        consumer_info(stream),
        *flow_control(stream),
    )


def _durable(stream: str, name: str) -> tuple[str, ...]:
    """One durable pull consumer: create (any form, only under its name), info, pull, ack."""
    return (
        *named_create(stream, name),
        durable_create(stream, name),
        consumer_info(stream, name),
        next_message(stream, name),
        *acks(stream, name),
    )


def _outside_reads(stream: str, *, direct: bool, legacy_create: bool) -> tuple[str, ...]:
    """What an outside party needs to read a stream with the `nats` CLI or nats-py: info,
    gets, consumers whose name is in the subject (ordered consumers, `nats sub --all`), their
    flow control. No acks and no pulls: those would reach the system's consumers too."""
    gets = (*direct_get(stream), msg_get(stream)) if direct else (msg_get(stream),)
    legacy = (legacy_ephemeral_create(stream),) if legacy_create else ()
    return (
        stream_info(stream),
        *gets,
        *named_create(stream),
        durable_create(stream),
        *legacy,
        consumer_info(stream),
        *flow_control(stream),
    )


def _reserved_consumers(stream: str, names: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        out += [*named_create(stream, name), durable_create(stream, name)]
    return tuple(out)


# Outside parties read SANDBOX_EVENTS only through consumers named in the subject: the legacy
# create subject would let them rewrite the projector. KV streams have no system consumer
# (only ephemerals with random names that no outside party can list), and nats-py's KV watch
# needs the legacy subject, so it stays allowed there.
_OUTSIDE_EVENTS = _outside_reads(EVENTS_STREAM, direct=True, legacy_create=False)
_OUTSIDE_REGISTRY = _outside_reads(SESSIONS_STREAM, direct=True, legacy_create=True)
_OUTSIDE_STATUS = _outside_reads(STATUS_STREAM, direct=False, legacy_create=True)
_OUTSIDE_DENY = _reserved_consumers(EVENTS_STREAM, (ConsumerName.PROJECTOR,))
_OUTSIDE_SUBSCRIBE = (f"{OUTSIDE_INBOX}.>", EVENT_SUBJECTS)


ROLES: dict[Role, RoleSpec] = {
    Role.AGENT: RoleSpec(
        Role.AGENT,
        AGENTS_ACCOUNT,
        Permissions(
            publish=(COMMAND_SUBJECTS, ACCOUNT_INFO, STREAM_NAMES, *_OUTSIDE_EVENTS, *_OUTSIDE_REGISTRY),
            subscribe=_OUTSIDE_SUBSCRIBE,
            publish_deny=_OUTSIDE_DENY,
        ),
        "publish commands; read events (consumers, direct get, the core feed) and the registry",
    ),
    Role.AUDITOR: RoleSpec(
        Role.AUDITOR,
        AGENTS_ACCOUNT,
        Permissions(
            publish=(ACCOUNT_INFO, STREAM_NAMES, *_OUTSIDE_EVENTS, *_OUTSIDE_REGISTRY, *_OUTSIDE_STATUS),
            subscribe=_OUTSIDE_SUBSCRIBE,
            publish_deny=_OUTSIDE_DENY,
        ),
        "read events, the registry and the status bucket",
    ),
    Role.API: RoleSpec(
        Role.API,
        SYSTEM_ACCOUNT,
        Permissions(
            publish=(
                COMMAND_SUBJECTS,
                f"{IDEMPOTENCY_KEYS}.>",
                ACCOUNT_INFO,
                stream_info(COMMANDS_STREAM),
                stream_info(IDEMPOTENCY_STREAM),
                *direct_get(IDEMPOTENCY_STREAM),
                consumer_info(COMMANDS_STREAM, ConsumerName.RUNTIME),
                *_ordered_reads(EVENTS_STREAM, direct=True),
                *_ordered_reads(SESSIONS_STREAM, direct=True),
                *_ordered_reads(STATUS_STREAM, direct=False),
                *direct_get(INSTANCES_STREAM),  # the nodes' beats: the dashboard's capacity
            ),
            subscribe=(f"{inbox_prefix(Role.API)}.>",),
        ),
        "publish commands; read events, the registry and status (stream and consumer info, status bucket) "
        "and the nodes' beats; read and write `sandbox_idempotency`",
    ),
    Role.RUNTIME: RoleSpec(
        Role.RUNTIME,
        SYSTEM_ACCOUNT,
        Permissions(
            publish=(
                EVENT_SUBJECTS,
                NODE_COMMAND_SUBJECTS,
                f"{SESSIONS_KEYS}.>",
                f"{HANDLED_KEYS}.>",
                f"{INSTANCES_KEYS}.>",
                f"{STATUS_KEYS}.runtime.>",
                ACCOUNT_INFO,
                stream_info(COMMANDS_STREAM),
                stream_info(STATUS_STREAM),
                stream_info(HANDLED_STREAM),
                *direct_get(HANDLED_STREAM),
                stream_info(INSTANCES_STREAM),
                *direct_get(INSTANCES_STREAM),  # heartbeats, and every node's beat in one batch
                *_durable(COMMANDS_STREAM, ConsumerName.RUNTIME),
                # Each node's queue (`sandboxd-node-<node>`: its own node's, and a dead node's
                # until it returns). Consumer names cannot be matched by a prefix, so: any
                # durable on the nodes' stream (which holds only those queues).
                stream_info(NODE_COMMANDS_STREAM),
                *_durable(NODE_COMMANDS_STREAM, "*"),
                *_durable(EVENTS_STREAM, ConsumerName.PROJECTOR),
                *_ordered_reads(EVENTS_STREAM, direct=True),
                *_ordered_reads(SESSIONS_STREAM, direct=True),
            ),
            subscribe=(f"{inbox_prefix(Role.RUNTIME)}.>",),
        ),
        "consume commands (durables `sandboxd-runtime` and `sandboxd-node-<node>`), forward them to "
        "`sandbox.node.<node>.>`; append events; project them "
        "(durable `sandboxd-projector`) into the registry; record handled commands in `sandbox_handled`; "
        "heartbeat in `sandbox_instances` and read the others' heartbeats; write `sandbox_status` `runtime.>`",
    ),
    Role.REAPER: RoleSpec(
        Role.REAPER,
        SYSTEM_ACCOUNT,
        Permissions(
            publish=(
                f"{COMMAND_PREFIX}.stop.>",
                f"{COMMAND_PREFIX}.pause.>",
                f"{COMMAND_PREFIX}.warn.>",
                f"{STATUS_KEYS}.reaper.>",
                ACCOUNT_INFO,
                stream_info(COMMANDS_STREAM),
                stream_info(EVENTS_STREAM),
                stream_info(STATUS_STREAM),
                *_ordered_reads(SESSIONS_STREAM, direct=True),
            ),
            subscribe=(f"{inbox_prefix(Role.REAPER)}.>",),
        ),
        "publish stop, pause and warn commands; watch the registry; write `sandbox_status` `reaper.>`",
    ),
    Role.ADMIN: RoleSpec(
        Role.ADMIN,
        SYSTEM_ACCOUNT,
        Permissions(
            publish=(">",),
            subscribe=(">",),
            # The outside parties' inbox namespaces: an admin tool that used the default
            # `_INBOX` prefix would leak its replies to them, so it fails loudly instead
            # (`nats --inbox-prefix _INBOX_admin ...`).
            subscribe_deny=(f"{OUTSIDE_INBOX}.>", f"{CHAT_INBOX}.>"),
        ),
        "everything, including creating, updating, purging and deleting streams",
    ),
}

INTERNAL_ROLES = tuple(r for r, spec in ROLES.items() if spec.account == SYSTEM_ACCOUNT)


def chat_agent_permissions(chat_id: str) -> Permissions:
    """An outside party limited to one chat: its commands, its events, its registry key.

    Consumers must carry the chat's subject as their filter in the create subject (the
    server refuses a body whose filter differs), gets only the "last message on this
    subject" form, and the inbox is `_INBOX_chat.<chat_id>` (connect with that
    `inbox_prefix`, or `nats --inbox-prefix`)."""
    chat = canonical_chat_id(chat_id)
    events = f"{EVENT_PREFIX}.{chat}"
    record = f"{SESSIONS_KEYS}.{chat}"
    return Permissions(
        publish=(
            f"{COMMAND_PREFIX}.*.{chat}",
            ACCOUNT_INFO,
            STREAM_NAMES,
            stream_info(EVENTS_STREAM),
            stream_info(SESSIONS_STREAM),
            f"{_API}.CONSUMER.CREATE.{EVENTS_STREAM}.*.{events}",
            f"{_API}.CONSUMER.CREATE.{SESSIONS_STREAM}.*.{record}",
            consumer_info(EVENTS_STREAM),
            consumer_info(SESSIONS_STREAM),
            f"{_API}.DIRECT.GET.{EVENTS_STREAM}.{events}",
            f"{_API}.DIRECT.GET.{SESSIONS_STREAM}.{record}",
            *flow_control(EVENTS_STREAM),
            *flow_control(SESSIONS_STREAM),
        ),
        subscribe=(f"{chat_inbox_prefix(chat)}.>", events),
        publish_deny=_OUTSIDE_DENY,
    )


def exported_services() -> tuple[str, ...]:
    """What SANDBOXD offers the outside accounts: exactly the subjects their roles may publish.
    A server answer aimed at an outside account's own subject (the reply route above) can
    reach nothing else of the system, whatever the user's permissions say."""
    subjects: list[str] = []
    for spec in ROLES.values():
        if spec.account == AGENTS_ACCOUNT:
            subjects += [s for s in spec.permissions.publish if s not in subjects]
    return tuple(subjects)


def is_multi_response(service: str) -> bool:
    """Direct gets with a batch answer with many messages; everything else with one."""
    return ".DIRECT.GET." in service
