"""Nodes (Docker hosts) and where new sessions go: `sandbox_instances` keys `node.<node token>`.

Every runtime instance rewrites its node's beat (`NodeBeat`: when, and the node's live
sessions against `runtime.max_sessions`) with each heartbeat; the key is never deleted, so a
node whose runtimes all stopped or died is seen silent. Each runtime reads every node's beat
once per heartbeat interval into a `NodeDirectory` and judges each node (`judge_node`):

- alive: a beat within `runtime.instance_dead_after_seconds` — a candidate for new sessions,
  and commands for its sessions are forwarded to its queue;
- silent: no fresh beat, but not yet dead — commands for its sessions wait (nak with a delay);
- dead: silent for `runtime.node_dead_after_seconds`, measured from the later of its last beat
  and when this runtime began watching (a whole cluster restarting does not declare every
  node dead at once) — its sessions are recorded lost.

Reading every beat is one batched direct get (last message per subject under `node.>`),
answered by any replica: no consumer is made, so a clustered server that is down does not
slow it. A runtime that could not read the beats for a heartbeat interval judges no node
dead (its own knowledge is stale, not the nodes).

Placement (`choose_node`) is pure: the alive node with the most free places, counting the
placements this runtime made since that node's last beat (so a burst spreads before the next
beats arrive); ties are broken at random.
"""

from __future__ import annotations

import enum
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.kv import KeyValue

from shared.clock import Clock
from shared.contracts import NodeBeat, Placement, decode_node_beat, encode
from shared.errors import NatsUnavailable
from shared.event_store import direct_batch, stream_seq, with_nats_retry
from shared.poison import DECODE_ERRORS, PoisonSource, Quarantine
from shared.subjects import INSTANCES_BUCKET, node_token

log = logging.getLogger(__name__)

NODE_KEY_PREFIX = "node."
# Free places of a node with no limit: large, less what it runs (fewest sessions wins).
_UNLIMITED_FREE = 1_000_000_000
# A placement counts against its node until a beat written this long after it.
_PLACEMENT_SETTLES = timedelta(seconds=1)


_KV_PREFIX = f"$KV.{INSTANCES_BUCKET}."
_BATCH = 10_000


def node_key(node_id: str) -> str:
    return NODE_KEY_PREFIX + node_token(node_id)


async def read_node_beats(nc: Client, timeout: float) -> list[tuple[str, int, bytes]]:
    """(key, revision, value) of every `node.*` key: one batched direct get of the last
    message per subject, NatsUnavailable when it is not answered."""
    request: dict[str, object] = {"multi_last": [f"{_KV_PREFIX}{NODE_KEY_PREFIX}>"], "batch": _BATCH}
    try:
        msgs = await direct_batch(nc, f"KV_{INSTANCES_BUCKET}", request, timeout)
    except NatsTimeoutError as exc:
        raise NatsUnavailable("node beats: the direct get was not answered") from exc
    found: list[tuple[str, int, bytes]] = []
    for msg in msgs:
        headers = msg.headers or {}
        subject = headers.get("Nats-Subject", "")
        if subject.startswith(_KV_PREFIX) and msg.data and headers.get("KV-Operation") is None:
            found.append((subject[len(_KV_PREFIX) :], stream_seq(msg), msg.data))
    return found


class NodeState(enum.StrEnum):
    ALIVE = "alive"
    SILENT = "silent"
    DEAD = "dead"


def judge_node(
    beat_at: datetime | None,
    now: datetime,
    watching_since: datetime,
    *,
    fresh_for: timedelta,
    dead_after: timedelta,
) -> NodeState:
    """Pure: a node's state from its last beat (None: none seen) at `now`."""
    if beat_at is not None and now - beat_at < fresh_for:
        return NodeState.ALIVE
    silent_since = watching_since if beat_at is None else max(beat_at, watching_since)
    return NodeState.DEAD if now - silent_since >= dead_after else NodeState.SILENT


def free_places(beat: NodeBeat, pending: int) -> int:
    limit = beat.max_sessions if beat.max_sessions is not None else _UNLIMITED_FREE
    return limit - beat.live_sessions - pending


def choose_node(
    alive: Sequence[NodeBeat],
    pending: Mapping[str, int],
    here: str,
    pick: Callable[[Sequence[str]], str] = random.choice,
) -> Placement:
    """Pure: the node for a new session among the alive nodes' beats; this node when it knows
    of none (its own beat not read yet)."""
    if not alive:
        return Placement(node_id=here, placed_by=here, nodes=1)
    free = {b.node_id: free_places(b, pending.get(b.node_id, 0)) for b in alive}
    best = max(free.values())
    node = pick(sorted(n for n, f in free.items() if f == best))
    limited = next(b for b in alive if b.node_id == node).max_sessions is not None
    return Placement(node_id=node, placed_by=here, free=best if limited else None, nodes=len(alive))


