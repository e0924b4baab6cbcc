"""Attack and fuzz tests against the real API, runtime, nats-server and Docker engine.

HTTP: over 2,000 hypothesis-generated requests to every route (odd methods, missing and
wrong tokens, UUIDs in every spelling, garbage and percent-encoded junk in paths and
queries, bodies of the wrong shape, type and encoding, deep nesting, random bytes, wrong
content types). No answer may be a 5xx, every 4xx is JSON with a `detail`, statuses stay
within what the contract allows where it says, and the API still works afterwards.

NATS: over 500 generated malformed commands published straight to `SANDBOX_COMMANDS`. Each
gets exactly one `rejected` event (on its own chat, or on `sandbox.events.invalid` when the
subject names no chat), the work queue ends empty with nothing pending or redelivered, and
a valid create afterwards still runs.

A failing run names its hypothesis seed; `FUZZ_SEED=<seed>` replays it. Every offending
request is in the failure message and, in full, in `<tmp_path>/http-fuzz-offenders.txt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import nats
import pytest
from hypothesis import HealthCheck, Phase, given
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from services.runtime.service import RuntimeHandle
from shared.config import Settings
from shared.subjects import COMMANDS_STREAM, EVENTS_STREAM, ConsumerName
from tests.conftest import TEST_TOKEN, settings_for
from tests.support.api_server import serving_api
from tests.support.fuzz import (
    CMD_PH,
    BadCommand,
    HttpFuzzer,
    bad_command,
    deadline_loop,
    http_cases,
    materialize,
    regression_cases,
    rejection_problems,
)
from tests.support.nats_server import NatsServer
from tests.support.processes import make_sandbox_dirs

pytestmark = [
    pytest.mark.integration,
    # The runtime and the API run in the event loop's thread while hypothesis generates in
    # another; hypothesis notices the global `random` state moving under it (nats-py, uvicorn).
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"),
]

HTTP_REQUESTS = 2_200  # at least 2,000 are asserted
NATS_COMMANDS = 600  # at least 500 are asserted
SHARED_CHATS = 3
POOL_SIZE = 5


def fuzz_seed() -> int:
    given_seed = os.environ.get("FUZZ_SEED")
    return int(given_seed) if given_seed else secrets.randbits(32)


@pytest.fixture
def settings(nats: NatsServer, tmp_path: Path, node_id: str) -> Settings:
    """As the shared fixture, but a create that takes longer than 2 s answers 202."""
    make_sandbox_dirs(tmp_path)
    return settings_for(nats.url, tmp_path, node_id, SANDBOXD_API_WAIT_SECONDS="2")


def run_generated(strategy: hypothesis.strategies.SearchStrategy[Any], examples: int, seed: int, sink: Any) -> None:
    """Feed `examples` values drawn by hypothesis to `sink` (generation only: no shrinking,
    no example database; `sink` never raises, so every example runs)."""

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def one(value: Any) -> None:
        sink(value)

    one()


# --------------------------------------------------------------------------- HTTP


def http_fuzz(fuzzer: HttpFuzzer, pool: list[str], target: int, seed: int) -> None:
    strategy = http_cases(pool, TEST_TOKEN)
    try:
        for case in regression_cases(TEST_TOKEN):
            fuzzer.submit(case)
        for batch in range(10):
            if fuzzer.sent >= target:
                break
            run_generated(strategy, max(target - fuzzer.sent, 200), seed + batch, fuzzer.submit)
    finally:
        fuzzer.close()


async def test_http_fuzz_never_answers_5xx(
    settings: Settings, runtime: RuntimeHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seed = fuzz_seed()
    caplog.set_level(logging.WARNING, logger="httpx")  # one INFO line per request otherwise
    pool = [str(uuid.uuid4()) for _ in range(POOL_SIZE)]
    started = time.monotonic()
    async with serving_api(settings) as base_url:
        fuzzer = HttpFuzzer(base_url, pool)
        # Hypothesis generates in a worker thread and synchronous clients send from a few
        # more; the API and the runtime keep running in this test's event loop.
        await asyncio.to_thread(http_fuzz, fuzzer, pool, HTTP_REQUESTS, seed)
        fuzz_seconds = time.monotonic() - started

        async with httpx.AsyncClient(base_url=base_url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http:
            health = await http.get("/api/v1/health")
            chat = str(uuid.uuid4())
            created = await http.post("/api/v1/sandboxes", json={"chat_id": chat})
            got = await http.get(f"/api/v1/sandboxes/{chat}")
            stopped = await http.delete(f"/api/v1/sandboxes/{chat}")

    stats = {
        "seed": seed,
        "sent": fuzzer.sent,
        "repeats_skipped": fuzzer.repeats,
        "fuzz_seconds": round(fuzz_seconds, 1),
        "by_status": dict(sorted(fuzzer.by_status.items())),
        "by_label": dict(sorted(fuzzer.by_label.items())),
        "offenders": len(fuzzer.offenders),
    }
    (tmp_path / "http-fuzz-stats.json").write_text(json.dumps(stats, indent=2))
    report = tmp_path / "http-fuzz-offenders.txt"
    report.write_text("\n".join(o.describe() for o in fuzzer.offenders))
    if fuzzer.offenders:
        kinds = Counter(o.why for o in fuzzer.offenders)
        pytest.fail(
            f"FUZZ_SEED={seed}: {len(fuzzer.offenders)} of {fuzzer.sent} requests broke the contract "
            f"({dict(kinds)}); all of them (also in {report}):\n" + "\n".join(o.describe() for o in fuzzer.offenders),
            pytrace=False,
        )
    assert fuzzer.sent >= 2_000, stats
    assert health.status_code == 200, health.text
    assert health.json() == {"status": "ok"}
    assert created.status_code == 201, created.text
    assert got.status_code == 200, got.text
    assert got.json()["session_id"] == created.json()["session_id"]
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped"


# --------------------------------------------------------------------------- NATS


@dataclass
class EventLog:
    """Every event the stream stored since the test began (a stream consumer, not core)."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    undecodable: list[tuple[str, bytes]] = field(default_factory=list)

    async def on_msg(self, msg: Msg) -> None:
        try:
            self.events.append((msg.subject, json.loads(msg.data)))
        except ValueError:
            self.undecodable.append((msg.subject, msg.data))

    def caused_by(self, command_id: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e.get("causation_id") == command_id]


