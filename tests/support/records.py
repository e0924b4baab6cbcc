"""One factory for session records in tests: valid by default, any field overridden."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.contracts import SessionRecord, SessionStatus

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def session_record(
    *,
    now: datetime = T0,
    ttl: timedelta = timedelta(hours=1),
    status: SessionStatus = SessionStatus.RUNNING,
    **fields: Any,
) -> SessionRecord:
    """A session created at `now`, expiring `ttl` later; ids are fresh unless given."""
    values: dict[str, Any] = {
        "session_id": str(uuid.uuid4()),
        "chat_id": str(uuid.uuid4()),
        "node_id": "node-a",
        "container_id": None if status == SessionStatus.PROVISIONING else f"c-{uuid.uuid4().hex[:12]}",
        "image": "sandboxd-sandbox:latest",
        "status": status,
        "created_at": now,
        "expires_at": now + ttl,
        "updated_at": now,
    }
    values.update(fields)
    return SessionRecord(**values)
