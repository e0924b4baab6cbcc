"""A process's status block is written periodically and once more on the way out, and that
last write never holds the stop when NATS does not answer."""

from __future__ import annotations

import asyncio

import pytest

from shared import status_blocks
from shared.status_blocks import publish_periodically
from tests.support.eventually import until


async def test_the_last_write_on_the_way_out_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status_blocks, "FINAL_WRITE_SECONDS", 0.05)
    written: list[bytes] = []
    stopping = asyncio.Event()

    async def put(data: bytes) -> None:
        if stopping.is_set():  # NATS went away: the request is never answered
            await asyncio.Event().wait()
        written.append(data)

    writer = asyncio.create_task(publish_periodically(put, lambda: {"n": len(written)}, 0.01, stopping))
    await until(lambda: len(written) >= 3, what="periodic writes")
    stopping.set()
    await until(writer.done, what="the writer stopped with its last write unanswered")
    assert writer.result() is None


async def test_the_last_write_on_the_way_out_is_made() -> None:
    written: list[bytes] = []
    stopping = asyncio.Event()

    async def put(data: bytes) -> None:
        written.append(data)

    writer = asyncio.create_task(publish_periodically(put, lambda: {"stopping": stopping.is_set()}, 60, stopping))
    await until(lambda: len(written) == 1, what="the first write")
    stopping.set()
    await writer
    assert written == [b'{"stopping":false}', b'{"stopping":true}']
