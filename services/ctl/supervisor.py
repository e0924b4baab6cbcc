"""Supervision for `sandboxctl up`: its children (the embedded nats-server, the runtime, the
reaper, the API) are restarted when they die, with back-off, and the stack stops instead of
serving without one of them when a child keeps dying.

Whether a death is restarted is a pure decision (`decide_restart`: the child's recent deaths
and the policy); everything is logged as JSON, and `status()` is the block `sandboxctl up`
publishes as `supervisor.<node_id>` in the `sandbox_status` bucket (`GET /api/v1/status`
shows it under `supervisors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from shared.clock import Clock, SystemClock
from shared.config import SupervisorSettings
from shared.logs import bound_log_context

log = logging.getLogger(__name__)

# What our services exit with on a configuration error: restarting cannot help.
CONFIG_ERROR_EXIT = 2


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    max_restarts: int  # restarts allowed within the window; one more death stops the stack
    window_seconds: float
    backoff_seconds: float  # before the first restart; doubled for every death in the window
    backoff_max_seconds: float

    @classmethod
    def from_settings(cls, settings: SupervisorSettings) -> RestartPolicy:
        return cls(
            settings.max_restarts,
            settings.restart_window_seconds,
            settings.restart_backoff_seconds,
            settings.restart_backoff_max_seconds,
        )


@dataclass(frozen=True, slots=True)
class Restart:
    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: str


def decide_restart(
    name: str, exit_code: int, deaths: Sequence[float], now: float, policy: RestartPolicy
) -> Restart | GiveUp:
    """After `name` died (its deaths so far, this one included, as monotonic times)."""
    if exit_code == CONFIG_ERROR_EXIT:
        return GiveUp(f"{name} exited with code {exit_code}: a configuration error, which a restart cannot fix")
    recent = sum(1 for t in deaths if now - t <= policy.window_seconds)
    if recent > policy.max_restarts:
        return GiveUp(
            f"{name} died {recent} times within {policy.window_seconds:g}s (last exit code {exit_code}); "
            "not serving without it"
        )
    return Restart(min(policy.backoff_seconds * 2 ** (recent - 1), policy.backoff_max_seconds))


# --------------------------------------------------------------------------- status


class ChildStatus(msgspec.Struct):
    pid: int | None
    running: bool
    restarts: int
    started_at: datetime | None
    last_exit_code: int | None  # negative: killed by that signal
    last_exit_at: datetime | None


class SupervisorStatus(msgspec.Struct):
    """What an operator reads with `nats kv get sandbox_status supervisor.<node_id>`."""

    node_id: str
    pid: int
    started_at: datetime
    last_seen: datetime
    children: dict[str, ChildStatus]
    failure: str | None  # why the stack is stopping, when a child kept dying


# --------------------------------------------------------------------------- the supervisor


@dataclass
class _Child:
    name: str
    argv: list[str]
    env: dict[str, str] | None
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    deaths: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    started_at: datetime | None = None
    last_exit_code: int | None = None
    last_exit_at: datetime | None = None
    watcher: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(self, policy: RestartPolicy, node_id: str, clock: Clock | None = None) -> None:
        self._policy = policy
        self._node_id = node_id
        self._clock = clock or SystemClock()
        self._started_at = self._clock.now()
        self._children: dict[str, _Child] = {}
        self.failure: str | None = None
        self.failed = asyncio.Event()  # a child kept dying: the stack must stop
        self.changed = asyncio.Event()  # something the status block shows changed

    def pid(self, name: str) -> int | None:
        child = self._children[name]
        return child.proc.pid if child.proc is not None and child.proc.returncode is None else None

    def running(self, name: str) -> bool:
        return self.pid(name) is not None

    async def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start a child and keep it running."""
        child = _Child(name, argv, env)
        self._children[name] = child
        proc = await self._spawn(child)
        child.watcher = asyncio.create_task(self._watch(child, proc), name=f"supervise-{name}")

    async def _spawn(self, child: _Child) -> asyncio.subprocess.Process:
        # Its own session: a Ctrl-C in the terminal reaches `up`, which stops children in order.
        child.proc = await asyncio.create_subprocess_exec(*child.argv, env=child.env, start_new_session=True)
        child.started_at = self._clock.now()
        self.changed.set()
        return child.proc

    async def _watch(self, child: _Child, proc: asyncio.subprocess.Process) -> None:
        while True:
            code = await proc.wait()
            now = time.monotonic()
            child.deaths.append(now)
            child.last_exit_code, child.last_exit_at = code, self._clock.now()
            self.changed.set()
            decision = decide_restart(child.name, code, child.deaths, now, self._policy)
            with bound_log_context(child=child.name, pid=str(proc.pid), exit_code=str(code)):
                if isinstance(decision, GiveUp):
                    log.error("%s; stopping the stack", decision.reason)
                    self.failure = decision.reason
                    self.failed.set()
                    self.changed.set()
                    return
                log.warning(
                    "%s (pid %d) exited with code %d; restarting it in %.1fs",
                    child.name,
                    proc.pid,
                    code,
                    decision.delay,
                )
            await asyncio.sleep(decision.delay)
            try:
                proc = await self._spawn(child)
            except OSError as exc:
                log.exception("%s could not be started again", child.name)
                self.failure = f"{child.name} could not be started again: {exc}"
                self.failed.set()
                self.changed.set()
                return
            child.restarts += 1
            with bound_log_context(child=child.name, pid=str(proc.pid), restarts=str(child.restarts)):
                log.info("%s restarted (pid %d, restart %d)", child.name, proc.pid, child.restarts)

    def status(self) -> SupervisorStatus:
        now = self._clock.now()
        return SupervisorStatus(
            node_id=self._node_id,
            pid=os.getpid(),
            started_at=self._started_at,
            last_seen=now,
            children={
                name: ChildStatus(
                    pid=child.proc.pid if child.proc is not None else None,
                    running=self.running(name),
                    restarts=child.restarts,
                    started_at=child.started_at,
                    last_exit_code=child.last_exit_code,
                    last_exit_at=child.last_exit_at,
                )
                for name, child in self._children.items()
            },
            failure=self.failure,
        )

    async def stop(self, say: Callable[[str], None] | None = None) -> None:
        """Stop every child, the last started first; none is restarted any more (their
        watchers are cancelled before the first is signalled)."""
        for child in self._children.values():
            if child.watcher is not None:
                child.watcher.cancel()
        for child in reversed(self._children.values()):
            if child.proc is not None:
                await stop_process(child.proc, child.name, say=say)


async def stop_process(
    proc: asyncio.subprocess.Process, name: str, timeout: float = 15.0, say: Callable[[str], None] | None = None
) -> None:
    """SIGTERM, then a kill when it does not stop within `timeout`."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        if say is not None:
            say(f"{name} did not stop within {timeout:g}s; killing it")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
