"""JSON Schema for every command, event and the session record, generated from the Structs,
and `schemas/asyncapi.yaml` (AsyncAPI 3) describing every subject that carries them.

`schemas/` holds the output; `sandboxctl schemas` rewrites it and a test fails when it is
stale, so the published contract cannot drift from the code. The AsyncAPI document is built
by iterating the contracts (`COMMAND_TYPES`, `EVENT_TYPES`, `NODE_EVENT_TYPES`), the subject
names of `shared/subjects.py` and the role permissions of `shared/nats_roles.py`: a new
command, event or permission shows up by regenerating, never by editing the document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from shared.contracts import (
    COMMAND_TYPES,
    EVENT_TYPES,
    NODE_EVENT_TYPES,
    AnyEvent,
    CommandRejected,
    HandledCommand,
    InstanceHeartbeat,
    NodeBeat,
    SessionRecord,
)
from shared.idempotency import IdempotentRequest
from shared.nats_roles import FEED_PREFIX, ROLES, Permissions, chat_agent_permissions
from shared.subjects import (
    COMMANDS_STREAM,
    EVENT_TYPE_HEADER,
    EVENTS_STREAM,
    EXPECTED_LAST_SUBJECT_SEQ_HEADER,
    HANDLED_BUCKET,
    IDEMPOTENCY_BUCKET,
    INSTANCES_BUCKET,
    INVALID_EVENTS_SUBJECT,
    MSG_ID_HEADER,
    NODE_COMMAND_PREFIX,
    NODE_COMMANDS_STREAM,
    NODE_EVENT_PREFIX,
    SESSIONS_BUCKET,
    ConsumerName,
    command_subject,
    event_subject,
    node_command_subject,
    node_consumer,
    node_event_subject,
)

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _document(tp: Any, title: str, description: str) -> dict[str, Any]:
    schema = msgspec.json.schema(tp)
    return {"$schema": _DIALECT, "title": title, "description": description, **schema}


def generate() -> dict[str, str]:
    """Relative path -> file text of every JSON Schema under schemas/."""
    docs: dict[str, dict[str, Any]] = {}
    for kind, cls in COMMAND_TYPES.items():
        docs[f"commands/{kind}.json"] = _document(
            cls, f"sandbox.cmd.{kind}.<chat_id>", f"Payload of a {kind} command. {cls.__doc__ or ''}".strip()
        )
    for event_cls in EVENT_TYPES:
        tag = event_cls.__struct_config__.tag
        docs[f"events/{tag}.json"] = _document(
            event_cls, f"{tag} event on sandbox.events.<chat_id>", (event_cls.__doc__ or "").strip()
        )
    docs["events/any.json"] = _document(
        AnyEvent, "any event on sandbox.events.<chat_id>", "Union of all event types, tagged by `type`."
    )
    docs["session-record.json"] = _document(
        SessionRecord, "sandbox_sessions KV value", "The registry's record of a chat's live session (key: chat_id)."
    )
    docs["handled-command.json"] = _document(
        HandledCommand,
        "sandbox_handled KV value",
        "A command that has had its outcome (key: <chat_id>.<command_id>); it is never carried out again.",
    )
    docs["idempotent-request.json"] = _document(
        IdempotentRequest,
        "sandbox_idempotency KV value",
        "An HTTP request sent with an Idempotency-Key (key: SHA-256 of the key, hex) and, once known, its answer.",
    )
    docs["instance-heartbeat.json"] = _document(
        InstanceHeartbeat,
        "sandbox_instances KV value",
        "A running runtime instance (key: its instance_id); claims name their instance.",
    )
    docs["node-beat.json"] = _document(
        NodeBeat,
        "sandbox_instances KV value under node.<node>",
        "A node (Docker host) and its free capacity, rewritten by its runtimes' heartbeats; placement reads it.",
    )
    for node_cls in NODE_EVENT_TYPES:
        tag = node_cls.__struct_config__.tag
        docs[f"node-events/{tag}.json"] = _document(
            node_cls, f"{tag} event on sandbox.events.node.<node>", (node_cls.__doc__ or "").strip()
        )
    return {path: json.dumps(doc, indent=2, sort_keys=True) + "\n" for path, doc in docs.items()}


def generate_all() -> dict[str, str]:
    """Relative path -> file text for everything under schemas/: the JSON Schemas and the
    AsyncAPI document that refers to them."""
    return {**generate(), ASYNCAPI_FILE: render_asyncapi(asyncapi())}


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    written: list[Path] = []
    for rel, text in generate_all().items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Files that are missing, different, or no longer generated."""
    wanted = generate_all()
    out = [
        rel for rel, text in wanted.items() if not (directory / rel).is_file() or (directory / rel).read_text() != text
    ]
    existing = {str(p.relative_to(directory)) for p in directory.rglob("*.json")}
    existing |= {str(p.relative_to(directory)) for p in directory.glob("*.yaml")}
    out += sorted(existing - set(wanted))
    return out


