"""Reuse over HTTP without a round trip: an HTTP create on a chat whose last event shows a
running, unexpired session is answered from that event (one direct get), `200 reused`, with
no command published and no event appended.

This is the runtime's own decision for such a chat (services/runtime/decisions.py
`decide_create`: a running session that is not expired is reused whatever the request's ttl
and labels; a chat whose last event is running has no open claim). Anything else takes the
command path as before: no session, a claim (provisioning, stopping), a stopped, failed or
lost session, an expired one, a poisoned last event, a failed read, and a `ttl_seconds` over
this process's `sandbox.max_ttl_seconds` (the runtime refuses it, live session or not).
Commands published straight to NATS are not affected: they keep their one outcome event.

A session with an idle timeout needs its activity recorded: when its last recorded activity
is `sandbox.activity_interval_seconds` old or more, the create takes the command path (whose
`reused` event records it). So activity costs at most one event per chat per interval, and
every other reuse stays a direct get.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from shared.clock import Clock
from shared.contracts import SessionRecord, SessionStatus
from shared.event_store import EventStore
from shared.telemetry import Metrics

log = logging.getLogger(__name__)

FAST_PATH_METRIC = "sandbox.api.reuse_fast_path.total"


@dataclass(frozen=True, slots=True)
class ReuseShortcut:
    events: EventStore
    clock: Clock
    metrics: Metrics
    max_ttl_seconds: int
    activity_interval: timedelta = timedelta(seconds=5)

    async def live_session(self, chat: uuid.UUID, ttl_seconds: int | None) -> SessionRecord | None:
        """The session to answer `reused` with at once, or None: take the command path.
        Counted under `sandbox.api.reuse_fast_path.total{result}`: `reused`, or why not."""
        session, result = await self._decide(str(chat), ttl_seconds)
        self.metrics.increment(FAST_PATH_METRIC, {"result": result})
        return session

    async def _decide(self, chat_id: str, ttl_seconds: int | None) -> tuple[SessionRecord | None, str]:
        if ttl_seconds is not None and ttl_seconds > self.max_ttl_seconds:
            return None, "ttl_too_long"
        try:
            state = await self.events.read(chat_id)
        except Exception as exc:  # noqa: BLE001 - only a shortcut: the command path answers instead
            log.info("reuse fast path: chat %s not read (%s: %s)", chat_id, type(exc).__name__, exc)
            return None, "read_failed"
        if state.poisoned:
            return None, "poisoned"
        session = state.session
        if session is None:
            return None, "no_session"
        if session.status != SessionStatus.RUNNING:
            return None, "not_running"
        now = self.clock.now()
        if session.is_expired(now):
            return None, "expired"
        if session.idle_ttl_seconds and now - session.active_at >= self.activity_interval:
            return None, "record_activity"
        return session, "reused"
