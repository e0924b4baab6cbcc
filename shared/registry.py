"""The session registry: the `sandbox_sessions` KV bucket, one record per chat with a live
session. Readers use `get`/`list`; the projector writes with compare-and-set on revisions."""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from shared.contracts import SessionRecord, decode_record, encode
from shared.event_store import CONFLICT_CODES, with_nats_retry
from shared.subjects import SESSIONS_BUCKET

_KV_OPERATION = "KV-Operation"


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """The key's last revision (0: never written) and its record (None: deleted/absent)."""

    revision: int
    record: SessionRecord | None


class Registry:
    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str = SESSIONS_BUCKET) -> None:
        self._js = js
        self._kv = kv
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."

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
            if op in ("DEL", "PURGE") or not raw.data:
                return RegistryEntry(raw.seq or 0, None)
            return RegistryEntry(raw.seq or 0, decode_record(raw.data))

        return await with_nats_retry(read, what=f"registry get {chat_id}")

    async def list(self) -> list[SessionRecord]:
        async def read_all() -> list[SessionRecord]:
            records: list[SessionRecord] = []
            watcher = await self._kv.watchall(ignore_deletes=True)
            try:
                async for entry in watcher:
                    if entry is None:
                        break
                    if entry.value:
                        records.append(decode_record(entry.value))
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]
            return records

        return await with_nats_retry(read_all, what="registry list")

    async def put(self, record: SessionRecord, *, last_revision: int) -> int:
        """Write if the key is still at `last_revision`; KeyWrongLastSequenceError if not."""
        return await self._kv.update(record.chat_id, encode(record), last=last_revision)

    async def delete(self, chat_id: str, *, last_revision: int) -> None:
        """Delete if the key is still at `last_revision`; KeyWrongLastSequenceError if not."""
        try:
            await self._kv.delete(chat_id, last=last_revision)
        except APIError as exc:
            if exc.err_code in CONFLICT_CODES:
                raise KeyWrongLastSequenceError(description=exc.description) from exc
            raise
