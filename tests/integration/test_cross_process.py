"""The cross-process guarantees, with real processes: three runtimes and two API processes
race on the same few chats (HTTP through both APIs and commands straight over NATS, all at
once), and still every chat has at most one container and one live session, and every
command exactly one outcome.

The per-chat lock of a runtime serialises commands only inside that process; across
processes only the optimistic concurrency of the event appends keeps the chats consistent,
so the test also proves, from the runtimes' own metrics, that appends really conflicted and
that every runtime took part.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import httpx
import nats as nats_client
import pytest
from nats.js import JetStreamContext

from shared.config import StreamSettings
from shared.contracts import (
    OUTCOME_TYPES,
    AnyEvent,
    CommandRejected,
    RejectReason,
    SandboxRunning,
    SandboxStopped,
    SessionRecord,
)
from shared.event_store import EventStore
from shared.subjects import (
    COMMANDS_STREAM,
    SESSIONS_BUCKET,
    STATUS_BUCKET,
    ConsumerName,
    command_subject,
)
from shared.topology import ensure_topology
from tests.support.eventually import eventually
from tests.support.nats_server import NatsServer
from tests.support.processes import (
    Child,
    api_base,
    make_sandbox_dirs,
    metric_total,
    sandboxd_env,
    spawn,
    stop,
    until_ready,
)

OUTCOMES = {t.__struct_config__.tag for t in OUTCOME_TYPES}
TOKEN = "cross-process-token"
RUNTIMES = 3
APIS = 2
CHATS = 3
HTTP_CREATES = 8  # per chat and lifetime, alternating over the API processes
RAW_CREATES = 16  # per chat and lifetime, published straight to sandbox.cmd.create.<chat>
RAW_STOPS = 2  # per chat, beside one DELETE through each API process
MIN_LIFETIMES, MAX_LIFETIMES = 2, 5  # of each chat: made, then stopped
# The runtime's counters as its Prometheus endpoint exports them.
APPEND_CONFLICTS = "sandbox_append_conflict_total"  # sandbox.append.conflict.total
CREATES_HANDLED = "sandbox_create_total"  # sandbox.create.total, once per create handled
# The API's counter of creates answered from the chat's last event (no command, no outcome).
FAST_PATH = "sandbox_api_reuse_fast_path_total"  # sandbox.api.reuse_fast_path.total


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_sandbox_dirs(tmp_path)
    return tmp_path


@dataclass
class Burst:
    """What one phase sent to one chat: the HTTP answers, the ids of the commands published
    straight over NATS, and the chat's last sequence before the phase."""

    after_seq: int
    answers: list[httpx.Response] = field(default_factory=list)
    raw: set[str] = field(default_factory=set)

    @property
    def commands(self) -> int:
        return len(self.answers) + len(self.raw)


async def publish_raw(js: JetStreamContext, kind: str, chat: str, count: int) -> set[str]:
    ids = {str(uuid.uuid4()) for _ in range(count)}
    await asyncio.gather(
        *(
            js.publish(
                command_subject(kind, chat),
                json.dumps({"command_id": command_id, "chat_id": chat}).encode(),
                headers={"Nats-Msg-Id": command_id},
            )
            for command_id in ids
        )
    )
    return ids


async def since(store: EventStore, chat: str, seq: int) -> list[AnyEvent]:
    return [s.event for s in await store.history(chat) if s.seq > seq]


def outcomes(events: list[AnyEvent]) -> list[AnyEvent]:
    return [e for e in events if e.type in OUTCOMES]


def kinds(events: list[AnyEvent]) -> list[str]:
    return [e.type for e in events]


async def every_outcome(store: EventStore, chat: str, burst: Burst) -> list[AnyEvent]:
    """The phase's events once every command of it has its outcome (the HTTP answers are in
    already; the raw commands are awaited here)."""

    async def without_outcome() -> set[str]:
        return burst.raw - {e.causation_id for e in outcomes(await since(store, chat, burst.after_seq))}

    await eventually(without_outcome, lambda ids: not ids, timeout=30, what=f"an outcome for every command on {chat}")
    return await since(store, chat, burst.after_seq)


