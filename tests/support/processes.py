"""sandboxd processes as separate OS processes, configured through SANDBOXD_* variables.

Every spawned process gets ports of its own (its Prometheus endpoint, and an API's HTTP
port) unless the test names them: no two children, and no child and anything else on the
machine, fight over the defaults 9464 / 9465 / 8123. `metric_total` reads a counter from a
child's Prometheus endpoint.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.nats_server import free_port

RUNTIME_METRICS_PORT_ENV = "SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT"
REAPER_METRICS_PORT_ENV = "SANDBOXD_TELEMETRY_REAPER_METRICS_PORT"
HTTP_PORT_ENV = "SANDBOXD_HTTP_PORT"
API_MODULE = "services.api"


class Child(subprocess.Popen[bytes]):
    """A spawned sandboxd process and where it serves its metrics (None: nowhere)."""

    module: str
    log: Path
    metrics_url: str | None


def make_sandbox_dirs(root: Path) -> Path:
    """The host directories `sandboxd_env` names under `root` (chats and the two read-only
    mount sources); `root` itself, for chaining."""
    for sub in ("chats", "deps", "tools"):
        (root / sub).mkdir(exist_ok=True)
    return root


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
        "SANDBOXD_SANDBOX_SLOTS_ROOT": str(root / "slots"),
        "SANDBOXD_SANDBOX_WARM_POOL_SIZE": "0",  # cold unless the caller asks for the pool
        "SANDBOXD_SANDBOX_OCI_RUNTIME": "runc",  # unless the caller asks for gVisor or `auto`
        **extra,
    }


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _with_own_ports(module: str, env: dict[str, str]) -> dict[str, str]:
    """`env` plus a fresh port for every port variable it leaves unset."""
    wanted = [RUNTIME_METRICS_PORT_ENV, REAPER_METRICS_PORT_ENV]
    if module == API_MODULE:
        wanted.append(HTTP_PORT_ENV)
    missing = [name for name in wanted if name not in env]
    return {**env, **dict(zip(missing, map(str, _free_ports(len(missing))), strict=True))}


def _metrics_url(module: str, env: dict[str, str]) -> str | None:
    if module == API_MODULE:  # the API serves /metrics on its HTTP port
        return f"http://127.0.0.1:{env[HTTP_PORT_ENV]}/metrics"
    port = env[REAPER_METRICS_PORT_ENV if "reaper" in module else RUNTIME_METRICS_PORT_ENV]
    return None if int(port) == 0 else f"http://127.0.0.1:{port}/metrics"


def spawn(module: str, env: dict[str, str], log: Path) -> Child:
    """Start `python -m module`; ports `env` does not name are chosen free for this child."""
    env = _with_own_ports(module, env)
    with log.open("ab") as out:
        child = Child([sys.executable, "-m", module], env=env, stdout=out, stderr=subprocess.STDOUT)
    child.module = module
    child.log = log
    child.metrics_url = _metrics_url(module, env)
    return child


def stop(*procs: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM every process still running (None: none there), then wait for each, killing
    one that outlives `timeout`: several stop side by side, not one after another."""
    running = [p for p in procs if p is not None and p.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
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


def api_base(child: Child) -> str:
    """The base URL of a spawned API process."""
    assert child.module == API_MODULE, f"{child.module} serves no HTTP API"
    assert child.metrics_url is not None
    return child.metrics_url.removesuffix("/metrics")


def sample_total(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` (the exported name, e.g.
    `sandbox_append_conflict_total`) whose labels include `labels`; 0 when there are none
    (OpenTelemetry exports a counter only once it was incremented)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def metric_total(child: Child, sample: str, **labels: str) -> float:
    """Scrape a child's Prometheus endpoint and read one sample's total (see sample_total)."""
    assert child.metrics_url is not None, f"{child.module} ({child.log.name}) serves no metrics"
    async with httpx.AsyncClient(timeout=5) as http:
        answer = await http.get(child.metrics_url)
    answer.raise_for_status()
    return sample_total(answer.text, sample, **labels)
