"""Idempotent declaration of the streams and the KV bucket every process relies on."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shared.config import StreamSettings
from shared.subjects import (
    COMMAND_SUBJECTS,
    COMMANDS_STREAM,
    EVENT_SUBJECTS,
    EVENTS_STREAM,
    SESSIONS_BUCKET,
    STATUS_BUCKET,
)

log = logging.getLogger(__name__)


# A command is two ids and at most 32 labels; an event carries one session record.
COMMAND_MAX_BYTES = 64 * 1024
EVENT_MAX_BYTES = 256 * 1024


class TopologyError(Exception):
    """An existing stream conflicts with the contract in a way we must not change silently."""


def commands_stream_config(settings: StreamSettings) -> StreamConfig:
    return StreamConfig(
        name=COMMANDS_STREAM,
        description="sandboxd commands (work queue: each command is consumed once)",
        subjects=[COMMAND_SUBJECTS],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        duplicate_window=settings.commands_duplicate_window_seconds,
        max_age=settings.commands_max_age_seconds,
        # Full: new commands are refused at publish, so an accepted command is never dropped.
        max_bytes=settings.commands_max_bytes,
        max_msg_size=COMMAND_MAX_BYTES,
        discard=DiscardPolicy.NEW,
        allow_direct=False,
    )


def events_stream_config(settings: StreamSettings) -> StreamConfig:
    return StreamConfig(
        name=EVENTS_STREAM,
        description="sandboxd lifecycle events, one subject per chat; the last one is the chat's state",
        subjects=[EVENT_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        duplicate_window=settings.events_duplicate_window_seconds,
        max_age=settings.events_max_age_seconds,
        max_bytes=settings.events_max_bytes,
        max_msgs_per_subject=settings.events_max_msgs_per_subject,
        max_msg_size=EVENT_MAX_BYTES,
        discard=DiscardPolicy.OLD,
        allow_direct=True,
    )


async def _ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    name = wanted.name or ""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("created stream %s", name)
        return
    have = info.config
    if have.retention != wanted.retention:
        raise TopologyError(
            f"stream {name} exists with retention {have.retention}, the contract needs "
            f"{wanted.retention}; it cannot be changed in place (delete or rename the old stream)"
        )
    if set(have.subjects or []) != set(wanted.subjects or []):
        raise TopologyError(f"stream {name} exists with subjects {have.subjects}, expected {wanted.subjects}")
    mutable = (
        "duplicate_window",
        "max_age",
        "max_bytes",
        "max_msgs_per_subject",
        "max_msg_size",
        "discard",
        "num_replicas",
        "allow_direct",
        "description",
    )
    if any(getattr(have, f) != getattr(wanted, f) for f in mutable):
        await js.update_stream(wanted)
        log.info("updated stream %s settings", name)


async def ensure_topology(js: JetStreamContext, settings: StreamSettings) -> KeyValue:
    """Create what is missing, update settings that may change, leave data alone."""
    await _ensure_stream(js, commands_stream_config(settings))
    await _ensure_stream(js, events_stream_config(settings))
    try:
        return await js.key_value(SESSIONS_BUCKET)
    except BucketNotFoundError:
        kv = await js.create_key_value(
            bucket=SESSIONS_BUCKET,
            description="sandboxd session registry: one record per chat with a live session",
            history=1,
            replicas=settings.replicas,
            direct=True,
        )
        log.info("created KV bucket %s", SESSIONS_BUCKET)
        return kv


async def ensure_status_bucket(js: JetStreamContext, settings: StreamSettings) -> KeyValue:
    """The bucket where processes publish their status blocks (e.g. `reaper.<id>`)."""
    try:
        return await js.key_value(STATUS_BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            bucket=STATUS_BUCKET,
            description="sandboxd process status blocks (reaper.<id>, ...)",
            history=1,
            replicas=settings.replicas,
        )


async def topology_missing(js: JetStreamContext) -> list[str]:
    """Names of the contract's streams and bucket that do not exist (for readiness)."""
    missing: list[str] = []
    for stream in (COMMANDS_STREAM, EVENTS_STREAM):
        try:
            await js.stream_info(stream)
        except NotFoundError:
            missing.append(stream)
    try:
        await js.key_value(SESSIONS_BUCKET)
    except BucketNotFoundError:
        missing.append(SESSIONS_BUCKET)
    return missing