def assert_one_outcome_each(events: list[AnyEvent], burst: Burst, *, reads: bool = False) -> list[AnyEvent]:
    """No command has two outcomes, and there are exactly as many as commands sent: every
    HTTP request was answered from its outcome, so each has one, and so has each raw one.
    `reads`: an HTTP create may also have been answered from the chat's last event (a running
    session is reused without a command), so without an outcome; the test body counts those
    from the APIs' metrics."""
    done = outcomes(events)
    causes = [e.causation_id for e in done]
    assert len(causes) == len(set(causes)), f"a command with two outcomes: {causes}"
    if reads:
        assert len(burst.raw) <= len(done) <= burst.commands, f"{len(done)} outcomes: {kinds(events)}"
    else:
        assert len(done) == burst.commands, f"{len(done)} outcomes for {burst.commands} commands: {kinds(events)}"
    assert burst.raw <= set(causes)
    return done


async def registry_holds(js: JetStreamContext, chat: str, want: str | None) -> None:
    kv = await js.key_value(SESSIONS_BUCKET)

    async def held() -> str | None:
        try:
            value = (await kv.get(chat)).value
        except nats_client.js.errors.KeyNotFoundError:
            return None
        record = json.loads(value or b"null")
        return record["session_id"] if record else None

    await eventually(held, lambda got: got == want, what=f"the registry holding {want} for {chat}")


def containers_of(client: docker.DockerClient, chat: str) -> list[str | None]:
    return [c.id for c in client.containers.list(all=True, filters={"label": f"sandboxd.chat_id={chat}"})]


@dataclass
class Census:
    """The most containers seen at once per chat, over `samples` listings."""

    most: dict[str, int] = field(default_factory=dict)
    samples: int = 0


@contextlib.asynccontextmanager
async def container_census(node_id: str) -> AsyncIterator[Census]:
    """List this node's containers all along, counting them per chat."""
    census = Census()
    done = asyncio.Event()
    client = docker.from_env()

    async def sample() -> None:
        while not done.is_set():
            # The low-level listing: the high-level one inspects each container afterwards,
            # and one removed meanwhile would fail the census.
            listed = await asyncio.to_thread(
                client.api.containers, all=True, filters={"label": f"sandboxd.node_id={node_id}"}
            )
            counts: dict[str, int] = {}
            for c in listed:
                chat = (c.get("Labels") or {}).get("sandboxd.chat_id", "")
                counts[chat] = counts.get(chat, 0) + 1
            for chat, n in counts.items():
                census.most[chat] = max(census.most.get(chat, 0), n)
            census.samples += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.1)

    task = asyncio.create_task(sample())
    try:
        yield census
    finally:
        done.set()
        await task
        client.close()


async def create_burst(
    http: httpx.AsyncClient, js: JetStreamContext, store: EventStore, apis: list[Child], chats: list[str]
) -> dict[str, Burst]:
    """Every chat at once: HTTP creates through every API process, raw NATS creates."""
    bursts = {chat: Burst((await store.read(chat)).seq) for chat in chats}

    async def post(chat: str, i: int) -> None:
        base = api_base(apis[i % len(apis)])
        bursts[chat].answers.append(await http.post(f"{base}/api/v1/sandboxes", json={"chat_id": chat}))

    async def raw(chat: str) -> None:
        bursts[chat].raw = await publish_raw(js, "create", chat, RAW_CREATES)

    await asyncio.gather(*(post(c, i) for c in chats for i in range(HTTP_CREATES)), *(raw(c) for c in chats))
    return bursts


