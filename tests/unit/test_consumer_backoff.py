"""The command consumer's settling of one message, delivery after delivery: a retryable
failure is nak'd with a growing delay and redelivered; the last delivery the runtime allows
ends the command with one `failed` outcome (`gave_up`) and terminates it."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import cast

from nats.aio.msg import Msg

from services.runtime.consumer import runtime_consumer_config, settle
from services.runtime.containers import ContainerSpec
from services.runtime.decisions import Policy
from services.runtime.handlers import CommandHandlers, HandlerDeps
from shared.config import SandboxSettings, load_settings
from shared.contracts import AnyEvent, SandboxFailed, SandboxRunning, is_outcome
from shared.errors import NatsUnavailable
from shared.subjects import command_subject
from shared.telemetry import disabled
from tests.support.eventually import holds, until
from tests.unit.fakes_runtime import FakeClock, FakeDriver, FakeHandled, FakeStore

POLICY = Policy("node-a", "img", timedelta(minutes=5), timedelta(hours=1), timedelta(seconds=60))
MAX_DELIVERIES = 5


@dataclass
class FakeMsg:
    """One delivery of a command as the consumer sees it: what it settled with is recorded."""

    subject: str
    data: bytes
    num_delivered: int
    headers: dict[str, str] | None = None
    settled: list[tuple[str, float | None]] = field(default_factory=list)

    @property
    def metadata(self) -> SimpleNamespace:
        return SimpleNamespace(num_delivered=self.num_delivered, timestamp=None)

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))

    async def term(self) -> None:
        self.settled.append(("term", None))

    async def in_progress(self) -> None:
        """Progress is not a settlement."""


class Runtime:
    def __init__(self) -> None:
        clock = FakeClock()
        self.store = FakeStore(clock)
        self.driver = FakeDriver()
        self.handlers = CommandHandlers(
            HandlerDeps(self.store, self.driver, clock, POLICY, SandboxSettings(), handled=FakeHandled())
        )

    async def deliver(self, chat: str, data: bytes, delivery: int) -> tuple[str, float | None]:
        msg = FakeMsg(command_subject("create", chat), data, delivery)
        await settle(cast("Msg", msg), self.handlers, disabled(), MAX_DELIVERIES)
        assert len(msg.settled) == 1, msg.settled
        return msg.settled[0]

    def outcomes(self, chat: str, command_id: str) -> list[AnyEvent]:
        return [e for e in self.store.events(chat) if e.causation_id == command_id and is_outcome(e)]


def a_create(chat: str) -> tuple[str, bytes]:
    command_id = str(uuid.uuid4())
    return command_id, json.dumps({"command_id": command_id, "chat_id": chat}).encode()


def grows(delays: list[float | None]) -> bool:
    values = [d for d in delays if d is not None]
    return len(values) == len(delays) and all(a < b for a, b in itertools.pairwise(values))


async def test_a_retryable_failure_is_nakd_with_growing_delays_then_carried_out() -> None:
    runtime = Runtime()
    chat = str(uuid.uuid4())
    command_id, data = a_create(chat)
    # NATS does not take the claim twice (a leader election, say), then recovers.
    runtime.store.fail_next["provisioning"] = [NatsUnavailable("no leader"), NatsUnavailable("no leader")]

    first, second, third = [await runtime.deliver(chat, data, n) for n in (1, 2, 3)]

    assert (first[0], second[0], third[0]) == ("nak", "nak", "ack")
    assert grows([first[1], second[1]]), (first, second)
    (outcome,) = runtime.outcomes(chat, command_id)
    assert isinstance(outcome, SandboxRunning)
    assert runtime.store.types(chat) == ["provisioning", "running"]
    assert len(runtime.driver.running) == 1


async def test_a_command_that_keeps_failing_gives_up_with_one_failed_outcome() -> None:
    runtime = Runtime()
    chat = str(uuid.uuid4())
    command_id, data = a_create(chat)
    runtime.store.fail_next["provisioning"] = [NatsUnavailable("no leader") for _ in range(2 * MAX_DELIVERIES)]

    settled = [await runtime.deliver(chat, data, n) for n in range(1, MAX_DELIVERIES + 1)]

    assert [how for how, _ in settled] == ["nak"] * (MAX_DELIVERIES - 1) + ["term"]
    assert grows([delay for _, delay in settled[:-1]]), settled
    (outcome,) = runtime.outcomes(chat, command_id)
    assert isinstance(outcome, SandboxFailed)
    assert outcome.error is not None
    assert outcome.error.type == "gave_up"
    assert f"after {MAX_DELIVERIES} deliveries" in outcome.error.message
    assert "nats_unavailable: " in outcome.error.message
    assert runtime.store.types(chat) == ["failed"], "no claim ever landed, nothing else was appended"
    assert runtime.driver.started == []

    # The server allows one delivery more (a runtime that died during the last try leaves it
    # that one to answer in): a command already given up is only acknowledged.
    assert runtime_consumer_config("d", 1, 30.0, MAX_DELIVERIES).max_deliver == MAX_DELIVERIES + 1
    assert await runtime.deliver(chat, data, MAX_DELIVERIES + 1) == ("ack", None)
    assert len(runtime.outcomes(chat, command_id)) == 1


@dataclass
class WatchedMsg(FakeMsg):
    """A delivery that also records each in-progress report among its settlements."""

    async def in_progress(self) -> None:
        self.settled.append(("in_progress", None))


async def test_a_command_stays_in_progress_through_a_long_docker_call_and_no_longer() -> None:
    runtime = Runtime()
    chat = str(uuid.uuid4())
    command_id, data = a_create(chat)
    docker_done = asyncio.Event()
    start = runtime.driver.ensure_running

    async def slow_start(spec: ContainerSpec) -> str:
        await docker_done.wait()  # one Docker call that outlasts many progress intervals
        return await start(spec)

    runtime.driver.ensure_running = slow_start  # type: ignore[method-assign]
    msg = WatchedMsg(command_subject("create", chat), data, 1)
    settling = asyncio.create_task(
        settle(cast("Msg", msg), runtime.handlers, disabled(), MAX_DELIVERIES, progress_every=0.01)
    )
    await until(lambda: len(msg.settled) >= 3, what="in-progress reports during the Docker call")
    assert {how for how, _ in msg.settled} == {"in_progress"}
    docker_done.set()
    await settling
    assert msg.settled[-1] == ("ack", None)
    reports = len(msg.settled)

    async def reported() -> int:
        return len(msg.settled)

    await holds(reported, lambda n: n == reports, seconds=0.1, what="no in-progress report after the ack")
    assert [e.type for e in runtime.outcomes(chat, command_id)] == ["running"]


def test_a_silent_runtimes_commands_are_redelivered_within_seconds_by_default() -> None:
    settings = load_settings(environ={})
    assert settings.runtime.ack_wait_seconds == 4.0
    assert settings.runtime.instance_dead_after_seconds <= 5.0
    config = runtime_consumer_config("d", 32, settings.runtime.ack_wait_seconds, MAX_DELIVERIES)
    assert config.ack_wait == 4.0
