"""HTTP request and response bodies, and the mapping from outcome events to responses."""

from __future__ import annotations

from datetime import datetime
from typing import Any, assert_never

import msgspec

from shared.contracts import (
    CommandRejected,
    CreateResult,
    ErrorInfo,
    ErrorType,
    Event,
    IdleTtlSeconds,
    Labels,
    RejectReason,
    SandboxExtended,
    SandboxFailed,
    SandboxPaused,
    SandboxResumed,
    SandboxReused,
    SandboxRunning,
    SandboxStopped,
    SessionRecord,
    SessionStatus,
    TtlSeconds,
)


class CreateSandboxRequest(msgspec.Struct, forbid_unknown_fields=True):
    chat_id: str
    ttl_seconds: TtlSeconds | None = None
    labels: Labels = msgspec.field(default_factory=dict)
    idle_ttl_seconds: IdleTtlSeconds | None = None


class PauseRequest(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str | None = None


class ResumeRequest(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str | None = None


class SeedCreateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The seed service's `POST /create` body."""

    chat_id: str


class KeepaliveRequest(msgspec.Struct, forbid_unknown_fields=True):
    ttl_seconds: TtlSeconds | None = None
    session_id: str | None = None


class SessionView(msgspec.Struct):
    session_id: str
    chat_id: str
    container_id: str | None
    status: SessionStatus
    created_at: datetime
    expires_at: datetime
    node_id: str
    result: CreateResult | None = None
    updated_at: datetime | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    idle_ttl_seconds: int = 0  # 0: no idle timeout
    last_active_at: datetime | None = None
    idle_deadline: datetime | None = None  # when it stops (or pauses) unless used again
    paused_at: datetime | None = None
    oci_runtime: str | None = None  # `runsc` (gVisor) or `runc`; null when not known


class SeedCreateResponse(msgspec.Struct):
    """The seed's create response fields."""

    session_id: str
    chat_id: str
    container_id: str | None
    status: SessionStatus
    created_at: datetime
    expires_at: datetime


class SessionList(msgspec.Struct):
    """One page of `GET /sandboxes`: `count` is the number of sessions in this page;
    `next_cursor` (null when no more match) asks for the next one."""

    sessions: list[SessionView]
    count: int
    next_cursor: str | None


class Accepted(msgspec.Struct):
    """The command is in the stream but its outcome did not come within the wait."""

    command_id: str
    chat_id: str
    detail: str
    status_url: str


class StoredEventView(msgspec.Struct):
    seq: int
    event: Any


class EventHistory(msgspec.Struct):
    chat_id: str
    events: list[StoredEventView]


class ErrorBody(msgspec.Struct):
    status_code: int
    detail: str
    error: ErrorInfo | None = None


def session_view(record: SessionRecord, result: CreateResult | None = None) -> SessionView:
    return SessionView(
        session_id=record.session_id,
        chat_id=record.chat_id,
        container_id=record.container_id,
        status=record.status,
        created_at=record.created_at,
        expires_at=record.expires_at,
        node_id=record.node_id,
        result=result,
        updated_at=record.updated_at,
        labels=record.labels,
        idle_ttl_seconds=record.idle_ttl_seconds,
        last_active_at=record.last_active_at,
        idle_deadline=record.idle_deadline if record.status == SessionStatus.RUNNING else None,
        paused_at=record.paused_at,
        oci_runtime=record.oci_runtime,
    )


# What a 429 asks the client to wait: sessions free up as others stop or expire.
RETRY_AFTER_SECONDS = 5


def rejection_status(reason: RejectReason) -> int:
    """The HTTP status of a refusal, for every reason the runtime gives."""
    match reason:
        case (
            RejectReason.UNKNOWN_COMMAND
            | RejectReason.INVALID_SUBJECT
            | RejectReason.INVALID_JSON
            | RejectReason.INVALID_PAYLOAD
            | RejectReason.SUBJECT_MISMATCH
        ):
            return 400
        case RejectReason.NO_LIVE_SESSION:
            return 404
        case (
            RejectReason.STALE_SESSION
            | RejectReason.NOT_RUNNING
            | RejectReason.EXPIRED
            | RejectReason.NOT_EXPIRED
            | RejectReason.NOT_IDLE
            | RejectReason.NOT_PAUSED
            | RejectReason.NOT_DUE
        ):
            return 409
        case RejectReason.TTL_TOO_LONG:
            return 422
        case RejectReason.CAPACITY_EXCEEDED:
            return 429
        case _:
            assert_never(reason)


def failure_status(error_type: ErrorType) -> int:
    """The HTTP status of a `failed` outcome, for every error type the runtime gives."""
    match error_type:
        case ErrorType.DOCKER_UNAVAILABLE | ErrorType.NATS_UNAVAILABLE:
            return 503
        case ErrorType.SANDBOX_START_FAILED | ErrorType.SANDBOX_STOP_FAILED | ErrorType.SANDBOX_PAUSE_FAILED:
            return 502
        case ErrorType.NODE_UNAVAILABLE | ErrorType.CONTAINER_STATE | ErrorType.GAVE_UP | ErrorType.INTERNAL_ERROR:
            return 500
        case _:
            assert_never(error_type)


def _rejected_status(reason: str | None) -> int:
    try:
        known = RejectReason(reason or "")
    except ValueError:
        return 400  # a reason this version does not know (a newer runtime's) is still a refusal
    return rejection_status(known)


def _failed_status(error: ErrorInfo | None) -> int:
    try:
        known = ErrorType(error.type if error is not None else "")
    except ValueError:
        return 500
    return failure_status(known)


def outcome_status(event: Event) -> int:
    """The HTTP status an outcome event answers with."""
    match event:
        case SandboxRunning():
            return 201
        case SandboxReused() | SandboxStopped() | SandboxExtended() | SandboxPaused() | SandboxResumed():
            return 200
        case CommandRejected():
            return _rejected_status(event.reason)
        case SandboxFailed():
            return _failed_status(event.error)
    return 500


def failure_detail(event: Event) -> str:
    error = event.error
    what = f"{error.type}: {error.message}" if error else "no detail"
    if isinstance(event, CommandRejected):
        return f"refused ({event.reason}): {error.message if error else event.reason}"
    if error is not None and error.type == ErrorType.DOCKER_UNAVAILABLE:
        return f"the Docker engine is unavailable; nothing was started ({what})"
    return f"the sandbox operation failed ({what})"