async def check_lifetime(
    js: JetStreamContext, store: EventStore, client: docker.DockerClient, chat: str, burst: Burst
) -> tuple[SessionRecord, int]:
    """One session was made for all the creates of the burst, and everyone got it; and how
    many outcomes the burst's creates had."""
    events = await every_outcome(store, chat, burst)
    assert kinds(events).count("provisioning") == 1, kinds(events)
    assert kinds(events).count("running") == 1, kinds(events)
    done = assert_one_outcome_each(events, burst, reads=True)
    running = next(e for e in done if isinstance(e, SandboxRunning))
    session = running.session
    assert session is not None
    assert session.container_id is not None
    assert set(kinds(done)) <= {"running", "reused"}, kinds(done)
    assert {e.session.session_id for e in done if e.session is not None} == {session.session_id}
    # Over HTTP: one 201 per lifetime (unless a raw command made the session), 200 for the rest,
    # every answer naming the same session and container.
    statuses = [a.status_code for a in burst.answers]
    assert set(statuses) <= {200, 201}, [a.text for a in burst.answers]
    assert statuses.count(201) + (running.causation_id in burst.raw) == 1, statuses
    assert {a.json()["session_id"] for a in burst.answers} == {session.session_id}
    assert {a.json()["container_id"] for a in burst.answers} == {session.container_id}
    # Docker and the registry agree: the one container, running.
    assert containers_of(client, chat) == [session.container_id]
    assert client.containers.get(session.container_id).status == "running"
    state = await store.read(chat)
    assert state.session is not None
    assert state.session.is_live
    assert state.session.session_id == session.session_id
    await registry_holds(js, chat, session.session_id)
    return session, len(done)


async def check_lifetimes(
    js: JetStreamContext, store: EventStore, client: docker.DockerClient, bursts: dict[str, Burst]
) -> tuple[dict[str, SessionRecord], int]:
    """check_lifetime of every chat: its session, and the outcomes of all the creates."""
    sessions: dict[str, SessionRecord] = {}
    answered = 0
    for chat, burst in bursts.items():
        sessions[chat], done = await check_lifetime(js, store, client, chat, burst)
        answered += done
    return sessions, answered


async def fast_path_reads(apis: list[Child]) -> float:
    """The HTTP creates the API processes answered from a chat's last event so far."""
    return sum([await metric_total(api, FAST_PATH, result="reused") for api in apis])


async def stop_burst(
    http: httpx.AsyncClient, js: JetStreamContext, store: EventStore, apis: list[Child], chats: list[str]
) -> dict[str, Burst]:
    """Every chat at once: a DELETE through each API process, raw NATS stops."""
    bursts = {chat: Burst((await store.read(chat)).seq) for chat in chats}

    async def delete(chat: str, api: Child) -> None:
        bursts[chat].answers.append(await http.delete(f"{api_base(api)}/api/v1/sandboxes/{chat}"))

    async def raw(chat: str) -> None:
        bursts[chat].raw = await publish_raw(js, "stop", chat, RAW_STOPS)

    await asyncio.gather(*(delete(c, a) for c in chats for a in apis), *(raw(c) for c in chats))
    return bursts


async def check_stopped(
    js: JetStreamContext, store: EventStore, client: docker.DockerClient, chat: str, burst: Burst
) -> None:
    """One stop stopped the session; every other was refused; nothing is left."""
    events = await every_outcome(store, chat, burst)
    done = assert_one_outcome_each(events, burst)
    stopped = [e for e in done if isinstance(e, SandboxStopped)]
    assert len(stopped) == 1, kinds(done)
    refused = [e for e in done if isinstance(e, CommandRejected)]
    assert len(refused) == burst.commands - 1, kinds(done)
    assert {e.reason for e in refused} == {RejectReason.NO_LIVE_SESSION}
    statuses = [a.status_code for a in burst.answers]
    assert set(statuses) <= {200, 404}, [a.text for a in burst.answers]
    assert statuses.count(200) + (stopped[0].causation_id in burst.raw) == 1, statuses
    assert containers_of(client, chat) == []
    state = await store.read(chat)
    assert state.session is None or not state.session.is_live
    await registry_holds(js, chat, None)


