"""`GET /api/v1/status`: a versioned envelope of what the system looks like from NATS.

Every section is computed on its own with a time limit; a failing section reports its
error and never breaks the endpoint (nor the other sections). Nothing here touches Docker,
so the endpoint answers while the engine is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.api.session_index import RegistryFollower
from shared.poison import DECODE_ERRORS
from shared.subjects import (
    COMMANDS_STREAM,
    EVENTS_STREAM,
    SESSIONS_BUCKET,
    STATUS_BUCKET,
    ConsumerName,
)

SCHEMA_VERSION = 1
_SECTION_TIMEOUT = 3.0
_CONSUMERS = ((COMMANDS_STREAM, ConsumerName.RUNTIME), (EVENTS_STREAM, ConsumerName.PROJECTOR))


class Section(msgspec.Struct, omit_defaults=True):
    ok: bool
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    error: str | None = None


class StatusEnvelope(msgspec.Struct):
    schema_version: int
    generated_at: datetime
    ok: bool
    sections: dict[str, Section]


async def _section(build: Callable[[], Awaitable[dict[str, Any]]]) -> Section:
    try:
        return Section(ok=True, data=await asyncio.wait_for(build(), _SECTION_TIMEOUT))
    except Exception as exc:  # noqa: BLE001 - a section reports its own failure and nothing else
        return Section(ok=False, error=f"{type(exc).__name__}: {exc}")


async def _status_blocks(js: JetStreamContext, prefix: str) -> dict[str, Any]:
    bucket = await js.key_value(STATUS_BUCKET)
    blocks: dict[str, Any] = {}
    watcher = await bucket.watch(f"{prefix}.>")
    try:
        async for entry in watcher:
            if entry is None:
                break
            if not entry.value:
                continue
            try:
                blocks[entry.key] = msgspec.json.decode(entry.value)
            except DECODE_ERRORS:
                blocks[entry.key] = {"error": "this status block does not decode"}
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return blocks


async def build_status(nc: Client, sessions: RegistryFollower, now: datetime) -> StatusEnvelope:
    js = nc.jetstream(timeout=2.0)

    async def nats_section() -> dict[str, Any]:
        if not nc.is_connected:
            raise ConnectionError("not connected")
        rtt = await nc.rtt()
        return {
            "connected": True,
            "server": nc.connected_url.netloc if nc.connected_url else None,
            "rtt_ms": rtt * 1000,
        }

    async def streams() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in (COMMANDS_STREAM, EVENTS_STREAM):
            info = await js.stream_info(name)
            out[name] = {"messages": info.state.messages, "bytes": info.state.bytes, "last_seq": info.state.last_seq}
        return out

    async def consumers() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for stream, name in _CONSUMERS:
            info = await js.consumer_info(stream, name)
            out[name] = {
                "stream": stream,
                "pending": info.num_pending,
                "ack_pending": info.num_ack_pending,
                "redelivered": info.num_redelivered,
                "waiting": info.num_waiting,
            }
        return out

    async def registry_section() -> dict[str, Any]:
        # From the API's index of the bucket (kept by a KV watch), not a scan of the bucket,
        # which took longer than the section's time limit at ~100k sessions.
        sessions.require_fresh()
        return {
            "bucket": SESSIONS_BUCKET,
            "sessions": len(sessions.index),
            "by_status": sessions.index.count_by_status(),
        }

    names = ("nats", "streams", "consumers", "registry", "reapers", "runtime_nodes", "supervisors")
    builders: tuple[Callable[[], Awaitable[dict[str, Any]]], ...] = (
        nats_section,
        streams,
        consumers,
        registry_section,
        lambda: _status_blocks(js, "reaper"),
        lambda: _status_blocks(js, "runtime"),
        # `sandboxctl up`'s: each child's pid, restarts and last exit code.
        lambda: _status_blocks(js, "supervisor"),
    )
    results = await asyncio.gather(*(_section(b) for b in builders))
    sections = dict(zip(names, results, strict=True))
    return StatusEnvelope(
        schema_version=SCHEMA_VERSION, generated_at=now, ok=all(s.ok for s in results), sections=sections
    )
