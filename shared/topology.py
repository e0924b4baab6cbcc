"""The streams and buckets every process relies on.

Declaring (creating what is missing, updating settings that may change) is the admin's job:
`sandboxctl up` and `sandboxctl declare` call `ensure_topology` / `ensure_status_bucket`.
The processes only attach (`attach_topology` / `attach_status_bucket`): they look the
topology up, create what is missing only where their NATS user may (an open test server),
and never change an existing stream's settings. Read-only operator commands
(`sandboxctl status`, `replay --dry-run`) create nothing at all: `require_topology`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from shared.config import StreamSettings
from shared.nats_roles import FEED_SUBJECTS
from shared.service import StartupError
from shared.subjects import (
    COMMAND_SUBJECTS,
    COMMANDS_STREAM,
    EVENT_SUBJECTS,
    EVENTS_STREAM,
    HANDLED_BUCKET,
    IDEMPOTENCY_BUCKET,
    INSTANCES_BUCKET,
    NODE_COMMAND_SUBJECTS,
    NODE_COMMANDS_STREAM,
    SESSIONS_BUCKET,
    STATUS_BUCKET,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


# A command is two ids and at most 32 labels; an event carries one session record.
COMMAND_MAX_BYTES = 64 * 1024
EVENT_MAX_BYTES = 256 * 1024
# A live instance rewrites its heartbeat every second or so; a killed one's stays this long
# (for operators), then reads as gone, like one deleted on a clean stop.
INSTANCE_HEARTBEAT_MAX_AGE_SECONDS = 3600.0


class TopologyError(Exception):
    """An existing stream conflicts with the contract in a way we must not change silently."""


class TopologyMissing(TopologyError, StartupError):
    """A stream or bucket is missing and this process may not create it; says what to run."""


def _work_queue(name: str, description: str, subjects: str, settings: StreamSettings) -> StreamConfig:
    return StreamConfig(
        name=name,
        description=description,
        subjects=[subjects],
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


def commands_stream_config(settings: StreamSettings) -> StreamConfig:
    return _work_queue(
        COMMANDS_STREAM, "sandboxd commands (work queue: each command is consumed once)", COMMAND_SUBJECTS, settings
    )


def node_commands_stream_config(settings: StreamSettings) -> StreamConfig:
    """The nodes' queues: commands a runtime forwarded to the node that must carry them out
    (`sandbox.node.<node>.<kind>.<chat_id>`, one durable `sandboxd-node-<node>` per node). A
    stream of its own, so that runtimes may make a consumer per node here and no consumer but
    their shared one on SANDBOX_COMMANDS."""
    return _work_queue(
        NODE_COMMANDS_STREAM,
        "sandboxd commands forwarded to the node that carries them out (work queue per node)",
        NODE_COMMAND_SUBJECTS,
        settings,
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
        # Outside parties' core subscriptions (`sandbox.events.>` in their accounts) read this
        # copy of what was stored; see shared/nats_roles.py for why not the stream subjects.
        republish=RePublish(src=EVENT_SUBJECTS, dest=FEED_SUBJECTS),
    )


_MUTABLE = (
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


def _republish(config: StreamConfig) -> tuple[str | None, str | None, bool]:
    r = config.republish
    return (None, None, False) if r is None else (r.src, r.dest, bool(r.headers_only))


def _check_contract(name: str, have: StreamConfig, wanted: StreamConfig) -> None:
    if have.retention != wanted.retention:
        raise TopologyError(
            f"stream {name} exists with retention {have.retention}, the contract needs "
            f"{wanted.retention}; it cannot be changed in place (delete or rename the old stream)"
        )
    if set(have.subjects or []) != set(wanted.subjects or []):
        raise TopologyError(f"stream {name} exists with subjects {have.subjects}, expected {wanted.subjects}")


def _drifted(have: StreamConfig, wanted: StreamConfig) -> list[str]:
    fields = [f for f in _MUTABLE if getattr(have, f) != getattr(wanted, f)]
    if _republish(have) != _republish(wanted):
        fields.append("republish")
    return fields


async def _ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    name = wanted.name or ""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("created stream %s", name)
        return
    _check_contract(name, info.config, wanted)
    if _drifted(info.config, wanted):
        await js.update_stream(wanted)
        log.info("updated stream %s settings", name)


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """A KV bucket of the contract: what `ensure_bucket` declares and `attach_bucket` opens."""

    name: str
    description: str
    direct: bool = True  # readers use direct gets (any replica answers)
    # How long a key lives, from the settings; None: until it is deleted.
    max_age: Callable[[StreamSettings], float] | None = None


SESSIONS = BucketSpec(SESSIONS_BUCKET, "sandboxd session registry: one record per chat with a live session")
HANDLED = BucketSpec(
    HANDLED_BUCKET,
    "sandboxd handled commands: <chat_id>.<command_id> for every command that had its outcome",
    max_age=lambda s: s.handled_max_age_seconds,
)
IDEMPOTENCY = BucketSpec(
    IDEMPOTENCY_BUCKET,
    "sandboxd HTTP idempotency keys: the request and the answer it got (key: SHA-256 of the key)",
    max_age=lambda s: s.idempotency_max_age_seconds,
)
INSTANCES = BucketSpec(
    INSTANCES_BUCKET,
    "sandboxd runtime instances: one heartbeat per running runtime (key: its instance id)",
    max_age=lambda _: INSTANCE_HEARTBEAT_MAX_AGE_SECONDS,
)
STATUS = BucketSpec(STATUS_BUCKET, "sandboxd process status blocks (reaper.<id>, ...)", direct=False)


async def _create_bucket(js: JetStreamContext, spec: BucketSpec, settings: StreamSettings) -> KeyValue:
    kv = await js.create_key_value(
        bucket=spec.name,
        description=spec.description,
        history=1,
        ttl=spec.max_age(settings) if spec.max_age is not None else None,
        replicas=settings.replicas,
        direct=spec.direct,
    )
    log.info("created KV bucket %s", spec.name)
    return kv


async def ensure_bucket(js: JetStreamContext, spec: BucketSpec, settings: StreamSettings) -> KeyValue:
    """Create the bucket if it is missing; a key lifetime that changed in the settings is
    applied (admin)."""
    try:
        kv = await js.key_value(spec.name)
    except BucketNotFoundError:
        return await _create_bucket(js, spec, settings)
    if spec.max_age is not None:
        info = await js.stream_info(f"KV_{spec.name}")
        wanted = spec.max_age(settings)
        if info.config.max_age != wanted:
            info.config.max_age = wanted
            await js.update_stream(info.config)
            log.info("updated KV bucket %s max age", spec.name)
    return kv


async def ensure_topology(js: JetStreamContext, settings: StreamSettings) -> KeyValue:
    """Create what is missing, update settings that may change, leave data alone (admin).
    The status bucket is declared apart (`ensure_bucket(js, STATUS, ...)`)."""
    await _ensure_stream(js, commands_stream_config(settings))
    await _ensure_stream(js, node_commands_stream_config(settings))
    await _ensure_stream(js, events_stream_config(settings))
    for spec in (HANDLED, IDEMPOTENCY, INSTANCES):
        await ensure_bucket(js, spec, settings)
    return await ensure_bucket(js, SESSIONS, settings)


# --------------------------------------------------------------------------- attaching

DECLARE_HINT = (
    "only the admin role may create streams and buckets: run `sandboxctl declare` with admin "
    "credentials (it uses .sandboxd/nats/admin.nk when that file exists, else SANDBOXD_NATS_NKEY_FILE)"
)


async def _create_or_explain(what: str, create: Callable[[], Awaitable[T]]) -> T:
    """Create a missing piece if this process's NATS user may; a clear TopologyMissing if not
    (a permission violation reaches the client only as a request time-out)."""
    try:
        return await create()
    except (NatsError, TimeoutError) as exc:
        raise TopologyMissing(
            f"{what} does not exist and this process could not create it ({type(exc).__name__}: {exc}); {DECLARE_HINT}"
        ) from exc


async def _attach_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    name = wanted.name or ""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await _create_or_explain(f"stream {name}", lambda: js.add_stream(wanted))
        log.info("created stream %s", name)
        return
    _check_contract(name, info.config, wanted)
    drift = _drifted(info.config, wanted)
    if drift:
        log.warning(
            "stream %s differs from this process's settings in %s; left as it is (`sandboxctl declare` applies them)",
            name,
            ", ".join(drift),
        )


async def attach_topology(js: JetStreamContext, settings: StreamSettings) -> KeyValue:
    """Check the streams and open the registry bucket without changing anything that exists."""
    await _attach_stream(js, commands_stream_config(settings))
    await _attach_stream(js, events_stream_config(settings))
    return await attach_bucket(js, SESSIONS, settings)


async def attach_node_queues(js: JetStreamContext, settings: StreamSettings) -> None:
    """The runtimes' own stream of forwarded commands (no other process needs it)."""
    await _attach_stream(js, node_commands_stream_config(settings))


