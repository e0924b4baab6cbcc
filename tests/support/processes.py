"""sandboxd processes as separate OS processes, configured through SANDBOXD_* variables."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def sandboxd_env(url: str, root: Path, node_id: str, token: str, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    return {
        **base,
        "SANDBOXD_NATS_URL": url,
        "SANDBOXD_API_TOKEN": token,
        "SANDBOXD_RUNTIME_NODE_ID": node_id,
        "SANDBOXD_SANDBOX_IMAGE": "sandboxd-sandbox:latest",
        "SANDBOXD_SANDBOX_CHATS_ROOT": str(root / "chats"),
        "SANDBOXD_SANDBOX_DEPENDENCIES_HOST_PATH": str(root / "deps"),
        "SANDBOXD_SANDBOX_LAMBDA_TOOLS_HOST_PATH": str(root / "tools"),
        "SANDBOXD_SANDBOX_STOP_TIMEOUT_SECONDS": "1",
        **extra,
    }


def spawn(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def until_ready(base: str, timeout: float = 60.0) -> None:
    """Wait for an API process's /ready to answer 200."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(f"{base}/api/v1/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{base} did not become ready within {timeout:g}s")
