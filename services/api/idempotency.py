"""Requests sent with an `Idempotency-Key`: the first one claims the key and sends its
command; any later one with the same key gets the same answer (shared/idempotency.py says
what is stored and why the command id is safe to send again).

A key whose request is still without an answer (in flight in some API process, answered
202, or its API process died) is retried as the very same command: its outcome is taken
from the chat's history if it is there already, otherwise the request waits for it, sending
the command again only if no request of this process is waiting for it yet.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from litestar import Response

from shared.clock import Clock
from shared.contracts import AnyCommand, AnyEvent
from shared.idempotency import (
    IDEMPOTENCY_HEADER,
    IdempotencyStore,
    IdempotentRequest,
    StoredAnswer,
    derive_command_id,
    fingerprint,
)

log = logging.getLogger(__name__)

# Set on an answer served from the record rather than from a command's outcome just now.
REPLAYED_HEADER = "Idempotent-Replayed"


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer in the form it is both sent and stored in."""

    status: int
    body: bytes  # JSON
    headers: dict[str, str] = field(default_factory=dict)

    def response(self, extra_headers: dict[str, str] | None = None) -> Response[Any]:
        headers = {**self.headers, **(extra_headers or {})}
        return Response(
            content=self.body, status_code=self.status, media_type="application/json", headers=headers or None
        )

    def stored(self) -> StoredAnswer:
        return StoredAnswer(status=self.status, body=msgspec.Raw(self.body), headers=self.headers)

    @classmethod
    def of(cls, stored: StoredAnswer) -> Answer:
        return cls(stored.status, bytes(stored.body), dict(stored.headers))


@dataclass(frozen=True, slots=True)
class KeyedRequest:
    """What a request with an idempotency key is: its key, method and route, chat, and the
    meaning of its body (normalised fields)."""

    key: str
    request: str
    chat_id: str
    fields: dict[str, object]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.request, self.chat_id, self.fields)


class IdempotencyKeyReused(Exception):
    """The key was first used for another request; says which."""

    def __init__(self, first: IdempotentRequest, now: KeyedRequest) -> None:
        if first.request != now.request:
            what = f"{first.request}"
        elif first.chat_id != now.chat_id:
            what = f"{first.request} on chat {first.chat_id}"
        else:
            what = f"{first.request} on chat {first.chat_id} with another body"
        super().__init__(
            f"this {IDEMPOTENCY_HEADER} was first used for {what}; a key stands for one request "
            "(send the same request to get its answer again, or use a new key for a new request)"
        )


class CommandSender(Protocol):
    """What answering needs of the gateway (CommandGateway; a fake in unit tests)."""

    async def send(self, command: AnyCommand) -> AnyEvent: ...

    async def send_again(self, command: AnyCommand) -> AnyEvent: ...


class IdempotentRequests:
    def __init__(self, records: IdempotencyStore, gateway: CommandSender, clock: Clock) -> None:
        self._records = records
        self._gateway = gateway
        self._clock = clock

    async def answer(
        self,
        keyed: KeyedRequest,
        command: AnyCommand,
        respond: Callable[[AnyEvent], Answer],
        shortcut: Callable[[], Awaitable[Answer | None]] | None = None,
    ) -> Response[Any]:
        """The answer to `keyed`: stored, or `respond(outcome)` of its command (whose id is
        replaced by the key's). OutcomePending (202) and NatsUnavailable (503) pass through
        and leave the key without an answer: a retry gets the outcome. `shortcut` may answer
        a key's first request without its command (reuse read from the log); that answer is
        stored like any other. A key already claimed but not answered never takes it: its
        command may be out, and its outcome is the answer."""
        now = self._clock.now()
        mine = IdempotentRequest(
            request=keyed.request,
            chat_id=keyed.chat_id,
            fingerprint=keyed.fingerprint,
            command_id=str(derive_command_id(keyed.key, keyed.request, keyed.chat_id, now)),
            first_seen_at=now,
        )
        first = await self._records.claim(keyed.key, mine)
        if first is None:
            answer = await shortcut() if shortcut is not None else None
            if answer is None:
                answer = respond(await self._gateway.send(_with_id(command, mine.command_id)))
        elif first.fingerprint != mine.fingerprint:
            raise IdempotencyKeyReused(first, keyed)
        elif first.answer is not None:
            return Answer.of(first.answer).response({REPLAYED_HEADER: "true"})
        else:
            answer = respond(await self._gateway.send_again(_with_id(command, first.command_id)))
        settled = msgspec.structs.replace(first or mine, answer=answer.stored())
        try:
            await self._records.settle(keyed.key, settled)
        except Exception as exc:  # noqa: BLE001 - the answer stands: a retry finds the outcome in the log
            log.warning("the answer to command %s was not stored with its idempotency key: %s", settled.command_id, exc)
        return answer.response()


def _with_id(command: AnyCommand, command_id: str) -> AnyCommand:
    return msgspec.structs.replace(command, command_id=uuid.UUID(command_id))
