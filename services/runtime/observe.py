"""What the runtime reports about each command: the seed's metric names and span
attributes, derived from the command and its outcome event."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.contracts import (
    AnyCommand,
    AnyEvent,
    CommandRejected,
    CreateSandbox,
    SandboxFailed,
    SandboxReused,
    SandboxRunning,
    SandboxStopped,
    StopReason,
    StopSandbox,
)
from shared.telemetry import Metrics, Span, disabled


@dataclass
class ActiveSandboxes:
    """`sandbox.active.count` for this node: set from each reconciliation pass (the truth)
    and moved by outcomes in between."""

    metrics: Metrics = field(default_factory=lambda: disabled().metrics)
    value: int = 0

    def set(self, value: int) -> None:
        self.value = max(value, 0)
        self.metrics.set("sandbox.active.count", self.value)

    def add(self, delta: int) -> None:
        self.set(self.value + delta)


def create_result(outcome: AnyEvent | None) -> str:
    match outcome:
        case SandboxRunning():
            return str(outcome.result or "created")
        case SandboxReused():
            return "reused"
        case CommandRejected():
            return "rejected"
        case None:
            return "duplicate"
    return "error"


def observe_outcome(
    command: AnyCommand, outcome: AnyEvent | None, span: Span, metrics: Metrics, active: ActiveSandboxes
) -> None:
    session = outcome.session if outcome is not None else None
    if session is not None:
        span.set_attribute("session.id", session.session_id)
        if session.container_id:
            span.set_attribute("container.id", session.container_id)
    if outcome is not None:
        span.set_attribute("sandbox.event", outcome.type)
    if isinstance(outcome, CommandRejected):
        metrics.increment("sandbox.command.rejected.total", {"kind": command.kind, "reason": outcome.reason or ""})
    if isinstance(command, CreateSandbox):
        _observe_create(outcome, span, metrics, active)
    elif isinstance(command, StopSandbox):
        _observe_stop(command, outcome, span, metrics, active)


def _observe_create(outcome: AnyEvent | None, span: Span, metrics: Metrics, active: ActiveSandboxes) -> None:
    result = create_result(outcome)
    span.set_attribute("sandbox.result", result)
    metrics.increment("sandbox.create.total", {"result": result})
    if not isinstance(outcome, SandboxRunning) or outcome.session is None:
        return
    if outcome.previous is None:
        active.add(1)
        return
    span.set_attribute("sandbox.previous_session.id", outcome.previous.session_id)
    span.set_attribute("sandbox.previous_container.id", outcome.previous.container_id or "")
    span.set_attribute("sandbox.new_session.id", outcome.session.session_id)
    span.set_attribute("sandbox.new_container.id", outcome.session.container_id or "")


def _observe_stop(
    command: StopSandbox, outcome: AnyEvent | None, span: Span, metrics: Metrics, active: ActiveSandboxes
) -> None:
    if isinstance(outcome, SandboxStopped):
        span.set_attribute("sandbox.result", "stopped")
        active.add(-1)
        if command.reason == StopReason.EXPIRED:
            metrics.increment("sandbox.cleanup.total", {"result": "cleaned"})
    elif isinstance(outcome, SandboxFailed):
        span.set_attribute("sandbox.result", "error")
        if command.reason == StopReason.EXPIRED:
            error_type = outcome.error.type if outcome.error else "unknown"
            metrics.increment("sandbox.cleanup.error.total", {"error.type": error_type})
