"""BENCH ONLY: `python -m tests.bench.runtime_main` runs a runtime whose container driver is
BenchNullDriver (no Docker), configured like any runtime through SANDBOXD_* variables.
Reconciliation is off: there are no containers to reconcile."""

from __future__ import annotations

import asyncio
import sys

import msgspec

from services.runtime.service import running_runtime
from shared.config import Settings
from shared.service import run_service
from tests.bench.null_driver import BenchNullDriver


async def serve(settings: Settings, stopping: asyncio.Event) -> None:
    settings = msgspec.structs.replace(
        settings, runtime=msgspec.structs.replace(settings.runtime, reconcile_enabled=False)
    )
    async with running_runtime(settings, driver=BenchNullDriver()):
        await stopping.wait()


if __name__ == "__main__":
    sys.exit(run_service("sandboxd-bench-runtime", serve))
