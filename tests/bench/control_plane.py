"""BENCH ONLY: the control plane on one nats-server (the bench-only BenchNullDriver: no
Docker), as a section of `just bench` or alone: `uv run python -m tests.bench.control_plane`.

- Throughput: creates+stops per second through 1 and 2 runtime processes, each beside the
  mean of the raw JetStream publish_async rates on the same server measured right before and
  right after it (this machine's speed drifts from minute to minute), and the CPU one command
  costs the runtime and the nats-server beside what one raw publish costs the publishing
  client and the server.
- Projector lag: a burst of BENCH_LAG_SESSIONS creates (default 10,000) published at once
  to one runtime. The registry (`sandbox_sessions`, read through a watch of the bucket's
  subjects) is sampled beside the outcomes (an ordered consumer on the event stream) every
  100 ms: how far the registry trailed the outcomes during the burst, how many sessions it
  held when the last outcome came, and how long after the last outcome it held every one of
  them as running.

Sizes: BENCH_CP (commands per kind, default 2000), BENCH_LAG_SESSIONS. Nothing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from shared.config import StreamSettings
from shared.subjects import EVENTS_STREAM, SESSIONS_BUCKET, ConsumerName, command_subject
from shared.topology import ensure_topology
from tests.bench.harness import (
    TOKEN,
    Report,
    control_plane,
    new_report,
    raw_publish,
    runtimes_alive,
    subscribe_outcomes,
)
from tests.support.nats_server import nats_server
from tests.support.processes import make_sandbox_dirs, sandboxd_env, spawn, stop

_SAMPLE_SECONDS = 0.1
_KV_PREFIX = f"$KV.{SESSIONS_BUCKET}."


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass
class RegistryView:
    """The registry's keys of the burst's chats as a watch sees them: how many hold a
    running record, and when the count last changed."""

    chats: set[str]
    status: dict[str, str] = field(default_factory=dict)
    running: int = 0
    changed_at: float = 0.0

    async def on_msg(self, msg: Msg) -> None:
        chat = msg.subject.removeprefix(_KV_PREFIX)
        if chat not in self.chats:
            return
        op = (msg.headers or {}).get("KV-Operation")
        status = "" if op in ("DEL", "PURGE") or not msg.data else str(json.loads(msg.data).get("status", ""))
        before = self.status.get(chat, "")
        self.status[chat] = status
        if (before == "running") != (status == "running"):
            self.running += 1 if status == "running" else -1
            self.changed_at = time.perf_counter()


async def projector_idle(js: JetStreamContext, timeout: float = 120.0) -> None:
    """Until the projector's durable consumer has nothing pending or unacknowledged."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(EVENTS_STREAM, ConsumerName.PROJECTOR)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"projector still has {info.num_pending} pending events")
        await asyncio.sleep(0.1)


