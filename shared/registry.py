"""The session registry: the `sandbox_sessions` KV bucket, one record per chat with a live
session. Readers use `get`/`list`; the projector writes with compare-and-set on revisions.

A value that does not decode, or whose `chat_id` is not its key, is quarantined: readers
skip it (`entry` reports it as `corrupt` so the projector can overwrite or delete it)."""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, InvalidKeyError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared.contracts import SessionRecord, decode_record, encode
from shared.event_store import (
    CONFLICT_CODES,
    connection_of,
    last_of_subjects,
    stream_seq,
    timeout_of,
    with_nats_retry,
)
from shared.nats_requests import requests_of, valid_key
from shared.poison import DECODE_ERRORS, PoisonSource, Quarantine
from shared.subjects import EXPECTED_LAST_SUBJECT_SEQ_HEADER, SESSIONS_BUCKET

_KV_OPERATION = "KV-Operation"


def check_record(key: str, value: bytes) -> SessionRecord | str:
    """The record stored under `key`, or why it cannot be trusted."""
    try:
        record = decode_record(value)
    except DECODE_ERRORS as exc:
        return f"does not decode: {exc}"
    if record.chat_id != key:
        return f"it holds chat {record.chat_id!r}"
    return record


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """The key's last revision (0: never written) and its record (None: deleted/absent)."""

    revision: int
    record: SessionRecord | None
    corrupt: bool = False  # a value is there, but it is poison


@dataclass(frozen=True, slots=True)
class RegistryScan:
    """Every key of the bucket: the valid records by key, and the keys holding poison."""

    records: dict[str, SessionRecord]
    corrupt: list[str]


class Registry:
    def __init__(
        self, js: JetStreamContext, kv: KeyValue, bucket: str = SESSIONS_BUCKET, quarantine: Quarantine | None = None
    ) -> None:
        self._js = js
        self._kv = kv
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._quarantine = quarantine or Quarantine()

    def check(self, key: str, revision: int, value: bytes) -> SessionRecord | None:
        """The record stored under `key`, or None (quarantined) when it cannot be trusted."""
        checked = check_record(key, value)
        if isinstance(checked, str):
            self._quarantine.report(PoisonSource.RECORD, key, revision, checked)
            return None
        return checked

    async def get(self, chat_id: str) -> SessionRecord | None:
        return (await self.entry(chat_id)).record

    async def entry(self, chat_id: str) -> RegistryEntry:
        """Like get, but also sees delete markers, whose revision a CAS write must name."""

        async def read() -> RegistryEntry:
            try:
                raw = await self._js.get_last_msg(self._stream, self._prefix + chat_id, direct=True)
            except NotFoundError:
                return RegistryEntry(0, None)
            op = (raw.headers or {}).get(_KV_OPERATION)
            revision = raw.seq or 0
            if op in ("DEL", "PURGE") or not raw.data:
                return RegistryEntry(revision, None)
            record = self.check(chat_id, revision, raw.data)
            return RegistryEntry(revision, record, corrupt=record is None)

        return await with_nats_retry(read, what=f"registry get {chat_id}")

    async def entries(self, chat_ids: list[str], *, timeout: float = 5.0) -> dict[str, RegistryEntry]:
        """`entry` for many keys at once: one batched direct get per 1024 keys."""
        lasts = await last_of_subjects(
            connection_of(self._js), self._stream, [self._prefix + chat for chat in chat_ids], timeout
        )
        found: dict[str, RegistryEntry] = {}
        for chat in chat_ids:
            msg = lasts.get(self._prefix + chat)
            found[chat] = RegistryEntry(0, None) if msg is None else self._entry_of(chat, msg)
        return found

    def _entry_of(self, chat_id: str, msg: Msg) -> RegistryEntry:
        """The entry a batched direct get's message holds (a delete marker: no record)."""
        revision = stream_seq(msg)
        if (msg.headers or {}).get(_KV_OPERATION) in ("DEL", "PURGE") or not msg.data:
            return RegistryEntry(revision, None)
        record = self.check(chat_id, revision, msg.data)
        return RegistryEntry(revision, record, corrupt=record is None)

    async def scan(self) -> RegistryScan:
        async def read_all() -> RegistryScan:
            records: dict[str, SessionRecord] = {}
            corrupt: list[str] = []
            watcher = await self._kv.watchall(ignore_deletes=True)
            try:
                async for entry in watcher:
                    if entry is None:
                        break
                    if not entry.value:
                        continue
                    record = self.check(entry.key, entry.revision or 0, entry.value)
                    if record is None:
                        corrupt.append(entry.key)
                    else:
                        records[entry.key] = record
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
            return RegistryScan(records, corrupt)

        return await with_nats_retry(read_all, what="registry list")

    async def list(self) -> list[SessionRecord]:
        """Every valid record (poison is quarantined and skipped)."""
        return list((await self.scan()).records.values())

    async def put(self, record: SessionRecord, *, last_revision: int) -> int:
        """Write if the key is still at `last_revision`; KeyWrongLastSequenceError if not."""
        headers = {EXPECTED_LAST_SUBJECT_SEQ_HEADER: str(last_revision)}
        return await self._write(record.chat_id, encode(record), headers)

    async def delete(self, chat_id: str, *, last_revision: int) -> None:
        """Delete if the key is still at `last_revision`; KeyWrongLastSequenceError if not."""
        headers = {_KV_OPERATION: "DEL"}
        if last_revision > 0:
            headers[EXPECTED_LAST_SUBJECT_SEQ_HEADER] = str(last_revision)
        await self._write(chat_id, b"", headers)

    async def _write(self, chat_id: str, value: bytes, headers: dict[str, str]) -> int:
        """A KV write as nats-py's `update` / `delete` make it, on the connection's shared
        reply subscription (see nats_requests.py)."""
        if not valid_key(chat_id):
            raise InvalidKeyError(chat_id)
        requests = requests_of(connection_of(self._js))
        try:
            ack = await requests.publish(self._prefix + chat_id, value, headers=headers, timeout=timeout_of(self._js))
        except APIError as exc:
            if exc.err_code in CONFLICT_CODES:
                raise KeyWrongLastSequenceError(description=exc.description) from exc
            raise
        return ack.seq
