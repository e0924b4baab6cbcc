"""`sandboxctl up`'s supervision: when a dead child is restarted (pure), and the supervisor
over real (tiny) child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import pytest

from services.ctl.supervisor import (
    CONFIG_ERROR_EXIT,
    ChildStatus,
    GiveUp,
    Restart,
    RestartPolicy,
    Supervisor,
    decide_restart,
)
from tests.support.eventually import eventually, holds

POLICY = RestartPolicy(max_restarts=3, window_seconds=60, backoff_seconds=0.5, backoff_max_seconds=3)


def test_a_dead_child_is_restarted_with_a_growing_back_off() -> None:
    assert decide_restart("runtime", -9, [100.0], 100.0, POLICY) == Restart(0.5)
    assert decide_restart("runtime", 1, [90.0, 100.0], 100.0, POLICY) == Restart(1.0)
    assert decide_restart("runtime", 1, [80.0, 90.0, 100.0], 100.0, POLICY) == Restart(2.0)


def test_deaths_outside_the_window_are_forgiven() -> None:
    assert decide_restart("runtime", 1, [1.0, 2.0, 3.0, 100.0], 100.0, POLICY) == Restart(0.5)


def test_the_back_off_is_capped() -> None:
    policy = RestartPolicy(max_restarts=10, window_seconds=60, backoff_seconds=0.5, backoff_max_seconds=3)
    assert decide_restart("api", 1, [float(t) for t in range(10)], 10.0, policy) == Restart(3)


def test_a_child_that_keeps_dying_stops_the_stack() -> None:
    decision = decide_restart("reaper", 1, [70.0, 80.0, 90.0, 100.0], 100.0, POLICY)
    assert isinstance(decision, GiveUp)
    assert "reaper died 4 times within 60s (last exit code 1)" in decision.reason


def test_a_configuration_error_is_not_restarted() -> None:
    decision = decide_restart("runtime", CONFIG_ERROR_EXIT, [100.0], 100.0, POLICY)
    assert isinstance(decision, GiveUp)
    assert "configuration error" in decision.reason


def test_no_restarts_allowed_means_the_first_death_stops_the_stack() -> None:
    policy = RestartPolicy(max_restarts=0, window_seconds=60, backoff_seconds=0.5, backoff_max_seconds=3)
    assert isinstance(decide_restart("runtime", -9, [100.0], 100.0, policy), GiveUp)


SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
FAILING = [sys.executable, "-c", "raise SystemExit(1)"]


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    policy = RestartPolicy(max_restarts=2, window_seconds=60, backoff_seconds=0.01, backoff_max_seconds=0.05)
    running = Supervisor(policy, "node-a")
    yield running
    await running.stop()


async def test_a_killed_child_is_restarted_and_the_status_says_so(supervisor: Supervisor) -> None:
    await supervisor.start("runtime", SLEEPER)
    first = supervisor.pid("runtime")
    assert first is not None
    os.kill(first, signal.SIGKILL)

    async def child() -> ChildStatus:
        return supervisor.status().children["runtime"]

    status = await eventually(child, lambda c: c.restarts == 1 and c.running, what="the restart")
    assert status.last_exit_code == -signal.SIGKILL
    assert status.pid not in (None, first)
    assert status.pid == supervisor.pid("runtime")
    assert not supervisor.failed.is_set()


async def test_a_child_that_keeps_dying_fails_the_supervisor(supervisor: Supervisor) -> None:
    await supervisor.start("reaper", FAILING)
    await asyncio.wait_for(supervisor.failed.wait(), 20)
    assert supervisor.failure is not None
    assert "reaper died 3 times" in supervisor.failure
    status = supervisor.status()
    assert (status.children["reaper"].restarts, status.failure) == (2, supervisor.failure)


async def test_stopped_children_are_not_restarted(supervisor: Supervisor) -> None:
    await supervisor.start("runtime", SLEEPER)
    await supervisor.start("api", SLEEPER)
    await supervisor.stop()

    async def children() -> list[ChildStatus]:
        return list(supervisor.status().children.values())

    await holds(
        children, lambda cs: not any(c.running or c.restarts for c in cs), seconds=0.3, what="nothing restarted"
    )
    assert not supervisor.failed.is_set()