# --------------------------------------------------------------------------- AsyncAPI

ASYNCAPI_FILE = "asyncapi.yaml"
_HEADER = "# Generated by `sandboxctl schemas` from shared/contracts.py, shared/subjects.py and\n"
_HEADER += "# shared/nats_roles.py: do not edit (a test fails when it is stale).\n"
# Concrete stand-ins for the parameters, to ask the role permissions about a real subject.
_EXAMPLE_CHAT = "00000000-0000-4000-8000-000000000000"
_EXAMPLE_NODE = "node-1"
_EXAMPLE_CONSUMER = "reader"
_CHAT_PARAM = {"description": "The chat's id: a UUID in canonical spelling (lowercase, hyphenated)."}
_NODE_PARAM = {"description": "A node id as one subject token (`.` written `~`)."}
_TRACE_HEADERS: dict[str, Any] = {
    "traceparent": {"type": "string", "description": "W3C trace context: the trace this message belongs to."},
    "tracestate": {"type": "string", "description": "W3C trace context: vendor state."},
}


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or (part not in ("*", have[i])):
            return False
    return len(want) == len(have)


def _allowed(allow: tuple[str, ...], deny: tuple[str, ...], subject: str) -> bool:
    return any(subject_matches(p, subject) for p in allow) and not any(subject_matches(p, subject) for p in deny)


@dataclass(frozen=True, slots=True)
class _Channel:
    key: str
    address: str  # with {parameters}
    example: str  # the address with example values
    title: str
    description: str
    messages: dict[str, dict[str, Any]]  # message key -> message object
    action: str  # sandboxd's side: `receive` (others publish to it) or `send`
    stream: str | None = None  # the stream (or KV bucket stream) that stores it
    parameters: dict[str, Any] = field(default_factory=dict)


def _parties() -> list[tuple[str, Permissions]]:
    """Every NATS user kind and its permissions, in the order of shared/nats_roles.py."""
    parties = [(role.value, spec.permissions) for role, spec in ROLES.items()]
    parties.append(("chat-agent", chat_agent_permissions(_EXAMPLE_CHAT)))
    return parties


def _stream_readers(stream: str, subject: str) -> list[str]:
    """Parties that may read `subject` out of `stream`: a consumer (any create form, or a pull
    on a durable), or a direct get of the subject's last message."""
    api = "$JS.API"
    probes = [
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.{_EXAMPLE_CONSUMER}.{subject}",
        f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{_EXAMPLE_CONSUMER}",
        f"{api}.DIRECT.GET.{stream}.{subject}",
        *(f"{api}.CONSUMER.MSG.NEXT.{stream}.{name}" for name in ConsumerName),
        f"{api}.CONSUMER.MSG.NEXT.{stream}.{node_consumer(_EXAMPLE_NODE)}",
    ]
    return [
        name
        for name, perms in _parties()
        if any(_allowed(perms.publish, perms.publish_deny, probe) for probe in probes)
    ]


def _roles(channel: _Channel) -> dict[str, list[str]]:
    parties = _parties()
    roles = {
        "publish": [n for n, p in parties if _allowed(p.publish, p.publish_deny, channel.example)],
        "subscribe": [n for n, p in parties if _allowed(p.subscribe, p.subscribe_deny, channel.example)],
    }
    if channel.stream is not None:
        roles["read_from_stream"] = _stream_readers(channel.stream, channel.example)
    return roles


def _message(name: str, title: str, summary: str, payload: str, headers: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": "application/json",
        "headers": {"type": "object", "properties": {**headers, **_TRACE_HEADERS}},
        "payload": {"$ref": f"./{payload}"},
    }


def _command_headers() -> dict[str, Any]:
    return {
        MSG_ID_HEADER: {
            "type": "string",
            "description": "The command_id: JetStream drops a re-sent command within the duplicate window.",
        }
    }


def _event_headers(tag: str) -> dict[str, Any]:
    return {
        EVENT_TYPE_HEADER: {
            "type": "string",
            "const": tag,
            "description": "The event type (also `type` in the payload).",
        },
        MSG_ID_HEADER: {"type": "string", "description": "Derived from the decision: a retried append is dropped."},
        EXPECTED_LAST_SUBJECT_SEQ_HEADER: {
            "type": "string",
            "description": "The sequence the event was decided from: a concurrent append loses.",
        },
    }


