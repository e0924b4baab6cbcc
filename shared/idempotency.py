"""Idempotency keys of the HTTP facade: what `sandbox_idempotency` holds and how it is used.

A client that sends `Idempotency-Key: <key>` may send the same request again (its connection
dropped, the API restarted, it got a 202) and gets the first request's answer, never a
second command. One key per request in `sandbox_idempotency` (key: the SHA-256 of the
client's key, so any printable key is a valid KV key and no client text names a subject):
which request it was (method and route, chat, a fingerprint of the body), the command id
sent for it, and, once the outcome is known, the answer given (status, body, headers).

The command id is derived from the client's key, the request and the moment the key was
first seen (uuid5), and kept in the record, so every retry sends the very same command id:
the commands stream drops a repeat within its duplicate window and, beyond it, the runtime's
`sandbox_handled` index never carries a command id out twice. Including the first-seen time
makes a key reused after its record expired (`streams.idempotency_max_age_seconds`, at
least 24 h) a new request with a new command id, not one `sandbox_handled` still knows.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Protocol

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared.contracts import AwareDatetime, Uuid, encode
from shared.event_store import with_nats_retry
from shared.poison import DECODE_ERRORS, PoisonSource, Quarantine
from shared.subjects import IDEMPOTENCY_BUCKET

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# Printable ASCII, no surrounding blanks (HTTP trims those anyway).
_KEY_PATTERN = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
# uuid5 namespace of command ids derived from idempotency keys (any fixed UUID would do).
_COMMAND_NAMESPACE = uuid.UUID("5f3c8f4e-0b0a-4d7e-9a43-6c1f2e7d9b10")


class InvalidIdempotencyKey(ValueError):
    """The header is not a key we accept; the message says why."""


def check_key(raw: str) -> str:
    """The key as given, or InvalidIdempotencyKey naming what is wrong with it."""
    if not raw:
        raise InvalidIdempotencyKey(f"the {IDEMPOTENCY_HEADER} header is empty")
    if len(raw) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"the {IDEMPOTENCY_HEADER} header is {len(raw)} characters long, at most {MAX_KEY_LENGTH} are allowed"
        )
    if _KEY_PATTERN.fullmatch(raw) is None:
        raise InvalidIdempotencyKey(
            f"the {IDEMPOTENCY_HEADER} header must be printable ASCII without leading or trailing blanks"
        )
    return raw


def record_key(key: str) -> str:
    """The key's entry in `sandbox_idempotency`."""
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(request: str, chat_id: str, fields: Mapping[str, object]) -> str:
    """What makes two requests the same: method and route, chat, and the body's meaning
    (decoded and normalised, so spacing or key order does not count)."""
    canonical = msgspec.json.encode([request, chat_id, fields], order="sorted")
    return hashlib.sha256(canonical).hexdigest()


def derive_command_id(key: str, request: str, chat_id: str, first_seen_at: datetime) -> uuid.UUID:
    return uuid.uuid5(_COMMAND_NAMESPACE, f"{request}\n{chat_id}\n{first_seen_at.isoformat()}\n{key}")


class StoredAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """An HTTP answer as it was given: status, JSON body, the headers that matter."""

    status: Annotated[int, msgspec.Meta(ge=100, le=599)]
    body: msgspec.Raw
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class IdempotentRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A request sent with an idempotency key, as `sandbox_idempotency` holds it (key: the
    SHA-256 of the client's key, hex). `answer` is null until the command's outcome is
    known (a 202 is not an answer: a retry waits for the outcome)."""

    request: str  # method and route, e.g. "POST /api/v1/sandboxes"
    chat_id: Uuid
    fingerprint: str
    command_id: Uuid
    first_seen_at: AwareDatetime
    answer: StoredAnswer | None = None


_request_decoder = msgspec.json.Decoder(IdempotentRequest)


def decode_request(data: bytes) -> IdempotentRequest:
    return _request_decoder.decode(data)


class IdempotencyStore(Protocol):
    """What the facade needs of `sandbox_idempotency` (IdempotencyRecords; a fake in unit tests)."""

    async def claim(self, key: str, record: IdempotentRequest) -> IdempotentRequest | None: ...

    async def settle(self, key: str, record: IdempotentRequest) -> None: ...


class IdempotencyRecords:
    """`sandbox_idempotency`: claim a key for a request, read it back, store its answer."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, quarantine: Quarantine | None = None) -> None:
        self._js = js
        self._kv = kv
        self._stream = f"KV_{IDEMPOTENCY_BUCKET}"
        self._prefix = f"$KV.{IDEMPOTENCY_BUCKET}."
        self._quarantine = quarantine or Quarantine()

    async def claim(self, key: str, record: IdempotentRequest) -> IdempotentRequest | None:
        """Store `record` under `key` if the key is new (None); else the record already there."""
        entry = record_key(key)
        value = encode(record)
        try:
            await with_nats_retry(lambda: self._kv.create(entry, value), what=f"idempotency claim {entry}")
        except KeyWrongLastSequenceError:
            existing = await self.read(key)
            if existing is not None:
                return existing
            # Unreadable (poison, quarantined) or expired meanwhile: the key is free again.
            await with_nats_retry(lambda: self._kv.put(entry, value), what=f"idempotency claim {entry}")
        return None

    async def read(self, key: str) -> IdempotentRequest | None:
        entry = record_key(key)

        async def get() -> IdempotentRequest | None:
            try:
                raw = await self._js.get_last_msg(self._stream, self._prefix + entry, direct=True)
            except NotFoundError:
                return None
            if not raw.data:
                return None  # a delete marker
            try:
                return decode_request(raw.data)
            except DECODE_ERRORS as exc:
                self._quarantine.report(PoisonSource.IDEMPOTENCY, entry, raw.seq or 0, f"does not decode: {exc}")
                return None

        return await with_nats_retry(get, what=f"idempotency read {entry}")

    async def settle(self, key: str, record: IdempotentRequest) -> None:
        """Store the record with its answer (the same answer whoever writes it)."""
        entry = record_key(key)
        await with_nats_retry(lambda: self._kv.put(entry, encode(record)), what=f"idempotency answer {entry}")
