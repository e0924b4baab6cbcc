"""Claims owned by live runtime instances, with real processes killed with SIGKILL.

A claim (`provisioning` / `stopping`) names the runtime instance that made it, and every
instance heartbeats in `sandbox_instances`. A claim whose instance is gone is taken over as
soon as that is known, and a command redelivered after a crash finishes its own claim. The
claim timeout is set far beyond every wait here (`HOLD_CLAIMS`), so nothing in these tests
can complete by waiting it out.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import msgspec
import nats as nats_client
import pytest
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from services.runtime.consumer import runtime_consumer_config
from services.runtime.service import running_runtime
from shared.config import Settings, StreamSettings, load_settings
from shared.contracts import OUTCOME_TYPES
from shared.event_store import EventStore
from shared.failpoints import FAILPOINT_ENV
from shared.nodes import NODE_KEY_PREFIX
from shared.subjects import COMMANDS_STREAM, INSTANCES_BUCKET, ConsumerName, command_subject
from shared.topology import ensure_topology
from tests.support.consistency import assert_consistent
from tests.support.eventually import eventually, holds
from tests.support.nats_server import NatsServer
from tests.support.processes import Child, make_sandbox_dirs, sandboxd_env, spawn, stop

OUTCOMES = {t.__struct_config__.tag for t in OUTCOME_TYPES}
TOKEN = "claim-liveness-token"
# A claim timeout no test here waits out: what completes, completes through liveness.
HOLD_CLAIMS = {
    "SANDBOXD_RUNTIME_CLAIM_TIMEOUT_SECONDS": "600",
    "SANDBOXD_REAPER_REDRIVE_GRACE_SECONDS": "900",
}
# A killed instance is known dead 1.5 s after its last heartbeat (not the default 5 s).
QUICK_LIVENESS = {"SANDBOXD_RUNTIME_INSTANCE_DEAD_AFTER_SECONDS": "1.5"}
# Far below the claim timeout, far above what the liveness path needs on a busy machine.
DONE_WITHIN = 60.0
IN_FLIGHT = 6
ACK_WAIT = load_settings(environ={}).runtime.ack_wait_seconds  # the default, which these runtimes use

Events = list[dict[str, Any]]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_sandbox_dirs(tmp_path)
    return tmp_path


async def history(js: JetStreamContext, chat: str) -> Events:
    return [json.loads(json.dumps(msgspec.to_builtins(s.event))) for s in await EventStore(js).history(chat)]


def outcomes_of(events: Events, command_id: str) -> Events:
    return [e for e in events if e["causation_id"] == command_id and e["type"] in OUTCOMES]


def answered(*command_ids: str) -> Any:
    return lambda events: all(outcomes_of(events, c) for c in command_ids)


async def publish(js: JetStreamContext, kind: str, chat: str, **fields: object) -> str:
    command_id = str(uuid.uuid4())
    body = json.dumps({"command_id": command_id, "chat_id": chat, **fields}).encode()
    await js.publish(command_subject(kind, chat), body, headers={"Nats-Msg-Id": command_id})
    return command_id


async def assert_settled(js: JetStreamContext, chats: list[str], outcomes: int) -> None:
    """The work queue is empty and stays so, and the chats hold `outcomes` outcomes in all:
    nothing is redelivered into a second outcome."""

    async def seen() -> tuple[int, int]:
        queued = (await js.stream_info(COMMANDS_STREAM)).state.messages
        events = [e for chat in chats for e in await history(js, chat)]
        return queued, len([e for e in events if e["type"] in OUTCOMES])

    await eventually(seen, lambda s: s == (0, outcomes), what="an empty work queue")
    await holds(seen, lambda s: s == (0, outcomes), seconds=3, what="an empty work queue, one outcome per command")


def claim_of(events: Events, command_id: str) -> dict[str, Any]:
    claims = [e for e in events if e["causation_id"] == command_id and e["type"] == "provisioning"]
    assert len(claims) == 1, events
    return claims[0]


async def live_instances(js: JetStreamContext) -> set[str]:
    """The instances whose heartbeat is in the bucket (deleted ones are not; nodes' beats,
    `node.<node>`, are not instances)."""
    kv = await js.key_value(INSTANCES_BUCKET)
    try:
        return {key for key in await kv.keys() if not key.startswith(NODE_KEY_PREFIX)}
    except nats_client.js.errors.NoKeysError:
        return set()


async def killed(child: Child) -> None:
    code = await asyncio.to_thread(child.wait, 60)
    assert code == -signal.SIGKILL, child.log.read_text()


@pytest.mark.parametrize("follow_up", ["keepalive", "create"])
async def test_after_a_claim_crash_the_chats_next_command_completes(
    follow_up: str,
    nats: NatsServer,
    root: Path,
    docker_client: docker.DockerClient,
    node_id: str,
    node_containers: None,
) -> None:
    """The issue's reproduction with one runtime: killed right after a create's claim, then a
    keepalive or a second create for the chat, then the runtime restarted. Both commands
    complete, and the create never replaces the session it claimed itself. (A short ack wait:
    the killed runtime's create comes back soon; a redelivery of a slow one is harmless.)"""
    env = sandboxd_env(
        nats.url, root, node_id, TOKEN, SANDBOXD_RUNTIME_ACK_WAIT_SECONDS="2", **QUICK_LIVENESS, **HOLD_CLAIMS
    )
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    await ensure_topology(js, StreamSettings())
    chat = str(uuid.uuid4())
    victim = spawn("services.runtime", {**env, FAILPOINT_ENV: "after_claim"}, root / "runtime-1.log")
    survivor: Child | None = None
    try:
        create = await publish(js, "create", chat)
        await killed(victim)
        second = await publish(js, follow_up, chat)
        survivor = spawn("services.runtime", env, root / "runtime-2.log")
        events = await eventually(
            lambda: history(js, chat), answered(create, second), timeout=DONE_WITHIN, what="both commands answered"
        )
        claimed = claim_of(events, create)["session_id"]
        assert claim_of(events, create)["instance_id"] is not None, "a claim names its instance"
        assert not [e for e in events if e["causation_id"] == create and e["type"] == "stopping"], (
            "the create replaced the session it claimed itself",
            events,
        )
        [first] = outcomes_of(events, create)
        [then] = outcomes_of(events, second)
        if follow_up == "keepalive":
            # The create resumed its claim (before or after the keepalive was answered).
            assert (first["type"], first["result"], first["session_id"]) == ("running", "created", claimed), events
            assert then["type"] in ("extended", "rejected"), then
        elif first["type"] == "running":  # the create resumed its claim first; the second reused it
            assert (first["result"], first["session_id"]) == ("created", claimed), events
            assert (then["type"], then["session_id"]) == ("reused", claimed), events
        else:  # the second create took the dead claim over; the first then reused its session
            assert (then["type"], then["result"], then["previous"]["session_id"]) == ("running", "replaced", claimed)
            assert (first["type"], first["session_id"]) == ("reused", then["session_id"]), events
        await assert_settled(js, [chat], 2)
        await assert_consistent(js, docker_client, chat)
        assert survivor.poll() is None, survivor.log.read_text()
    finally:
        stop(victim, survivor)
        await nc.close()


@pytest.mark.parametrize("follow_up", ["keepalive", "create"])
async def test_a_dead_instances_claim_is_taken_over_before_its_command_comes_back(
    follow_up: str,
    nats: NatsServer,
    root: Path,
    docker_client: docker.DockerClient,
    node_id: str,
    node_containers: None,
) -> None:
    """A runtime holds a create right after its claim (alive, heartbeating), a second one
    runs, and the first is killed. A keepalive or a second create for the chat is answered as
    soon as the first runtime's heartbeat is stale, before the held create is redelivered (its
    ack wait is far longer). The create, when it comes back, finishes its own claim under the
    keepalive's answer, or reuses the session that replaced its claimed one."""
    env = sandboxd_env(
        nats.url,
        root,
        node_id,
        TOKEN,
        SANDBOXD_RUNTIME_ACK_WAIT_SECONDS="12",
        **QUICK_LIVENESS,
        **HOLD_CLAIMS,
    )
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    await ensure_topology(js, StreamSettings())
    chat = str(uuid.uuid4())
    victim = spawn("services.runtime", {**env, FAILPOINT_ENV: "after_claim:hang"}, root / "runtime-1.log")
    survivor: Child | None = None
    try:
        create = await publish(js, "create", chat)
        events = await eventually(
            lambda: history(js, chat), lambda ev: [e["type"] for e in ev] == ["provisioning"], what="the claim"
        )
        claimed = claim_of(events, create)["session_id"]
        assert await live_instances(js) == {claim_of(events, create)["instance_id"]}, "the claim names its instance"
        survivor = spawn("services.runtime", env, root / "runtime-2.log")
        await eventually(lambda: live_instances(js), lambda ids: len(ids) == 2, what="the second runtime alive")
        victim.send_signal(signal.SIGKILL)
        await killed(victim)

        second = await publish(js, follow_up, chat)
        events = await eventually(lambda: history(js, chat), answered(second), timeout=DONE_WITHIN)
        assert not outcomes_of(events, create), "the claim was waited on until its create came back"
        [answer] = outcomes_of(events, second)
        events = await eventually(lambda: history(js, chat), answered(create), timeout=DONE_WITHIN)
        [first] = outcomes_of(events, create)
        if follow_up == "keepalive":
            assert (answer["type"], answer["reason"]) == ("rejected", "not_running"), answer
            assert (first["type"], first["result"], first["session_id"]) == ("running", "created", claimed), first
            assert [e["type"] for e in events] == ["provisioning", "rejected", "running"]
        else:
            assert (answer["type"], answer["result"], answer["previous"]["session_id"]) == (
                "running",
                "replaced",
                claimed,
            ), answer
            assert (first["type"], first["session_id"]) == ("reused", answer["session_id"]), first
            assert [e["type"] for e in events] == ["provisioning", "stopping", "provisioning", "running", "reused"]
        await assert_settled(js, [chat], 2)
        await assert_consistent(js, docker_client, chat)
    finally:
        stop(victim, survivor)
        await nc.close()


async def test_kill_9_of_a_runtime_with_another_alive_completes_its_in_flight_commands(
    nats: NatsServer, root: Path, docker_client: docker.DockerClient, node_id: str, node_containers: None
) -> None:
    """Creates in flight on a runtime (each held right after its claim): while it lives none
    of them is redelivered; once it is killed, the runtime alive beside it gets them
    redelivered within the ack wait and finishes each one's own claim: one `running {created}`
    per create, on the session it claimed."""
    env = sandboxd_env(nats.url, root, node_id, TOKEN, **QUICK_LIVENESS, **HOLD_CLAIMS)
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    await ensure_topology(js, StreamSettings())
    chats = [str(uuid.uuid4()) for _ in range(IN_FLIGHT)]
    victim = spawn("services.runtime", {**env, FAILPOINT_ENV: "after_claim:hang"}, root / "runtime-1.log")
    survivor: Child | None = None
    try:
        creates = {chat: await publish(js, "create", chat) for chat in chats}

        async def claims() -> dict[str, str]:
            held: dict[str, str] = {}
            for chat in chats:
                events = await history(js, chat)
                if [e["type"] for e in events] == ["provisioning"]:
                    held[chat] = claim_of(events, creates[chat])["session_id"]
            return held

        claimed = await eventually(claims, lambda got: len(got) == IN_FLIGHT, what="every create claimed")
        survivor = spawn("services.runtime", env, root / "runtime-2.log")
        await eventually(lambda: live_instances(js), lambda ids: len(ids) == 2, what="the second runtime alive")

        # A runtime that works on its commands keeps them: none is redelivered, however long
        # it holds them (watched for longer than the ack wait).
        async def redelivered() -> int:
            return (await js.consumer_info(COMMANDS_STREAM, ConsumerName.RUNTIME)).num_redelivered or 0

        await holds(redelivered, lambda n: n == 0, seconds=ACK_WAIT + 1, what="no redelivery from a live runtime")
        victim.send_signal(signal.SIGKILL)
        await killed(victim)

        for chat in chats:
            events = await eventually(
                functools.partial(history, js, chat), answered(creates[chat]), timeout=DONE_WITHIN, what=chat
            )
            [running] = outcomes_of(events, creates[chat])
            assert (running["type"], running["result"], running["session_id"]) == (
                "running",
                "created",
                claimed[chat],
            ), events
            assert [e["type"] for e in events] == ["provisioning", "running"]
        await assert_settled(js, chats, IN_FLIGHT)
        for chat in chats:
            await assert_consistent(js, docker_client, chat)
        assert survivor.poll() is None, survivor.log.read_text()
    finally:
        stop(victim, survivor)
        await nc.close()


async def test_a_runtime_heartbeats_until_it_stops_and_updates_the_consumers_ack_wait(
    settings: Settings, docker_client: docker.DockerClient, node_containers: None
) -> None:
    """The heartbeat exists while the runtime runs and is deleted when it stops cleanly (its
    claims are then taken over at once); a durable left by a version with a longer ack wait
    is updated to this runtime's."""
    nc = await nats_client.connect(settings.nats.url or "")
    js = nc.jetstream()
    try:
        await ensure_topology(js, settings.streams)
        old: ConsumerConfig = runtime_consumer_config(ConsumerName.RUNTIME, 32, 30.0, 100)
        await js.add_consumer(COMMANDS_STREAM, config=old)
        bucket = await js.key_value(INSTANCES_BUCKET)

        async def beat_of(instance: str) -> dict[str, Any]:
            beat: dict[str, Any] = json.loads((await bucket.get(instance)).value or b"{}")
            return beat

        async with running_runtime(settings):
            (instance,) = await eventually(lambda: live_instances(js), what="the runtime's heartbeat")
            first = await beat_of(instance)
            assert (first["instance_id"], first["node_id"]) == (instance, settings.runtime.node_id)
            await eventually(
                lambda: beat_of(instance),
                lambda beat: datetime.fromisoformat(beat["beat_at"]) > datetime.fromisoformat(first["beat_at"]),
                what="the next heartbeat",
            )
            info = await js.consumer_info(COMMANDS_STREAM, ConsumerName.RUNTIME)
            assert info.config.ack_wait == settings.runtime.ack_wait_seconds == 4.0
        assert await live_instances(js) == set()
    finally:
        await nc.close()
