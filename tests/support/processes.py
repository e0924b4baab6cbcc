"""sandboxd processes as separate OS processes, configured through SANDBOXD_* variables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


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
