"""`sandbox.oci_runtime`: `auto` picks gVisor when the engine lists it, runc otherwise; an
explicit runtime the engine lacks stops start-up naming the key; the warm pool is allowed
only under runtimes that see host mounts in a running container."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from services.runtime.containers import ContainerIdentity, container_spec, warm_layout_blocker
from services.runtime.oci import RuntimeUnavailable, choose_runtime, warm_pool_blocker
from shared.config import ConfigError, SandboxSettings, load_settings
from shared.contracts import SessionRecord, SessionStatus

RUNC: dict[str, Any] = {"runc": {"path": "runc"}, "io.containerd.runc.v2": {"path": "runc"}}
GVISOR: dict[str, Any] = {**RUNC, "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]}}


def info(runtimes: dict[str, Any], default: str = "runc") -> dict[str, Any]:
    return {"Runtimes": runtimes, "DefaultRuntime": default}


def test_auto_is_the_default_and_picks_gvisor_when_the_engine_lists_it() -> None:
    assert load_settings(environ={}).sandbox.oci_runtime == "auto"
    choice = choose_runtime("auto", info(GVISOR))
    assert (choice.name, choice.binary, choice.is_gvisor) == ("runsc", "/usr/bin/runsc", True)
    assert "lists runsc" in choice.why
    assert choice.warm_pool_blocker is None, "gVisor sees a mount made inside a warm container's slot"


def test_auto_falls_back_to_runc_and_keeps_the_pool() -> None:
    choice = choose_runtime("auto", info(RUNC))
    assert (choice.name, choice.is_gvisor, choice.warm_pool_blocker) == ("runc", False, None)
    assert "no runsc" in choice.why
    # An engine whose only runtime is another (its default) runs that.
    assert choose_runtime("auto", info({"crun": {"path": "/usr/bin/crun"}}, "crun")).name == "crun"


def test_an_explicit_runtime_is_used_when_listed_and_stops_start_up_when_not() -> None:
    assert choose_runtime("runc", info(GVISOR)).name == "runc"
    assert choose_runtime("runsc", info(GVISOR)).name == "runsc"
    with pytest.raises(
        RuntimeUnavailable, match=r"sandbox\.oci_runtime .*'runsc'.*lists: io\.containerd\.runc\.v2, runc"
    ):
        choose_runtime("runsc", info(RUNC))
    assert issubclass(RuntimeUnavailable, ConfigError)  # exit code 2: the stack stops


def test_without_an_engine_auto_leaves_the_runtime_to_it() -> None:
    assert choose_runtime("auto", None).name is None
    assert choose_runtime("runsc", None).name == "runsc"
    session = SessionRecord(
        session_id="00000000-0000-4000-8000-000000000001",
        chat_id="00000000-0000-4000-8000-000000000002",
        node_id="n",
        container_id=None,
        image="i",
        status=SessionStatus.PROVISIONING,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        expires_at=datetime(2026, 1, 2, tzinfo=UTC),
        updated_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    identity = ContainerIdentity(session.chat_id, session.session_id, "n")
    assert container_spec(identity, session, SandboxSettings()).oci_runtime is None  # never "auto" to Docker
    explicit = SandboxSettings(oci_runtime="runsc")
    assert container_spec(identity, session, explicit).oci_runtime == "runsc"


def test_the_warm_pool_needs_a_runtime_that_sees_host_mounts() -> None:
    assert warm_pool_blocker("runc", "runc") is None
    assert warm_pool_blocker("io.containerd.runc.v2", "/usr/sbin/runc") is None
    assert warm_pool_blocker("my-crun", "/usr/bin/crun") is None
    assert warm_pool_blocker("gvisor", "/usr/local/bin/runsc") is None  # by its program
    assert warm_pool_blocker("runsc", None) is None
    assert warm_pool_blocker("kata", "/usr/bin/kata-runtime") is not None  # unknown: off


def test_warm_containers_need_a_chat_mount_path_with_a_parent_of_its_own() -> None:
    assert warm_layout_blocker(SandboxSettings()) is None  # /workspace/chat: the slot at /workspace
    why = warm_layout_blocker(SandboxSettings(chat_mount_path="/chat"))
    assert why is not None
    assert "sandbox.chat_mount_path" in why
    overlapping = SandboxSettings(chat_mount_path="/opt/chat", dependencies_mount_path="/opt")
    why = warm_layout_blocker(overlapping)
    assert why is not None
    assert "sandbox.dependencies_mount_path" in why
    inside = SandboxSettings(lambda_tools_mount_path="/workspace/tools")
    assert "sandbox.lambda_tools_mount_path" in (warm_layout_blocker(inside) or "")
    assert warm_layout_blocker(SandboxSettings(chat_mount_path="/home/agent/chat")) is None


def test_a_bad_runtime_name_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match=r"sandbox\.oci_runtime"):
        load_settings(environ={"SANDBOXD_SANDBOX_OCI_RUNTIME": "run sc"})


def test_records_written_before_the_runtime_was_recorded_still_decode() -> None:
    old = {
        "session_id": "00000000-0000-4000-8000-000000000001",
        "chat_id": "00000000-0000-4000-8000-000000000002",
        "node_id": "n",
        "container_id": "c",
        "image": "i",
        "status": "running",
        "created_at": "2026-01-01T00:00:00+00:00",
        "expires_at": "2026-01-02T00:00:00+00:00",
        "updated_at": "2026-01-01T00:00:00+00:00",
    }
    record = msgspec.json.decode(msgspec.json.encode(old), type=SessionRecord)
    assert record.oci_runtime is None
    now = msgspec.json.decode(msgspec.json.encode({**old, "oci_runtime": "runsc"}), type=SessionRecord)
    assert now.oci_runtime == "runsc"
