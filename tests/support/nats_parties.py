"""Clients of a secured test server, connected as a role or a chat-scoped agent.

A permission violation reaches a NATS client only as an asynchronous `-ERR` (nats-py hands
it to the error callback; a request just times out), so a Party records those errors and
`attempt` waits for the server's verdict instead of a time-out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from shared.nats_roles import Role, chat_inbox_prefix, inbox_prefix
from tests.support.eventually import until
from tests.support.nats_server import NatsServer

# Requests a role may not make time out; keep that short, and never wait for it when the
# violation itself can be awaited.
SHORT = 1.0


@dataclass
class Party:
    nc: Client
    errors: list[str] = field(default_factory=list)

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream(timeout=SHORT)

    def was_denied(self, subject: str, *, subscribe: bool = False) -> bool:
        kind = "subscription to" if subscribe else "publish to"
        needle = f'permissions violation for {kind} "{subject}"'.lower()
        return any(needle in e.lower() for e in self.errors)

    async def denied(self, subject: str, *, subscribe: bool = False) -> bool:
        """Whether the server refuses `subject` (waits for its -ERR, a few seconds at most)."""
        try:
            await until(lambda: self.was_denied(subject, subscribe=subscribe), timeout=5.0)
        except AssertionError:
            return False
        return True

    async def attempt(self, subject: str, payload: bytes = b"", headers: dict[str, str] | None = None) -> bool:
        """Publish as a request would (with a reply inbox); True when the server refused it."""
        await self.nc.publish(subject, payload, reply=self.nc.new_inbox(), headers=headers)
        await self.nc.flush()
        return await self.denied(subject)

    async def close(self) -> None:
        await self.nc.close()


async def connect_as(
    server: NatsServer,
    role: Role | None = None,
    *,
    chat: str | None = None,
    seed_file: Path | None = None,
    inbox: str | None = None,
) -> Party:
    """A client with `role`'s seed and inbox prefix (or a chat agent's, or any seed file, or
    none: anonymous); `inbox` overrides the prefix."""
    party = Party(nc=Client())

    async def on_error(exc: Exception) -> None:
        party.errors.append(str(exc))

    seed = str(seed_file) if seed_file is not None else None
    prefix = "_INBOX"
    if role is not None:
        seed, prefix = str(server.seed_file(role)), inbox_prefix(role)
    elif chat is not None:
        seed, prefix = str(server.chat_seed_file(chat)), chat_inbox_prefix(chat)
    party.nc = await nats.connect(
        server.url,
        nkeys_seed=seed,
        inbox_prefix=inbox or prefix,
        error_cb=on_error,
        allow_reconnect=False,
        connect_timeout=5,
    )
    return party
