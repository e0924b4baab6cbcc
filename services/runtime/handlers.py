"""Command handlers: read the chat's last event, decide (pure), carry the decision out.

Every append names the sequence it was decided from, so a lost race is an AppendConflict
and the loop decides again from the new state. Outcome events use the message id
`<chat_id>:<command_id>:outcome`, so a redelivered command can never get a second outcome; each
step returns what became of the command, and `handle` returns its outcome event.

Claims name this runtime instance. Meeting another command's open claim, a handler asks
whether the instance that made it is alive (one heartbeat read, only for another instance's
claim) and lets the pure decision wait on it or take it over; while it waits it steps out of
the chat's turn, so the claim's own command (redelivered after a crash) can resume it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, assert_never

import msgspec

from services.runtime.capacity import NodeCapacity, unlimited
from services.runtime.containers import ContainerIdentity, container_spec
from services.runtime.decisions import (
    AlreadyHandled,
    ClaimProvision,
    ClaimReplace,
    ClaimStop,
    CreateDecision,
    Extend,
    OpenClaim,
    Pause,
    PauseDecision,
    Policy,
    Reject,
    Resume,
    ResumeDecision,
    ResumeProvision,
    ResumeReplace,
    ResumeStop,
    Reuse,
    Wait,
    Warn,
    decide_create,
    decide_keepalive,
    decide_pause,
    decide_resume,
    decide_stop,
    decide_warn,
    find_open_claim,
    provision_after_replace,
    under_claim,
)
from services.runtime.docker_driver import ContainerDriver
from services.runtime.losses import mark_node_lost
from services.runtime.observe import ActiveSandboxes, observe_outcome
from services.runtime.pool import WarmPool
from shared.clock import Clock
from shared.commands import MalformedCommand
from shared.config import SandboxSettings
from shared.contracts import (
    AnyCommand,
    AnyEvent,
    CommandRejected,
    CreateResult,
    CreateSandbox,
    ErrorInfo,
    ErrorType,
    ExtendReason,
    HandledCommand,
    KeepaliveSandbox,
    PauseSandbox,
    Placement,
    PreviousSession,
    RejectReason,
    ResumeSandbox,
    SandboxExpiring,
    SandboxExtended,
    SandboxFailed,
    SandboxPaused,
    SandboxProvisioning,
    SandboxResumed,
    SandboxReused,
    SandboxRunning,
    SandboxStopped,
    SandboxStopping,
    SessionRecord,
    SessionStatus,
    StopReason,
    StopSandbox,
    WarnSandbox,
    is_outcome,
)
from shared.errors import AppendConflict, DockerUnavailable, Forward, InfrastructureError, NatsUnavailable, WrongNode
from shared.event_store import ChatState, EventLog
from shared.failpoints import failpoint, hang_point
from shared.handled import HandledIndex
from shared.ids import random_uuid
from shared.instances import InstanceLiveness, Liveness, Unmonitored
from shared.nodes import Nodes, NodeState, SingleNode
from shared.subjects import INVALID_EVENTS_SUBJECT
from shared.telemetry import Telemetry
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)

Progress = Callable[[], Awaitable[None]]


_TURN_PROGRESS_SECONDS = 1.0


def outcome_msg_id(chat_id: str, command_id: str) -> str:
    """De-duplication is stream-wide: the chat scopes an outcome to the command on it."""
    return f"{chat_id}:{command_id}:outcome"


def _error(exc: Exception) -> ErrorInfo:
    if isinstance(exc, InfrastructureError):
        return ErrorInfo(exc.error_type, exc.message)
    if isinstance(exc, DockerUnavailable):
        return ErrorInfo(ErrorType.DOCKER_UNAVAILABLE, str(exc))
    if isinstance(exc, WrongNode):
        return ErrorInfo(ErrorType.NODE_UNAVAILABLE, str(exc))
    if isinstance(exc, NatsUnavailable):
        return ErrorInfo(ErrorType.NATS_UNAVAILABLE, str(exc))
    return ErrorInfo(ErrorType.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")


class _Backoff:
    def __init__(self, first: float = 0.02, cap: float = 0.5) -> None:
        self._next = first
        self._cap = cap

    async def sleep(self) -> None:
        await asyncio.sleep(self._next)
        self._next = min(self._next * 2, self._cap)


@dataclass(frozen=True, slots=True)
class HandlerDeps:
    store: EventLog
    driver: ContainerDriver
    clock: Clock
    policy: Policy
    sandbox: SandboxSettings
    telemetry: Telemetry = field(default_factory=telemetry_disabled)
    active: ActiveSandboxes = field(default_factory=ActiveSandboxes)
    capacity: NodeCapacity = field(default_factory=unlimited)
    handled: HandledIndex = field(kw_only=True)  # the index of commands that had their outcome
    # This runtime instance (named by its claims) and the liveness of the others.
    instances: InstanceLiveness = field(default_factory=Unmonitored, kw_only=True)
    # The nodes: where new sessions go, and whether another node's session may be reached.
    # None: this node only (SingleNode).
    nodes: Nodes | None = field(default=None, kw_only=True)
    # Warm containers a new session takes before a cold create; None: always cold.
    pool: WarmPool | None = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Delivery:
    """How the command reached this runtime: `placement` when another runtime placed the new
    session here and forwarded the create, `hops` how often it was forwarded. `first`: this
    is the first delivery of a message a client published (not a redelivery, not a forwarded
    copy), so no handling of it can have been under way before (see `_look_back`)."""

    placement: Placement | None = None
    hops: int = 0
    first: bool = False


@dataclass(frozen=True, slots=True)
class Finished:
    """The command is finished: `outcome` is the outcome event this handling appended, None
    when the command's outcome had been given before (a redelivery, a duplicate)."""

    outcome: AnyEvent | None = None


