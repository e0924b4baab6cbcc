"""Node capacity admission: the engine's listing, admissions in flight, and what changed
since the listing."""

from __future__ import annotations

import asyncio

from services.runtime.capacity import NodeCapacity, auto_limit
from shared.errors import DockerUnavailable


class Engine:
    def __init__(self) -> None:
        self.live: set[str] = set()
        self.listings = 0
        self.down = False

    async def list(self) -> set[str]:
        self.listings += 1
        await asyncio.sleep(0)
        if self.down:
            raise DockerUnavailable("engine down")
        return set(self.live)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_burst_lists_once_and_never_overshoots() -> None:
    engine, clock = Engine(), Clock()
    capacity = NodeCapacity(3, engine.list, max_age=1.0, monotonic=clock)
    admitted: list[str] = []

    async def create(session: str) -> None:
        async with capacity.admit(session) as refused:
            if refused is None:
                admitted.append(session)
                await asyncio.sleep(0)
                engine.live.add(session)  # the container now runs

    await asyncio.gather(*(create(f"s{i}") for i in range(10)))
    assert len(admitted) == 3
    assert engine.listings == 1
    # Admitted since the listing: still counted although the listing does not show them.
    async with capacity.admit("late") as refused:
        assert refused is not None
        assert "3 of at most 3" in refused.detail


async def test_a_removed_session_frees_its_place_before_the_next_listing() -> None:
    engine, clock = Engine(), Clock()
    engine.live = {"a", "b"}
    capacity = NodeCapacity(2, engine.list, max_age=60.0, monotonic=clock)
    async with capacity.admit("c") as refused:
        assert refused is not None
    engine.live.discard("a")
    capacity.removed("a")
    async with capacity.admit("c") as refused:
        assert refused is None


async def test_an_engine_that_cannot_list_does_not_block_admission() -> None:
    engine, clock = Engine(), Clock()
    engine.live = {"a"}
    capacity = NodeCapacity(2, engine.list, max_age=1.0, monotonic=clock)
    async with capacity.admit("b") as refused:
        assert refused is None
    engine.down = True
    clock.now += 5
    async with capacity.admit("c") as refused:  # the last listing and what came since still count
        assert refused is not None
    engine.live = set()
    async with capacity.admit("c") as refused:
        assert refused is not None, "nothing new is known while the engine is down"


def test_the_automatic_limit_fits_the_memory_limits_into_the_engines_memory() -> None:
    assert auto_limit(24 * 1024**3, "512m") == 48
    assert auto_limit(100 * 1024**2, "512m") == 1
