"""Replay against a real nats-server: every drift it reports, it repairs, whatever the
bucket holds (a missing key, a stale record with any version, a record for a chat with no
live session, a key for a chat with no events, poison) — a second pass finds none."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from services.runtime.projector import Projector
from services.runtime.replay import DriftReport, replay
from shared.config import StreamSettings
from shared.contracts import AnyEvent, SandboxRunning, SandboxStopped, SessionRecord, SessionStatus, encode
from shared.event_store import EventStore
from shared.registry import Registry
from shared.topology import ensure_topology
from tests.support.nats_server import NatsServer
from tests.support.records import session_record


@dataclass
class Parts:
    js: JetStreamContext
    kv: KeyValue
    store: EventStore
    registry: Registry

    async def replay(self, *, repair: bool = True) -> DriftReport:
        return await replay(self.js, self.registry, Projector(self.js, self.store, self.registry), repair=repair)

    async def append(self, cls: type[AnyEvent], session: SessionRecord) -> int:
        event = cls(
            event_id=str(uuid.uuid4()),
            chat_id=session.chat_id,
            session_id=session.session_id,
            causation_id=None,
            occurred_at=session.updated_at,
            node_id=session.node_id,
            session=session,
        )
        state = await self.store.read(session.chat_id)
        return (await self.store.append(event, expected_seq=state.seq, msg_id=event.event_id)).seq

    async def held(self, chat: str) -> bytes | None:
        try:
            return (await self.kv.get(chat)).value
        except nats.js.errors.KeyNotFoundError:
            return None


@pytest.fixture
async def parts(nats: NatsServer) -> AsyncIterator[Parts]:
    nc = await _connect(nats.url)
    js = nc.jetstream()
    kv = await ensure_topology(js, StreamSettings())
    store = EventStore(js)
    yield Parts(js, kv, store, Registry(js, kv))
    await nc.close()


async def _connect(url: str) -> Client:
    return await nats.connect(url)


def _bump(record: SessionRecord, **changes: object) -> SessionRecord:
    return msgspec.structs.replace(record, **changes)


Drift = Callable[[Parts, SessionRecord, int], bytes | None]

# How the bucket can disagree with a chat whose last event is `running` at sequence `seq`.
DRIFTS: dict[str, tuple[str, Drift]] = {
    "a newer version, other content": (
        "stale",
        lambda _p, r, seq: encode(_bump(r, version=seq + 5, container_id="forged")),
    ),
    "the same version, other content": (
        "stale",
        lambda _p, r, seq: encode(_bump(r, version=seq, labels={"forged": "yes"})),
    ),
    "an older version": ("stale", lambda _p, r, seq: encode(_bump(r, version=seq - 1))),
    "another status at the same version": (
        "stale",
        lambda _p, r, seq: encode(_bump(r, version=seq, status=SessionStatus.STOPPING)),
    ),
    "poison": ("corrupt", lambda _p, _r, _seq: b"{not json"),
    "no key": ("missing", lambda _p, _r, _seq: None),
}


@pytest.mark.parametrize("case", list(DRIFTS))
async def test_replay_repairs_every_drift_it_reports(parts: Parts, case: str) -> None:
    kind, drift = DRIFTS[case]
    running = session_record()
    chat = running.chat_id
    seq = await parts.append(SandboxRunning, running)
    want = encode(_bump(running, version=seq))
    forged = drift(parts, running, seq)
    if forged is None:
        await parts.kv.delete(chat)
    else:
        await parts.kv.put(chat, forged)

    dry = await parts.replay(repair=False)
    assert getattr(dry, kind) == [chat], dry
    assert dry.drift == 1
    assert dry.repaired == 0
    assert await parts.held(chat) == forged, "a dry run changed the bucket"

    report = await parts.replay()
    assert getattr(report, kind) == [chat]
    assert report.repaired == 1
    assert report.unrepaired == []
    assert await parts.held(chat) == want
    again = await parts.replay()
    assert again.drift == 0, again


async def test_replay_removes_records_of_chats_without_a_live_session(parts: Parts) -> None:
    stopped = session_record()
    await parts.append(SandboxRunning, stopped)
    await parts.append(SandboxStopped, _bump(stopped, status=SessionStatus.STOPPED))
    ghost = session_record()  # a key for a chat that has no events at all
    for record in (stopped, ghost):
        await parts.kv.put(record.chat_id, encode(record))

    report = await parts.replay()
    assert sorted(report.extra) == sorted([stopped.chat_id, ghost.chat_id])
    assert report.repaired == 2
    assert await parts.held(stopped.chat_id) is None
    assert await parts.held(ghost.chat_id) is None
    assert (await parts.replay()).drift == 0
