"""Paged lists at scale: `uv run python -m tests.bench.list_index [N]` (default 100,000).

1. In process: N records into a SessionIndex, the build, its memory (tracemalloc), the
   latency of pages (unfiltered, by cursor, by label, label and status, a rare combination,
   limit 1000) and of single updates once built.
2. Against a real nats-server: N records written into `sandbox_sessions`, the time the API
   takes to start with them (its index's initial load), and `GET /api/v1/sandboxes` over
   HTTP (p50 of 50 requests, one client).
Figures are printed, nothing is asserted.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import httpx
import nats

from services.api.session_index import SessionIndex, SessionQuery, decode_cursor
from shared.contracts import SessionRecord, SessionStatus, decode_record, encode
from shared.subjects import SESSIONS_BUCKET
from shared.topology import ensure_topology
from tests.conftest import TEST_TOKEN, settings_for
from tests.support.api_server import serving_api
from tests.support.nats_server import nats_server
from tests.support.processes import make_sandbox_dirs
from tests.support.records import session_record


def population(n: int) -> list[SessionRecord]:
    out = []
    for i in range(n):
        labels = {"team": f"t{i % 10}", "user": f"u{i % 1000}"}
        if i % 5 == 0:
            labels["tier"] = "gold"
        status = SessionStatus.PROVISIONING if i % 50 == 0 else SessionStatus.RUNNING
        out.append(session_record(status=status, labels=labels))
    return out


def timed_ms(fn: Callable[[], object], repeat: int = 50) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def in_process(records: list[SessionRecord]) -> None:
    encoded = [encode(r) for r in records]  # the index holds records decoded from the bucket
    tracemalloc.start()
    started = time.perf_counter()
    index = SessionIndex()
    for raw in encoded:
        index.put(decode_record(raw))
    loaded = time.perf_counter()
    index.build()
    built = time.perf_counter()
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    n = len(records)
    load_ms, build_ms = 1000 * (loaded - started), 1000 * (built - loaded)
    print(f"in process, {n} records (under tracemalloc): decode + put {load_ms:.0f} ms, build {build_ms:.0f} ms")
    print(f"  memory of the decoded records + index: {memory / 2**20:.0f} MiB ({memory / n:.0f} B per session)")
    middle = sorted(r.chat_id for r in records)[n // 2]
    cases = {
        "first page, limit 100": (SessionQuery(), 100, None),
        "a middle page by cursor, limit 100": (SessionQuery(), 100, middle),
        "label team (10%), limit 100": (SessionQuery(labels=(("team", "t3"),)), 100, None),
        "label user (0.1%), limit 100": (SessionQuery(labels=(("user", "u7"),)), 100, None),
        "status provisioning (2%) + tier gold, limit 100": (
            SessionQuery(status=SessionStatus.PROVISIONING, labels=(("tier", "gold"),)),
            100,
            None,
        ),
        "team t3 + tier gold (no match: walks team t3, 10%)": (
            SessionQuery(labels=(("team", "t3"), ("tier", "gold"))),
            100,
            None,
        ),
        "first page, limit 1000": (SessionQuery(), 1000, None),
    }
    for what, (query, limit, after) in cases.items():
        ms = timed_ms(lambda q=query, lim=limit, a=after: index.page(q, limit=lim, after=a))  # type: ignore[misc]
        print(f"  page: {what}: p50 {ms:.3f} ms")
    fresh = [session_record(labels={"team": "t1", "user": "u1"}) for _ in range(200)]
    started = time.perf_counter()
    for record in fresh:
        index.put(record)
    for record in fresh:
        index.remove(record.chat_id)
    per_update = (time.perf_counter() - started) * 1000 / (2 * len(fresh))
    print(f"  an update once built (insert or remove, 3 postings): {per_update:.3f} ms")
    page = index.page(SessionQuery(), limit=1000)
    pages = 1
    started = time.perf_counter()
    while page.next_cursor is not None:
        page = index.page(SessionQuery(), limit=1000, after=decode_cursor(page.next_cursor))
        pages += 1
    print(f"  every page at limit 1000 ({pages} pages): {1000 * (time.perf_counter() - started):.0f} ms")


async def over_nats(records: list[SessionRecord]) -> None:
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        root = Path(tmp)
        make_sandbox_dirs(root)
        settings = settings_for(server.url, root, "bench-list")
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await ensure_topology(js, settings.streams)
        started = time.perf_counter()
        for at in range(0, len(records), 5000):
            for record in records[at : at + 5000]:
                _ = await js.publish_async(f"$KV.{SESSIONS_BUCKET}.{record.chat_id}", encode(record))
            await js.publish_async_completed()
        print(f"over NATS: {len(records)} records written in {time.perf_counter() - started:.1f} s")
        await nc.close()
        started = time.perf_counter()
        async with (
            serving_api(settings) as base,
            httpx.AsyncClient(base_url=base, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
        ):
            print(f"  API start-up with them (the index's initial load): {time.perf_counter() - started:.2f} s")
            queries: tuple[dict[str, str | int], ...] = (
                {"limit": 100},
                {"limit": 1000},
                {"label": "team:t3", "limit": 100},
            )
            for params in queries:
                samples = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    answer = await http.get("/api/v1/sandboxes", params=params)
                    samples.append((time.perf_counter() - t0) * 1000)
                    assert answer.status_code == 200, answer.text
                health = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    await http.get("/api/v1/health")
                    health.append((time.perf_counter() - t0) * 1000)
                print(
                    f"  GET /sandboxes {params}: p50 {statistics.median(samples):.1f} ms "
                    f"(GET /health p50 {statistics.median(health):.1f} ms)"
                )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    records = population(n)
    assert len({r.chat_id for r in records}) == n
    in_process(records)
    asyncio.run(over_nats(records))


if __name__ == "__main__":
    main()
