"""The public message contracts: commands, lifecycle events and the session record.

Everything here is serialised as JSON on NATS and exported to `schemas/`; renaming a field
is a contract change. Commands are decoded per subject kind (their kind is in the subject,
not the payload); events are one tagged union on the `type` field.
"""

from __future__ import annotations

import enum
import functools
import uuid
from datetime import datetime, timedelta
from typing import Annotated, ClassVar, Literal

import msgspec

LabelKey = Annotated[str, msgspec.Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
# Printable text only: label values end up in Docker labels, logs and dashboards.
LabelValue = Annotated[str, msgspec.Meta(max_length=256, pattern=r"^[^\x00-\x1f\x7f]*$")]
Labels = Annotated[dict[LabelKey, LabelValue], msgspec.Meta(max_length=32)]
TtlSeconds = Annotated[int, msgspec.Meta(ge=1, le=30 * 24 * 3600)]
# An idle timeout: 0 turns it off for the session.
IdleTtlSeconds = Annotated[int, msgspec.Meta(ge=0, le=30 * 24 * 3600)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
# Identifiers inside events and records are checked when they are read back: an id that
# names a container or a host directory must be exactly what sandboxd writes.
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
Uuid = Annotated[str, msgspec.Meta(pattern=UUID_PATTERN)]
NodeId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
ContainerId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
# Times read back are compared with the clock: one without a zone would raise there.
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class SessionStatus(enum.StrEnum):
    PROVISIONING = "provisioning"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    LOST = "lost"
    PAUSED = "paused"  # its processes frozen (Docker pause), memory and files kept

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({SessionStatus.STOPPED, SessionStatus.FAILED, SessionStatus.LOST})


class CreateResult(enum.StrEnum):
    CREATED = "created"
    REUSED = "reused"
    REPLACED = "replaced"
    RESUMED = "resumed"  # a create found the session paused and resumed it


class RejectReason(enum.StrEnum):
    """Why a command was refused (the `reason` of its `rejected` event)."""

    # Malformed: the command can never be carried out; it is terminated, never retried.
    UNKNOWN_COMMAND = "unknown_command"
    INVALID_SUBJECT = "invalid_subject"
    INVALID_JSON = "invalid_json"
    INVALID_PAYLOAD = "invalid_payload"
    SUBJECT_MISMATCH = "subject_mismatch"
    # Refused by the chat's state or the node's limits.
    NO_LIVE_SESSION = "no_live_session"
    STALE_SESSION = "stale_session"
    NOT_RUNNING = "not_running"
    EXPIRED = "expired"
    NOT_EXPIRED = "not_expired"
    NOT_IDLE = "not_idle"  # an idle stop or pause found the session active again
    NOT_PAUSED = "not_paused"  # a resume found the session running (or in a claim)
    NOT_DUE = "not_due"  # a warn found no such deadline to warn of (it moved, or was warned of)
    TTL_TOO_LONG = "ttl_too_long"
    CAPACITY_EXCEEDED = "capacity_exceeded"


class StopReason(enum.StrEnum):
    """The stop reasons sandboxd itself gives or interprets: the `reason` of a `stop` command
    and of the `stopping` / `stopped` / `failed` events it leads to.

    On the wire a stop's `reason` stays a free-form `Reason` (an agent may give its own, which
    is recorded as given); only `expired` changes what a stop does."""

    API = "api"  # a stop over HTTP, and one that names no reason
    EXPIRED = "expired"  # the reaper's: stops only a session that *is* expired
    STUCK_PROVISIONING = "stuck_provisioning"  # the reaper's re-drive of an abandoned claim
    STUCK_STOPPING = "stuck_stopping"
    REPLACED = "replaced"  # the `stopping` claim of a create replacing an expired session
    ORPHAN_REMOVED = "orphan_removed"  # reconciliation removed a container no live session owns
    IDLE = "idle"  # the reaper's: stops only a running session past its idle deadline
    PAUSED_TTL = "paused_ttl"  # the reaper's: stops only a session paused for sandbox.paused_ttl_seconds


class PauseReason(enum.StrEnum):
    """The `reason` of a `pause` command and of its `paused` event."""

    API = "api"  # asked for (HTTP or NATS)
    IDLE = "idle"  # the reaper's, with sandbox.on_idle = pause: pauses only an idle session


class ExpiringReason(enum.StrEnum):
    """Which deadline an `expiring` event warns of."""

    EXPIRED = "expired"  # the lifetime: expires_at
    IDLE = "idle"  # the idle timeout: last_active_at + idle_ttl_seconds
    PAUSED_TTL = "paused_ttl"  # paused_at + sandbox.paused_ttl_seconds


class LostReason(enum.StrEnum):
    """Why a running session was recorded as `lost`: the engine reported its container's
    death (`container_exited`, `error.exit_code` / `error.oom_killed` say how), or node
    reconciliation found it gone or not running."""

    CONTAINER_EXITED = "container_exited"
    CONTAINER_MISSING = "container_missing"
    CONTAINER_NOT_RUNNING = "container_not_running"
    # Its node's runtimes were all silent for runtime.node_dead_after_seconds: the node is
    # dead, and a returning node removes the container (it never resurrects the session).
    NODE_LOST = "node_lost"


class ExtendReason(enum.StrEnum):
    """The `reason` of an `extended` event (none when the keepalive got what it asked)."""

    LIFETIME_CAP = "lifetime_cap"  # the expiry was held at created_at + sandbox.max_lifetime_seconds
    # The session already expired later than the keepalive asked: a keepalive never moves
    # the expiry earlier, so it was kept.
    ALREADY_LATER = "already_later"


class RunningReason(enum.StrEnum):
    """The `reason` of a `running` event (none when the create's own handler appended it)."""

    ADOPTED = "adopted"  # reconciliation adopted the container of a create that crashed


class ErrorType(enum.StrEnum):
    """The `error.type` of a `failed` or `lost` event (a `rejected` event's is its RejectReason)."""

    DOCKER_UNAVAILABLE = "docker_unavailable"  # the engine could not be reached
    NATS_UNAVAILABLE = "nats_unavailable"  # NATS did not answer (named in a gave_up message)
    NODE_UNAVAILABLE = "node_unavailable"  # the session's container is on another node
    SANDBOX_START_FAILED = "sandbox_start_failed"  # Docker refused to create or start it
    SANDBOX_STOP_FAILED = "sandbox_stop_failed"  # Docker refused to stop or remove it
    SANDBOX_PAUSE_FAILED = "sandbox_pause_failed"  # Docker refused to pause or unpause it
    CONTAINER_STATE = "container_state"  # a lost session: what Docker says of its container
    GAVE_UP = "gave_up"  # still not carried out after runtime.max_deliveries deliveries
    INTERNAL_ERROR = "internal_error"  # a bug: the command still gets its outcome


# --------------------------------------------------------------------------- commands


class Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, dict=True):
    """Fields every command carries; an agent typing one by hand needs only the ids.

    Unknown fields are refused: a misspelt `ttl_seconds` must not silently start a sandbox
    with the default TTL. `chat_key` / `command_key` are the ids as text (subjects, keys and
    events use them), made once per command (`dict=True` lets them be cached)."""

    kind: ClassVar[str]
    command_id: uuid.UUID
    chat_id: uuid.UUID
    requested_at: datetime | None = None
    requested_by: Annotated[str, msgspec.Meta(max_length=128)] | None = None

    @functools.cached_property
    def chat_key(self) -> str:
        return str(self.chat_id)

    @functools.cached_property
    def command_key(self) -> str:
        return str(self.command_id)


class CreateSandbox(Command, frozen=True, kw_only=True):
    """Create the chat's sandbox, or reuse the live one (replace it when expired)."""

    kind: ClassVar[str] = "create"
    ttl_seconds: TtlSeconds | None = None
    # Stop (or pause, per sandbox.on_idle) the session after this long without activity;
    # default sandbox.idle_ttl_seconds, 0: never.
    idle_ttl_seconds: IdleTtlSeconds | None = None
    labels: Labels = msgspec.field(default_factory=dict)


class StopSandbox(Command, frozen=True, kw_only=True):
    """Stop the chat's sandbox; with `session_id`, only if that is still the current one."""

    kind: ClassVar[str] = "stop"
    session_id: uuid.UUID | None = None
    reason: Reason = StopReason.API


class KeepaliveSandbox(Command, frozen=True, kw_only=True):
    """Move the live session's `expires_at` to now + ttl (never earlier); also activity."""

    kind: ClassVar[str] = "keepalive"
    session_id: uuid.UUID | None = None
    ttl_seconds: TtlSeconds | None = None


class PauseSandbox(Command, frozen=True, kw_only=True):
    """Freeze the running session's processes (Docker pause); memory and files are kept."""

    kind: ClassVar[str] = "pause"
    session_id: uuid.UUID | None = None
    reason: Reason = PauseReason.API


class ResumeSandbox(Command, frozen=True, kw_only=True):
    """Unfreeze the paused session; also activity."""

    kind: ClassVar[str] = "resume"
    session_id: uuid.UUID | None = None


class WarnSandbox(Command, frozen=True, kw_only=True):
    """The reaper's: have `expiring` appended for the session's `deadline`. Carried out only
    while that is the session's earliest deadline and not warned of yet (else `rejected`),
    so anyone may send it without effect; only the runtime appends events."""

    kind: ClassVar[str] = "warn"
    session_id: uuid.UUID
    deadline: AwareDatetime
    reason: ExpiringReason


AnyCommand = CreateSandbox | StopSandbox | KeepaliveSandbox | PauseSandbox | ResumeSandbox | WarnSandbox
COMMAND_TYPES: dict[str, type[AnyCommand]] = {
    CreateSandbox.kind: CreateSandbox,
    StopSandbox.kind: StopSandbox,
    KeepaliveSandbox.kind: KeepaliveSandbox,
    PauseSandbox.kind: PauseSandbox,
    ResumeSandbox.kind: ResumeSandbox,
    WarnSandbox.kind: WarnSandbox,
}


# --------------------------------------------------------------------------- session record


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A chat's session as the registry (`sandbox_sessions`) holds it.

    `version` is the stream sequence of the event that produced this record. Inside an event
    payload the event's own sequence is not known yet, so there it is the sequence of the
    chat's previous event (the state the event was decided from); the projector and replay
    write the event's own sequence.
    """

    session_id: Uuid
    chat_id: Uuid
    node_id: NodeId
    container_id: ContainerId | None
    image: str
    status: SessionStatus
    created_at: AwareDatetime
    expires_at: AwareDatetime
    updated_at: AwareDatetime
    labels: Labels = msgspec.field(default_factory=dict)
    version: int = 0
    # Idle timeout (0: none) and the last recorded activity (a create that reused or resumed
    # it, a keepalive, a resume; null: none since created_at).
    idle_ttl_seconds: IdleTtlSeconds = 0
    last_active_at: AwareDatetime | None = None
    paused_at: AwareDatetime | None = None  # when it was paused (status paused only)
    # The deadline the last `expiring` event warned of (each deadline is warned of once).
    warned_deadline: AwareDatetime | None = None
    # The OCI runtime the container runs under (`runsc`: gVisor, `runc`); null before it
    # runs, under the engine's default, or in records written before it was recorded.
    oci_runtime: Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")] | None = None

    @property
    def is_live(self) -> bool:
        return not self.status.is_terminal

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at <= now

    @property
    def active_at(self) -> datetime:
        return self.last_active_at or self.created_at

    @property
    def idle_deadline(self) -> datetime | None:
        """When a running session becomes idle; None without an idle timeout."""
        if not self.idle_ttl_seconds:
            return None
        return self.active_at + timedelta(seconds=self.idle_ttl_seconds)

    def is_idle(self, now: datetime) -> bool:
        deadline = self.idle_deadline
        return deadline is not None and deadline <= now


# --------------------------------------------------------------------------- events


class ErrorInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """What went wrong. A `lost` session's error also says how its container ended, when the
    engine told: its process's exit code and whether the kernel's OOM killer ended it."""

    type: str
    message: str
    exit_code: int | None = None
    oom_killed: bool | None = None


class PreviousSession(msgspec.Struct, frozen=True):
    session_id: Uuid
    container_id: ContainerId | None


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """A lifecycle event; `session` is the chat's whole session after it (null when none)."""

    event_id: str
    chat_id: str  # the chat of its subject (`invalid` for commands whose subject names none)
    session_id: Uuid | None
    causation_id: str | None
    occurred_at: AwareDatetime
    node_id: NodeId | None
    result: CreateResult | None = None
    reason: str | None = None
    error: ErrorInfo | None = None
    previous: PreviousSession | None = None
    session: SessionRecord | None = None

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """Where a new session was placed and why: the node with the most free capacity among the
    nodes whose runtimes heartbeat (`free`: its free places as the placing runtime saw them,
    null when unlimited; `nodes`: how many live nodes it chose from)."""

    node_id: NodeId
    placed_by: NodeId  # the node of the runtime that chose
    free: int | None = None
    nodes: Annotated[int, msgspec.Meta(ge=1)] = 1


class SandboxProvisioning(Event, frozen=True, kw_only=True, tag="provisioning"):
    """The claim: a create owns the chat before any container exists. `instance_id` names the
    runtime instance that made it (its heartbeat is in `sandbox_instances`); absent in claims
    written before instances heartbeated. `placement` records how a new session's node was
    chosen (absent for the new session of a replace, which stays on its node)."""

    instance_id: Uuid | None = None
    placement: Placement | None = None


class SandboxRunning(Event, frozen=True, kw_only=True, tag="running"):
    """Outcome of a create: a new container runs (`result` created or replaced)."""


class SandboxReused(Event, frozen=True, kw_only=True, tag="reused"):
    """Outcome of a create that found a live, unexpired session; nothing changed."""


class SandboxExtended(Event, frozen=True, kw_only=True, tag="extended"):
    """Outcome of a keepalive: `expires_at` moved."""


class SandboxPaused(Event, frozen=True, kw_only=True, tag="paused"):
    """Outcome of a pause: the container's processes are frozen (`reason` api or idle)."""


class SandboxResumed(Event, frozen=True, kw_only=True, tag="resumed"):
    """Outcome of a resume, or of a create that found the session paused (`result`
    resumed): the container runs again, same session."""


class SandboxExpiring(Event, frozen=True, kw_only=True, tag="expiring"):
    """A warning: the session reaches `deadline` (`reason`: expired, idle or paused_ttl) in
    sandbox.expiry_warning_seconds or less; a keepalive (or any activity, for idle) moves it.
    The outcome of the reaper's `warn` command, once per deadline; the session is unchanged
    but for `warned_deadline`."""

    deadline: AwareDatetime | None = None


class SandboxStopping(Event, frozen=True, kw_only=True, tag="stopping"):
    """The claim of a stop (or of a create replacing the session), before the container is
    removed; `instance_id` as in `provisioning`."""

    instance_id: Uuid | None = None


class SandboxStopped(Event, frozen=True, kw_only=True, tag="stopped"):
    """Outcome of a stop: the container is gone; the session is terminal."""


class SandboxFailed(Event, frozen=True, kw_only=True, tag="failed"):
    """A command could not be carried out; `error` says why, `session` what is left."""


class SandboxLost(Event, frozen=True, kw_only=True, tag="lost"):
    """The container of a running session disappeared behind our back."""


class CommandRejected(Event, frozen=True, kw_only=True, tag="rejected"):
    """The command was refused (`reason`); nothing changed."""


AnyEvent = (
    SandboxProvisioning
    | SandboxRunning
    | SandboxReused
    | SandboxExtended
    | SandboxStopping
    | SandboxStopped
    | SandboxFailed
    | SandboxLost
    | CommandRejected
    | SandboxPaused
    | SandboxResumed
    | SandboxExpiring
)
EVENT_TYPES: tuple[type[Event], ...] = (
    SandboxProvisioning,
    SandboxRunning,
    SandboxReused,
    SandboxExtended,
    SandboxStopping,
    SandboxStopped,
    SandboxFailed,
    SandboxLost,
    CommandRejected,
    SandboxPaused,
    SandboxResumed,
    SandboxExpiring,
)
OUTCOME_TYPES: tuple[type[Event], ...] = (
    SandboxRunning,
    SandboxReused,
    SandboxExtended,
    SandboxStopped,
    SandboxFailed,
    CommandRejected,
    SandboxPaused,
    SandboxResumed,
    SandboxExpiring,
)

EventTypeName = Literal[
    "provisioning",
    "running",
    "reused",
    "extended",
    "stopping",
    "stopped",
    "failed",
    "lost",
    "rejected",
    "paused",
    "resumed",
    "expiring",
]

_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_record_decoder = msgspec.json.Decoder(SessionRecord)
_encoder = msgspec.json.Encoder()


def encode(value: object) -> bytes:
    return _encoder.encode(value)


def decode_event(data: bytes) -> AnyEvent:
    return _event_decoder.decode(data)


def decode_record(data: bytes) -> SessionRecord:
    return _record_decoder.decode(data)


def is_outcome(event: Event) -> bool:
    return isinstance(event, OUTCOME_TYPES)


# --------------------------------------------------------------------------- handled commands


class HandledCommand(msgspec.Struct, frozen=True, kw_only=True):
    """A command that has had its outcome, as `sandbox_handled` holds it (key
    `<chat_id>.<command_id>`). A command id found there is never carried out again: a
    redelivery or a client re-sending it long after the event stream's de-duplication window
    gets no second outcome. `outcome_seq` is the outcome event's sequence in SANDBOX_EVENTS."""

    chat_id: Uuid
    command_id: Uuid
    kind: str  # the command's kind: create, stop or keepalive
    outcome_seq: Annotated[int, msgspec.Meta(ge=1)]
    recorded_at: AwareDatetime


_handled_decoder = msgspec.json.Decoder(HandledCommand)


def decode_handled(data: bytes) -> HandledCommand:
    return _handled_decoder.decode(data)


# --------------------------------------------------------------------------- runtime instances


class InstanceHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """A running runtime instance, as `sandbox_instances` holds it (key `<instance_id>`):
    rewritten several times within `runtime.instance_dead_after_seconds` while the instance
    runs, deleted when it stops cleanly. A claim naming an instance whose heartbeat is gone or
    older than that is taken over."""

    instance_id: Uuid
    node_id: NodeId
    pid: Annotated[int, msgspec.Meta(ge=1)]
    started_at: AwareDatetime
    beat_at: AwareDatetime


_heartbeat_decoder = msgspec.json.Decoder(InstanceHeartbeat)


def decode_heartbeat(data: bytes) -> InstanceHeartbeat:
    return _heartbeat_decoder.decode(data)


# --------------------------------------------------------------------------- nodes


class NodeBeat(msgspec.Struct, frozen=True, kw_only=True):
    """A node (one Docker host) as `sandbox_instances` holds it (key `node.<node token>`):
    rewritten by each of its runtime instances with every heartbeat, never deleted, so a node
    whose runtimes all went silent is seen silent. Placement reads its free capacity."""

    node_id: NodeId
    instance_id: Uuid  # the instance that wrote it
    beat_at: AwareDatetime
    live_sessions: Annotated[int, msgspec.Meta(ge=0)]
    max_sessions: Annotated[int, msgspec.Meta(ge=1)] | None = None  # None: unlimited
    # Written by a runtime that stops cleanly: no new sessions are placed here until another
    # runtime of the node beats.
    draining: bool = False


_node_beat_decoder = msgspec.json.Decoder(NodeBeat)


def decode_node_beat(data: bytes) -> NodeBeat:
    return _node_beat_decoder.decode(data)


class NodeEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """A node's lifecycle, on `sandbox.events.node.<node token>`."""

    event_id: str
    node_id: NodeId
    occurred_at: AwareDatetime
    last_beat_at: AwareDatetime | None  # the node's last heartbeat when this was recorded
    recorded_by: NodeId  # the node of the runtime that recorded it

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)


class NodeDead(NodeEvent, frozen=True, kw_only=True, tag="node_dead"):
    """Every runtime of the node was silent for runtime.node_dead_after_seconds: its live
    sessions are recorded `lost {reason: node_lost}`, new sessions go elsewhere."""


class NodeReturned(NodeEvent, frozen=True, kw_only=True, tag="node_returned"):
    """A runtime of a node recorded dead heartbeats again; the node removes the containers of
    the sessions it no longer owns before it takes work."""


AnyNodeEvent = NodeDead | NodeReturned
NODE_EVENT_TYPES: tuple[type[NodeEvent], ...] = (NodeDead, NodeReturned)
_node_event_decoder: msgspec.json.Decoder[AnyNodeEvent] = msgspec.json.Decoder(AnyNodeEvent)


def decode_node_event(data: bytes) -> AnyNodeEvent:
    return _node_event_decoder.decode(data)
