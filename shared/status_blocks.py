"""Status blocks: what each process publishes about itself in the `sandbox_status` bucket
(`reaper.<id>`, `runtime.<node_id>.<pid>`), and the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

import prometheus_client

from shared.contracts import encode

log = logging.getLogger(__name__)
# How long a stopping process spends on its last status block.
FINAL_WRITE_SECONDS = 2.0


async def publish_periodically(
    put: Callable[[bytes], Awaitable[object]], build: Callable[[], object], interval: float, stopping: asyncio.Event
) -> None:
    """Write `build()` every `interval` seconds (and once more on the way out, for at most
    FINAL_WRITE_SECONDS: with NATS gone a stop must not wait out its time-outs); never raises."""
    while True:
        final = stopping.is_set()
        try:
            if final:
                await asyncio.wait_for(put(encode(build())), FINAL_WRITE_SECONDS)
            else:
                await put(encode(build()))
        except Exception as exc:  # noqa: BLE001 - a status block is best effort
            log.warning("status block not written: %s", exc)
        if stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)


@contextlib.contextmanager
def prometheus_endpoint(host: str, port: int) -> Iterator[int | None]:
    """Serve the Prometheus text format on host:port (port 0: not at all); the port."""
    if port == 0:
        yield None
        return
    server, thread = prometheus_client.start_http_server(port, addr=host)
    try:
        yield port
    finally:
        server.shutdown()
        thread.join(timeout=5)
