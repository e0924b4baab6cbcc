"""The HTTP status of every outcome the runtime can give: the maps are total over the enums."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.api.views import failure_status, outcome_status, rejection_status
from shared.contracts import CommandRejected, ErrorInfo, ErrorType, RejectReason, SandboxFailed

MALFORMED = {
    RejectReason.UNKNOWN_COMMAND,
    RejectReason.INVALID_SUBJECT,
    RejectReason.INVALID_JSON,
    RejectReason.INVALID_PAYLOAD,
    RejectReason.SUBJECT_MISMATCH,
}
REFUSED = {
    RejectReason.NO_LIVE_SESSION: 404,
    RejectReason.STALE_SESSION: 409,
    RejectReason.NOT_RUNNING: 409,
    RejectReason.EXPIRED: 409,
    RejectReason.NOT_EXPIRED: 409,
    RejectReason.NOT_IDLE: 409,
    RejectReason.NOT_PAUSED: 409,
    RejectReason.NOT_DUE: 409,
    RejectReason.TTL_TOO_LONG: 422,
    RejectReason.CAPACITY_EXCEEDED: 429,
}
FAILED = {
    ErrorType.DOCKER_UNAVAILABLE: 503,
    ErrorType.NATS_UNAVAILABLE: 503,
    ErrorType.SANDBOX_START_FAILED: 502,
    ErrorType.SANDBOX_STOP_FAILED: 502,
    ErrorType.SANDBOX_PAUSE_FAILED: 502,
}  # any other error type: 500
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _rejected(reason: str | None) -> CommandRejected:
    return CommandRejected(
        event_id="e", chat_id="c", session_id=None, causation_id="x", occurred_at=NOW, node_id=None, reason=reason
    )


def _failed(error_type: str) -> SandboxFailed:
    error = ErrorInfo(error_type, "why")
    return SandboxFailed(
        event_id="e", chat_id="c", session_id=None, causation_id="x", occurred_at=NOW, node_id=None, error=error
    )


@pytest.mark.parametrize("reason", list(RejectReason))
def test_every_rejection_reason_has_its_status(reason: RejectReason) -> None:
    expected = 400 if reason in MALFORMED else REFUSED[reason]
    assert rejection_status(reason) == expected
    assert outcome_status(_rejected(str(reason))) == expected  # as it arrives: a plain string


@pytest.mark.parametrize("error_type", list(ErrorType))
def test_every_error_type_has_a_server_side_status(error_type: ErrorType) -> None:
    expected = FAILED.get(error_type, 500)
    assert failure_status(error_type) == expected
    assert outcome_status(_failed(str(error_type))) == expected


def test_reasons_and_types_this_version_does_not_know_keep_a_status() -> None:
    assert outcome_status(_rejected("a_newer_reason")) == 400
    assert outcome_status(_rejected(None)) == 400
    assert outcome_status(_failed("a_newer_type")) == 500
