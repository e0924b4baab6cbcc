"""One create is one trace across processes' spans, and each seed metric is recorded on its
path — with in-memory exporters, a real nats-server and the real Docker engine."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.reaper.service import running_reaper
from services.runtime.containers import ContainerIdentity, ContainerSpec
from services.runtime.docker_driver import DockerDriver, ObservedContainer
from services.runtime.service import running_runtime
from shared.config import Settings
from shared.errors import SandboxStopFailed
from shared.telemetry import Telemetry, setup_telemetry
from tests.conftest import TEST_TOKEN
from tests.support.api_server import serving_api
from tests.support.eventually import past, until


class StopFailsOnce:
    """The real Docker driver, except that the next removal of a chosen container fails."""

    def __init__(self, real: DockerDriver) -> None:
        self.real = real
        self.fail_for: str | None = None

    async def ensure_running(self, spec: ContainerSpec) -> str:
        return await self.real.ensure_running(spec)

    async def remove(self, identity: ContainerIdentity, stop_timeout_seconds: int, ref: str | None = None) -> None:
        if identity.session_id == self.fail_for:
            self.fail_for = None
            raise SandboxStopFailed(f"refusing to remove {identity.name} once, for the test")
        await self.real.remove(identity, stop_timeout_seconds, ref)

    async def list_managed(self, node_id: str) -> list[ObservedContainer]:
        return await self.real.list_managed(node_id)

    async def pause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        await self.real.pause(identity, ref)

    async def unpause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        await self.real.unpause(identity, ref)


def telemetry(service: str, spans: InMemorySpanExporter) -> tuple[Telemetry, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return (
        setup_telemetry(
            service, span_processors=[SimpleSpanProcessor(spans)], metric_readers=[reader], prometheus=False
        ),
        reader,
    )


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], float]]:
    data = reader.get_metrics_data()
    out: list[tuple[dict[str, Any], float]] = []
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        value = getattr(p, "value", None)
                        out.append((dict(p.attributes or {}), value if value is not None else getattr(p, "count", 0)))
    return out


def total(reader: InMemoryMetricReader, name: str, **attrs: str) -> float:
    return sum(v for a, v in points(reader, name) if all(a.get(k) == want for k, want in attrs.items()))


def named(spans: Iterable[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_one_create_is_one_trace_and_the_seed_metrics_follow_their_paths(
    settings: Settings, docker_client: Any, node_containers: None, tmp_path: Path
) -> None:
    spans = InMemorySpanExporter()
    api_telemetry, api_metrics = telemetry("sandboxd-api", spans)
    runtime_telemetry, runtime_metrics = telemetry("sandboxd-runtime", spans)
    reaper_telemetry, reaper_metrics = telemetry("sandboxd-reaper", spans)
    driver = StopFailsOnce(DockerDriver.from_env(30, telemetry=runtime_telemetry))
    async with (
        running_runtime(settings, driver=driver, telemetry=runtime_telemetry),
        serving_api(settings, api_telemetry) as url,
        httpx.AsyncClient(base_url=url, headers={"X-API-Token": TEST_TOKEN}, timeout=30) as http,
    ):
        chat = str(uuid.uuid4())
        created = await http.post("/api/v1/sandboxes", json={"chat_id": chat})
        assert created.status_code == 201
        names = (
            "HTTP POST",
            "api.send_command",
            "runtime.handle_command",
            "usecase.create_sandbox",
            "adapter.docker.create_sandbox",
            "projector.project_chat",
        )
        # The answer comes with the outcome event; the runtime's spans end once it has recorded
        # and acknowledged the command, and the projector's follows the event: all asynchronously.
        await until(lambda: all(named(spans.get_finished_spans(), n) for n in names), what="every span")
        trace_ids = {name: {s.context.trace_id for s in named(spans.get_finished_spans(), name)} for name in names}
        assert all(len(ids) == 1 for ids in trace_ids.values()), trace_ids
        assert len(set.union(*trace_ids.values())) == 1, "one create, one trace"
        usecase = named(spans.get_finished_spans(), "usecase.create_sandbox")[0]
        attrs = dict(usecase.attributes or {})
        assert attrs["chat.id"] == chat
        assert attrs["session.id"] == created.json()["session_id"]
        assert attrs["container.id"] == created.json()["container_id"]
        assert attrs["sandbox.result"] == "created"
        docker_span = named(spans.get_finished_spans(), "adapter.docker.create_sandbox")[0]
        assert dict(docker_span.attributes or {})["sandbox.result"] == "created"

        assert (await http.post("/api/v1/sandboxes", json={"chat_id": chat})).status_code == 200
        short = str(uuid.uuid4())
        first = (await http.post("/api/v1/sandboxes", json={"chat_id": short, "ttl_seconds": 1})).json()
        await past(datetime.fromisoformat(first["expires_at"]))  # no reaper yet: it stays, expired, to be replaced
        replaced = await http.post("/api/v1/sandboxes", json={"chat_id": short})
        assert replaced.status_code == 201

        # error: a read-only mount source that is missing
        (tmp_path / "deps").rename(tmp_path / "deps-away")
        failed = await http.post("/api/v1/sandboxes", json={"chat_id": str(uuid.uuid4())})
        assert failed.status_code == 502
        (tmp_path / "deps-away").rename(tmp_path / "deps")

        # cleanup and cleanup error: the reaper's expiry stops, one of which Docker refuses once
        doomed, stubborn = str(uuid.uuid4()), str(uuid.uuid4())
        await http.post("/api/v1/sandboxes", json={"chat_id": doomed, "ttl_seconds": 1})
        kept = (await http.post("/api/v1/sandboxes", json={"chat_id": stubborn, "ttl_seconds": 1})).json()
        driver.fail_for = kept["session_id"]
        async with running_reaper(settings, telemetry=reaper_telemetry) as reaper:
            await reaper.ready()
            await until(
                lambda: (
                    total(runtime_metrics, "sandbox.cleanup.total") >= 1
                    and total(runtime_metrics, "sandbox.cleanup.error.total") >= 1
                ),
                what="a cleanup and a cleanup error",
            )

    result_counts = {
        r: total(runtime_metrics, "sandbox.create.total", result=r) for r in ("created", "reused", "replaced", "error")
    }
    assert result_counts["created"] >= 3
    # The HTTP reuse was answered by the API from the chat's last event; the expired session
    # was not, it went to the runtime and was replaced.
    assert result_counts["reused"] == 0
    assert total(api_metrics, "sandbox.api.reuse_fast_path.total", result="reused") == 1
    assert total(api_metrics, "sandbox.api.reuse_fast_path.total", result="expired") == 1
    assert result_counts["error"] == 1
    replaced_json = replaced.json()
    assert replaced_json["result"] == "replaced"
    assert result_counts["replaced"] == 1
    assert replaced_json["session_id"] != first["session_id"]
    assert total(runtime_metrics, "sandbox.cleanup.total", result="cleaned") >= 1
    assert total(runtime_metrics, "sandbox.cleanup.error.total", **{"error.type": "sandbox_stop_failed"}) == 1
    assert total(runtime_metrics, "sandbox.runtime.create.duration_ms", operation="create", result="created") >= 3
    assert total(runtime_metrics, "sandbox.runtime.stop.duration_ms", operation="stop") >= 1
    assert total(runtime_metrics, "sandbox.runtime.error.total", operation="create") >= 1
    assert points(runtime_metrics, "sandbox.active.count")
    assert total(runtime_metrics, "sandbox.command.duration_ms", kind="create") >= 5
    assert total(reaper_metrics, "sandbox.reaper.action.total", reason="expired") >= 2
    # The projector counts what it did to the registry (per batch, by result).
    assert total(runtime_metrics, "sandbox.projector.projection.total", result="written") >= 3
    span = next(
        s
        for s in named(spans.get_finished_spans(), "usecase.create_sandbox")
        if dict(s.attributes or {}).get("sandbox.result") == "replaced"
    )
    attrs = dict(span.attributes or {})
    assert attrs["sandbox.previous_session.id"] == first["session_id"]
    assert attrs["sandbox.previous_container.id"] == first["container_id"]
    assert attrs["sandbox.new_session.id"] == replaced_json["session_id"]
    driver.real.close()