# Each step of a command returns Finished, or None when another writer appended first and the
# chat must be read and decided again.
Step = Finished | None


@dataclass(frozen=True, slots=True)
class _LookBack:
    handled: bool = False  # the command's outcome is in the chat's history
    claimed: str | None = None  # the session the command's last claim named


class _ChatTurn:
    """A command's turn on its chat within this process (see CommandHandlers._chat_turn)."""

    def __init__(self, lock: asyncio.Lock, progress: Progress) -> None:
        self._lock = lock
        self._progress = progress
        self.held = False

    async def take(self) -> None:
        """Wait for the turn, keeping the message in progress meanwhile."""
        if not self._lock.locked():  # free: taken at once, without a timeout's task and timer
            await self._lock.acquire()
            self.held = True
            return
        while True:
            try:
                await asyncio.wait_for(self._lock.acquire(), _TURN_PROGRESS_SECONDS)
            except TimeoutError:
                await self._progress()
                continue
            self.held = True
            return

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._lock.release()

    async def wait_aside(self, backoff: _Backoff) -> None:
        """Wait on another command's claim outside the turn: the chat's other commands —
        the claim's own, resumed after a crash, among them — go on meanwhile."""
        self.give_back()
        await self._progress()
        await backoff.sleep()
        await self.take()