@contextlib.asynccontextmanager
async def watching(settings: Settings) -> AsyncIterator[tuple[Client, EventLog]]:
    nc = await nats.connect(settings.nats.url or "")
    log = EventLog()
    sub = await nc.jetstream().subscribe(
        "sandbox.events.>", cb=log.on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        yield nc, log
    finally:
        await sub.unsubscribe()
        await nc.close()


def generate_bad_commands(count: int, seed: int) -> list[BadCommand]:
    """`count` distinct malformed commands (hypothesis repeats itself; repeats are dropped)."""
    out: dict[BadCommand, None] = {}

    def keep(bad: BadCommand) -> None:
        if len(out) < count:
            out[bad] = None

    for batch in range(10):
        if len(out) >= count:
            break
        run_generated(bad_command(), max(count - len(out), 100), seed + batch, keep)
    return list(out)


@dataclass
class QueueState:
    stored_commands: int
    pending: int
    ack_pending: int
    redelivered: int
    stored_events: int

    @property
    def settled(self) -> bool:
        return self.stored_commands == 0 and self.pending == 0 and self.ack_pending == 0


async def queue_state(nc: Client) -> QueueState:
    js = nc.jetstream()
    commands = await js.stream_info(COMMANDS_STREAM)
    consumer = await js.consumer_info(COMMANDS_STREAM, ConsumerName.RUNTIME)
    events = await js.stream_info(EVENTS_STREAM)
    return QueueState(
        stored_commands=commands.state.messages,
        pending=consumer.num_pending or 0,
        ack_pending=consumer.num_ack_pending or 0,
        redelivered=consumer.num_redelivered or 0,
        stored_events=events.state.messages,
    )


async def test_nats_fuzz_rejects_each_malformed_command_once(
    settings: Settings, runtime: RuntimeHandle, tmp_path: Path
) -> None:
    seed = fuzz_seed()
    bad = await asyncio.to_thread(generate_bad_commands, NATS_COMMANDS, seed)
    # Most commands get a chat of their own; some share one of a few chats (their rejections
    # then race for the same subject), told apart by their command ids.
    shared = [str(uuid.uuid4()) for _ in range(SHARED_CHATS)]
    sharable = [b for b in bad if b.names_chat and b.causation == CMD_PH]
    sharing = {id(b): shared[i % SHARED_CHATS] for i, b in enumerate(sharable[::3])}
    published = [materialize(b, sharing.get(id(b))) for b in bad]
    on_chats = [p for p in published if p.chat is not None]
    on_invalid = [p for p in published if p.chat is None]
    categories = Counter(p.command.category for p in published)
    assert len(published) >= 500, categories
    assert set(categories) == {
        "payload",
        "bad_command_id",
        "missing_ids",
        "mismatch",
        "unknown_kind",
        "bad_subject",
    }, categories

    async with watching(settings) as (nc, log):
        js = nc.jetstream()
        for p in published:
            headers = {"Nats-Msg-Id": f"fuzz-{uuid.uuid4()}"}
            if p.command.traceparent is not None:
                headers["traceparent"] = p.command.traceparent.decode("latin-1")
            ack = await js.publish(p.subject, p.payload, headers=headers)
            assert ack.stream == COMMANDS_STREAM, (p.describe(), ack)

        # Settled: the work queue is empty and the consumer holds nothing; then the log has
        # caught up with every event the stream stored.
        state = await queue_state(nc)
        more = deadline_loop(60)
        while more() and not (state.settled and len(log.events) + len(log.undecodable) >= state.stored_events):
            await asyncio.sleep(0.05)
            state = await queue_state(nc)
        assert state.settled, f"FUZZ_SEED={seed}: the work queue did not settle: {state}"
        assert len(log.events) + len(log.undecodable) == state.stored_events, (state, len(log.events))

        info = await js.stream_info(EVENTS_STREAM, subjects_filter="sandbox.events.>")
        per_subject: dict[str, int] = dict(info.state.subjects or {})

        # A valid create afterwards still gets its outcome.
        chat, command_id = str(uuid.uuid4()), str(uuid.uuid4())
        await js.publish(
            f"sandbox.cmd.create.{chat}",
            json.dumps({"command_id": command_id, "chat_id": chat}).encode(),
            headers={"Nats-Msg-Id": command_id},
        )
        more = deadline_loop(30)
        while more() and not [e for e in log.caused_by(command_id) if e["type"] != "provisioning"]:
            await asyncio.sleep(0.02)
        outcome = [e for e in log.caused_by(command_id) if e["type"] != "provisioning"]
        final = await queue_state(nc)
        more = deadline_loop(10)
        while more() and not final.settled:  # the ack follows the outcome
            await asyncio.sleep(0.02)
            final = await queue_state(nc)

    stats = {
        "seed": seed,
        "published": len(published),
        "distinct_payloads": len({p.command.payload for p in published}),
        "on_chats": len(on_chats),
        "on_invalid": len(on_invalid),
        "on_shared_chats": sum(p.chat in shared for p in published),
        "categories": dict(categories),
        "reasons": dict(Counter(str(e.get("reason")) for _, e in log.events)),
        "settled": str(state),
    }
    (tmp_path / "nats-fuzz-stats.json").write_text(json.dumps(stats, indent=2))
    problems = rejection_problems(published, log.events, per_subject)
    if log.undecodable:
        problems.append(f"events that are not JSON: {log.undecodable[:5]}")

    if problems:
        pytest.fail(
            f"FUZZ_SEED={seed}: {len(problems)} problem(s) with {len(published)} malformed commands "
            f"({dict(categories)}):\n" + "\n".join(problems),
            pytrace=False,
        )
    assert state.redelivered == 0, state
    assert [e["type"] for e in outcome] == ["running"], outcome
    assert outcome[0]["result"] == "created"
    assert final.settled, final
    assert final.redelivered == 0, final
