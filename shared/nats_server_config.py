"""nats-server configuration rendered from shared/nats_roles.py.

Three files, so that checked-in configs never hold anybody's key:
- `accounts.conf`: the accounts, their users with permissions, exports and imports. The users'
  public nkeys are variables defined in
- `users.conf`: generated next to the seeds (`sandboxctl nats-credentials`), also listing the
  chat-scoped agents;
- a server file (`server.conf`, or one per cluster node) with ports, JetStream and
  `include "accounts.conf"`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.nats_roles import (
    AGENTS_ACCOUNT,
    CHAT_INBOX,
    CHATS_ACCOUNT,
    FEED_SUBJECTS,
    OUTSIDE_ACCOUNTS,
    OUTSIDE_INBOX,
    ROLES,
    SYSTEM_ACCOUNT,
    Permissions,
    Role,
    chat_agent_permissions,
    exported_services,
    is_multi_response,
)
from shared.subjects import EVENT_SUBJECTS

ACCOUNTS_FILE = "accounts.conf"
USERS_FILE = "users.conf"
CHAT_USERS_VARIABLE = "SANDBOXD_CHAT_USERS"
GENERATED_NOTE = "generated from shared/nats_roles.py by sandboxctl; do not edit"


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to a config variable (`$NAME`), e.g. a user's public nkey from users.conf."""

    name: str


@dataclass(frozen=True, slots=True)
class ClusterNode:
    name: str
    client_port: int
    cluster_port: int


CLUSTER_NAME = "sandboxd"


def cluster_nodes(size: int, client_port: int, cluster_port: int) -> tuple[ClusterNode, ...]:
    """The nodes of a loopback cluster: `sandboxd-n1`.. with consecutive client ports from
    `client_port` and route ports from `cluster_port` (infra/nats/ and `sandboxctl up`)."""
    return tuple(ClusterNode(f"sandboxd-n{i + 1}", client_port + i, cluster_port + i) for i in range(size))


def key_variable(role: Role) -> str:
    return f"SANDBOXD_NKEY_{role.value.upper()}"


# --------------------------------------------------------------------------- rendering


def _render(value: Any, indent: int) -> str:
    pad = "  " * (indent + 1)
    end = "  " * indent
    if isinstance(value, Ref):
        return f"${value.name}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        body = "\n".join(f"{pad}{k}: {_render(v, indent + 1)}" for k, v in value.items())
        return "{\n" + body + "\n" + end + "}"
    if isinstance(value, Sequence):
        if not value:
            return "[]"
        body = "\n".join(f"{pad}{_render(v, indent + 1)}" for v in value)
        return "[\n" + body + "\n" + end + "]"
    raise TypeError(f"cannot render {value!r} as nats-server config")


def _assign(name: str, value: Any) -> str:
    return f"{name}: {_render(value, 0)}\n"


def _permissions(p: Permissions) -> dict[str, Any]:
    def direction(allow: tuple[str, ...], deny: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {"allow": list(allow)}
        if deny:
            out["deny"] = list(deny)
        return out

    return {
        "publish": direction(p.publish, p.publish_deny),
        "subscribe": direction(p.subscribe, p.subscribe_deny),
    }


def _users(account: str) -> list[dict[str, Any]]:
    return [
        {"nkey": Ref(key_variable(role)), "permissions": _permissions(spec.permissions)}
        for role, spec in ROLES.items()
        if spec.account == account
    ]


def _exports() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for service in exported_services():
        export: dict[str, Any] = {"service": service}
        if is_multi_response(service):
            export["response_type"] = "stream"
        export["accounts"] = list(OUTSIDE_ACCOUNTS)
        out.append(export)
    # Deliveries of the outside parties' consumers land on their inboxes in SANDBOXD.
    out.append({"stream": f"{OUTSIDE_INBOX}.>", "accounts": [AGENTS_ACCOUNT]})
    out.append({"stream": f"{CHAT_INBOX}.>", "accounts": [CHATS_ACCOUNT]})
    out.append({"stream": FEED_SUBJECTS, "accounts": list(OUTSIDE_ACCOUNTS)})
    return out


def _imports(inbox: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"service": {"account": SYSTEM_ACCOUNT, "subject": service}} for service in exported_services()
    ]
    out.append({"stream": {"account": SYSTEM_ACCOUNT, "subject": f"{inbox}.>"}})
    out.append({"stream": {"account": SYSTEM_ACCOUNT, "subject": FEED_SUBJECTS}, "to": EVENT_SUBJECTS})
    return out


def render_accounts() -> str:
    accounts = {
        SYSTEM_ACCOUNT: {"jetstream": "enabled", "users": _users(SYSTEM_ACCOUNT), "exports": _exports()},
        AGENTS_ACCOUNT: {"users": _users(AGENTS_ACCOUNT), "imports": _imports(OUTSIDE_INBOX)},
        CHATS_ACCOUNT: {"users": Ref(CHAT_USERS_VARIABLE), "imports": _imports(CHAT_INBOX)},
    }
    return (
        f"# sandboxd accounts, users and permissions ({GENERATED_NOTE}).\n"
        f"# The users' public nkeys are defined in {USERS_FILE} (`sandboxctl nats-credentials --out <this dir>`).\n"
        f'include "{USERS_FILE}"\n\n' + _assign("accounts", accounts)
    )


def render_users(role_keys: Mapping[Role, str], chat_keys: Mapping[str, str]) -> str:
    """users.conf: every role's public key, and the chat-scoped agents with their permissions."""
    lines = [f"# Public nkeys of the sandboxd NATS users ({GENERATED_NOTE}); the seeds are beside it.\n"]
    lines += [_assign(key_variable(role), role_keys[role]) for role in Role]
    chat_users = [
        {"nkey": key, "permissions": _permissions(chat_agent_permissions(chat))}
        for chat, key in sorted(chat_keys.items())
    ]
    lines.append(_assign(CHAT_USERS_VARIABLE, chat_users))
    return "".join(lines)


def render_server(
    *,
    server_name: str,
    port: int,
    store_dir: str,
    cluster: tuple[ClusterNode, Sequence[ClusterNode]] | None = None,
    host: str = "127.0.0.1",
) -> str:
    """One server's file; `cluster` is (this node, all nodes)."""
    parts = [
        f"# sandboxd nats-server ({GENERATED_NOTE}).\n",
        _assign("server_name", server_name),
        _assign("listen", f"{host}:{port}"),
        # strict: JetStream API requests with unknown fields are refused.
        _assign("jetstream", {"store_dir": store_dir, "strict": True}),
    ]
    if cluster is not None:
        node, nodes = cluster
        parts.append(
            _assign(
                "cluster",
                {
                    "name": CLUSTER_NAME,
                    "listen": f"{host}:{node.cluster_port}",
                    "routes": [f"nats-route://{host}:{n.cluster_port}" for n in nodes if n != node],
                },
            )
        )
    parts.append(f'include "{ACCOUNTS_FILE}"\n')
    return "".join(parts)
