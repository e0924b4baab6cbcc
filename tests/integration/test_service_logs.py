"""The runtime's and the reaper's own start-up failures are JSON lines like the rest of their
logs (the API's are tested in test_api_logs.py): a configuration error names the key and
exits 2, a dependency that is not there says what to do and exits 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.support.nats_server import free_port


def run(module: str, **env: str) -> tuple[int, list[dict[str, Any]]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    done = subprocess.run(
        [sys.executable, "-m", module], env={**base, **env}, capture_output=True, text=True, timeout=60, check=False
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{module} wrote a line that is not JSON: {line!r}")
    return done.returncode, entries


@pytest.mark.parametrize("module", ["services.runtime", "services.reaper"])
def test_a_configuration_error_is_one_json_line_naming_the_key(module: str) -> None:
    code, entries = run(module, SANDBOXD_RUNTIME_MAX_IN_FLIGHT="lots")
    assert code == 2
    (entry,) = entries
    assert entry["level"] == "error"
    assert "configuration error" in entry["message"]
    assert "runtime.max_in_flight" in entry["message"]


@pytest.mark.parametrize("module", ["services.runtime", "services.reaper"])
def test_a_missing_dependency_is_a_json_line_that_says_what_to_do(module: str) -> None:
    nowhere = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    code, entries = run(
        module,
        SANDBOXD_NATS_URL=nowhere,
        SANDBOXD_NATS_CONNECT_TIMEOUT_SECONDS="1",
        SANDBOXD_TELEMETRY_RUNTIME_METRICS_PORT="0",
        SANDBOXD_TELEMETRY_REAPER_METRICS_PORT="0",
    )
    assert code == 1
    last = entries[-1]
    assert last["level"] == "error"
    assert "cannot start" in last["message"]
    assert nowhere.removeprefix("nats://") in last["message"]