class Nodes(Protocol):
    """What the command handlers need to know of nodes."""

    @property
    def node_id(self) -> str: ...

    def state(self, node_id: str) -> NodeState: ...

    def place(self) -> Placement: ...


class SingleNode:
    """A runtime that knows of no other node (unit tests, tools): every session is placed
    here, and another node's session waits for that node (it is never judged alive or dead)."""

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id

    @property
    def node_id(self) -> str:
        return self._node_id

    def state(self, node_id: str) -> NodeState:
        return NodeState.ALIVE if node_id == self._node_id else NodeState.SILENT

    def place(self) -> Placement:
        return Placement(node_id=self._node_id, placed_by=self._node_id)


@dataclass
class _Seen:
    beat: NodeBeat | None  # None: known only from a session that names it


@dataclass
class NodeDirectory:
    """This runtime's view of the nodes: its own node's beat written, every node's read."""

    kv: KeyValue
    nc: Client
    clock: Clock
    here: str
    instance_id: str
    fresh_for: timedelta
    dead_after: timedelta
    quarantine: Quarantine = field(default_factory=Quarantine)
    pick: Callable[[Sequence[str]], str] = random.choice
    _seen: dict[str, _Seen] = field(default_factory=dict)
    # Per node, when this runtime placed sessions there (oldest first), until a beat covers them.
    _placed: dict[str, deque[datetime]] = field(default_factory=dict)
    _watching_since: datetime | None = None
    _read_at: datetime | None = None  # when every beat was last read

    @property
    def node_id(self) -> str:
        return self.here

    async def beat(self, live_sessions: int, max_sessions: int | None, *, draining: bool = False) -> NodeBeat:
        beat = NodeBeat(
            node_id=self.here,
            instance_id=self.instance_id,
            beat_at=self.clock.now(),
            live_sessions=live_sessions,
            max_sessions=max_sessions,
            draining=draining,
        )
        await with_nats_retry(lambda: self.kv.put(node_key(self.here), encode(beat)), what="node beat")
        self._seen[self.here] = _Seen(beat)
        return beat

    async def refresh(self) -> None:
        """Read every node's beat; nodes seen before keep their entry."""
        if self._watching_since is None:
            self._watching_since = self.clock.now()
        timeout = self.fresh_for.total_seconds() / 2
        beats = await with_nats_retry(lambda: read_node_beats(self.nc, timeout), what="node beats")
        self._read_at = self.clock.now()
        for key, revision, value in beats:
            try:
                beat = decode_node_beat(value)
            except DECODE_ERRORS as exc:
                self.quarantine.report(PoisonSource.HEARTBEAT, key, revision, f"does not decode: {exc}")
                continue
            if node_key(beat.node_id) != key:
                self.quarantine.report(PoisonSource.HEARTBEAT, key, revision, "it names another node")
                continue
            self._seen[beat.node_id] = _Seen(beat)

    def know_of(self, node_id: str) -> None:
        """A node named by a live session: judged from now on even if it never beats."""
        self._seen.setdefault(node_id, _Seen(None))

    def state(self, node_id: str) -> NodeState:
        seen = self._seen.get(node_id)
        beat_at = seen.beat.beat_at if seen is not None and seen.beat is not None else None
        now = self.clock.now()
        since = self._watching_since or now
        state = judge_node(beat_at, now, since, fresh_for=self.fresh_for, dead_after=self.dead_after)
        if state == NodeState.DEAD and (self._read_at is None or now - self._read_at >= self.fresh_for):
            return NodeState.SILENT  # what this runtime knows is stale: it judges nobody dead
        return state

    def last_beat(self, node_id: str) -> NodeBeat | None:
        seen = self._seen.get(node_id)
        return seen.beat if seen is not None else None

    def nodes(self) -> dict[str, NodeState]:
        return {node: self.state(node) for node in self._seen}

    def place(self) -> Placement:
        """Amortised O(nodes): each placement is counted until a beat of its node covers it."""
        alive = [
            s.beat
            for n, s in self._seen.items()
            if s.beat is not None and not s.beat.draining and self.state(n) == NodeState.ALIVE
        ]
        pending: dict[str, int] = {}
        for beat in alive:
            placed = self._placed.get(beat.node_id)
            while placed and placed[0] <= beat.beat_at - _PLACEMENT_SETTLES:
                placed.popleft()
            pending[beat.node_id] = len(placed) if placed else 0
        placement = choose_node(alive, pending, self.here, self.pick)
        self._placed.setdefault(placement.node_id, deque()).append(self.clock.now())
        return placement
