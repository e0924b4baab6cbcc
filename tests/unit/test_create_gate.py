"""The create gate: at most `limit` at once, a session's create before a waiting refill,
first come first served within each, and no place lost to a cancelled waiter."""

from __future__ import annotations

import asyncio

import pytest

from services.runtime.create_gate import CreateGate


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_no_more_than_the_limit_hold_a_place_at_once() -> None:
    gate = CreateGate(2)
    holding = 0
    most = 0

    async def create() -> None:
        nonlocal holding, most
        async with gate.turn():
            holding += 1
            most = max(most, holding)
            await asyncio.sleep(0.001)
            holding -= 1

    await asyncio.gather(*(create() for _ in range(10)))
    assert most == 2
    assert gate.running == 0
    assert gate.waiting == 0


async def test_a_waiting_session_goes_before_a_refill_that_waited_longer() -> None:
    gate = CreateGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.turn():
            await release.wait()

    async def create(name: str, *, refill: bool) -> None:
        async with gate.turn(refill=refill):
            order.append(name)

    holder = asyncio.create_task(hold())
    await settle()
    waiters = [asyncio.create_task(create("refill-1", refill=True))]
    await settle()
    waiters.append(asyncio.create_task(create("refill-2", refill=True)))
    await settle()
    waiters.append(asyncio.create_task(create("session-1", refill=False)))
    await settle()
    waiters.append(asyncio.create_task(create("session-2", refill=False)))
    await settle()
    assert gate.waiting == 4
    release.set()
    await asyncio.gather(holder, *waiters)
    assert order == ["session-1", "session-2", "refill-1", "refill-2"]


async def test_a_cancelled_waiter_gives_up_its_turn_and_loses_no_place() -> None:
    gate = CreateGate(1)
    release = asyncio.Event()
    got: list[str] = []

    async def create(name: str) -> None:
        async with gate.turn():
            got.append(name)
            await release.wait()

    first = asyncio.create_task(create("first"))
    await settle()
    cancelled = asyncio.create_task(create("cancelled"))
    later = asyncio.create_task(create("later"))
    await settle()
    cancelled.cancel()
    await settle()
    assert gate.waiting == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(first, later), 5)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert got == ["first", "later"]
    assert gate.running == 0


async def test_a_waiter_cancelled_as_it_is_given_the_place_passes_it_on() -> None:
    gate = CreateGate(1)
    got: list[str] = []

    async def create(name: str) -> None:
        async with gate.turn():
            got.append(name)

    holding = gate.turn()
    await holding.__aenter__()
    given = asyncio.create_task(create("given"))
    later = asyncio.create_task(create("later"))
    await settle()
    await holding.__aexit__(None, None, None)  # gives "given" the place; it has not run yet
    assert gate.running == 1
    given.cancel()
    await asyncio.wait_for(later, 5)  # not forever: a place kept by the cancelled waiter
    with pytest.raises(asyncio.CancelledError):
        await given
    assert got == ["later"]
    assert gate.running == 0
    async with gate.turn():  # the place is free again
        assert gate.running == 1


def test_a_gate_needs_a_place() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CreateGate(0)
