"""JSON Schema for every command, event and the session record, generated from the Structs.

`schemas/` holds the output; `sandboxctl schemas` rewrites it and a test fails when it is
stale, so the published contract cannot drift from the code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from shared.contracts import (
    COMMAND_TYPES,
    EVENT_TYPES,
    NODE_EVENT_TYPES,
    AnyEvent,
    HandledCommand,
    InstanceHeartbeat,
    NodeBeat,
    SessionRecord,
)
from shared.idempotency import IdempotentRequest

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _document(tp: Any, title: str, description: str) -> dict[str, Any]:
    schema = msgspec.json.schema(tp)
    return {"$schema": _DIALECT, "title": title, "description": description, **schema}


def generate() -> dict[str, str]:
    """Relative path -> file text for everything under schemas/."""
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


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    written: list[Path] = []
    for rel, text in generate().items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Files that are missing, different, or no longer generated."""
    wanted = generate()
    out = [
        rel for rel, text in wanted.items() if not (directory / rel).is_file() or (directory / rel).read_text() != text
    ]
    existing = {str(p.relative_to(directory)) for p in directory.rglob("*.json")}
    out += sorted(existing - set(wanted))
    return out
