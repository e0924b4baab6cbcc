"""schemas/asyncapi.yaml: generated from the contracts, subjects and roles, never by hand."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from shared import schema_export
from shared.contracts import COMMAND_TYPES, EVENT_TYPES, NODE_EVENT_TYPES, CreateSandbox
from shared.schema_export import ASYNCAPI_FILE, SCHEMA_DIR, asyncapi, generate_all, subject_matches


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_the_committed_file_is_what_the_contracts_generate() -> None:
    assert (SCHEMA_DIR / ASYNCAPI_FILE).read_text() == generate_all()[ASYNCAPI_FILE]
    doc = yaml.safe_load((SCHEMA_DIR / ASYNCAPI_FILE).read_text())
    assert doc["asyncapi"].startswith("3.")


def test_every_reference_resolves_in_the_document_or_to_a_generated_schema() -> None:
    doc = asyncapi()
    files = set(generate_all())
    for ref in _refs(doc):
        if ref.startswith("#/"):
            _resolve(doc, ref)
        else:
            assert ref.removeprefix("./") in files, ref
    for name, operation in doc["operations"].items():
        assert operation["action"] in ("send", "receive"), name
        _resolve(doc, operation["channel"]["$ref"])
        for message in operation["messages"]:
            assert message["$ref"].startswith(operation["channel"]["$ref"] + "/messages/")


def test_every_command_event_and_node_event_has_its_subject_and_payload() -> None:
    doc = asyncapi()
    channels = doc["channels"]
    for kind in COMMAND_TYPES:
        channel = channels[f"command_{kind}"]
        assert channel["address"] == f"sandbox.cmd.{kind}.{{chat_id}}"
        message = doc["components"]["messages"][f"{kind}_command"]
        assert message["payload"] == {"$ref": f"./commands/{kind}.json"}
        assert "Nats-Msg-Id" in message["headers"]["properties"]
        assert "traceparent" in message["headers"]["properties"]
    events = channels["events"]
    assert events["address"] == "sandbox.events.{chat_id}"
    for cls in EVENT_TYPES:
        tag = cls.__struct_config__.tag
        message = doc["components"]["messages"][f"{tag}_event"]
        assert f"{tag}_event" in events["messages"]
        assert message["headers"]["properties"]["Sandbox-Event"]["const"] == tag
        assert message["payload"] == {"$ref": f"./events/{tag}.json"}
    for node_cls in NODE_EVENT_TYPES:
        assert f"{node_cls.__struct_config__.tag}_event" in channels["node_events"]["messages"]


def test_a_command_added_to_the_contracts_appears_by_regenerating(monkeypatch: pytest.MonkeyPatch) -> None:
    class HibernateSandbox(CreateSandbox, frozen=True, kw_only=True):
        """Hibernate it (a kind that does not exist)."""

        kind = "hibernate"

    monkeypatch.setattr(schema_export, "COMMAND_TYPES", {**COMMAND_TYPES, "hibernate": HibernateSandbox})
    doc = asyncapi()
    assert doc["channels"]["command_hibernate"]["address"] == "sandbox.cmd.hibernate.{chat_id}"
    # The roles come from the permissions: whoever may publish `sandbox.cmd.>` may hibernate.
    roles = doc["channels"]["command_hibernate"]["x-sandboxd-roles"]["publish"]
    assert roles == ["agent", "api", "admin", "chat-agent"]
    assert "commands/hibernate.json" in schema_export.generate_all()


def test_roles_come_from_the_permissions() -> None:
    channels = asyncapi()["channels"]
    assert "reaper" in channels["command_stop"]["x-sandboxd-roles"]["publish"]
    assert "reaper" not in channels["command_create"]["x-sandboxd-roles"]["publish"]
    assert "auditor" not in channels["command_stop"]["x-sandboxd-roles"]["publish"]
    assert channels["command_create"]["x-sandboxd-roles"]["read_from_stream"] == ["runtime", "admin"]
    assert channels["events"]["x-sandboxd-roles"]["publish"] == ["runtime", "admin"]
    readers = channels["events"]["x-sandboxd-roles"]["read_from_stream"]
    assert {"agent", "auditor", "api", "runtime", "admin", "chat-agent"} <= set(readers)
    assert channels["kv_sandbox_sessions"]["x-sandboxd-roles"]["publish"] == ["runtime", "admin"]


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("sandbox.cmd.>", "sandbox.cmd.stop.x", True),
        ("sandbox.cmd.>", "sandbox.cmd", False),
        ("sandbox.cmd.stop.>", "sandbox.cmd.create.x", False),
        ("sandbox.*.stop.x", "sandbox.cmd.stop.x", True),
        ("sandbox.*", "sandbox.cmd.stop", False),
        (">", "a", True),
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_subject_matching(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches
