"""The death watch: the engine tells us when a sandbox dies, and its session becomes `lost`
at once instead of after reconciliation's confirmations.

Each runtime follows its engine's event stream for this node's managed containers (`die`,
`oom`, `destroy`) in a thread of its own. A death is a fact handed to a pure decision
(`decide_death`): only a `running` session of this node whose container it is becomes `lost`
(with the exit code and whether the OOM killer ended it). Our own stops and replaces kill
containers too, but they claim `stopping` before they touch Docker, so their deaths find a
session that is no longer `running` and change nothing. The `lost` append names the
sequence it was decided from, as every append does: a command handled meanwhile wins, and the
death is decided again from the new state.

Until its `lost` is in the log a death is *pending*, and the command handlers read the event
log through `DeathAwareLog`: a chat whose running session's container is known dead has its
`lost` recorded before the handler decides, so a create never reuses a dead container (it
makes a new session) and a keepalive is refused. A container that dies while its create is
still in its `provisioning` claim is held (parked) until the create's `running` lands.

The stream survives engine restarts: it reconnects with back-off, asks the engine for what
happened while it was away, records the deaths of containers found exited, and has
reconciliation run a pass. Periodic reconciliation stays the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from services.runtime.containers import ContainerIdentity, container_name
from services.runtime.docker_driver import ContainerEvent, ContainerEventSource, ContainerEventStream, ExitState
from services.runtime.losses import MarkLost, append_lost
from services.runtime.observe import ActiveSandboxes
from services.runtime.reconcile import is_canonical_uuid
from shared.clock import Clock
from shared.contracts import AnyEvent, LostReason, SandboxProvisioning, SandboxRunning, SessionStatus
from shared.errors import AppendConflict, DockerUnavailable, SandboxdError
from shared.event_store import Appended, ChatState, EventLog, StoredEvent
from shared.ids import random_uuid
from shared.telemetry import Telemetry
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)

# Exited containers found on (re)connect are deaths the stream may have missed.
_DEAD_STATES = frozenset({"exited", "dead"})


# --------------------------------------------------------------------------- facts and decisions


@dataclass(frozen=True, slots=True)
class ContainerDeath:
    """A managed container of this node died (`die`) or was removed (`destroy`)."""

    chat_id: str
    session_id: str
    container_id: str
    exit_code: int | None
    oom_killed: bool | None
    removed: bool  # the container is gone, not only stopped
    noticed_at: float  # monotonic, when the engine told us

    @property
    def reason(self) -> LostReason:
        if self.exit_code is None and self.removed:
            return LostReason.CONTAINER_MISSING
        return LostReason.CONTAINER_EXITED

    @property
    def docker_state(self) -> str:
        if self.exit_code is None:
            return "removed" if self.removed else "exited"
        killed = ", killed by the OOM killer" if self.oom_killed else ""
        removed = ", removed" if self.removed else ""
        return f"exited with code {self.exit_code}{killed}{removed}"


@dataclass(frozen=True, slots=True)
class Park:
    """The container died while its create is still in its `provisioning` claim: that create
    may yet append `running` with it, so the death is kept until the chat moves on."""


DeathDecision = MarkLost | Park | None
# The statuses in which a container's death is a loss: it runs, or it is paused.
_SETTLED = frozenset({SessionStatus.RUNNING, SessionStatus.PAUSED})


def decide_death(last: AnyEvent | None, death: ContainerDeath, node_id: str) -> DeathDecision:
    """What a container's death means for its chat, given the chat's last event."""
    session = last.session if last is not None else None
    if session is None or session.session_id != death.session_id or session.node_id != node_id:
        return None  # another session's, or another node's: not this death's business
    if isinstance(last, SandboxProvisioning) and session.status == SessionStatus.PROVISIONING:
        return Park()
    if session.status not in _SETTLED or session.container_id != death.container_id:
        # Our own stop or replace (claimed `stopping` before touching Docker), or already
        # terminal: nothing was lost behind our back.
        return None
    return MarkLost(
        session,
        death.reason,
        death.docker_state,
        death.container_id,
        exit_code=death.exit_code,
        oom_killed=death.oom_killed,
    )


def lost_msg_id(chat_id: str, session_id: str) -> str:
    """One `lost` per session, whichever runtime of the node records it."""
    return f"{chat_id}:{session_id}:lost"


# --------------------------------------------------------------------------- the watch


class _End:
    """The stream ended (the engine went away, or we closed it)."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error