async def attach_bucket(js: JetStreamContext, spec: BucketSpec, settings: StreamSettings) -> KeyValue:
    """Open the bucket; create it only where this process's NATS user may (TopologyMissing,
    saying what to run, where it may not)."""
    try:
        return await js.key_value(spec.name)
    except BucketNotFoundError:
        return await _create_or_explain(f"KV bucket {spec.name}", lambda: _create_bucket(js, spec, settings))


async def topology_missing(js: JetStreamContext, *, status_bucket: bool = False) -> list[str]:
    """Names of the contract's streams and bucket (and, if asked, the status bucket) that do
    not exist (for readiness)."""
    missing: list[str] = []
    for stream in (COMMANDS_STREAM, EVENTS_STREAM):
        try:
            await js.stream_info(stream)
        except NotFoundError:
            missing.append(stream)
    for bucket in (SESSIONS_BUCKET, STATUS_BUCKET) if status_bucket else (SESSIONS_BUCKET,):
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            missing.append(bucket)
    return missing


async def require_topology(js: JetStreamContext, *, status_bucket: bool = False) -> None:
    """For a command that only reads: TopologyMissing naming what does not exist; it never
    creates anything (an admin's connection could, and would hide a wrong server or account)."""
    missing = await topology_missing(js, status_bucket=status_bucket)
    if missing:
        raise TopologyMissing(
            f"{', '.join(missing)} not found on this NATS server: this command only reads and creates "
            "nothing; run `sandboxctl declare` first (or point SANDBOXD_NATS_URL at the server that has them)"
        )
