"""runc against gVisor (`runsc`), side by side, in one run (part of `just bench`; alone:
`uv run python -m tests.bench.gvisor`).

For each runtime a stack (API, runtime and reaper as processes) with
`sandbox.oci_runtime` set to it:
- cold create: a create through HTTP with no warm pool, interleaved with a bare docker-py
  `containers.run` of the same container under the same runtime (the floor);
- warm claim: a create through HTTP from a full pool (`sandbox.warm_pool_size`), with how many
  were served warm (all, unless the pool could not keep up).

No figure is asserted. Sizes: BENCH_GVISOR (creates per runtime and mode, 20). Needs runsc
registered with the engine (`infra/gvisor/register-runsc`); without it only runc is measured.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path
from typing import Any

import docker
import httpx

from services.runtime.image import ensure_sandbox_image
from services.runtime.oci import GVISOR
from services.runtime.slots import unmount_all
from tests.bench.harness import IMAGE, TOKEN, Report, _int, bare_run, dist, new_report, timed
from tests.bench.warm_pool import create, pool_full
from tests.support.nats_server import nats_server
from tests.support.processes import make_sandbox_dirs, sandboxd_env, spawn, stop, until_ready

NODE = "bench-gvisor"
POOL = 4


async def _stack_creates(
    client: docker.DockerClient, root: Path, runtime: str, pool: int, n: int
) -> tuple[list[float], list[float], int]:
    """(HTTP create ms, bare docker-py run ms, creates served warm) under one stack."""
    root.mkdir(parents=True, exist_ok=True)
    make_sandbox_dirs(root)
    ours: list[float] = []
    bare: list[float] = []
    warm = 0
    with nats_server(root / "nats") as server:
        env = sandboxd_env(
            server.url,
            root,
            NODE,
            TOKEN,
            SANDBOXD_SANDBOX_OCI_RUNTIME=runtime,
            SANDBOXD_SANDBOX_WARM_POOL_SIZE=str(pool),
            SANDBOXD_RUNTIME_MAX_SESSIONS="1000",
            SANDBOXD_TELEMETRY_LOG_LEVEL="WARNING",
        )
        rt = spawn("services.runtime", env, root / "runtime.log")
        api = spawn("services.api", env, root / "api.log")
        assert api.metrics_url is not None
        base = api.metrics_url.removesuffix("/metrics")
        try:
            await until_ready(base)
            async with httpx.AsyncClient(base_url=base, headers={"X-API-Token": TOKEN}, timeout=120) as http:
                warm_up = str(uuid.uuid4())
                await create(http, warm_up)  # first HTTP/NATS round trips
                await http.delete(f"/api/v1/sandboxes/{warm_up}")
                for _ in range(n):
                    ms, container = await timed(lambda: asyncio.to_thread(bare_run, client, root, runtime))
                    bare.append(ms)
                    await asyncio.to_thread(container.remove, force=True)
                    if pool:
                        await pool_full(rt, pool)
                    chat = str(uuid.uuid4())
                    ms, answer = await timed(lambda chat=chat: create(http, chat))  # type: ignore[misc]
                    ours.append(ms)
                    view = answer.json()
                    if view.get("oci_runtime") != runtime:
                        raise RuntimeError(f"session runs under {view.get('oci_runtime')}, not {runtime}")
                    inspected = await asyncio.to_thread(client.api.inspect_container, view["container_id"])
                    warm += inspected["Config"]["Labels"].get("sandboxd.pool") == "true"
                    await http.delete(f"/api/v1/sandboxes/{chat}")
        finally:
            stop(api)
            stop(rt)
            for c in client.containers.list(all=True, filters={"label": "sandboxd.bench=bare"}):
                c.remove(force=True)
            for c in client.containers.list(all=True, filters={"label": f"sandboxd.node_id={NODE}"}):
                c.remove(force=True)
            unmount_all(root / "slots")
    return ours, bare, warm


async def gvisor_section(report: Report, root: Path) -> None:
    client = docker.from_env()
    ensure_sandbox_image(client, IMAGE)
    n = _int("BENCH_GVISOR", 20)
    runtimes = ["runc"]
    if GVISOR in (client.info().get("Runtimes") or {}):
        runtimes.append(GVISOR)
    else:
        report.row("gVisor: the engine lists no runsc", "not measured", "", "", "infra/gvisor/register-runsc")
    figures: dict[str, Any] = {}
    for runtime in runtimes:
        for mode, pool in (("cold", 0), ("warm", POOL)):
            ours, bare, warm = await _stack_creates(client, root / f"{runtime}-{mode}", runtime, pool, n)
            o, b = dist(ours), dist(bare)
            figures[f"{runtime}_{mode}"] = {
                "http_create_ms": o,
                "bare_docker_py_ms": b,
                "served_warm": warm,
                "pool_size": pool,
            }
            what = f"{mode} create p50, {runtime} ({warm}/{n} warm)" if pool else f"cold create p50, {runtime}"
            report.row(what, f"{o['p50']:.1f} ms", f"{b['p50']:.1f} ms", f"{o['p50'] / b['p50']:.3f}")
    if GVISOR in runtimes:
        for mode in ("cold", "warm"):
            g, r = figures[f"{GVISOR}_{mode}"]["http_create_ms"], figures[f"runc_{mode}"]["http_create_ms"]
            report.row(
                f"{mode} create p50, gVisor vs runc (HTTP)",
                f"{g['p50']:.1f} ms",
                f"{r['p50']:.1f} ms",
                f"{g['p50'] / r['p50']:.2f}",
            )
    report.figures["gvisor"] = figures


async def main() -> None:
    report = new_report()
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-gvisor-") as tmp:
        await gvisor_section(report, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
