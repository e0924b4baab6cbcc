"""Exactly once beyond the event stream's de-duplication window: a command id seen again at
any time gets no second outcome (the index of handled commands, shared/handled.py).

The fake store forgets message ids after its duplicate window like the server does, so
without the index each of these commands would be decided afresh and answered twice."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import msgspec
import pytest

from shared.contracts import AnyCommand, CreateSandbox, KeepaliveSandbox, StopSandbox, is_outcome
from shared.errors import NatsUnavailable
from shared.handled import handled_key
from tests.unit.test_command_handlers import World

BEYOND_THE_WINDOW = 601.0  # seconds; the fake store's duplicate window is 600 s


def command(cls: type[AnyCommand], chat: uuid.UUID, **fields: object) -> AnyCommand:
    return msgspec.convert({"command_id": str(uuid.uuid4()), "chat_id": str(chat), **fields}, cls)


def outcomes(world: World, chat: uuid.UUID, command_id: uuid.UUID) -> list[str]:
    return [e.type for e in world.store.events(str(chat)) if e.causation_id == str(command_id) and is_outcome(e)]


@pytest.fixture
def world() -> World:
    return World()


# Each case: a command whose outcome is not a claim (so no history check guards it), and
# what the chat looks like when it is seen again: something else happened meanwhile.
CASES: dict[str, Callable[[uuid.UUID], AnyCommand]] = {
    "a create that reused": lambda chat: command(CreateSandbox, chat),
    "a keepalive that extended": lambda chat: command(KeepaliveSandbox, chat),
    "a stop that was refused": lambda chat: command(StopSandbox, chat, session_id=str(uuid.uuid4())),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_command_seen_again_after_the_window_gets_no_second_outcome(world: World, case: str) -> None:
    chat = uuid.uuid4()
    await world.create(chat)
    again = CASES[case](chat)
    await world.handlers.handle(again, world.progress)
    first = outcomes(world, chat, again.command_id)
    assert len(first) == 1, first
    world.clock.advance(BEYOND_THE_WINDOW)
    await world.create(chat)  # the chat moves on: its last event is not the command's outcome
    before = world.store.types(str(chat))

    assert await world.handlers.handle(again, world.progress) is None
    assert world.store.types(str(chat)) == before, "a second outcome after the window"
    assert outcomes(world, chat, again.command_id) == first


async def test_a_create_seen_again_after_its_session_ended_does_not_start_another(world: World) -> None:
    chat = uuid.uuid4()
    created = await world.create(chat)
    await world.stop(chat)
    world.clock.advance(BEYOND_THE_WINDOW)
    await world.handlers.handle(created, world.progress)
    assert world.store.types(str(chat)) == ["provisioning", "running", "stopping", "stopped"]
    assert world.driver.running == {}


async def test_every_outcome_is_recorded_with_its_sequence(world: World) -> None:
    chat = uuid.uuid4()
    created = await world.create(chat)
    reused = await world.create(chat)
    stopped = await world.stop(chat)
    for c in (created, reused, stopped):
        entry = world.handled.entries[handled_key(str(chat), str(c.command_id))]
        stored = {s.seq: s.event for s in await world.store.history(str(chat))}
        assert stored[entry.outcome_seq].causation_id == str(c.command_id)
        assert is_outcome(stored[entry.outcome_seq])
        assert entry.kind == c.kind


async def test_an_outcome_whose_record_was_lost_is_recorded_on_redelivery(world: World) -> None:
    """The process died between appending the outcome and recording it: the command was not
    acknowledged, so it comes back inside the window, finds its outcome, and records it."""
    chat = uuid.uuid4()
    await world.create(chat)
    reuse = command(CreateSandbox, chat)
    original = world.handled.record
    failures = [NatsUnavailable("record lost")]

    async def record_failing_once(handled: object) -> None:
        if failures:
            raise failures.pop()
        await original(handled)  # type: ignore[arg-type]

    world.handled.record = record_failing_once  # type: ignore[method-assign]
    with pytest.raises(NatsUnavailable):
        await world.handlers.handle(reuse, world.progress)
    assert handled_key(str(chat), str(reuse.command_id)) not in world.handled.entries
    world.clock.advance(5)
    await world.handlers.handle(reuse, world.progress)  # the redelivery
    assert handled_key(str(chat), str(reuse.command_id)) in world.handled.entries
    assert outcomes(world, chat, reuse.command_id) == ["reused"]
    world.clock.advance(BEYOND_THE_WINDOW)
    await world.create(chat)
    await world.handlers.handle(reuse, world.progress)
    assert outcomes(world, chat, reuse.command_id) == ["reused"]


async def test_the_fake_store_forgets_message_ids_after_its_window(world: World) -> None:
    """What makes the tests above able to fail: without the index, the same command is
    answered twice once the window has passed."""
    chat = uuid.uuid4()
    await world.create(chat)
    reuse = command(CreateSandbox, chat)
    await world.handlers.handle(reuse, world.progress)
    world.handled.entries.clear()  # as if there were no index
    world.clock.advance(BEYOND_THE_WINDOW)
    await world.create(chat)
    await world.handlers.handle(reuse, world.progress)
    assert outcomes(world, chat, reuse.command_id) == ["reused", "reused"]
    assert world.store.duplicate_window == timedelta(seconds=600)
