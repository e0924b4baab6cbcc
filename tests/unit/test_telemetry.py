"""Spans nobody records or carries on are not started; a trace that arrives is carried on.
Counters and gauges read as the SDK's own instruments would."""

from __future__ import annotations

from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.telemetry import extract, inject, setup_telemetry

_TRACE = "0af7651916cd43dd8448eb211c80319c"


def _traceparent(*, sampled: bool) -> dict[str, str]:
    return {"traceparent": f"00-{_TRACE}-b7ad6b7169203331-{'01' if sampled else '00'}"}


def test_without_an_exporter_a_span_with_no_trace_to_join_is_not_started() -> None:
    telemetry = setup_telemetry("t", prometheus=False)
    with telemetry.tracer.span("work", {"a": "b"}, parent=extract({"Nats-Msg-Id": "x"})):
        assert trace.get_current_span().get_span_context() == trace.INVALID_SPAN_CONTEXT
        assert inject({}) == {}
    telemetry.shutdown()


def test_without_an_exporter_a_trace_from_the_headers_goes_on_into_what_it_causes() -> None:
    telemetry = setup_telemetry("t", prometheus=False)
    for sampled in (True, False):
        with telemetry.tracer.span("work", parent=extract(_traceparent(sampled=sampled))):
            headers = inject({})
            with telemetry.tracer.span("inner"):
                inner = inject({})
        for carried in (headers, inner):
            _version, trace_id, span_id, flags = carried["traceparent"].split("-")
            assert trace_id == _TRACE
            assert flags == ("01" if sampled else "00")
            assert span_id != "b7ad6b7169203331"  # a span of its own, child of the sender's
    telemetry.shutdown()


def test_the_api_starts_an_unrecorded_trace_for_its_log_lines() -> None:
    telemetry = setup_telemetry("t", prometheus=False, always_start_traces=True)
    with telemetry.tracer.span("HTTP POST", parent=extract({})):
        context = trace.get_current_span().get_span_context()
        assert context.is_valid
        assert not context.trace_flags.sampled
        assert inject({})["traceparent"].split("-")[1] == f"{context.trace_id:032x}"
    telemetry.shutdown()


def test_with_an_exporter_every_span_is_recorded() -> None:
    spans = InMemorySpanExporter()
    telemetry = setup_telemetry("t", span_processors=[SimpleSpanProcessor(spans)], prometheus=False)
    with telemetry.tracer.span("root", parent=extract(None)):
        assert "traceparent" in inject({})
    with telemetry.tracer.span("joined", parent=extract(_traceparent(sampled=True))):
        pass
    recorded = {s.name: s for s in spans.get_finished_spans()}
    assert set(recorded) == {"root", "joined"}
    assert recorded["joined"].context is not None
    assert f"{recorded['joined'].context.trace_id:032x}" == _TRACE
    telemetry.shutdown()


def test_extract_gives_what_the_propagators_give() -> None:
    cases: list[dict[str, str] | None] = [
        None,
        {},
        {"Nats-Msg-Id": "x", "Traceparent": "not the name"},
        _traceparent(sampled=True),
        _traceparent(sampled=False),
        {"tracestate": "k=v"},
        {"baggage": "k=v"},
        {"traceparent": "garbage"},
    ]
    for headers in cases:
        ours, theirs = extract(headers), propagate.extract(dict(headers or {}))
        assert trace.get_current_span(ours).get_span_context() == trace.get_current_span(theirs).get_span_context()
        assert baggage.get_all(ours) == baggage.get_all(theirs), headers


def _points(reader: InMemoryMetricReader) -> dict[str, dict[frozenset[tuple[str, object]], float]]:
    """name -> {attributes: value} of every counter and gauge the reader collects."""
    found: dict[str, dict[frozenset[tuple[str, object]], float]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = found.setdefault(metric.name, {})
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    if value is not None:
                        points[frozenset(dict(point.attributes or {}).items())] = value
    return found


def test_counters_and_gauges_read_as_the_sdks_own_instruments_would() -> None:
    ours_reader, sdk_reader = InMemoryMetricReader(), InMemoryMetricReader()
    ours = setup_telemetry("t", metric_readers=[ours_reader], prometheus=False).metrics
    meter = MeterProvider(metric_readers=[sdk_reader]).get_meter("sandboxd")
    counters: dict[str, Any] = {}
    gauges: dict[str, Any] = {}
    calls: list[tuple[str, str, dict[str, Any], float]] = [
        ("increment", "sandbox.create.total", {"result": "created", "node": "a"}, 1),
        ("increment", "sandbox.create.total", {"node": "a", "result": "created"}, 1),  # the same series
        ("increment", "sandbox.create.total", {"result": "reused"}, 3),
        ("increment", "sandbox.cleanup.total", {}, 1),
        ("set", "sandbox.active.count", {}, 3),
        ("set", "sandbox.active.count", {}, 5),
        ("set", "sandbox.lag", {"consumer": "a"}, 7),
        ("set", "sandbox.lag", {"consumer": "b"}, 0),
    ]
    for rounds in range(2):  # counters keep adding up across collections; gauges keep their last value
        for kind, name, attrs, value in calls:
            if kind == "increment":
                ours.increment(name, attrs, int(value))
                if name not in counters:
                    counters[name] = meter.create_counter(name)
                counters[name].add(value, attrs)
            else:
                ours.set(name, value + rounds, attrs)
                if name not in gauges:
                    gauges[name] = meter.create_gauge(name)
                gauges[name].set(value + rounds, attrs)
        assert _points(ours_reader) == _points(sdk_reader)
    assert _points(ours_reader)["sandbox.create.total"][frozenset({"result": "created", "node": "a"}.items())] == 4