class DeathWatch:
    def __init__(
        self,
        store: EventLog,
        engine: ContainerEventSource,
        clock: Clock,
        *,
        node_id: str,
        stop_timeout_seconds: int,
        park_seconds: float,
        telemetry: Telemetry | None = None,
        active: ActiveSandboxes | None = None,
        first_backoff: float = 0.1,
        max_backoff: float = 5.0,
        new_id: Callable[[], str] = random_uuid,
    ) -> None:
        self._store = store
        self._engine = engine
        self._clock = clock
        self._node_id = node_id
        self._stop_timeout = stop_timeout_seconds
        self._park_seconds = park_seconds
        self._reconcile: Callable[[], Awaitable[object]] | None = None
        self._metrics = (telemetry or telemetry_disabled()).metrics
        self._active = active or ActiveSandboxes()
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._new_id = new_id
        self._pending: dict[str, ContainerDeath] = {}  # container id -> its death, until decided
        self._oom: set[str] = set()  # containers the OOM killer hit, until their `die`
        self._tasks: set[asyncio.Task[None]] = set()
        self._since_ns: int | None = None
        self.connected = asyncio.Event()
        self.connections = 0

    def reconcile_after_reconnect(self, reconcile: Callable[[], Awaitable[object]]) -> None:
        """A reconciliation pass to run whenever the stream comes back (events were missed)."""
        self._reconcile = reconcile

    # ------------------------------------------------------------------ what handlers ask

    @property
    def pending_count(self) -> int:
        """Deaths noticed whose meaning is not recorded yet (parked ones included)."""
        return len(self._pending)

    def pending_death(self, state: ChatState) -> ContainerDeath | None:
        """The death of the container the chat's running session names, if it is known and
        its `lost` is not recorded yet."""
        session = state.session
        if session is None or session.status not in _SETTLED or session.container_id is None:
            return None
        death = self._pending.get(session.container_id)
        return death if death is not None and death.session_id == session.session_id else None

    async def settle(self, death: ContainerDeath) -> None:
        """Record what the death means now (errors propagate: a handler is retried)."""
        while True:
            state = await self._store.read(death.chat_id)
            decision = decide_death(state.last, death, self._node_id)
            if isinstance(decision, Park):
                return
            if decision is None:
                self._forget(death, "ignored")
                return
            exit_state = await self._inspect(death)
            if exit_state is not None and exit_state.running:
                # Started again (a retried create finds its container by name and starts it).
                self._forget(death, "running_again")
                return
            decision = _with_exit_state(decision, exit_state)
            try:
                await append_lost(
                    self._store,
                    death.chat_id,
                    state,
                    decision,
                    node_id=self._node_id,
                    now=self._clock.now(),
                    event_id=self._new_id(),
                    msg_id=lost_msg_id(death.chat_id, death.session_id),
                )
            except AppendConflict:
                continue  # the chat moved on: decide again
            self._recorded(death, decision)
            return

    async def _inspect(self, death: ContainerDeath) -> ExitState | None:
        """How the container is now; None when it is gone or the engine does not answer (the
        event's facts then stand)."""
        try:
            return await self._engine.exit_state(death.container_id)
        except DockerUnavailable as exc:
            log.info("could not inspect the dead container %s (%s)", death.container_id[:12], exc)
            return None

    def settle_soon(self, death: ContainerDeath) -> None:
        """Settle in the background, retrying while NATS or Docker do not answer."""
        self._spawn(self._settle_retrying(death), f"settle-{death.container_id[:12]}")

    # ------------------------------------------------------------------ following the engine

    async def run(self, stopping: asyncio.Event) -> None:
        """Follow the engine until stopped; never raises (reconnects with back-off)."""
        backoff = self._first_backoff
        try:
            while not stopping.is_set():
                started = time.monotonic()
                try:
                    await self._follow(stopping)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the watch outlives any engine trouble
                    log.warning("docker event stream: %s; reconnecting in %.1fs", exc, backoff)
                else:
                    if stopping.is_set():
                        return
                    log.warning("docker event stream ended; reconnecting in %.1fs", backoff)
                self.connected.clear()
                if time.monotonic() - started > self._max_backoff:
                    backoff = self._first_backoff  # it ran a good while: a fresh outage
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), backoff)
                backoff = min(backoff * 2, self._max_backoff)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, stopping: asyncio.Event) -> None:
        """One connection: open, catch up on what was missed, then hand events to the loop
        until the stream ends or we stop."""
        if self._since_ns is None:  # replay from a little before the first connection
            self._since_ns = time.time_ns() - 1_000_000_000
        stream = await asyncio.to_thread(self._engine.open_events, self._node_id, self._since_ns)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ContainerEvent | _End] = asyncio.Queue()
        thread = threading.Thread(
            target=_pump, args=(stream, loop, queue), name=f"docker-events-{self._node_id}", daemon=True
        )
        thread.start()
        stop = asyncio.ensure_future(stopping.wait())
        try:
            reconnected = self.connections > 0
            self.connections += 1
            self.connected.set()
            if reconnected:
                log.info("docker event stream reconnected; catching up on what it missed")
            await self._catch_up(reconcile=reconnected)
            while True:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                item = get.result()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                self._on_event(item)
        finally:
            stop.cancel()
            stream.close()
            await asyncio.to_thread(thread.join, 5.0)

    async def _catch_up(self, *, reconcile: bool) -> None:
        """Containers found exited are deaths the stream may not have shown us (it was not
        running, or the engine restarted); after a reconnect reconciliation looks at the rest
        (a container removed meanwhile)."""
        try:
            for container in await self._engine.list_managed(self._node_id):
                made_by_us = container.name == container_name(container.session_id)
                if container.state in _DEAD_STATES and is_canonical_uuid(container.chat_id) and made_by_us:
                    self._note(
                        ContainerDeath(
                            chat_id=container.chat_id,
                            session_id=container.session_id,
                            container_id=container.container_id,
                            exit_code=None,
                            oom_killed=None,
                            removed=False,
                            noticed_at=time.monotonic(),
                        )
                    )
        except DockerUnavailable as exc:
            log.warning("could not list containers after connecting to the event stream: %s", exc)
        if reconcile and self._reconcile is not None:
            self._spawn(self._reconcile_quietly(self._reconcile), "reconcile-after-reconnect")

    async def _reconcile_quietly(self, reconcile: Callable[[], Awaitable[object]]) -> None:
        try:
            await reconcile()
        except Exception:
            log.exception("reconciliation after the event stream reconnected failed")

    def _on_event(self, event: ContainerEvent) -> None:
        self._since_ns = max(self._since_ns or 0, event.time_ns)
        if not (is_canonical_uuid(event.chat_id) and is_canonical_uuid(event.session_id)):
            return
        if event.name and event.name != container_name(event.session_id):
            return  # labelled as ours, but not made by us
        if event.action == "oom":
            self._oom.add(event.container_id)
            return
        oom = event.container_id in self._oom
        if event.action == "die":
            self._oom.discard(event.container_id)
        self._note(
            ContainerDeath(
                chat_id=event.chat_id,
                session_id=event.session_id,
                container_id=event.container_id,
                exit_code=event.exit_code,
                oom_killed=oom if event.exit_code is not None else None,
                removed=event.action == "destroy",
                noticed_at=time.monotonic(),
            )
        )

    def _note(self, death: ContainerDeath) -> None:
        self._prune()
        known = self._pending.get(death.container_id)
        if known is not None:  # e.g. the `destroy` after its `die`: already being settled
            self._pending[death.container_id] = replace(known, removed=known.removed or death.removed)
            return
        self._pending[death.container_id] = death
        self.settle_soon(death)

    def _prune(self) -> None:
        """Parked deaths are kept for as long as a claim may stay in flight."""
        horizon = time.monotonic() - self._park_seconds
        for container_id, death in list(self._pending.items()):
            if death.noticed_at < horizon:
                del self._pending[container_id]

    async def _settle_retrying(self, death: ContainerDeath) -> None:
        backoff = self._first_backoff
        while death.container_id in self._pending:
            try:
                await self.settle(death)
            except (SandboxdError, OSError) as exc:
                log.warning("recording the death of %s failed (%s); trying again", death.container_id[:12], exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
            else:
                return

    def _forget(self, death: ContainerDeath, outcome: str) -> None:
        if self._pending.pop(death.container_id, None) is not None:
            self._metrics.increment("sandbox.container.death.total", {"outcome": outcome})

    def _recorded(self, death: ContainerDeath, decision: MarkLost) -> None:
        self._forget(death, "lost")
        self._active.add(-1)
        delay_ms = (time.monotonic() - death.noticed_at) * 1000
        self._metrics.record("sandbox.container.lost_delay_ms", delay_ms)
        log.info(
            "session %s of chat %s lost: its container %s %s (recorded %.0f ms after the engine told us)",
            death.session_id,
            death.chat_id,
            death.container_id[:12],
            decision.docker_state,
            delay_ms,
        )
        identity = ContainerIdentity(death.chat_id, death.session_id, self._node_id)
        self._spawn(self._remove_quietly(identity, death.container_id), f"remove-{death.container_id[:12]}")

    async def _remove_quietly(self, identity: ContainerIdentity, container_id: str) -> None:
        """A lost session's container is removed, as reconciliation does (the chat directory
        stays); if this fails, reconciliation removes it as an orphan."""
        try:
            await self._engine.remove(identity, self._stop_timeout, container_id)
        except (SandboxdError, OSError) as exc:
            log.warning("could not remove the dead container %s: %s", container_id[:12], exc)

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _with_exit_state(decision: MarkLost, exit_state: ExitState | None) -> MarkLost:
    """What `docker inspect` says beats what the event said (a die event carries no OOM flag)."""
    if exit_state is None:
        return decision
    oom = bool(decision.oom_killed) or exit_state.oom_killed
    death_text = f"exited with code {exit_state.exit_code}" + (", killed by the OOM killer" if oom else "")
    return replace(
        decision,
        reason=LostReason.CONTAINER_EXITED,
        docker_state=death_text,
        exit_code=exit_state.exit_code,
        oom_killed=oom,
    )


def _pump(
    stream: ContainerEventStream, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[ContainerEvent | _End]
) -> None:
    """The stream's thread: hand every event to the loop, then how the stream ended."""
    end = _End(None)
    try:
        for event in stream:
            loop.call_soon_threadsafe(queue.put_nowait, event)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        return
    except Exception as exc:  # noqa: BLE001 - handed to the loop, which reconnects
        end = _End(exc)
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(queue.put_nowait, end)


# --------------------------------------------------------------------------- the handlers' view


class DeathAwareLog:
    """The event log as the command handlers read it: a chat whose running session's
    container is known dead has its `lost` recorded first, so no decision is made on a
    dead container; a `running` appended for a container that already died is followed by
    its `lost` at once."""

    def __init__(self, inner: EventLog, watch: DeathWatch) -> None:
        self._inner = inner
        self._watch = watch

    async def read(self, chat_id: str) -> ChatState:
        state = await self._inner.read(chat_id)
        death = self._watch.pending_death(state)
        if death is None:
            return state
        await self._watch.settle(death)
        return await self._inner.read(chat_id)

    async def append(self, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended:
        appended = await self._inner.append(event, expected_seq=expected_seq, msg_id=msg_id)
        if isinstance(event, SandboxRunning) and not appended.duplicate:
            death = self._watch.pending_death(ChatState(appended.seq, event))
            if death is not None:
                self._watch.settle_soon(death)
        return appended

    async def append_to(self, subject: str, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended:
        return await self._inner.append_to(subject, event, expected_seq=expected_seq, msg_id=msg_id)

    async def history(self, chat_id: str, *, limit: int | None = None, through: int | None = None) -> list[StoredEvent]:
        return await self._inner.history(chat_id, limit=limit, through=through)