def _doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def _channels() -> list[_Channel]:
    chat = {"chat_id": _CHAT_PARAM}
    channels: list[_Channel] = []
    for kind, cls in COMMAND_TYPES.items():
        msg = _message(f"{kind}_command", f"{kind} command", _doc(cls), f"commands/{kind}.json", _command_headers())
        channels.append(
            _Channel(
                key=f"command_{kind}",
                address=command_subject(kind, "{chat_id}"),
                example=command_subject(kind, _EXAMPLE_CHAT),
                title=f"{kind} commands",
                description=f"{_doc(cls)} Stored in {COMMANDS_STREAM} (work queue); the outcome is an event "
                f"on {event_subject('{chat_id}')} whose causation_id is the command_id.",
                messages={f"{kind}_command": msg},
                action="receive",
                stream=COMMANDS_STREAM,
                parameters=chat,
            )
        )
        channels.append(
            _Channel(
                key=f"node_command_{kind}",
                address=f"{NODE_COMMAND_PREFIX}.{{node}}.{kind}.{{chat_id}}",
                example=node_command_subject(_EXAMPLE_NODE, kind, _EXAMPLE_CHAT),
                title=f"{kind} commands forwarded to a node",
                description=f"A {kind} command a runtime forwarded to the node that carries it out "
                f"({NODE_COMMANDS_STREAM}, one queue per node); internal to sandboxd.",
                messages={f"{kind}_command": msg},
                action="send",
                stream=NODE_COMMANDS_STREAM,
                parameters={"node": _NODE_PARAM, **chat},
            )
        )
    events: dict[str, dict[str, Any]] = {}
    for event_cls in EVENT_TYPES:
        tag = str(event_cls.__struct_config__.tag)
        events[f"{tag}_event"] = _message(
            f"{tag}_event", f"{tag} event", _doc(event_cls), f"events/{tag}.json", _event_headers(tag)
        )
    rejected = str(CommandRejected.__struct_config__.tag)
    channels += [
        _Channel(
            key="events",
            address=event_subject("{chat_id}"),
            example=event_subject(_EXAMPLE_CHAT),
            title="a chat's lifecycle events",
            description=f"One subject per chat in {EVENTS_STREAM}; each event carries the chat's whole session "
            "after it (`session`), so the last message of the subject is the chat's state.",
            messages=events,
            action="send",
            stream=EVENTS_STREAM,
            parameters=chat,
        ),
        _Channel(
            key="events_invalid",
            address=INVALID_EVENTS_SUBJECT,
            example=INVALID_EVENTS_SUBJECT,
            title="rejections of commands whose subject names no chat",
            description="A command whose subject holds no valid chat id is rejected here.",
            messages={f"{rejected}_event": events[f"{rejected}_event"]},
            action="send",
            stream=EVENTS_STREAM,
        ),
        _Channel(
            key="events_feed",
            address=f"{FEED_PREFIX}.{{chat_id}}",
            example=f"{FEED_PREFIX}.{_EXAMPLE_CHAT}",
            title="the republished event feed",
            description=f"{EVENTS_STREAM} republishes every stored event here; the outside accounts import it "
            f"as {event_subject('{chat_id}')}, so a core subscription there sees only what the stream stored.",
            messages=events,
            action="send",
            parameters=chat,
        ),
    ]
    node_events = {
        f"{tag}_event": _message(
            f"{tag}_event",
            f"{tag} event",
            _doc(cls),
            f"node-events/{tag}.json",
            {
                EVENT_TYPE_HEADER: {"type": "string", "const": tag},
                MSG_ID_HEADER: {"type": "string"},
            },
        )
        for cls in NODE_EVENT_TYPES
        for tag in [str(cls.__struct_config__.tag)]
    }
    channels.append(
        _Channel(
            key="node_events",
            address=f"{NODE_EVENT_PREFIX}.{{node}}",
            example=node_event_subject(_EXAMPLE_NODE),
            title="a node's lifecycle events",
            description=f"Node deaths and returns, in {EVENTS_STREAM} beside the chats' events.",
            messages=node_events,
            action="send",
            stream=EVENTS_STREAM,
            parameters={"node": _NODE_PARAM},
        )
    )
    channels += _kv_channels()
    return channels


