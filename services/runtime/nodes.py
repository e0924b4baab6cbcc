"""The node watch: this node's beat, the other nodes' deaths, and this node's return.

Every heartbeat interval each runtime

1. writes its node's beat (live sessions against `runtime.max_sessions`) and reads every
   node's (`shared/nodes.py`);
2. for each node judged dead (silent for `runtime.node_dead_after_seconds`): records
   `node_dead` on `sandbox.events.node.<node>` (once per silence: the append names the node
   subject's last sequence, so of several runtimes one records it), records every live
   session of that node `lost {reason: node_lost}` (from a scan of the registry; a command
   that meets such a session before the sweep reaches it records the loss itself), and
   consumes the dead node's queue (from the moment the node is silent, in fact) so that no
   command forwarded to it waits for its return;
3. for its own node: when the node's last node event is `node_dead` (it was declared dead
   while its runtimes were down or cut off), records `node_returned` and runs a fencing
   reconciliation pass: every container of a session this node no longer owns is removed at
   once (no confirmation), so a returning node never resurrects a session.

Several runtimes of one node all do this; every append is conditional, so they agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from services.runtime.capacity import UNLIMITED, NodeCapacity
from services.runtime.losses import mark_node_lost
from shared.clock import Clock
from shared.contracts import AnyNodeEvent, NodeDead, NodeReturned, decode_node_event, encode
from shared.errors import AppendConflict, TransientError
from shared.event_store import CONFLICT_CODES, EventLog, with_nats_retry
from shared.ids import random_uuid
from shared.nodes import NodeDirectory, NodeState
from shared.poison import DECODE_ERRORS, PoisonSource, Quarantine
from shared.registry import Registry
from shared.subjects import (
    EVENT_TYPE_HEADER,
    EVENTS_STREAM,
    EXPECTED_LAST_SUBJECT_SEQ_HEADER,
    MSG_ID_HEADER,
    node_event_subject,
)
from shared.telemetry import Telemetry
from shared.telemetry import disabled as telemetry_disabled

log = logging.getLogger(__name__)
# How long a clean stop spends telling peers it is leaving.
_LEAVE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class LastNodeEvent:
    seq: int  # 0: the node has no event
    event: AnyNodeEvent | None


class NodeLog:
    """The node subjects of SANDBOX_EVENTS."""

    def __init__(self, js: JetStreamContext, quarantine: Quarantine | None = None) -> None:
        self._js = js
        self._quarantine = quarantine or Quarantine()

    async def last(self, node_id: str) -> LastNodeEvent:
        subject = node_event_subject(node_id)

        async def get() -> LastNodeEvent:
            try:
                raw = await self._js.get_last_msg(EVENTS_STREAM, subject, direct=True)
            except NotFoundError:
                return LastNodeEvent(0, None)
            try:
                event = decode_node_event(raw.data or b"")
            except DECODE_ERRORS as exc:
                self._quarantine.report(PoisonSource.EVENT, subject, raw.seq or 0, f"does not decode: {exc}")
                return LastNodeEvent(raw.seq or 0, None)
            return LastNodeEvent(raw.seq or 0, event if event.node_id == node_id else None)

        return await with_nats_retry(get, what=f"read {subject}")

    async def append(self, event: AnyNodeEvent, *, expected_seq: int) -> None:
        """AppendConflict when another runtime recorded something on the node first."""
        subject = node_event_subject(event.node_id)
        headers = {
            MSG_ID_HEADER: event.event_id,
            EVENT_TYPE_HEADER: event.type,
            EXPECTED_LAST_SUBJECT_SEQ_HEADER: str(expected_seq),
        }

        async def publish() -> None:
            try:
                await self._js.publish(subject, encode(event), stream=EVENTS_STREAM, headers=headers)
            except APIError as exc:
                if exc.err_code in CONFLICT_CODES:
                    raise AppendConflict(f"{subject}: last sequence is not {expected_seq}") from exc
                raise

        await with_nats_retry(publish, what=f"append to {subject}")


# A dead node's queue is consumed by this until the node returns (see CommandConsumer).
QueueConsumer = Callable[[str, asyncio.Event], Coroutine[Any, Any, None]]


class NodeWatch:
    def __init__(
        self,
        directory: NodeDirectory,
        *,
        capacity: NodeCapacity,
        nodes: NodeLog,
        store: EventLog,
        registry: Registry,
        clock: Clock,
        fence: Callable[[], Awaitable[object]],
        consume_queue: QueueConsumer | None = None,
        queue_pending: Callable[[str], Awaitable[int]] | None = None,
        telemetry: Telemetry | None = None,
        new_id: Callable[[], str] = random_uuid,
    ) -> None:
        self._directory = directory
        self._capacity = capacity
        self._nodes = nodes
        self._store = store
        self._registry = registry
        self._clock = clock
        self._fence = fence
        self._consume_queue = consume_queue
        self._queue_pending = queue_pending
        self._metrics = (telemetry or telemetry_disabled()).metrics
        self._new_id = new_id
        self._here = directory.here
        self._swept: dict[str, datetime | None] = {}  # dead node -> the last beat its sweep was for
        self._adopted: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = {}

    async def beat(self, *, draining: bool = False) -> None:
        live, limit = await self._capacity.snapshot()
        await self._directory.beat(live, None if limit == UNLIMITED else limit, draining=draining)

    async def leave(self) -> None:
        """A clean stop: the node's beat says it takes no new sessions (another runtime of
        the node, if any, says otherwise with its next beat)."""
        try:
            # Best effort, and bounded: with NATS gone a stop must not wait out every retry.
            await asyncio.wait_for(self.beat(draining=True), _LEAVE_SECONDS)
        except Exception as exc:  # noqa: BLE001 - placements then go here until the beat ages
            log.warning("node beat not marked draining: %s", exc)

    async def start(self) -> None:
        """Beat, read the nodes, and learn the nodes that live sessions name (a node that
        never beats again is judged from now on); record this node's return if it was dead."""
        await self.beat()
        await self._directory.refresh()
        for record in await self._registry.list():
            if record.is_live:
                self._directory.know_of(record.node_id)
        await self._returned()

    async def tick(self) -> None:
        await self.beat()
        await self._directory.refresh()
        await self._returned()
        states = self._directory.nodes()
        for state in NodeState:
            self._metrics.set("sandbox.nodes", sum(1 for s in states.values() if s == state), {"state": state})
        for node, state in states.items():
            if node == self._here:
                continue
            if state == NodeState.ALIVE:
                await self._release(node)
                self._swept.pop(node, None)
                continue
            if state == NodeState.DEAD and self._settled(node):
                continue
            # Silent or dead: its queue is consumed here until it beats again (a create placed
            # on it just before it went is placed again; a stop for its session waits), or
            # until, dead and swept, its queue is empty (nothing is forwarded to a node that
            # is not alive, so nothing more comes).
            self._adopt(node)
            if state == NodeState.DEAD:
                await self._declare_dead(node)
                if self._queue_pending is not None and await self._queue_pending(node) == 0:
                    await self._release(node)

    async def run(self, stopping: asyncio.Event, interval: float) -> None:
        try:
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), interval)
                if stopping.is_set():
                    return
                try:
                    await _unless_stopped(self.tick(), stopping)
                except (NatsError, TimeoutError, AppendConflict, TransientError) as exc:
                    log.warning("node watch: %s; trying again next beat", exc)
                except Exception:
                    log.exception("node watch pass failed; trying again next beat")
        finally:
            for node in list(self._adopted):
                await self._release(node)

    # ------------------------------------------------------------------ this node

    async def _returned(self) -> None:
        last = await self._nodes.last(self._here)
        if not isinstance(last.event, NodeDead):
            return
        event = NodeReturned(
            event_id=self._new_id(),
            node_id=self._here,
            occurred_at=self._clock.now(),
            last_beat_at=last.event.last_beat_at,
            recorded_by=self._here,
        )
        try:
            await self._nodes.append(event, expected_seq=last.seq)
        except AppendConflict:
            return  # another runtime of this node recorded it; it fences too
        log.warning("node %s was declared dead and is back: removing containers of sessions it lost", self._here)
        self._metrics.increment("sandbox.node.returned.total")
        await self._fence()

    # ------------------------------------------------------------------ other nodes

    def _settled(self, node: str) -> bool:
        """Dead, swept for its current silence, and its queue no longer consumed here."""
        beat = self._directory.last_beat(node)
        beat_at = beat.beat_at if beat is not None else None
        return node in self._swept and self._swept[node] == beat_at and node not in self._adopted

    async def _declare_dead(self, node: str) -> None:
        beat = self._directory.last_beat(node)
        beat_at = beat.beat_at if beat is not None else None
        if node in self._swept and self._swept[node] == beat_at:
            return
        last = await self._nodes.last(node)
        if not (isinstance(last.event, NodeDead) and last.event.last_beat_at == beat_at):
            event = NodeDead(
                event_id=self._new_id(),
                node_id=node,
                occurred_at=self._clock.now(),
                last_beat_at=beat_at,
                recorded_by=self._here,
            )
            try:
                await self._nodes.append(event, expected_seq=last.seq)
                log.warning("node %s is dead (last beat %s): its sessions are lost", node, beat_at)
                self._metrics.increment("sandbox.node.dead.total")
            except AppendConflict:
                pass  # another runtime recorded it; the sweep below is idempotent
        lost = await self._sweep(node)
        self._swept[node] = beat_at
        if lost:
            log.warning("node %s is dead: %d session(s) recorded lost", node, lost)

    async def _sweep(self, node: str) -> int:
        """Every live session of the dead node, recorded lost (registry scan; a session the
        registry has not caught up with is lost by the first command that meets it)."""
        lost = 0
        for record in await self._registry.list():
            if not record.is_live or record.node_id != node:
                continue
            event = await mark_node_lost(
                self._store, record.chat_id, node, here=self._here, now=self._clock.now(), event_id=self._new_id()
            )
            if event is not None:
                lost += 1
                self._metrics.increment("sandbox.node.session_lost.total", {"by": "sweep"})
        return lost

    def _adopt(self, node: str) -> None:
        if self._consume_queue is None or node in self._adopted:
            return
        stop = asyncio.Event()
        task = asyncio.create_task(self._consume_queue(node, stop), name=f"queue of dead node {node}")
        self._adopted[node] = (stop, task)
        log.info("consuming the queue of dead node %s until it returns", node)

    async def _release(self, node: str) -> None:
        adopted = self._adopted.pop(node, None)
        if adopted is None:
            return
        stop, task = adopted
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        log.info("node %s is back: its queue is its own again", node)


# How long a pass in flight may go on once the runtime stops (with NATS gone it would wait out
# its requests' time-outs and retries); then it is cancelled, as a crash would end it.
_STOP_GRACE_SECONDS = 1.0


async def _unless_stopped(work: Coroutine[Any, Any, None], stopping: asyncio.Event) -> None:
    """Run a pass; once `stopping` is set it has _STOP_GRACE_SECONDS to end, then it is
    cancelled. The pass's own error is raised."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait((task,), timeout=_STOP_GRACE_SECONDS)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.warning("node watch: a pass still running at the stop was cancelled")
            return
        task.result()
    finally:
        stopped.cancel()
        if not task.done():  # this loop itself was cancelled
            task.cancel()