async def projector_lag(report: Report, nats_url: str, root: Path, sessions: int) -> dict[str, object]:
    env = sandboxd_env(
        nats_url,
        root,
        "bench-lag",
        TOKEN,
        SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
        SANDBOXD_RUNTIME_MAX_IN_FLIGHT="256",
        SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
    )
    proc = spawn("tests.bench.runtime_main", env, root / "bench-lag-runtime.log")
    nc = await nats.connect(servers=nats_url.split(","))
    samples: list[tuple[float, int, int]] = []
    try:
        js = nc.jetstream()
        chats = [str(uuid.uuid4()) for _ in range(sessions)]
        outcomes = await subscribe_outcomes(nc)
        registry = RegistryView(set(chats))
        await runtimes_alive(nc, "bench-lag", 1)
        await js.subscribe(
            f"{_KV_PREFIX}>",
            cb=registry.on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        await asyncio.sleep(0.5)  # the runtime's consumers attach right after its first heartbeat
        await projector_idle(js)  # what earlier sections left behind is not this burst's lag
        base = outcomes.count

        async def sample() -> None:
            while True:
                samples.append((time.perf_counter(), outcomes.count - base, registry.running))
                await asyncio.sleep(_SAMPLE_SECONDS)

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        for i, chat in enumerate(chats):
            command_id = str(uuid.uuid4())
            body = json.dumps({"command_id": command_id, "chat_id": chat, "ttl_seconds": 3600}).encode()
            _ = await js.publish_async(command_subject("create", chat), body, headers={"Nats-Msg-Id": command_id})
            if i % 500 == 0:
                await js.publish_async_completed()
        await js.publish_async_completed()
        await outcomes.wait_count(base + sessions)
        last_outcome = max(at for event, at in outcomes.events if event.get("chat_id") in registry.chats)
        at_last_outcome = registry.running
        deadline = time.monotonic() + 120
        while registry.running < sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        complete = registry.running >= sessions
        catch_up = max(registry.changed_at - last_outcome, 0.0) if complete else float("nan")
        sampler.cancel()
        burst = last_outcome - started
    finally:
        await nc.close()
        stop(proc)
    during = [(o, r) for t, o, r in samples if t <= last_outcome and o > 0]
    worst = max(during, key=lambda s: s[0] - s[1], default=(0, 0))
    figures: dict[str, object] = {
        "sessions": sessions,
        "burst_seconds": burst,
        "registry_at_last_outcome": at_last_outcome,
        "largest_lag_during_burst": {"outcomes": worst[0], "registry": worst[1]},
        "registry_complete_after_last_outcome_s": catch_up,
        "samples": [{"t": t - started, "outcomes": o, "registry": r} for t, o, r in samples],
    }
    report.row(
        f"projector: registry at the last of {sessions:,} outcomes",
        f"{at_last_outcome:,}",
        f"{sessions:,}",
        f"{at_last_outcome / sessions:.3f}",
    )
    report.row(
        "projector: largest lag during the burst (registry/outcomes)",
        f"{worst[1]:,}",
        f"{worst[0]:,}",
        f"{worst[1] / worst[0]:.3f}" if worst[0] else "",
    )
    report.row(
        "projector: registry complete after the last outcome",
        f"{catch_up:.2f} s" if complete else f"{registry.running:,} after 120 s",
        "",
        "",
        "<= 1 s",
    )
    return figures


async def control_plane_section(report: Report, nats_url: str, root: Path, server_pid: int | None = None) -> None:
    """Throughput with 1 and 2 runtimes, each beside the mean of the raw publish_async rates
    measured right before and right after it (the machine's speed drifts between minutes),
    and what a command costs in CPU beside what a raw publish does; then the projector lag."""
    count = _int("BENCH_CP", 2000)
    raws = [await raw_publish(nats_url, 20000, server_pid=server_pid)]
    one = await control_plane(report, nats_url, root, 1, count, server_pid)
    raws.append(await raw_publish(nats_url, 20000, server_pid=server_pid))
    two = await control_plane(report, nats_url, root, 2, count, server_pid)
    raws.append(await raw_publish(nats_url, 20000, server_pid=server_pid))
    floor_one = (raws[0].async_per_s + raws[1].async_per_s) / 2
    floor_two = (raws[1].async_per_s + raws[2].async_per_s) / 2
    raw_client_ms = statistics.median(r.client_cpu_ms for r in raws)
    server_ms = [r.server_cpu_ms for r in raws if r.server_cpu_ms is not None]
    raw_server_ms = statistics.median(server_ms) if server_ms else None
    report.figures["control_plane"] = {
        "commands": 2 * count,
        "one_runtime_per_s": one.per_s,
        "two_runtimes_per_s": two.per_s,
        "raw_publish_async_per_s": [r.async_per_s for r in raws],
        "raw_publish_sequential_per_s": [r.sequential_per_s for r in raws],
        "floor_one_per_s": floor_one,
        "floor_two_per_s": floor_two,
        "cpu_ms_per_command": {
            "one_runtime": {"runtime": one.runtime_cpu_ms, "nats_server": one.server_cpu_ms},
            "two_runtimes": {"runtimes": two.runtime_cpu_ms, "nats_server": two.server_cpu_ms},
        },
        "raw_publish_cpu_ms_per_message": {"client": raw_client_ms, "nats_server": raw_server_ms},
    }
    report.row(
        "control plane creates+stops/s, 1 runtime (no Docker)",
        f"{one.per_s:,.0f}",
        f"{floor_one:,.0f}",
        f"{one.per_s / floor_one:.3f}",
        ">= 0.08x",
    )
    report.row(
        "control plane creates+stops/s, 2 runtimes (no Docker)",
        f"{two.per_s:,.0f}",
        f"{floor_two:,.0f}",
        f"{two.per_s / floor_two:.3f}",
    )
    report.row(
        "  floor: raw publish_async before / between / after", "", " / ".join(f"{r.async_per_s:,.0f}" for r in raws)
    )
    report.row(
        "  floor: JetStream publish+ack, sequential",
        "",
        f"{statistics.median(r.sequential_per_s for r in raws):,.0f}/s",
    )
    report.row(
        "  CPU per command, 1 runtime: the runtime vs a raw publish's client",
        f"{one.runtime_cpu_ms:.3f} ms",
        f"{raw_client_ms:.3f} ms",
        f"{one.runtime_cpu_ms / raw_client_ms:.1f}",
    )
    if one.server_cpu_ms is not None and raw_server_ms:
        report.row(
            "  CPU per command, 1 runtime: nats-server vs a raw publish",
            f"{one.server_cpu_ms:.3f} ms",
            f"{raw_server_ms:.3f} ms",
            f"{one.server_cpu_ms / raw_server_ms:.1f}",
        )
    report.figures["projector_lag"] = await projector_lag(report, nats_url, root, _int("BENCH_LAG_SESSIONS", 10000))


async def main() -> None:
    report = new_report()
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-cp-") as tmp, nats_server(Path(tmp) / "nats") as server:
        root = make_sandbox_dirs(Path(tmp))
        nc = await nats.connect(server.url)
        await ensure_topology(nc.jetstream(), StreamSettings())
        await nc.close()
        await control_plane_section(report, server.url, root, server.process.pid if server.process else None)
    out = Path(os.environ.get("BENCH_OUT", "bench-results")) / f"control-plane-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(msgspec.to_builtins(report.figures), indent=2) + "\n")
    print(f"\nresults written to {out}")


if __name__ == "__main__":
    asyncio.run(main())