async def consuming(js: JetStreamContext, node_id: str, runtimes: list[Child]) -> None:
    """Every runtime has written its status block and is pulling commands."""
    status = await js.key_value(STATUS_BUCKET)

    async def started(runtime: Child) -> tuple[int | None, bool]:
        """(its exit code, whether its status block is there): a runtime that exited at
        start-up fails the test at once, with its log."""
        try:
            await status.get(f"runtime.{node_id}.{runtime.pid}")
        except nats_client.js.errors.KeyNotFoundError:
            return runtime.poll(), False
        return runtime.poll(), True

    for runtime in runtimes:
        exited, _ = await eventually(
            functools.partial(started, runtime),
            lambda seen: seen[0] is not None or seen[1],
            timeout=60,
            what=f"the status block of runtime {runtime.pid}",
        )
        assert exited is None, f"{runtime.log.name} exited ({exited}): {runtime.log.read_text()[-3000:]}"
    await eventually(
        lambda: js.consumer_info(COMMANDS_STREAM, ConsumerName.RUNTIME),
        lambda info: (info.num_waiting or 0) >= len(runtimes),
        what=f"{len(runtimes)} runtimes pulling commands",
    )


async def test_three_runtimes_and_two_apis_race_on_the_same_chats(
    nats: NatsServer, root: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None
) -> None:
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    store = EventStore(js)
    await ensure_topology(js, StreamSettings())
    env = sandboxd_env(nats.url, root, node_id, TOKEN)
    runtimes = [spawn("services.runtime", env, root / f"runtime-{i}.log") for i in range(RUNTIMES)]
    apis = [spawn("services.api", env, root / f"api-{i}.log") for i in range(APIS)]
    try:
        await asyncio.gather(*(until_ready(api_base(api)) for api in apis))
        await consuming(js, node_id, runtimes)
        chats = [str(uuid.uuid4()) for _ in range(CHATS)]
        async with (
            httpx.AsyncClient(headers={"X-API-Token": TOKEN}, timeout=60) as http,
            container_census(node_id) as census,
        ):
            # Lifetimes of the chats, each a burst of creates then of stops, until two runtimes
            # have raced on a claim (the race this test is about: its odds per burst vary with
            # the machine's timing) and at least two lifetimes were made.
            lifetimes, reads = 0, 0.0
            previous: dict[str, SessionRecord] = {}
            while True:
                reads_before = await fast_path_reads(apis)
                burst = await create_burst(http, js, store, apis, chats)
                sessions, answered = await check_lifetimes(js, store, docker_client, burst)
                burst_reads = await fast_path_reads(apis) - reads_before
                assert answered + burst_reads == sum(b.commands for b in burst.values()), "an outcome or a read each"
                for chat, before in previous.items():
                    assert sessions[chat].session_id != before.session_id
                    assert sessions[chat].container_id != before.container_id
                lifetimes, reads, previous = lifetimes + 1, reads + burst_reads, sessions
                stops = await stop_burst(http, js, store, apis, chats)
                for chat in chats:
                    await check_stopped(js, store, docker_client, chat, stops[chat])
                raced = sum([await metric_total(r, APPEND_CONFLICTS, event="provisioning") for r in runtimes])
                if (lifetimes >= MIN_LIFETIMES and raced > 0) or lifetimes == MAX_LIFETIMES:
                    break
        assert census.samples > 0
        assert census.most == dict.fromkeys(chats, 1), "a chat had more than one container at once"
        await eventually(
            lambda: js.stream_info(COMMANDS_STREAM),
            lambda info: info.state.messages == 0,
            what="an empty work queue",
        )
        for child in [*runtimes, *apis]:
            assert child.poll() is None, f"{child.log.name} died: {child.log.read_text()[-3000:]}"
        handled = [await metric_total(r, CREATES_HANDLED) for r in runtimes]
        assert all(n > 0 for n in handled), f"creates handled per runtime: {handled}"
        assert sum(handled) >= CHATS * lifetimes * (HTTP_CREATES + RAW_CREATES) - reads
        conflicts = [await metric_total(r, APPEND_CONFLICTS) for r in runtimes]
        assert sum(conflicts) > 0, f"no append conflicted across processes (per runtime: {conflicts})"
        # ...among them the dangerous race: two runtimes claiming the same chat's session.
        claims = [await metric_total(r, APPEND_CONFLICTS, event="provisioning") for r in runtimes]
        assert sum(claims) > 0, f"no runtime lost a claim to another in {lifetimes} lifetimes (per runtime: {claims})"
    finally:
        stop(*runtimes, *apis)
        await nc.close()
