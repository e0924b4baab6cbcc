"""The warm pool's bookkeeping and the handlers' use of it, with fakes (the real engine and
mounts: tests/integration/test_warm_pool.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from services.runtime.containers import ContainerIdentity, ContainerSpec, container_spec
from services.runtime.docker_driver import ObservedContainer
from services.runtime.handlers import CommandHandlers, HandlerDeps
from services.runtime.pool import WarmPool
from shared.config import SandboxSettings
from shared.contracts import CreateSandbox, SandboxRunning
from shared.errors import AppendConflict
from shared.instances import Liveness
from tests.support.eventually import until
from tests.support.records import session_record
from tests.unit.fakes_runtime import FakeClock, FakeDriver, FakeHandled, FakeStore
from tests.unit.test_claim_takeover import FakeInstances
from tests.unit.test_command_handlers import POLICY

NODE = POLICY.node_id


@dataclass
class FakeEngine(FakeDriver):
    attached: list[tuple[str, str]] = field(default_factory=list)  # (session, chat)
    others: list[ObservedContainer] = field(default_factory=list)  # containers the pool did not make
    removed_sessions: list[str] = field(default_factory=list)

    async def remove(self, identity: ContainerIdentity, stop_timeout_seconds: int, ref: str | None = None) -> None:
        self.removed_sessions.append(identity.session_id)
        await super().remove(identity, stop_timeout_seconds, ref)

    async def attach_warm(self, spec: ContainerSpec) -> None:
        await asyncio.sleep(0)
        self.attached.append((spec.identity.session_id, spec.identity.chat_id))

    async def list_managed(self, node_id: str) -> list[ObservedContainer]:
        """As the real driver lists them: warm containers with their owner, and the chat of a
        claimed one (from its marker)."""
        chats = dict(self.attached)
        listed = []
        for found in await super().list_managed(node_id):
            labels = self.specs[found.name].labels
            if labels.get("sandboxd.pool") != "true":
                listed.append(found)
                continue
            chat = chats.get(found.session_id, "")
            listed.append(dataclasses.replace(found, pool=True, pool_owner=labels["sandboxd.pool_owner"], chat_id=chat))
        return [*listed, *self.others]


@dataclass
class FakeSlots:
    made: set[str] = field(default_factory=set)
    released: list[str] = field(default_factory=list)
    claimed: dict[str, str] = field(default_factory=dict)  # session -> chat (the marker)

    def make(self, session_id: str) -> Path:
        self.made.add(session_id)
        return Path("/slots") / session_id

    def stale(self, present: set[str], older_than: float) -> set[str]:  # noqa: ARG002 - the fake has no clock
        return self.made - present

    def release(self, session_id: str) -> None:
        self.made.discard(session_id)
        self.released.append(session_id)

    def retire(self) -> bool:
        return not self.made

    def chat_of(self, session_id: str) -> str | None:
        return self.claimed.get(session_id)


async def no_progress() -> None:
    await asyncio.sleep(0)


def pool_of(
    size: int, engine: FakeEngine, instances: FakeInstances | None = None, now: Callable[[], float] = time.monotonic
) -> WarmPool:
    return WarmPool(
        engine, FakeSlots(), SandboxSettings(), node_id=NODE, instances=instances or FakeInstances(), size=size, now=now
    )


async def running(pool: WarmPool) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stopping = asyncio.Event()
    task = asyncio.create_task(pool.run(stopping))
    await until(lambda: pool.ready == pool.size)
    return stopping, task


async def test_the_pool_fills_hands_each_container_to_one_claim_and_refills() -> None:
    engine = FakeEngine()
    pool = pool_of(3, engine)
    stopping, task = await running(pool)
    made = [name.removeprefix("sandboxd-") for name in engine.started]
    assert len(made) == 3
    assert all(engine.specs[f"sandboxd-{s}"].labels["sandboxd.pool"] == "true" for s in made)

    first = pool.take()
    assert first == made[0]
    assert pool.holds(first)
    second = pool.take()
    assert second is not None
    pool.give_back(second)  # its claim lost the race: the next take gets it again
    assert not pool.holds(second)
    assert pool.take() == second
    await until(lambda: pool.ready == 3)  # refilled in the background
    assert len(engine.started) == 5

    stopping.set()
    await task
    assert pool.ready == 0
    assert len(engine.removed) == 3, "a clean stop removes the unclaimed ones, not the taken ones"
    assert {f"id-sandboxd-{first}", f"id-sandboxd-{second}"}.isdisjoint(engine.removed)


async def test_an_empty_pool_gives_nothing() -> None:
    pool = pool_of(0, FakeEngine())
    assert pool.take() is None


async def test_warm_containers_of_a_gone_instance_are_removed_others_kept() -> None:
    instances = FakeInstances()
    alive, gone = str(uuid.uuid4()), str(uuid.uuid4())
    instances.others = {alive: Liveness.ALIVE, gone: Liveness.DEAD}
    engine = FakeEngine()

    def warm(owner: str, chat: str = "") -> ObservedContainer:
        session = str(uuid.uuid4())
        return ObservedContainer(
            f"c-{session}", f"sandboxd-{session}", chat, session, "running", "Up", NODE, pool=True, pool_owner=owner
        )

    kept = [warm(alive), warm(gone, chat=str(uuid.uuid4())), warm(instances.instance_id)]
    doomed = warm(gone)
    engine.others = [*kept, doomed]
    pool = pool_of(1, engine, instances)
    stopping, task = await running(pool)
    assert engine.removed_sessions == [doomed.session_id]
    stopping.set()
    await task


async def test_a_create_takes_a_warm_container_and_a_lost_claim_hands_it_back() -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    engine = FakeEngine()
    pool = pool_of(1, engine)
    stopping, task = await running(pool)
    (warm_session,) = [n.removeprefix("sandboxd-") for n in engine.started]
    handlers = CommandHandlers(
        HandlerDeps(store, engine, clock, POLICY, SandboxSettings(), handled=FakeHandled(), pool=pool)
    )

    async def create(chat: str) -> None:
        command = msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": chat}, CreateSandbox)
        await handlers.handle(command, no_progress)

    # The first claim loses its append once: the warm container goes back and is taken again.
    store.fail_next["provisioning"].append(AppendConflict("another writer"))
    chat = str(uuid.uuid4())
    await create(chat)
    running_event = store.events(chat)[-1]
    assert isinstance(running_event, SandboxRunning)
    assert running_event.session_id == warm_session
    assert running_event.session is not None
    assert running_event.session.container_id == f"id-sandboxd-{warm_session}"
    assert engine.attached == [(warm_session, chat)]
    assert f"sandboxd-{warm_session}" in engine.started[:1], "not created again"

    # A stopped pool holds nothing: the next create is cold, under its own session id.
    stopping.set()
    await task
    other = str(uuid.uuid4())
    await create(other)
    cold = store.events(other)[-1]
    assert isinstance(cold, SandboxRunning)
    assert cold.session_id != warm_session
    assert f"sandboxd-{cold.session_id}" in engine.started
    assert engine.attached == [(warm_session, chat)]


async def test_a_take_no_claim_attached_is_let_go_and_its_container_removed_while_unclaimed() -> None:
    """A claim whose append failed without landing (NATS gone) never attaches its warm
    container; its command, redelivered, claims another. The pool must not keep the first one
    taken (and running) forever."""
    clock = [1000.0]
    engine = FakeEngine()
    pool = pool_of(3, engine, now=lambda: clock[0])
    stopping, task = await running(pool)
    lost, claimed = pool.take(), pool.take()
    assert lost is not None
    assert claimed is not None
    chat = str(uuid.uuid4())
    engine.attached.append((claimed, chat))  # a resumed claim found it by name and attached its chat
    clock[0] += 119
    recent = pool.take()
    assert recent is not None
    await pool.check()
    assert engine.removed_sessions == [], "within the grace nothing is let go"
    assert pool.holds(lost)

    clock[0] += 2
    await pool.check()
    assert engine.removed_sessions == [lost], "the unclaimed one is removed, the claimed one is the session's"
    assert not pool.holds(lost)
    assert not pool.holds(claimed)
    assert pool.holds(recent), "a take within the grace is kept"

    # A claim that comes after its take was let go makes its container as a cold create would.
    chat_of_lost = str(uuid.uuid4())
    session = session_record(chat_id=chat_of_lost, session_id=lost, node_id=NODE)
    spec = container_spec(ContainerIdentity(chat_of_lost, lost, NODE), session, SandboxSettings())
    assert await pool.claim(spec) == f"id-sandboxd-{lost}"
    assert (lost, chat_of_lost) not in engine.attached, "not attached as a warm container"
    assert engine.specs[f"sandboxd-{lost}"] is spec
    stopping.set()
    await task
