"""Running `sandboxctl` from tests: as a child process of the test's event loop (the runtime
under test runs in that loop, so a blocking `subprocess.run` would starve it), piped or in a
pseudo-terminal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from shared.config import Settings
from tests.support.eventually import until


def ctl_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `sandboxctl` that sees the test's stack (its settings), as admin
    of an open server (no seed)."""
    sandbox = settings.sandbox
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    env.pop("NO_COLOR", None)
    env.update(
        {
            "SANDBOXD_NATS_URL": settings.nats.url or "",
            "SANDBOXD_RUNTIME_NODE_ID": settings.runtime.node_id,
            "SANDBOXD_SANDBOX_IMAGE": sandbox.image,
            "SANDBOXD_SANDBOX_CHATS_ROOT": sandbox.chats_root,
            "SANDBOXD_SANDBOX_DEPENDENCIES_HOST_PATH": sandbox.dependencies_host_path,
            "SANDBOXD_SANDBOX_LAMBDA_TOOLS_HOST_PATH": sandbox.lambda_tools_host_path,
            "TERM": "xterm",
            **extra,
        }
    )
    return env


@dataclass
class Done:
    code: int
    out: str
    err: str


async def ctl(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120.0) -> Done:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.ctl",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


@dataclass
class Terminal:
    """A `sandboxctl` whose stdout and stderr are a pseudo-terminal; `screen` is all it wrote."""

    proc: asyncio.subprocess.Process
    screen: str = ""

    async def wait_for(self, *texts: str, timeout: float = 30.0) -> None:
        try:
            await until(lambda: all(t in self.screen for t in texts), timeout=timeout, what=f"{texts} on the terminal")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- the terminal showed:\n{self.screen[-4000:]}") from None

    async def interrupt(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        return await asyncio.wait_for(self.proc.wait(), timeout)


@contextlib.asynccontextmanager
async def in_terminal(env: dict[str, str], cwd: Path, *args: str) -> AsyncIterator[Terminal]:
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.ctl", *args, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    terminal = Terminal(proc)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed its side
            loop.remove_reader(master)
            return
        terminal.screen += data.decode(errors="replace")

    loop.add_reader(master, readable)
    try:
        yield terminal
    finally:
        loop.remove_reader(master)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)
