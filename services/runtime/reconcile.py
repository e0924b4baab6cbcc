"""Node reconciliation: this node's Docker containers against the chats' last events.

- a `running` session whose container is gone or not running becomes `lost` (Docker's state
  in the event), after `confirmations` consecutive observations;
- a container that belongs to an abandoned `provisioning` claim (a crash mid-create) is
  adopted: the claim's command gets its `running` outcome;
- a managed container that no live session owns (an orphan) is removed after
  `confirmations` consecutive observations, and a `stopped` event with reason
  `orphan_removed` records it (carrying the chat's current session unchanged).

Every action is an append with the expected sequence it was decided from, so a command
handled meanwhile simply wins. Decisions are pure (`decide_for_chat`); the loop never raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec

from services.runtime.containers import ContainerIdentity, container_name
from services.runtime.docker_driver import ContainerDriver, ObservedContainer
from services.runtime.handlers import outcome_msg_id
from services.runtime.losses import MarkLost, append_lost
from services.runtime.observe import ActiveSandboxes
from shared.clock import Clock
from shared.contracts import (
    AnyEvent,
    CreateResult,
    LostReason,
    RunningReason,
    SandboxProvisioning,
    SandboxRunning,
    SandboxStopped,
    SandboxStopping,
    SessionRecord,
    SessionStatus,
    StopReason,
)
from shared.errors import AppendConflict
from shared.event_store import ChatState, EventStore
from shared.ids import random_uuid
from shared.registry import Registry
from shared.subjects import canonical_chat_id
from shared.telemetry import Telemetry
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Adopt:
    claim: SandboxProvisioning
    session: SessionRecord
    container: ObservedContainer


@dataclass(frozen=True, slots=True)
class RemoveOrphan:
    container: ObservedContainer


@dataclass(frozen=True, slots=True)
class Refreeze:
    """The container is paused while its session runs, or runs while its session is paused
    (a pause or resume that died between Docker and its event): Docker is set to match the
    session; nothing is recorded."""

    session: SessionRecord
    container: ObservedContainer
    frozen: bool  # pause it (True) or unpause it


Action = MarkLost | Adopt | RemoveOrphan | Refreeze
# Docker's state of a session's container, for each settled status.
_DOCKER_STATE = {SessionStatus.RUNNING: "running", SessionStatus.PAUSED: "paused"}


def decide_for_chat(
    state: ChatState,
    containers: list[ObservedContainer],
    node_id: str,
    now: datetime,
    claim_timeout: timedelta,
) -> list[Action]:
    """What reconciliation would do for one chat, given one observation."""
    last = state.last
    session = state.session if state.session is not None and state.session.is_live else None
    mine = session if session is not None and session.node_id == node_id else None
    by_session = {c.session_id: c for c in containers}
    actions: list[Action] = []
    claim_in_flight = isinstance(last, SandboxProvisioning | SandboxStopping) and now - last.occurred_at < claim_timeout
    if mine is not None and mine.status in _DOCKER_STATE and not claim_in_flight:
        container = by_session.get(mine.session_id)
        if container is None:
            actions.append(MarkLost(mine, LostReason.CONTAINER_MISSING, "no such container", None))
        elif container.state in _DOCKER_STATE.values():
            if container.state != _DOCKER_STATE[mine.status]:
                actions.append(Refreeze(mine, container, frozen=mine.status == SessionStatus.PAUSED))
        else:
            actions.append(
                MarkLost(
                    mine,
                    LostReason.CONTAINER_NOT_RUNNING,
                    f"{container.state}: {container.status}",
                    container.container_id,
                )
            )
    if mine is not None and isinstance(last, SandboxProvisioning) and not claim_in_flight:
        container = by_session.get(mine.session_id)
        if container is not None and container.state == "running":
            actions.append(Adopt(last, mine, container))
    owner = session.session_id if session is not None else None
    actions += [RemoveOrphan(c) for c in containers if c.session_id != owner]
    return actions


def is_canonical_uuid(value: str) -> bool:
    try:
        return canonical_chat_id(value) == value
    except ValueError:
        return False


def _made_by_us(container: ObservedContainer) -> bool:
    """Its chat and session labels are ids and its name is its session's: only then is it
    reconciled (a session label would otherwise name the event recorded for it)."""
    return (
        is_canonical_uuid(container.chat_id)
        and is_canonical_uuid(container.session_id)
        and container.name == container_name(container.session_id)
    )


def _key(action: Action) -> tuple[str, str]:
    match action:
        case MarkLost():
            return ("lost", action.session.session_id)
        case Adopt():
            return ("adopt", action.claim.session_id or "")
        case RemoveOrphan():
            return ("orphan", action.container.container_id)
        case Refreeze():
            return ("refreeze", action.container.container_id)


# --------------------------------------------------------------------------- effects


@dataclass
class ReconcileReport:
    containers: int = 0
    chats: int = 0
    lost: int = 0
    adopted: int = 0
    orphans_removed: int = 0
    refrozen: int = 0
    pending_confirmation: int = 0
    errors: int = 0
    actions: list[str] = field(default_factory=list)


class NodeReconciler:
    def __init__(
        self,
        store: EventStore,
        registry: Registry,
        driver: ContainerDriver,
        clock: Clock,
        *,
        node_id: str,
        claim_timeout: timedelta,
        confirmations: int = 2,
        stop_timeout_seconds: int = 2,
        new_id: Callable[[], str] = random_uuid,
        telemetry: Telemetry | None = None,
        active: ActiveSandboxes | None = None,
    ) -> None:
        self._telemetry = telemetry or telemetry_disabled()
        self._active = active or ActiveSandboxes()
        self.last_report: ReconcileReport | None = None
        self._store = store
        self._registry = registry
        self._driver = driver
        self._clock = clock
        self._node_id = node_id
        self._claim_timeout = claim_timeout
        self._confirmations = confirmations
        self._stop_timeout = stop_timeout_seconds
        self._new_id = new_id
        self._seen: Counter[tuple[str, str]] = Counter()
        # One pass at a time: the periodic loop and the death watch's pass after a reconnect
        # would otherwise count each other's observations.
        self._one_pass = asyncio.Lock()

    async def run_once(self) -> ReconcileReport:
        async with self._one_pass:
            return await self._run_once()

    async def fence(self) -> ReconcileReport:
        """A pass for a node that was declared dead and is back: a container that no live
        session owns is removed at once (its session was recorded lost while the node was
        away; waiting for a second observation would let it run on)."""
        async with self._one_pass:
            return await self._run_once(fencing=True)

    async def _run_once(self, *, fencing: bool = False) -> ReconcileReport:
        with self._telemetry.tracer.span("adapter.sandbox.reconcile_sessions", {"node.id": self._node_id}) as span:
            report = await self._pass(fencing=fencing)
            span.set_attribute("sandbox.container_count", report.containers)
            span.set_attribute("sandbox.lost_count", report.lost)
            span.set_attribute("sandbox.adopted_count", report.adopted)
            span.set_attribute("sandbox.orphan_count", report.orphans_removed)
            span.set_attribute("sandbox.result", "reconciled")
        metrics = self._telemetry.metrics
        for action, count in (
            ("lost", report.lost),
            ("adopted", report.adopted),
            ("orphan_removed", report.orphans_removed),
        ):
            if count:
                metrics.increment("sandbox.reconcile.action.total", {"action": action}, count)
        metrics.set("sandbox.reconcile.pending_confirmation", report.pending_confirmation)
        self.last_report = report
        return report

    async def _pass(self, *, fencing: bool) -> ReconcileReport:
        report = ReconcileReport()
        containers = await self._driver.list_managed(self._node_id)
        containers = [c for c in containers if not c.unclaimed_warm]  # the warm pool's
        self._active.set(sum(1 for c in containers if c.state == "running"))
        report.containers = len(containers)
        by_chat: dict[str, list[ObservedContainer]] = {}
        for c in containers:
            if _made_by_us(c):
                by_chat.setdefault(c.chat_id, []).append(c)
            else:  # labelled as ours, but not made by us: never touched
                log.warning(
                    "container %s is labelled managed but not named for a session of a chat; left alone", c.name
                )
        chats = set(by_chat)
        chats |= {r.chat_id for r in await self._registry.list() if r.node_id == self._node_id}
        report.chats = len(chats)
        seen_now: Counter[tuple[str, str]] = Counter()
        for chat in sorted(chats):
            try:
                await self._reconcile_chat(chat, by_chat.get(chat, []), seen_now, report, fencing=fencing)
            except Exception as exc:  # noqa: BLE001 - one chat's failure must not end the pass
                report.errors += 1
                log.warning("reconciling chat %s failed: %s", chat, exc)
        self._seen = seen_now
        return report

    async def _reconcile_chat(
        self,
        chat: str,
        containers: list[ObservedContainer],
        seen_now: Counter[tuple[str, str]],
        report: ReconcileReport,
        *,
        fencing: bool = False,
    ) -> None:
        state = await self._store.read(chat)
        actions = decide_for_chat(state, containers, self._node_id, self._clock.now(), self._claim_timeout)
        for action in actions:
            key = _key(action)
            seen_now[key] = self._seen[key] + 1
            needed = 1 if fencing and isinstance(action, RemoveOrphan) else self._confirmations
            if seen_now[key] < needed:
                report.pending_confirmation += 1
                continue
            try:
                await self._carry_out(chat, state, action, report)
            except AppendConflict:
                log.info("chat %s changed while reconciling; it is looked at again next time", chat)
                return
            del seen_now[key]
            state = await self._store.read(chat)

    def _event(
        self,
        cls: type[AnyEvent],
        chat: str,
        session_id: str | None,
        session: SessionRecord | None,
        version: int,
        **fields: object,
    ) -> AnyEvent:
        return cls(
            event_id=self._new_id(),
            chat_id=chat,
            session_id=session_id,
            occurred_at=self._clock.now(),
            node_id=self._node_id,
            session=msgspec.structs.replace(session, version=version) if session is not None else None,
            **fields,  # type: ignore[arg-type]
        )

    async def _carry_out(self, chat: str, state: ChatState, action: Action, report: ReconcileReport) -> None:
        now = self._clock.now()
        match action:
            case MarkLost(session, reason, docker_state, container_id):
                await append_lost(
                    self._store, chat, state, action, node_id=self._node_id, now=now, event_id=self._new_id()
                )
                if container_id is not None:
                    identity = ContainerIdentity(chat, session.session_id, self._node_id)
                    await self._driver.remove(identity, self._stop_timeout, container_id)
                report.lost += 1
                report.actions.append(f"lost {session.session_id} ({reason}: {docker_state})")
            case Adopt(claim, claimed, container):
                running = msgspec.structs.replace(
                    claimed, container_id=container.container_id, status=SessionStatus.RUNNING, updated_at=now
                )
                result = CreateResult.REPLACED if claim.previous is not None else CreateResult.CREATED
                event = self._event(
                    SandboxRunning,
                    chat,
                    running.session_id,
                    running,
                    state.seq,
                    causation_id=claim.causation_id,
                    result=result,
                    previous=claim.previous,
                    reason=RunningReason.ADOPTED,
                )
                msg_id = outcome_msg_id(chat, claim.causation_id) if claim.causation_id else event.event_id
                await self._store.append(event, expected_seq=state.seq, msg_id=msg_id)
                report.adopted += 1
                report.actions.append(f"adopted {container.name} for session {running.session_id}")
            case Refreeze(session, container, frozen):
                identity = ContainerIdentity(chat, session.session_id, self._node_id)
                if frozen:
                    await self._driver.pause(identity, container.container_id)
                else:
                    await self._driver.unpause(identity, container.container_id)
                report.refrozen += 1
                report.actions.append(f"{'paused' if frozen else 'unpaused'} {container.name} ({session.status})")
            case RemoveOrphan(container):
                await self._driver.remove(container.identity, self._stop_timeout, container.container_id)
                current = state.session if state.session is not None and state.session.is_live else None
                event = self._event(
                    SandboxStopped,
                    chat,
                    container.session_id,
                    current,
                    state.seq,
                    causation_id=None,
                    reason=StopReason.ORPHAN_REMOVED,
                )
                await self._store.append(event, expected_seq=state.seq, msg_id=event.event_id)
                report.orphans_removed += 1
                report.actions.append(f"removed orphan {container.name} ({container.state})")

    async def run(self, stopping: asyncio.Event, interval_seconds: float) -> None:
        """Reconcile every `interval_seconds` until stopped; a failed pass is logged, not fatal."""
        while not stopping.is_set():
            try:
                report = await self.run_once()
                if report.actions or report.errors:
                    log.info("reconciliation: %s", report)
            except Exception:
                log.exception("reconciliation pass failed; trying again in %.0fs", interval_seconds)
            try:
                await asyncio.wait_for(stopping.wait(), interval_seconds)
            except TimeoutError:
                continue
