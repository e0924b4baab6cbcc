"""In-memory stand-ins for the event store, the handled-command index, the Docker driver and
the clock (unit tests only).

FakeStore keeps the real store's semantics that the handlers rely on, in nats-server 2.14's
order: the per-subject expected sequence first (AppendConflict, even for a message id seen
before), then stream-wide message-id de-duplication inside the duplicate window (which
expires on the fake clock); one global sequence. tests/integration/test_event_log_contract.py
runs one suite against it and the real store.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from services.runtime.containers import ContainerIdentity, ContainerSpec
from services.runtime.docker_driver import ObservedContainer
from shared.contracts import AnyEvent, HandledCommand
from shared.errors import AppendConflict, SandboxdError, SandboxPauseFailed
from shared.event_store import Appended, ChatState, StoredEvent
from shared.handled import handled_key
from shared.subjects import event_subject


class FakeClock:
    def __init__(self, now: datetime | None = None) -> None:
        self._now = now or datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)


@dataclass
class FakeStore:
    clock: FakeClock = field(default_factory=FakeClock)
    duplicate_window: timedelta = timedelta(seconds=600)
    seq: int = 0
    subjects: dict[str, list[StoredEvent]] = field(default_factory=lambda: defaultdict(list))
    msg_ids: dict[str, tuple[int, datetime]] = field(default_factory=dict)  # msg id -> (seq, stored at)
    # event type -> errors to raise on the next appends of that type
    fail_next: dict[str, list[Exception]] = field(default_factory=lambda: defaultdict(list))
    history_reads: int = 0

    async def read(self, chat_id: str) -> ChatState:
        await asyncio.sleep(0)
        events = self.subjects[event_subject(chat_id)]
        return ChatState(events[-1].seq, events[-1].event) if events else ChatState(0, None)

    async def append(self, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended:
        return await self.append_to(event_subject(event.chat_id), event, expected_seq=expected_seq, msg_id=msg_id)

    async def append_to(self, subject: str, event: AnyEvent, *, expected_seq: int | None, msg_id: str) -> Appended:
        await asyncio.sleep(0)
        if self.fail_next[event.type]:
            raise self.fail_next[event.type].pop(0)
        events = self.subjects[subject]
        last = events[-1].seq if events else 0
        if expected_seq is not None and expected_seq != last:
            raise AppendConflict(f"{subject}: last is {last}, not {expected_seq}")
        now = self.clock.now()
        seen = self.msg_ids.get(msg_id)
        if seen is not None and now - seen[1] < self.duplicate_window:
            return Appended(seen[0], duplicate=True)
        self.seq += 1
        self.msg_ids[msg_id] = (self.seq, now)
        events.append(StoredEvent(self.seq, event))
        return Appended(self.seq, duplicate=False)

    async def history(
        self,
        chat_id: str,
        *,
        limit: int | None = None,
        through: int | None = None,  # noqa: ARG002 - the fake never lags
    ) -> list[StoredEvent]:
        self.history_reads += 1
        events = list(self.subjects[event_subject(chat_id)])
        return events[-limit:] if limit else events

    def events(self, chat_id: str) -> list[AnyEvent]:
        return [s.event for s in self.subjects[event_subject(chat_id)]]

    def types(self, chat_id: str) -> list[str]:
        return [e.type for e in self.events(chat_id)]


@dataclass
class FakeHandled:
    """The handled-command index in memory (the real one is a KV bucket with a TTL)."""

    entries: dict[str, HandledCommand] = field(default_factory=dict)

    async def lookup(self, chat_id: str, command_id: str) -> HandledCommand | None:
        await asyncio.sleep(0)
        return self.entries.get(handled_key(chat_id, command_id))

    async def record(self, handled: HandledCommand) -> None:
        await asyncio.sleep(0)
        self.entries[handled_key(handled.chat_id, handled.command_id)] = handled


@dataclass
class FakeDriver:
    """Containers by name; like the real driver, it touches only a container whose identity
    (its labels) is the session's."""

    running: dict[str, str] = field(default_factory=dict)  # name -> id
    specs: dict[str, ContainerSpec] = field(default_factory=dict)  # name -> what started it
    started: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # container ids
    left_alone: list[str] = field(default_factory=list)  # names of containers that were not the session's
    start_errors: list[SandboxdError] = field(default_factory=list)
    remove_errors: list[SandboxdError] = field(default_factory=list)
    paused: set[str] = field(default_factory=set)  # names of frozen containers

    async def ensure_running(self, spec: ContainerSpec) -> str:
        await asyncio.sleep(0)
        if self.start_errors:
            raise self.start_errors.pop(0)
        if spec.name not in self.running:
            self.running[spec.name] = f"id-{spec.name}"
            self.specs[spec.name] = spec
            self.started.append(spec.name)
        return self.running[spec.name]

    async def list_managed(self, node_id: str) -> list[ObservedContainer]:
        return [
            ObservedContainer(container_id, name, "", name.removeprefix("sandboxd-"), "running", "Up", node_id)
            for name, container_id in self.running.items()
        ]

    async def remove(
        self,
        identity: ContainerIdentity,
        stop_timeout_seconds: int,  # noqa: ARG002 - the protocol's signature
        ref: str | None = None,
    ) -> None:
        await asyncio.sleep(0)
        if self.remove_errors:
            raise self.remove_errors.pop(0)
        wanted = ref or identity.name
        name = next((n for n, cid in self.running.items() if wanted in (n, cid)), None)
        if name is None:
            return
        spec = self.specs.get(name)
        if spec is not None and spec.identity != identity:
            self.left_alone.append(name)
            return
        self.removed.append(self.running.pop(name))
        self.paused.discard(name)

    async def pause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        self.paused.add(self._frozen_name(identity, ref, "pause"))

    async def unpause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        self.paused.discard(self._frozen_name(identity, ref, "unpause"))

    def _frozen_name(self, identity: ContainerIdentity, ref: str | None, what: str) -> str:
        wanted = ref or identity.name
        name = next((n for n, cid in self.running.items() if wanted in (n, cid)), None)
        if name is None or self.specs[name].identity != identity:
            raise SandboxPauseFailed(f"{what}: no container {wanted} of {identity}")
        return name
