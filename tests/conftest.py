"""Shared fixtures: a real nats-server per test, the real Docker engine, the sandbox image.

A test that needs Docker or NATS skips when they are missing on a developer machine, and
fails under CI=true: CI must never pass by skipping the parts that matter. Every test under
tests/integration carries the `integration` marker (`just unit` deselects them).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest
from docker.errors import DockerException

from services.runtime.image import ensure_sandbox_image
from services.runtime.service import RuntimeHandle, running_runtime
from services.runtime.slots import unmount_all
from shared.config import Settings, load_settings
from tests.support.nats_cluster import NatsCluster, nats_cluster
from tests.support.nats_server import NatsServer, nats_server
from tests.support.processes import make_sandbox_dirs

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_IMAGE = "sandboxd-sandbox:latest"
TEST_TOKEN = "test-token-" + uuid.uuid4().hex


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark by place: a `pytestmark` in a conftest marks nothing, so the folder decides."""
    for item in items:
        if item.path.is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


def missing(what: str) -> None:
    """Skip on a developer machine without the dependency; fail under CI=true."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: missing infrastructure fails the run)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        missing(f"no Docker engine: {exc}")
        raise
    ensure_sandbox_image(client, TEST_IMAGE)
    yield client
    client.close()


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    try:
        with nats_server(tmp_path / "nats") as server:
            yield server
    except (OSError, RuntimeError) as exc:
        missing(f"cannot run nats-server: {exc}")


@pytest.fixture
def open_nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster without authentication (tests/support/nats_cluster.py);
    await `ready` before using JetStream."""
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(nats_cluster(tmp_path / "nats-cluster"))
        except (OSError, RuntimeError) as exc:
            missing(f"cannot run a nats-server cluster: {exc}")
            raise
        yield cluster


@pytest.fixture
def node_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(request: pytest.FixtureRequest, nats: NatsServer, tmp_path: Path, node_id: str) -> Settings:
    make_sandbox_dirs(tmp_path)
    extra = {}
    if request.node.get_closest_marker("without_death_watch") is not None:
        extra["SANDBOXD_RUNTIME_DEATH_WATCH_ENABLED"] = "false"
    return settings_for(nats.url, tmp_path, node_id, **extra)


def settings_for(url: str, root: Path, node_id: str, **extra: str) -> Settings:
    env = {
        "SANDBOXD_NATS_URL": url,
        "SANDBOXD_API_TOKEN": TEST_TOKEN,
        "SANDBOXD_API_WAIT_SECONDS": "20",
        "SANDBOXD_RUNTIME_NODE_ID": node_id,
        "SANDBOXD_SANDBOX_IMAGE": TEST_IMAGE,
        "SANDBOXD_SANDBOX_CHATS_ROOT": str(root / "chats"),
        "SANDBOXD_SANDBOX_DEPENDENCIES_HOST_PATH": str(root / "deps"),
        "SANDBOXD_SANDBOX_LAMBDA_TOOLS_HOST_PATH": str(root / "tools"),
        "SANDBOXD_SANDBOX_SLOTS_ROOT": str(root / "slots"),
        # Cold creates unless a test asks for the warm pool (tests/integration/test_warm_pool.py).
        "SANDBOXD_SANDBOX_WARM_POOL_SIZE": "0",
        # runc unless a test asks for gVisor or `auto` (tests/integration/test_container_options.py
        # and test_oci_runtime.py run their checks under both).
        "SANDBOXD_SANDBOX_OCI_RUNTIME": "runc",
        "SANDBOXD_SANDBOX_STOP_TIMEOUT_SECONDS": "1",
        # Tests drive reconciliation passes themselves (RuntimeHandle.reconciler.run_once).
        "SANDBOXD_RUNTIME_RECONCILE_ENABLED": "false",
        "SANDBOXD_REAPER_TICK_SECONDS": "0.2",
        **extra,
    }
    return load_settings(environ=env)


@pytest.fixture
def node_containers(docker_client: docker.DockerClient, node_id: str, tmp_path: Path) -> Iterator[None]:
    """Remove whatever containers this test's node left behind, and the warm slots' mounts."""
    yield
    for c in docker_client.containers.list(all=True, filters={"label": f"sandboxd.node_id={node_id}"}):
        c.remove(force=True)
    unmount_all(tmp_path / "slots")


@pytest.fixture
async def runtime(
    settings: Settings, docker_client: docker.DockerClient, node_containers: None
) -> AsyncIterator[RuntimeHandle]:
    async with running_runtime(settings) as handle:
        yield handle
