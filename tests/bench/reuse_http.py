"""Reuse over HTTP, measured with wrk: `uv run python -m tests.bench.reuse_http [BEFORE_TREE]`.

A real nats-server, one runtime and the API as OS processes; 32 chats created first. Then, with
Debian's `wrk` (a Python client saturates first), for BENCH_REUSE_SECONDS (default 6) each, in
three windows interleaved with the figures beside it (`interleaved`: the median window):
`POST /api/v1/sandboxes` on a running chat at concurrency 1 (one chat) and 32 (over the 32
chats), beside `GET /api/v1/health` at the same concurrency. Prints p50 and requests/s, and
the ratios to /health.

BEFORE_TREE: a source tree of another commit (e.g. `git archive <commit> services shared |
tar -x -C DIR`): its API is run beside this one, against the same stack, and measured the same
way (a before/after of the reuse fast path). Last, the floor (tests/bench/bare_asgi.py): a bare
ASGI app under the same server, one direct get per request vs its no-op. Nothing is asserted:
this reports figures.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from services.runtime.image import ensure_sandbox_image
from shared.config import StreamSettings
from shared.subjects import event_subject
from tests.bench.harness import Report, new_report
from tests.support.nats_server import free_port, nats_server
from tests.support.processes import (
    HTTP_PORT_ENV,
    Child,
    api_base,
    make_sandbox_dirs,
    sandboxd_env,
    spawn,
    stop,
    until_ready,
)

TOKEN = "bench-reuse-token"
NODE = "bench-reuse"
CHATS = 32
SECONDS = int(os.environ.get("BENCH_REUSE_SECONDS", "6"))  # per figure, over ROUNDS windows
ROUNDS = 3
WRK = shutil.which("wrk") or "/usr/bin/wrk"

LUA = """
local chats = {%s}
local n = 0
wrk.method = "%s"
wrk.headers["X-API-Token"] = "%s"
wrk.headers["Content-Type"] = "application/json"
local kind = "%s"
request = function()
  n = n + 1
  local chat = chats[(n %% #chats) + 1]
  if kind == "reuse" then return wrk.format(nil, nil, nil, '{"chat_id": "' .. chat .. '"}') end
  if kind == "get" then return wrk.format(nil, "/api/v1/sandboxes/" .. chat) end
  return wrk.format()
end
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, script: Path, connections: int, seconds: int = SECONDS) -> tuple[float, float]:
    """(p50 in ms, requests/s) of a wrk run."""
    threads = min(connections, 2)
    out = subprocess.run(
        [WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    p50 = re.search(r"^\s*50%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    if p50 is None or rate is None or "Non-2xx" in out:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return float(p50.group(1)) * _UNITS[p50.group(2)], float(rate.group(1))


def interleaved(runs: list[tuple[str, Path]], connections: int) -> list[tuple[float, float]]:
    """(p50 in ms, requests/s) of each (url, script), measured in ROUNDS alternating windows
    (a, b, a, b, ...) of SECONDS / ROUNDS each, rounded up: the median window of each. A
    figure and its floor are then measured over the same stretch of time: this machine's
    speed drifts between minutes (GET /health ran at 4,450-5,400 requests/s in one quarter
    of an hour), and two windows one after the other put that drift into their ratio."""
    seconds = max(1, -(-SECONDS // ROUNDS))
    windows: list[list[tuple[float, float]]] = [[] for _ in runs]
    for _ in range(ROUNDS):
        for i, (url, lua) in enumerate(runs):
            windows[i].append(wrk(url, lua, connections, seconds))
    return [(statistics.median(p for p, _ in w), statistics.median(r for _, r in w)) for w in windows]


def script(root: Path, kind: str, chats: list[str], token: str = TOKEN) -> Path:
    path = root / f"{kind}-{len(chats)}.lua"
    method = "POST" if kind == "reuse" else "GET"
    path.write_text(LUA % (", ".join(f'"{c}"' for c in chats), method, token, kind))
    return path


async def reuse_section(report: Report, base: str, root: Path, token: str, chats: list[str], nats_url: str) -> None:
    """`just bench`'s rows: reuse at concurrency 1 (one chat) and 32 (over 32 chats) beside
    GET /health at the same concurrency, both driven by wrk; then the same two ratios for a
    bare ASGI app (tests/bench/bare_asgi.py): one direct get per request over its no-op, the
    floor of a reuse that reads the chat's last event."""
    figures: dict[str, dict[str, float]] = {}
    for connections, over in ((1, chats[:1]), (len(chats), chats)):
        runs = [
            (f"{base}/api/v1/health", script(root, "health", over, token)),
            (f"{base}/api/v1/sandboxes", script(root, "reuse", over, token)),
        ]
        (health_p50, health_rate), (reuse_p50, reuse_rate) = await asyncio.to_thread(interleaved, runs, connections)
        figures[f"c{connections}"] = {
            "reuse_p50_ms": reuse_p50,
            "reuse_per_s": reuse_rate,
            "health_p50_ms": health_p50,
            "health_per_s": health_rate,
        }
        report.row(
            f"reuse p50 (wrk, c{connections}, {len(over)} chats) vs GET /health",
            f"{reuse_p50:.2f} ms",
            f"{health_p50:.2f} ms",
            f"{reuse_p50 / health_p50:.2f}",
            "<= 2" if connections == 1 else "",
        )
        report.row(
            f"reuse requests/s (wrk, c{connections}) vs GET /health",
            f"{reuse_rate:,.0f}",
            f"{health_rate:,.0f}",
            f"{reuse_rate / health_rate:.2f}",
            ">= 0.5" if connections > 1 else "",
        )
    report.figures["reuse_wrk"] = figures
    report.figures["reuse_floor_wrk"] = await asyncio.to_thread(floor_rows, report, root, nats_url, chats[0])


def _until_answers(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def floor_rows(report: Report, root: Path, nats_url: str, chat: str) -> dict[str, dict[str, float]]:
    port = free_port()
    log = root / "bare-asgi.log"
    with log.open("ab") as out:
        bare = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.bare_asgi", nats_url, str(port), event_subject(chat)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    figures: dict[str, dict[str, float]] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        _until_answers(f"{base}/noop")
        plain = script(root, "plain", [chat])
        for connections in (1, CHATS):
            runs = [(f"{base}/noop", plain), (f"{base}/get", plain)]
            (noop_p50, noop_rate), (get_p50, get_rate) = interleaved(runs, connections)
            figures[f"c{connections}"] = {
                "get_p50_ms": get_p50,
                "get_per_s": get_rate,
                "noop_p50_ms": noop_p50,
                "noop_per_s": noop_rate,
            }
            report.row(
                f"floor: bare ASGI, one direct get vs no-op, c{connections} p50",
                f"{get_p50:.2f} ms",
                f"{noop_p50:.2f} ms",
                f"{get_p50 / noop_p50:.2f}",
            )
            report.row(
                f"floor: bare ASGI, one direct get vs no-op, c{connections} req/s",
                f"{get_rate:,.0f}",
                f"{noop_rate:,.0f}",
                f"{get_rate / noop_rate:.2f}",
            )
    finally:
        bare.terminate()
        bare.wait(10)
    return figures


async def measure(name: str, base: str, root: Path, chats: list[str]) -> None:
    for connections, over in ((1, chats[:1]), (CHATS, chats)):
        runs = [
            (f"{base}/api/v1/health", script(root, "health", over)),
            (f"{base}/api/v1/sandboxes", script(root, "get", over)),
            (f"{base}/api/v1/sandboxes", script(root, "reuse", over)),
        ]
        (health_p50, health_rate), (get_p50, get_rate), (reuse_p50, reuse_rate) = interleaved(runs, connections)
        print(
            f"{name} c={connections:<2} chats={len(over):<2} reuse p50 {reuse_p50:6.2f} ms {reuse_rate:6.0f}/s | "
            f"GET chat p50 {get_p50:6.2f} ms {get_rate:6.0f}/s | "
            f"/health p50 {health_p50:6.2f} ms {health_rate:6.0f}/s | "
            f"reuse/health: p50 {reuse_p50 / health_p50:4.2f}x, rate {reuse_rate / health_rate:4.2f}x",
            flush=True,
        )


def spawn_before(tree: Path, env: dict[str, str], log: Path, port: int) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.api"],
            cwd=tree,
            env={**env, HTTP_PORT_ENV: str(port), "PYTHONPATH": str(tree)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def main(before_tree: Path | None) -> None:
    import docker  # noqa: PLC0415 - only the bench needs it at once
    import nats  # noqa: PLC0415

    from shared.topology import ensure_topology  # noqa: PLC0415

    ensure_sandbox_image(docker.from_env(), "sandboxd-sandbox:latest")
    with tempfile.TemporaryDirectory(prefix="bench-reuse-") as tmp, nats_server(Path(tmp) / "nats") as server:
        root = make_sandbox_dirs(Path(tmp))
        nc = await nats.connect(server.url)
        await ensure_topology(nc.jetstream(), StreamSettings())
        await nc.close()
        env = sandboxd_env(server.url, root, NODE, TOKEN)
        children: list[subprocess.Popen[bytes]] = []
        try:
            runtime = spawn("services.runtime", env, root / "runtime.log")
            api: Child = spawn("services.api", env, root / "api.log")
            children += [runtime, api]
            base = api_base(api)
            await until_ready(base)
            chats = [str(uuid.uuid4()) for _ in range(CHATS)]
            async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=120) as http:
                for chat in chats:
                    created = await http.post("/api/v1/sandboxes", json={"chat_id": chat})
                    created.raise_for_status()
            print(f"{CHATS} chats running; wrk for {SECONDS}s per figure, in {ROUNDS} interleaved windows", flush=True)
            await measure("after ", base, root, chats)
            await asyncio.to_thread(floor_rows, new_report(), root, server.url, chats[0])
            if before_tree is not None:
                port = free_port()
                before = spawn_before(before_tree, env, root / "api-before.log", port)
                children.append(before)
                await until_ready(f"http://127.0.0.1:{port}")
                await measure("before", f"http://127.0.0.1:{port}", root, chats)
            async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=120) as http:
                for chat in chats:
                    await http.delete(f"/api/v1/sandboxes/{chat}")
        finally:
            for child in reversed(children):
                stop(child)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None))