def _kv(  # noqa: PLR0917 - one row of the table below
    bucket: str, key: str, example_key: str, title: str, description: str, message: dict[str, Any]
) -> _Channel:
    return _Channel(
        key=f"kv_{bucket}" + ("_nodes" if key.startswith("node.") else ""),
        address=f"$KV.{bucket}.{key}",
        example=f"$KV.{bucket}.{example_key}",
        title=title,
        description=f"{description} (KV bucket `{bucket}`: read with `nats kv get {bucket} <key>`).",
        messages={message["name"]: message},
        action="send",
        stream=f"KV_{bucket}",
        parameters={name: {"description": f"the key's {name} part"} for name in _params(key)},
    )


def _params(address: str) -> list[str]:
    return [token[1:-1] for token in address.split(".") if token.startswith("{")]


def _kv_channels() -> list[_Channel]:
    def value(name: str, schema: str, summary: str) -> dict[str, Any]:
        return _message(name, name.replace("_", " "), summary, schema, {})

    return [
        _kv(
            SESSIONS_BUCKET,
            "{chat_id}",
            _EXAMPLE_CHAT,
            "the session registry",
            "One record per chat with a live session, projected from the events",
            value("session_record", "session-record.json", "A chat's live session."),
        ),
        _kv(
            HANDLED_BUCKET,
            "{chat_id}.{command_id}",
            f"{_EXAMPLE_CHAT}.{_EXAMPLE_CHAT}",
            "handled commands",
            "Every command that had its outcome; it is never carried out again",
            value("handled_command", "handled-command.json", "A command that had its outcome."),
        ),
        _kv(
            IDEMPOTENCY_BUCKET,
            "{key_hash}",
            "0" * 64,
            "HTTP idempotency keys",
            "An HTTP request sent with an Idempotency-Key and its answer",
            value("idempotent_request", "idempotent-request.json", "A keyed HTTP request."),
        ),
        _kv(
            INSTANCES_BUCKET,
            "{instance_id}",
            _EXAMPLE_CHAT,
            "runtime instance heartbeats",
            "One heartbeat per running runtime instance",
            value("instance_heartbeat", "instance-heartbeat.json", "A running runtime instance."),
        ),
        _kv(
            INSTANCES_BUCKET,
            "node.{node}",
            f"node.{_EXAMPLE_NODE}",
            "node beats",
            "A node's beat and free capacity, rewritten by its runtimes; placement reads it",
            value("node_beat", "node-beat.json", "A node and its capacity."),
        ),
    ]


def _role_table() -> str:
    lines = ["| role | may |", "| --- | --- |"]
    lines += [f"| `{role.value}` | {spec.summary} |" for role, spec in ROLES.items()]
    lines.append("| `chat-agent` | an agent limited to one chat: its commands, its events, its registry key |")
    return "\n".join(lines)


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3 document, as plain data."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for ch in _channels():
        body: dict[str, Any] = {
            "address": ch.address,
            "title": ch.title,
            "description": ch.description,
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in ch.messages},
        }
        if ch.parameters:
            body["parameters"] = ch.parameters
        if ch.stream is not None:
            body["x-nats-stream"] = ch.stream
        body["x-sandboxd-roles"] = _roles(ch)
        channels[ch.key] = body
        operations[f"{ch.action}_{ch.key}"] = {
            "action": ch.action,
            "title": f"sandboxd {'receives' if ch.action == 'receive' else 'sends'} {ch.title}",
            "channel": {"$ref": f"#/channels/{ch.key}"},
            "messages": [{"$ref": f"#/channels/{ch.key}/messages/{name}"} for name in ch.messages],
            "security": [{"$ref": "#/components/securitySchemes/nkey"}],
        }
    messages: dict[str, Any] = {}
    for ch in _channels():
        messages.update(ch.messages)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "sandboxd NATS contract",
            "version": "1",
            "description": (
                "Every subject sandboxd uses on NATS, its payload (the JSON Schemas beside this file) and "
                "headers, and which role may publish it, subscribe to it, or read it from its stream "
                "(`x-sandboxd-roles`). Operations are from sandboxd's side: it *receives* commands and "
                "*sends* events and registry values.\n\n" + _role_table()
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "embedded": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The embedded nats-server of `sandboxctl up` (JetStream; no anonymous access).",
                "security": [{"$ref": "#/components/securitySchemes/nkey"}],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "securitySchemes": {
                "nkey": {
                    "type": "asymmetricEncryption",
                    "description": "One NATS nkey user per role (`.sandboxd/nats/<role>.nk`); the role's "
                    "permissions are in shared/nats_roles.py and infra/nats/.",
                }
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Plain YAML for readers: no anchors for repeated parts, multi-line text as blocks."""

    def ignore_aliases(self, data: Any) -> bool:  # noqa: ARG002 - the interface's
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def render_asyncapi(doc: dict[str, Any]) -> str:
    return _HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
