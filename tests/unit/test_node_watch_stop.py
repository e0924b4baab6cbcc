"""The node watch's pass in flight when the runtime stops: it gets a short grace, then is
cancelled (with NATS gone it would wait out its requests' time-outs and retries)."""

from __future__ import annotations

import asyncio

import pytest

from services.runtime.nodes import _unless_stopped
from tests.support.eventually import until


async def test_a_pass_that_hangs_is_cancelled_once_the_runtime_stops() -> None:
    stopping = asyncio.Event()
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    running = asyncio.create_task(_unless_stopped(hangs(), stopping))
    await asyncio.sleep(0.05)
    assert not running.done(), "no stop yet: the pass goes on"
    stopping.set()
    await until(running.done, what="the pass ended after the stop")
    assert running.result() is None
    assert cancelled.is_set()


async def test_a_pass_that_ends_gives_its_own_result_or_error() -> None:
    stopping = asyncio.Event()
    finished: list[str] = []

    async def ends() -> None:
        await asyncio.sleep(0)
        finished.append("done")

    async def fails() -> None:
        await asyncio.sleep(0)
        raise TimeoutError("a request timed out")

    await _unless_stopped(ends(), stopping)
    assert finished == ["done"]
    with pytest.raises(TimeoutError, match="timed out"):
        await _unless_stopped(fails(), stopping)
