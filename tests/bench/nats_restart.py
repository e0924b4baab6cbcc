"""BENCH ONLY: `uv run python -m tests.bench.nats_restart` measures how the HTTP facade rides
through nats-server restarts (kill -9, same store and port, down `BENCH_OUTAGE` seconds,
default 3.5) under a steady HTTP load (`BENCH_WORKERS` clients, default 8, each alternating a
create-that-reuses and a keepalive on its own chat), `BENCH_RESTARTS` times (default 5).

Real processes: nats-server 2.14, an API and a runtime with the bench-only BenchNullDriver
(no Docker: the figures are about NATS and the API). Printed per restart and over all:
- first 2xx: from the server being back to the first 2xx answer (target <= 2 s);
- API reconnected: from the server being back to the API's "nats reconnected" log line;
- in flight: requests sent before the kill and answered after it, and when the last of them
  was answered (from the server being back);
- answer lag: for those, the time from their outcome being stored (the stream's timestamp)
  to the HTTP answer (target <= 1 s);
- 503s while down and anything else that is not a 2xx (should be none).
Nothing is asserted; tests/integration/test_nats_restart.py judges the behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import nats
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from shared.config import StreamSettings
from shared.subjects import EVENT_SUBJECTS, EVENTS_STREAM
from shared.topology import ensure_topology
from tests.support.http_load import Call, HttpLoad
from tests.support.nats_server import NatsServer, free_port
from tests.support.processes import api_base, make_sandbox_dirs, sandboxd_env, spawn, stop, until_ready

TOKEN = "bench-" + uuid.uuid4().hex
OUTCOMES = {"running", "reused", "extended", "stopped", "failed", "rejected"}


@dataclass(frozen=True, slots=True)
class Stored:
    chat: str
    type: str
    at: float  # the stream's timestamp (wall clock)


async def stored_outcomes(url: str) -> list[Stored]:
    nc = await nats.connect(url)
    out: list[Stored] = []
    done = asyncio.Event()
    last = (await nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq

    async def on_msg(msg: Msg) -> None:
        event = json.loads(msg.data)
        if event.get("type") in OUTCOMES:
            out.append(Stored(event["chat_id"], event["type"], msg.metadata.timestamp.timestamp()))
        if msg.metadata.sequence.stream >= last:
            done.set()

    sub = await nc.jetstream().subscribe(
        EVENT_SUBJECTS, stream=EVENTS_STREAM, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    await asyncio.wait_for(done.wait(), 60)
    await sub.unsubscribe()
    await nc.close()
    return out


def logged_at(log: Path, message: str, after: float) -> float | None:
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == message:
                at = datetime.fromisoformat(entry["ts"]).timestamp()
                if at > after:
                    return at
    return None


def answer_lags(calls: list[Call], stored: list[Stored]) -> list[float]:
    """For each call, the time from its outcome being stored to its answer: each worker's
    calls on its chat are sequential, so the call's outcome is the one stored while it ran."""
    lags = []
    for call in calls:
        mine = [s for s in stored if s.chat == call.chat and call.started <= s.at <= call.ended]
        if mine:
            lags.append(call.ended - mine[-1].at)
    return lags


async def one_restart(
    server: NatsServer, base: str, api_log: Path, chats: list[str], outage: float
) -> dict[str, float]:
    load = HttpLoad(base, TOKEN, chats)
    load.start()
    while len(load.answered()) < 4 * len(chats):
        await asyncio.sleep(0.05)
    killed = time.time()
    assert server.process is not None
    server.process.kill()
    server.process.wait()
    server.process = None
    await asyncio.sleep(outage)  # the outage itself
    server.start()
    back = time.time()
    while len(load.answered(since=back)) < 8 * len(chats) and time.time() - back < 60:
        await asyncio.sleep(0.05)
    await load.stop()
    calls = load.calls
    after = [c for c in calls if c.status in (200, 201) and c.ended > back]
    across = [c for c in calls if c.started < killed < c.ended]
    other = [c for c in calls if c.status not in (200, 201, 503)]
    stored = await stored_outcomes(server.url)
    lags = answer_lags([c for c in across if c.status in (200, 201)], stored)
    reconnected = logged_at(api_log, "nats reconnected", killed)
    return {
        "down_s": back - killed,
        "api_reconnected_s": (reconnected - back) if reconnected else float("nan"),
        "first_2xx_s": min(c.ended for c in after) - back if after else float("nan"),
        "in_flight": len(across),
        "in_flight_last_answer_s": max(c.ended for c in across) - back if across else float("nan"),
        "answer_lag_max_s": max(lags) if lags else float("nan"),
        "answered_503": len([c for c in calls if c.status == 503]),
        "other_than_2xx_or_503": len(other),
        "requests": len(calls),
        "latency_max_s": max(c.ended - c.started for c in calls),
    }


async def main() -> None:
    workers = int(os.environ.get("BENCH_WORKERS", "8"))
    restarts = int(os.environ.get("BENCH_RESTARTS", "5"))
    outage = float(os.environ.get("BENCH_OUTAGE", "3.5"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_sandbox_dirs(root)
        server = NatsServer(free_port(), root / "nats")
        server.start()
        env = sandboxd_env(
            server.url,
            root,
            "bench-restart",
            TOKEN,
            SANDBOXD_RUNTIME_ACK_WAIT_SECONDS="2",
            SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
        )
        nc = await nats.connect(server.url)
        await ensure_topology(nc.jetstream(), StreamSettings())
        await nc.close()
        runtime = spawn("tests.bench.runtime_main", env, root / "runtime.log")
        api = spawn("services.api", env, root / "api.log")
        try:
            base = api_base(api)
            await until_ready(base)
            chats = [str(uuid.uuid4()) for _ in range(workers)]
            async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=60) as http:
                for chat in chats:
                    (await http.post("/api/v1/sandboxes", json={"chat_id": chat})).raise_for_status()
            runs = []
            for i in range(restarts):
                figures = await one_restart(server, base, root / "api.log", chats, outage)
                runs.append(figures)
                print(f"restart {i + 1}: " + ", ".join(f"{k}={v:.2f}" for k, v in figures.items()), flush=True)
            for key in ("first_2xx_s", "in_flight_last_answer_s", "answer_lag_max_s", "api_reconnected_s"):
                values = [r[key] for r in runs]
                print(f"{key}: median {statistics.median(values):.2f}, max {max(values):.2f}")
        finally:
            stop(api)
            stop(runtime)
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
