"""Quarantine of what cannot be trusted: an event or a registry record that does not decode,
or that names another chat than the subject or key it was stored under.

Such a message is never acted on and never fatal: readers skip it, and it is counted once
(`sandbox.poison.total{source}`) and logged once with where it was found and its sequence,
however often it is read again.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict

from shared.telemetry import Metrics
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)

# What a decoder raises on bad input: msgspec.DecodeError and UnicodeDecodeError (invalid
# UTF-8 inside a string) are ValueErrors; JSON nested too deep is a RecursionError.
DECODE_ERRORS: tuple[type[Exception], ...] = (ValueError, RecursionError)


class PoisonSource(enum.StrEnum):
    EVENT = "event"  # a message on SANDBOX_EVENTS
    RECORD = "record"  # a value in the sandbox_sessions bucket
    HANDLED = "handled"  # a value in the sandbox_handled bucket
    IDEMPOTENCY = "idempotency"  # a value in the sandbox_idempotency bucket
    HEARTBEAT = "heartbeat"  # a value in the sandbox_instances bucket


class Quarantine:
    """Counts and logs each poisoned message once (a bounded memory of what it has seen)."""

    def __init__(self, metrics: Metrics | None = None, remember: int = 10_000) -> None:
        self._metrics = metrics or telemetry_disabled().metrics
        self._seen: OrderedDict[tuple[PoisonSource, str, int], None] = OrderedDict()
        self._remember = remember

    def report(self, source: PoisonSource, where: str, seq: int, why: str) -> None:
        key = (source, where, seq)
        if key in self._seen:
            self._seen.move_to_end(key)
            return
        self._seen[key] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        self._metrics.increment("sandbox.poison.total", {"source": source.value})
        log.warning("quarantined poison (%s) at %s, sequence %d, skipped: %s", source.value, where, seq, why[:300])