class CommandHandlers:
    def __init__(self, deps: HandlerDeps, new_id: Callable[[], str] = random_uuid) -> None:
        self._d = deps
        self._new_id = new_id
        self._metrics = deps.telemetry.metrics
        self._chat_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._nodes: Nodes = deps.nodes if deps.nodes is not None else SingleNode(deps.policy.node_id)

    @contextlib.asynccontextmanager
    async def _chat_turn(self, chat_id: str, progress: Progress) -> AsyncIterator[_ChatTurn]:
        """Commands for one chat take turns within this process: their appends would only
        conflict with each other (optimistic concurrency still guards across processes).
        A command waiting for its turn keeps its message in progress."""
        lock, users = self._chat_locks.get(chat_id, (asyncio.Lock(), 0))
        self._chat_locks[chat_id] = (lock, users + 1)
        turn = _ChatTurn(lock, progress)
        try:
            await turn.take()
            try:
                yield turn
            finally:
                turn.give_back()
        finally:
            lock, users = self._chat_locks[chat_id]
            if users == 1:
                del self._chat_locks[chat_id]
            else:
                self._chat_locks[chat_id] = (lock, users - 1)

    async def handle(
        self, command: AnyCommand, progress: Progress, delivery: Delivery | None = None
    ) -> AnyEvent | None:
        """Carry the command out; its outcome event (None when it had one already). Forward
        when the command is another node's to carry out."""
        attributes = {"chat.id": command.chat_key, "command.id": command.command_key}
        with self._d.telemetry.tracer.span(f"usecase.{command.kind}_sandbox", attributes) as span:
            try:
                outcome = await self._run(command, progress, delivery or Delivery())
            except Forward as forward:  # not an error: raised outside the span
                span.set_attribute("sandbox.forwarded_to", forward.node_id)
                forwarded = forward
            else:
                observe_outcome(command, outcome, span, self._metrics, self._d.active)
                return outcome
        raise forwarded

    async def _run(self, command: AnyCommand, progress: Progress, delivery: Delivery) -> AnyEvent | None:
        async with self._chat_turn(command.chat_key, progress) as turn:
            if await self._d.handled.lookup(command.chat_key, command.command_key) is not None:
                # Seen again after its outcome (a re-send, or a redelivery after a lost ack):
                # never decided afresh, whatever the chat's state is now.
                log.info("command %s was handled before; not handling it again", command.command_id)
                self._metrics.increment("sandbox.command.seen_again.total", {"kind": command.kind})
                return None
            match command:
                case CreateSandbox():
                    return await self.create(command, progress, turn, delivery)
                case StopSandbox():
                    return await self.stop(command, turn, delivery)
                case KeepaliveSandbox():
                    return await self.keepalive(command, turn)
                case PauseSandbox() | ResumeSandbox():
                    return await self.pause_or_resume(command, turn)
                case WarnSandbox():
                    return await self.warn(command)

    async def _open_claim(self, state: ChatState, command: AnyCommand) -> OpenClaim | None:
        """The chat's open claim as of `state`, and the liveness of the instance that made it
        (read only for another command's claim made by another instance)."""
        if not under_claim(state.last):
            return None
        claim = state.last
        if not isinstance(claim, SandboxProvisioning | SandboxStopping):
            # Buried under other commands' answers: found in the chat's history (rare).
            history = await self._d.store.history(command.chat_key, through=state.seq)
            claim = find_open_claim([s.event for s in history if s.seq <= state.seq])
        if claim is None:
            return None
        instance = claim.instance_id
        if claim.causation_id == command.command_key or instance is None:
            return OpenClaim(claim)  # our own (liveness does not matter), or an old claim naming none
        if instance == self._d.instances.instance_id:
            return OpenClaim(claim, Liveness.ALIVE)
        liveness = await self._d.instances.liveness(instance)
        if liveness == Liveness.DEAD:
            log.info("chat %s: instance %s is gone; its %s claim is not waited on", claim.chat_id, instance, claim.type)
            self._metrics.increment("sandbox.claim.dead_instance.total", {"event": claim.type})
        return OpenClaim(claim, liveness)

    async def _look_back(self, command: AnyCommand, state: ChatState, delivery: Delivery) -> _LookBack:
        """What the chat's history says of the command: whether it already has its outcome,
        and the session its last claim named (a claim taken over while it was away).

        Asked once, before a command's first claim, on chats with history, of a command that
        may have been handled before: a redelivery (a lost ack, a runtime that died while
        handling it) or a forwarded copy. An outcome append is de-duplicated by its message
        id, but a claim is not: without this, such a command whose outcome is no longer the
        chat's last event would claim and start a container whose `running` the stream then
        drops as a duplicate. A message's first delivery skips it (a read of up to the
        chat's last 1,000 events saved on most commands): nothing handled it before. A
        client that sends the same command id again gets a new message only after the
        commands stream's duplicate window (2 min at least); by then the first one was
        recorded in `sandbox_handled` before its ack (`_run` finds it there), or, unacked,
        it is redelivered (`runtime.ack_wait_seconds`, 4 s by default) and looks back."""
        if state.seq == 0 or delivery.first:
            return _LookBack()
        command_id = command.command_key
        history = await self._d.store.history(command.chat_key, through=state.seq)
        mine = [s for s in history if s.event.causation_id == command_id]
        found = next((s for s in mine if is_outcome(s.event)), None)
        if found is not None:
            log.info("command %s already has its outcome; not handling it again", command_id)
            await self._record_handled(command, found.seq)
            return _LookBack(handled=True)
        claims = [s.event.session for s in mine if isinstance(s.event, SandboxProvisioning | SandboxStopping)]
        return _LookBack(claimed=claims[-1].session_id if claims and claims[-1] is not None else None)

    async def _record_handled(self, command: AnyCommand, outcome_seq: int) -> None:
        """Remember that the command had its outcome (before it is acknowledged)."""
        await self._d.handled.record(
            HandledCommand(
                chat_id=command.chat_key,
                command_id=command.command_key,
                kind=command.kind,
                outcome_seq=outcome_seq,
                recorded_at=self._d.clock.now(),
            )
        )

    async def _already_handled(self, command: AnyCommand, state: ChatState) -> Finished:
        """The chat's last event is this command's outcome (a redelivery): record it again,
        in case the process that appended it died before recording it."""
        await self._record_handled(command, state.seq)
        return Finished()

    async def _owned_here(self, command: AnyCommand, session: SessionRecord) -> bool:
        """Docker work on a session's container is for the node that runs it: True when that
        is this node. Another node's session: Forward to it while it is alive; WrongNode (wait)
        while it is silent; once it is dead, the session is recorded lost here and False
        says to read the chat again."""
        here, owner = self._d.policy.node_id, session.node_id
        if owner == here:
            return True
        match self._nodes.state(owner):
            case NodeState.ALIVE:
                raise Forward(owner)
            case NodeState.SILENT:
                raise WrongNode(owner, here)
            case NodeState.DEAD:
                lost = await mark_node_lost(
                    self._d.store,
                    command.chat_key,
                    owner,
                    here=here,
                    now=self._d.clock.now(),
                    event_id=self._new_id(),
                )
                if lost is not None:
                    log.info(
                        "chat %s: node %s is dead; its session %s is lost", command.chat_id, owner, lost.session_id
                    )
                    self._metrics.increment("sandbox.node.session_lost.total", {"by": "command"})
                return False

    async def _if_owned_here(
        self, command: AnyCommand, session: SessionRecord, then: Callable[[], Awaitable[Step]]
    ) -> Step:
        """`then` when the session's container is this node's; None (read the chat again)
        when its dead node's session was just recorded lost."""
        return await then() if await self._owned_here(command, session) else None

    def _placement(self, delivery: Delivery) -> Placement:
        """Where a new session goes: here when another runtime placed it here; else the node
        with the most free capacity, and Forward when that is another."""
        here = self._d.policy.node_id
        if delivery.placement is not None and delivery.placement.node_id == here:
            return delivery.placement
        placement = self._nodes.place()
        if placement.node_id != here:
            self._metrics.increment("sandbox.placement.total", {"where": "forwarded"})
            raise Forward(placement.node_id, placement)
        self._metrics.increment("sandbox.placement.total", {"where": "here"})
        return placement

    def _identity(self, command: AnyCommand, session: SessionRecord) -> ContainerIdentity:
        """The container a session of this command's chat has on this node."""
        return ContainerIdentity(command.chat_key, session.session_id, self._d.policy.node_id)

    # ------------------------------------------------------------------ appends

    def _event(
        self,
        cls: type[AnyEvent],
        chat_id: str,
        causation_id: str | None,
        session: SessionRecord | None,
        version: int,
        **fields: Any,
    ) -> AnyEvent:
        return cls(
            event_id=self._new_id(),
            chat_id=chat_id,
            session_id=session.session_id if session else None,
            causation_id=causation_id,
            occurred_at=self._d.clock.now(),
            node_id=self._d.policy.node_id,
            session=msgspec.structs.replace(session, version=version) if session else None,
            **fields,
        )

    async def _claim(
        self,
        cls: type[SandboxProvisioning | SandboxStopping],
        command: AnyCommand,
        session: SessionRecord,
        expected: int,
        **fields: Any,
    ) -> int | None:
        """Append a claim naming this instance; its sequence, or None when another writer got
        there first."""
        instance_id = self._d.instances.instance_id
        event = self._event(
            cls, session.chat_id, command.command_key, session, expected, instance_id=instance_id, **fields
        )
        try:
            seq = (await self._d.store.append(event, expected_seq=expected, msg_id=event.event_id)).seq
        except AppendConflict:
            self._metrics.increment("sandbox.append.conflict.total", {"event": event.type})
            return None
        failpoint("after_claim")
        await hang_point("after_claim")
        return seq

    async def _outcome(
        self, cls: type[AnyEvent], command: AnyCommand, session: SessionRecord | None, expected: int, **fields: Any
    ) -> Step:
        """Append the command's one outcome; None when another writer got there first."""
        command_id = command.command_key
        event = self._event(cls, command.chat_key, command_id, session, expected, **fields)
        try:
            msg_id = outcome_msg_id(command.chat_key, command_id)
            appended = await self._d.store.append(event, expected_seq=expected, msg_id=msg_id)
        except AppendConflict:
            self._metrics.increment("sandbox.append.conflict.total", {"event": event.type})
            return None
        failpoint("after_outcome")  # appended, not yet recorded or acknowledged
        await self._record_handled(command, appended.seq)
        # A duplicate: the stream already held this outcome, given before.
        return Finished(None if appended.duplicate else event)

    async def _reject(self, command: AnyCommand, state: ChatState, decision: Reject) -> Step:
        live = state.session if state.session is not None and state.session.is_live else None
        return await self._outcome(
            CommandRejected,
            command,
            live,
            state.seq,
            reason=decision.reason,
            error=ErrorInfo(decision.reason, decision.detail),
        )

    # ------------------------------------------------------------------ create

    async def create(
        self, command: CreateSandbox, progress: Progress, turn: _ChatTurn, delivery: Delivery | None = None
    ) -> AnyEvent | None:
        backoff = _Backoff()
        chat_id = command.chat_key
        checked = False
        while True:
            state = await self._d.store.read(chat_id)
            claim = await self._open_claim(state, command)
            now = self._d.clock.now()
            decision = decide_create(state.last, command, now, self._d.policy, self._new_id(), claim=claim)
            if isinstance(decision, ClaimProvision | ClaimReplace) and not checked:
                checked = True
                if (await self._look_back(command, state, delivery or Delivery())).handled:
                    return None
            if isinstance(decision, Wait):
                await turn.wait_aside(backoff)
            elif (
                finished := await self._carry_out_create(command, state, decision, progress, delivery or Delivery())
            ) is not None:
                return finished.outcome

    async def _carry_out_create(
        self, command: CreateSandbox, state: ChatState, decision: CreateDecision, progress: Progress, delivery: Delivery
    ) -> Step:
        """Finished when the command is; None to read the chat again and re-decide."""
        match decision:
            case AlreadyHandled():
                return await self._already_handled(command, state)
            case Wait():
                return None
            case Reject():
                return await self._reject(command, state, decision)
            case Reuse(session):
                return await self._outcome(SandboxReused, command, session, state.seq, result=CreateResult.REUSED)
            case Resume(session):
                unfreeze = partial(self._unfreeze, command, session, state, CreateResult.RESUMED)
                return await self._if_owned_here(command, session, unfreeze)
            case ClaimProvision(session, previous):
                return await self._provision(command, state, session, previous, progress=progress, delivery=delivery)
            case ResumeProvision(session, previous):
                resume = partial(self._start, command, session, state.seq, previous, progress)
                return await self._if_owned_here(command, session, resume)
            case ClaimReplace(old):
                claim_replace = partial(self._claim_replace, command, old, state, progress)
                return await self._if_owned_here(command, old, claim_replace)
            case ResumeReplace(old):
                replace = partial(self._replace, command, old, state.seq, progress)
                return await self._if_owned_here(command, old, replace)
            case _:
                assert_never(decision)

    async def _provision(
        self,
        command: CreateSandbox,
        state: ChatState,
        session: SessionRecord,
        previous: PreviousSession | None,
        *,
        progress: Progress,
        delivery: Delivery,
    ) -> Step:
        placement = self._placement(delivery)
        session = self._warm(session)
        async with self._d.capacity.admit(session.session_id) as refused:
            if refused is not None:
                self._unwarm(session)
                return await self._reject(command, state, Reject(RejectReason.CAPACITY_EXCEEDED, refused.detail))
            seq = await self._claim(
                SandboxProvisioning, command, session, state.seq, previous=previous, placement=placement
            )
            if seq is None:
                self._unwarm(session)
                return None
            return await self._start(command, session, seq, previous, progress)

    def _warm(self, session: SessionRecord) -> SessionRecord:
        """The new session with a warm container's session id, when the pool has one."""
        warm = self._d.pool.take() if self._d.pool is not None else None
        return session if warm is None else msgspec.structs.replace(session, session_id=warm)

    def _unwarm(self, session: SessionRecord) -> None:
        """A claim that did not land hands its warm container back."""
        if self._d.pool is not None:
            self._d.pool.give_back(session.session_id)

    async def _claim_replace(
        self, command: CreateSandbox, old: SessionRecord, state: ChatState, progress: Progress
    ) -> Step:
        seq = await self._claim(SandboxStopping, command, old, state.seq, reason=StopReason.REPLACED)
        return None if seq is None else await self._replace(command, old, seq, progress)

    async def _replace(self, command: CreateSandbox, old: SessionRecord, claim_seq: int, progress: Progress) -> Step:
        try:
            await self._d.driver.remove(self._identity(command, old), self._d.sandbox.stop_timeout_seconds)
        except (InfrastructureError, DockerUnavailable) as exc:
            log.warning("replace of session %s: removing its container failed: %s", old.session_id, exc)
            return await self._outcome(SandboxFailed, command, old, claim_seq, error=_error(exc))
        self._d.capacity.removed(old.session_id)
        decision = provision_after_replace(command, old, self._new_id(), self._d.clock.now(), self._d.policy)
        if isinstance(decision, Reject):
            return await self._refuse_after_replace(command, claim_seq, decision)
        session = self._warm(decision.session)
        async with self._d.capacity.admit(session.session_id) as refused:
            if refused is not None:  # the old container is gone, and its place was taken meanwhile
                self._unwarm(session)
                refusal = Reject(RejectReason.CAPACITY_EXCEEDED, refused.detail)
                return await self._refuse_after_replace(command, claim_seq, refusal)
            seq = await self._claim(SandboxProvisioning, command, session, claim_seq, previous=decision.previous)
            if seq is None:
                self._unwarm(session)
                return None
            await progress()
            return await self._start(command, session, seq, decision.previous, progress)

    async def _refuse_after_replace(self, command: CreateSandbox, claim_seq: int, refusal: Reject) -> Step:
        """The old session's container is removed and no new one may start: the chat is left
        with no session."""
        error = ErrorInfo(refusal.reason, refusal.detail)
        return await self._outcome(CommandRejected, command, None, claim_seq, reason=refusal.reason, error=error)

    async def _start(
        self,
        command: CreateSandbox,
        claim: SessionRecord,
        claim_seq: int,
        previous: PreviousSession | None,
        progress: Progress,
    ) -> Step:
        identity = self._identity(command, claim)
        spec = container_spec(identity, claim, self._d.sandbox)
        pool = self._d.pool
        try:
            if pool is not None and pool.holds(identity.session_id):
                container_id = await pool.claim(spec)  # a warm container: the chat is attached
            else:
                container_id = await self._d.driver.ensure_running(spec)
        except (InfrastructureError, DockerUnavailable) as exc:
            log.warning("create for chat %s failed: %s", identity.chat_id, exc)
            await self._remove_quietly(identity)
            failed = msgspec.structs.replace(claim, status=SessionStatus.FAILED, updated_at=self._d.clock.now())
            return await self._outcome(SandboxFailed, command, failed, claim_seq, error=_error(exc), previous=previous)
        failpoint("after_start")
        await progress()
        # created_at/expires_at stay as claimed: the container's labels carry the same values.
        # The image (and the OCI runtime) is what the container runs, whatever the claim said.
        running = msgspec.structs.replace(
            claim,
            container_id=container_id,
            image=spec.image,
            oci_runtime=spec.oci_runtime,
            status=SessionStatus.RUNNING,
            updated_at=self._d.clock.now(),
        )
        result = CreateResult.REPLACED if previous is not None else CreateResult.CREATED
        # A NatsUnavailable here propagates: the append may have landed, so the container
        # stays; the redelivered command resumes our claim and finds it by name.
        finished = await self._outcome(SandboxRunning, command, running, claim_seq, result=result, previous=previous)
        if finished is not None:
            return finished
        now_state = await self._d.store.read(identity.chat_id)
        if isinstance(now_state.last, SandboxRunning) and now_state.last.causation_id == command.command_key:
            return Finished()  # node reconciliation adopted our container for this very command
        still = await self._open_claim(now_state, command)
        if still is not None and still.command_id == command.command_key:
            return None  # another command's answer landed on our claim: resume it, the container stays
        # Our claim was overtaken: the container must not outlive the record it never got.
        log.warning("chat %s: running append lost its claim; removing container %s", identity.chat_id, container_id)
        await self._remove_quietly(identity, container_id)
        return None

    async def _remove_quietly(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        try:
            await self._d.driver.remove(identity, 0, ref)
        except (InfrastructureError, DockerUnavailable):
            log.warning("could not remove the container of %s", identity, exc_info=True)

    # ------------------------------------------------------------------ stop

    async def stop(self, command: StopSandbox, turn: _ChatTurn, delivery: Delivery | None = None) -> AnyEvent | None:
        backoff = _Backoff()
        chat_id = command.chat_key
        pinned: str | None = None
        checked = False
        while True:
            state = await self._d.store.read(chat_id)
            claim = await self._open_claim(state, command)
            now = self._d.clock.now()
            decision = decide_stop(state.last, command, now, self._d.policy, pinned, claim=claim)
            if isinstance(decision, ClaimStop) and not checked:
                checked = True
                before = await self._look_back(command, state, delivery or Delivery())
                if before.handled:
                    return None
                # A claim of its own that was taken over while it was away (its runtime died)
                # pins it to the session it claimed: it never stops one made since.
                pinned = before.claimed
                decision = decide_stop(state.last, command, now, self._d.policy, pinned, claim=claim)
            match decision:
                case AlreadyHandled():
                    await self._already_handled(command, state)
                    return None
                case Wait():
                    await turn.wait_aside(backoff)
                    continue
                case Reject():
                    finished = await self._reject(command, state, decision)
                case ClaimStop(session):
                    pinned = session.session_id
                    claim_stop = partial(self._claim_stop, command, session, state)
                    finished = await self._if_owned_here(command, session, claim_stop)
                case ResumeStop(session):
                    pinned = session.session_id
                    resume = partial(self._finish_stop, command, session, state.seq)
                    finished = await self._if_owned_here(command, session, resume)
                case _:
                    assert_never(decision)
            if finished is not None:
                return finished.outcome

    async def _claim_stop(self, command: StopSandbox, session: SessionRecord, state: ChatState) -> Step:
        seq = await self._claim(SandboxStopping, command, session, state.seq, reason=command.reason)
        return None if seq is None else await self._finish_stop(command, session, seq)

    async def _finish_stop(self, command: StopSandbox, session: SessionRecord, claim_seq: int) -> Step:
        try:
            await self._d.driver.remove(self._identity(command, session), self._d.sandbox.stop_timeout_seconds)
        except (InfrastructureError, DockerUnavailable) as exc:
            # The record keeps pointing at the container (status stopping): a later stop retries.
            log.warning("stop of session %s failed: %s", session.session_id, exc)
            return await self._outcome(
                SandboxFailed, command, session, claim_seq, error=_error(exc), reason=command.reason
            )
        self._d.capacity.removed(session.session_id)
        stopped = msgspec.structs.replace(session, status=SessionStatus.STOPPED, updated_at=self._d.clock.now())
        return await self._outcome(SandboxStopped, command, stopped, claim_seq, reason=command.reason)

    # ------------------------------------------------------------------ keepalive

    async def keepalive(self, command: KeepaliveSandbox, turn: _ChatTurn) -> AnyEvent | None:
        backoff = _Backoff()
        while True:
            state = await self._d.store.read(command.chat_key)
            claim = await self._open_claim(state, command)
            decision = decide_keepalive(state.last, command, self._d.clock.now(), self._d.policy, claim=claim)
            match decision:
                case AlreadyHandled():
                    await self._already_handled(command, state)
                    return None
                case Wait():
                    await turn.wait_aside(backoff)
                    continue
                case Reject():
                    finished = await self._reject(command, state, decision)
                case Extend(session, capped, kept):
                    reason = ExtendReason.LIFETIME_CAP if capped else ExtendReason.ALREADY_LATER if kept else None
                    finished = await self._outcome(SandboxExtended, command, session, state.seq, reason=reason)
                case _:
                    assert_never(decision)
            if finished is not None:
                return finished.outcome

    # ------------------------------------------------------------------ pause and resume

    async def pause_or_resume(self, command: PauseSandbox | ResumeSandbox, turn: _ChatTurn) -> AnyEvent | None:
        backoff = _Backoff()
        while True:
            state = await self._d.store.read(command.chat_key)
            claim = await self._open_claim(state, command)
            now, policy = self._d.clock.now(), self._d.policy
            decision: PauseDecision | ResumeDecision = (
                decide_pause(state.last, command, now, policy, claim=claim)
                if isinstance(command, PauseSandbox)
                else decide_resume(state.last, command, now, policy, claim=claim)
            )
            match decision:
                case AlreadyHandled():
                    await self._already_handled(command, state)
                    return None
                case Wait():
                    await turn.wait_aside(backoff)
                    continue
                case Reject():
                    finished = await self._reject(command, state, decision)
                case Pause(session) if isinstance(command, PauseSandbox):
                    freeze = partial(self._freeze, command, session, state)
                    finished = await self._if_owned_here(command, session, freeze)
                case Resume(session):
                    unfreeze = partial(self._unfreeze, command, session, state, None)
                    finished = await self._if_owned_here(command, session, unfreeze)
                case _:
                    raise AssertionError(f"{decision} for {command.kind}")
            if finished is not None:
                return finished.outcome

    async def warn(self, command: WarnSandbox) -> AnyEvent | None:
        while True:
            state = await self._d.store.read(command.chat_key)
            decision = decide_warn(state.last, command, self._d.policy)
            match decision:
                case AlreadyHandled():
                    await self._already_handled(command, state)
                    return None
                case Reject():
                    finished = await self._reject(command, state, decision)
                case Warn(session, due):
                    finished = await self._outcome(
                        SandboxExpiring, command, session, state.seq, reason=due.reason, deadline=due.deadline
                    )
                case _:
                    assert_never(decision)
            if finished is not None:
                return finished.outcome

    async def _freeze(self, command: PauseSandbox, paused: SessionRecord, state: ChatState) -> Step:
        """Docker pause, then `paused`; a lost race re-decides (the pause is idempotent, and a
        new decision pauses again or refuses, so Docker ends as the last event says)."""
        try:
            await self._d.driver.pause(self._identity(command, paused), paused.container_id)
        except (InfrastructureError, DockerUnavailable) as exc:
            log.warning("pause of session %s failed: %s", paused.session_id, exc)
            return await self._outcome(SandboxFailed, command, state.session, state.seq, error=_error(exc))
        return await self._outcome(SandboxPaused, command, paused, state.seq, reason=command.reason)

    async def _unfreeze(
        self, command: AnyCommand, running: SessionRecord, state: ChatState, result: CreateResult | None
    ) -> Step:
        try:
            await self._d.driver.unpause(self._identity(command, running), running.container_id)
        except (InfrastructureError, DockerUnavailable) as exc:
            log.warning("resume of session %s failed: %s", running.session_id, exc)
            return await self._outcome(SandboxFailed, command, state.session, state.seq, error=_error(exc))
        return await self._outcome(SandboxResumed, command, running, state.seq, result=result)

    # ------------------------------------------------------------------ refusals

    def count_malformed(self, bad: MalformedCommand) -> None:
        self._metrics.increment("sandbox.command.rejected.total", {"kind": "malformed", "reason": bad.reason})

    async def reject_malformed(self, bad: MalformedCommand) -> None:
        """One `rejected` event for a command that can never be carried out."""
        error = ErrorInfo(bad.reason, bad.detail)
        scope = bad.chat_id or "invalid"
        msg_id = outcome_msg_id(scope, bad.command_id) if bad.command_id else self._new_id()
        if bad.chat_id is None:
            event = self._event(CommandRejected, "invalid", bad.command_id, None, 0, reason=bad.reason, error=error)
            await self._d.store.append_to(INVALID_EVENTS_SUBJECT, event, expected_seq=None, msg_id=msg_id)
            return
        while True:
            state = await self._d.store.read(bad.chat_id)
            live = state.session if state.session is not None and state.session.is_live else None
            event = self._event(
                CommandRejected, bad.chat_id, bad.command_id, live, state.seq, reason=bad.reason, error=error
            )
            try:
                await self._d.store.append(event, expected_seq=state.seq, msg_id=msg_id)
            except AppendConflict:
                continue
            return

    async def fail_unexpected(self, command: AnyCommand, exc: Exception) -> None:
        """A bug must still end the command with an outcome rather than a silent loop."""
        await self._fail(command, _error(exc))

    async def give_up(self, command: AnyCommand, exc: Exception, deliveries: int) -> None:
        """The command was tried as often as the consumer allows: it ends as `failed`."""
        cause = _error(exc)
        await self._fail(
            command,
            ErrorInfo(
                ErrorType.GAVE_UP, f"not carried out after {deliveries} deliveries: {cause.type}: {cause.message}"
            ),
        )

    async def _fail(self, command: AnyCommand, error: ErrorInfo) -> None:
        """A `failed` outcome that leaves the chat's session as it is."""
        while True:
            state = await self._d.store.read(command.chat_key)
            live = state.session if state.session is not None and state.session.is_live else None
            if await self._outcome(SandboxFailed, command, live, state.seq, error=error) is not None:
                return


def policy_from(node_id: str, sandbox: SandboxSettings, claim_timeout_seconds: float) -> Policy:
    return Policy(
        node_id=node_id,
        image=sandbox.image,
        default_ttl=timedelta(seconds=sandbox.ttl_seconds),
        max_ttl=timedelta(seconds=sandbox.max_ttl_seconds),
        claim_timeout=timedelta(seconds=claim_timeout_seconds),
        max_lifetime=timedelta(seconds=sandbox.max_lifetime_seconds),
        default_idle_ttl=timedelta(seconds=sandbox.idle_ttl_seconds),
        paused_ttl=timedelta(seconds=sandbox.paused_ttl_seconds),
        warning=timedelta(seconds=sandbox.expiry_warning_seconds),
    )
