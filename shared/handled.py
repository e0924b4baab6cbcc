"""The index of handled commands: `sandbox_handled`, one key per command that has had its
outcome (`<chat_id>.<command_id>`).

The event stream de-duplicates an outcome by its message id only inside its duplicate
window (`streams.events_duplicate_window_seconds`). A command seen again later — a client
re-sending the same command id, or a redelivery after a long outage — would otherwise be
decided afresh and could get a second outcome (a second `reused`, `extended` or
`rejected`). The handlers look a command up here before carrying it out and record it once
its outcome is in the log, before the command is acknowledged.

Recording after the outcome append is safe: if the process dies in between, the command is
not acknowledged, so it is redelivered within seconds (inside the duplicate window), its
outcome append comes back as a duplicate, and it is recorded then. Keys expire after
`streams.handled_max_age_seconds`, longer than a command can stay in SANDBOX_COMMANDS.
"""

from __future__ import annotations

from typing import Protocol

from nats.js import JetStreamContext
from nats.js.errors import InvalidKeyError
from nats.js.kv import KeyValue

from shared.contracts import HandledCommand, decode_handled, encode
from shared.event_store import LastMessages, connection_of, stream_seq, timeout_of, with_nats_retry
from shared.nats_requests import requests_of, valid_key
from shared.poison import DECODE_ERRORS, PoisonSource, Quarantine
from shared.subjects import HANDLED_BUCKET


def handled_key(chat_id: str, command_id: str) -> str:
    return f"{chat_id}.{command_id}"


class HandledIndex(Protocol):
    """What the handlers need of the index (HandledCommands; a fake in unit tests)."""

    async def lookup(self, chat_id: str, command_id: str) -> HandledCommand | None: ...

    async def record(self, handled: HandledCommand) -> None: ...


class HandledCommands:
    def __init__(self, js: JetStreamContext, kv: KeyValue, quarantine: Quarantine | None = None) -> None:
        self._js = js
        self._kv = kv
        self._stream = f"KV_{HANDLED_BUCKET}"
        self._prefix = f"$KV.{HANDLED_BUCKET}."
        self._lasts = LastMessages(js, self._stream)  # the lookups of commands in flight go out together
        self._quarantine = quarantine or Quarantine()

    async def lookup(self, chat_id: str, command_id: str) -> HandledCommand | None:
        """The command's entry, or None when it has none (or only poison: the command is then
        decided from the log, where the outcome's message id still guards the window)."""
        key = handled_key(chat_id, command_id)

        async def read() -> HandledCommand | None:
            raw = await self._lasts.last(self._prefix + key)
            if raw is None or not raw.data:
                return None
            try:
                handled = decode_handled(raw.data)
            except DECODE_ERRORS as exc:
                self._quarantine.report(PoisonSource.HANDLED, key, stream_seq(raw), f"does not decode: {exc}")
                return None
            if handled_key(handled.chat_id, handled.command_id) != key:
                self._quarantine.report(PoisonSource.HANDLED, key, stream_seq(raw), "it names another command")
                return None
            return handled

        return await with_nats_retry(read, what=f"handled lookup {key}")

    async def record(self, handled: HandledCommand) -> None:
        """A KV put (as nats-py's) on the connection's shared reply subscription."""
        key = handled_key(handled.chat_id, handled.command_id)
        if not valid_key(key):
            raise InvalidKeyError(key)
        requests, value, timeout = requests_of(connection_of(self._js)), encode(handled), timeout_of(self._js)

        async def put() -> None:
            await requests.publish(self._prefix + key, value, timeout=timeout)

        await with_nats_retry(put, what=f"handled record {key}")
