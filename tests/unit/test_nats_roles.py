"""The permission matrix as data: what each role may publish and subscribe to."""

from __future__ import annotations

import pytest

from shared.nats_roles import (
    AGENTS_ACCOUNT,
    ROLES,
    SYSTEM_ACCOUNT,
    Role,
    chat_agent_permissions,
    exported_services,
    inbox_prefix,
)
from shared.nats_server_config import render_accounts, render_users

CHAT = "6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40"


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` the rest (one token at least)."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token not in ("*", s[i])):
            return False
    return len(p) == len(s)


def allowed(role: Role, subject: str) -> bool:
    perms = ROLES[role].permissions
    return any(matches(p, subject) for p in perms.publish) and not any(matches(d, subject) for d in perms.publish_deny)


@pytest.mark.parametrize("role", list(Role))
def test_every_role_may_subscribe_to_its_own_inbox_only(role: Role) -> None:
    spec = ROLES[role]
    own = f"{inbox_prefix(role)}.abc.1"
    subscribe = spec.permissions.subscribe
    assert any(matches(p, own) for p in subscribe)
    assert not any(matches(d, own) for d in spec.permissions.subscribe_deny)
    for other in Role:
        if inbox_prefix(other) != inbox_prefix(role) and role != Role.ADMIN:
            assert not any(matches(p, f"{inbox_prefix(other)}.abc.1") for p in subscribe), other


@pytest.mark.parametrize("role", [Role.AGENT, Role.AUDITOR])
def test_outside_roles_cannot_write_manage_or_take_the_systems_messages(role: Role) -> None:
    assert ROLES[role].account == AGENTS_ACCOUNT
    for subject in (
        "sandbox.events.x",
        "$KV.sandbox_sessions.x",
        "$KV.sandbox_status.reaper.x",
        "$JS.API.STREAM.PURGE.SANDBOX_EVENTS",
        "$JS.API.STREAM.DELETE.SANDBOX_EVENTS",
        "$JS.API.STREAM.UPDATE.SANDBOX_EVENTS",
        "$JS.API.STREAM.MSG.DELETE.SANDBOX_EVENTS",
        "$JS.API.CONSUMER.DELETE.SANDBOX_EVENTS.sandboxd-projector",
        "$JS.API.CONSUMER.CREATE.SANDBOX_EVENTS",
        "$JS.API.CONSUMER.CREATE.SANDBOX_EVENTS.sandboxd-projector",
        "$JS.API.CONSUMER.CREATE.SANDBOX_EVENTS.sandboxd-projector.sandbox.events.>",
        "$JS.API.CONSUMER.DURABLE.CREATE.SANDBOX_EVENTS.sandboxd-projector",
        "$JS.API.CONSUMER.MSG.NEXT.SANDBOX_COMMANDS.sandboxd-runtime",
        "$JS.ACK.SANDBOX_COMMANDS.sandboxd-runtime.1.1.1.1.0",
        "$JS.ACK.SANDBOX_EVENTS.sandboxd-projector.1.1.1.1.0",
        "$JS.API.STREAM.INFO.SANDBOX_COMMANDS",
        "_INBOX_api.x",
        "_INBOX.x",
    ):
        assert not allowed(role, subject), subject
    assert allowed(role, "$JS.API.CONSUMER.CREATE.SANDBOX_EVENTS.mine.sandbox.events.>")
    assert allowed(role, "$JS.API.DIRECT.GET.SANDBOX_EVENTS.sandbox.events.x")
    assert allowed(role, "$JS.API.CONSUMER.CREATE.KV_sandbox_sessions")  # nats-py's KV watch
    assert allowed(role, "sandbox.cmd.create.x") is (role == Role.AGENT)


def test_internal_roles_hold_only_their_own_writes() -> None:
    assert all(ROLES[r].account == SYSTEM_ACCOUNT for r in (Role.API, Role.RUNTIME, Role.REAPER, Role.ADMIN))
    assert allowed(Role.REAPER, "sandbox.cmd.stop.x")
    assert not allowed(Role.REAPER, "sandbox.cmd.create.x")
    assert allowed(Role.REAPER, "$KV.sandbox_status.reaper.r1")
    assert not allowed(Role.REAPER, "$KV.sandbox_status.runtime.n1.1")
    assert allowed(Role.RUNTIME, "$KV.sandbox_status.runtime.n1.1")
    assert allowed(Role.RUNTIME, "$JS.ACK.SANDBOX_COMMANDS.sandboxd-runtime.1.2.3.4.0")
    assert not allowed(Role.RUNTIME, "sandbox.cmd.create.x")
    assert not allowed(Role.API, "sandbox.events.x")
    assert not allowed(Role.API, "$KV.sandbox_sessions.x")
    # The HTTP idempotency keys are the API's alone: no other role reads or writes them.
    assert allowed(Role.API, "$KV.sandbox_idempotency.x")
    assert allowed(Role.API, "$JS.API.DIRECT.GET.KV_sandbox_idempotency.$KV.sandbox_idempotency.x")
    for role in (Role.RUNTIME, Role.REAPER, Role.AGENT, Role.AUDITOR):
        assert not allowed(role, "$KV.sandbox_idempotency.x")
        assert not allowed(role, "$JS.API.DIRECT.GET.KV_sandbox_idempotency.$KV.sandbox_idempotency.x")
    for role in (Role.API, Role.RUNTIME, Role.REAPER):
        assert not allowed(role, "$JS.API.STREAM.CREATE.SANDBOX_EVENTS")
        assert not allowed(role, "$JS.API.STREAM.UPDATE.SANDBOX_EVENTS")
        assert not allowed(role, "$JS.API.STREAM.PURGE.SANDBOX_EVENTS")
    assert allowed(Role.ADMIN, "$JS.API.STREAM.PURGE.SANDBOX_EVENTS")


def test_outside_accounts_can_reach_only_what_their_roles_may_publish() -> None:
    exported = exported_services()
    for role in (Role.AGENT, Role.AUDITOR):
        assert set(ROLES[role].permissions.publish) <= set(exported)
    for subject in chat_agent_permissions(CHAT).publish:
        assert any(matches(service, subject) for service in exported), subject
    assert not any(matches(s, "$JS.API.STREAM.DELETE.SANDBOX_EVENTS") for s in exported)
    assert not any(matches(s, "$JS.ACK.SANDBOX_EVENTS.sandboxd-projector.1.1.1.1.0") for s in exported)


def test_a_chat_agent_is_confined_to_its_chat() -> None:
    perms = chat_agent_permissions(CHAT.upper())
    other = "0d9c1c62-5f0e-4a8e-9d55-3b8f0f2f6a11"

    def may(subject: str) -> bool:
        return any(matches(p, subject) for p in perms.publish)

    assert may(f"sandbox.cmd.create.{CHAT}")
    assert not may(f"sandbox.cmd.create.{other}")
    assert may(f"$JS.API.CONSUMER.CREATE.SANDBOX_EVENTS.c1.sandbox.events.{CHAT}")
    assert not may("$JS.API.CONSUMER.CREATE.SANDBOX_EVENTS.c1.sandbox.events.>")
    assert not may(f"$JS.API.DIRECT.GET.SANDBOX_EVENTS.sandbox.events.{other}")
    assert may(f"$JS.API.DIRECT.GET.KV_sandbox_sessions.$KV.sandbox_sessions.{CHAT}")
    assert perms.subscribe == (f"_INBOX_chat.{CHAT}.>", f"sandbox.events.{CHAT}")
    with pytest.raises(ValueError, match="badly formed"):
        chat_agent_permissions("not-a-chat")


def test_rendered_config_names_every_role_and_chat() -> None:
    accounts = render_accounts()
    for role in Role:
        assert f"$SANDBOXD_NKEY_{role.value.upper()}" in accounts
    users = render_users({role: f"U{role.value.upper()}" for role in Role}, {CHAT: "UCHAT"})
    assert 'SANDBOXD_NKEY_AGENT: "UAGENT"' in users
    assert f'"sandbox.cmd.*.{CHAT}"' in users
    assert render_accounts() == accounts  # deterministic
