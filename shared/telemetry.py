"""Telemetry ports (what inner code sees) and their OpenTelemetry implementation (what the
composition roots wire).

Inner code asks for `metrics.increment/record/set` and `tracer.span(...)`, as in the seed
service, and never imports the SDK. `setup_telemetry` builds the SDK providers once per
process: metrics are always kept for the Prometheus scrape endpoint; traces are recorded
and exported only when an OTLP endpoint (or a test's exporter) is configured, so a process
without one pays for no span processing. W3C trace context travels in NATS headers through
`inject` / `extract`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Status, StatusCode

Attributes = Mapping[str, str | int | float | bool]


class Span(Protocol):
    def set_attribute(self, key: str, value: str | float | bool) -> None: ...
    def record_error(self, error: BaseException) -> None: ...


class Tracer(Protocol):
    def span(
        self, name: str, attributes: Attributes | None = None, *, kind: SpanKind = SpanKind.INTERNAL, parent: Any = None
    ) -> contextlib.AbstractContextManager[Span]: ...


class Metrics(Protocol):
    def increment(self, name: str, attrs: Attributes | None = None, value: int = 1) -> None: ...
    def record(self, name: str, value: float, attrs: Attributes | None = None) -> None: ...
    def set(self, name: str, value: float, attrs: Attributes | None = None) -> None: ...


# --------------------------------------------------------------------------- OpenTelemetry


class _OtelSpan:
    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def set_attribute(self, key: str, value: str | float | bool) -> None:
        self._span.set_attribute(key, value)

    def record_error(self, error: BaseException) -> None:
        self._span.record_exception(error)
        self._span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


class _NoSpan:
    """The span of work no trace records or carries on (see OtelTracer.span)."""

    def set_attribute(self, key: str, value: str | float | bool) -> None:
        pass

    def record_error(self, error: BaseException) -> None:
        pass


class _NoSpanContext:
    def __enter__(self) -> Span:
        return _NO_SPAN

    def __exit__(self, *_: object) -> None:
        return None


_NO_SPAN = _NoSpan()
_NO_SPAN_CONTEXT = _NoSpanContext()


def _carries_trace(parent: otel_context.Context | None) -> bool:
    """Whether `parent` (None: the current context) holds a span context to carry on."""
    return trace.get_current_span(parent).get_span_context().is_valid


class OtelTracer:
    """`starts_traces`: whether a span with no trace to join starts a trace. Without an
    exporter such a trace is not recorded, and the runtime and reaper do not start it at
    all: the SDK's sampler, context attach and span objects cost a busy runtime about a
    twentieth of its CPU per command for nothing (a command's log lines are tied together by
    its `command_id`). The API does start it, unrecorded, so the lines one HTTP request logs
    share a `trace_id`. A span joining a trace (one that arrived in a request's or message's
    headers) is always started, sampled or not, so the trace goes on into what it causes."""

    def __init__(self, tracer: trace.Tracer, *, starts_traces: bool = True) -> None:
        self._tracer = tracer
        self._starts_traces = starts_traces

    def span(
        self, name: str, attributes: Attributes | None = None, *, kind: SpanKind = SpanKind.INTERNAL, parent: Any = None
    ) -> contextlib.AbstractContextManager[Span]:
        if not self._starts_traces and not _carries_trace(parent):
            return _NO_SPAN_CONTEXT
        return self._started(name, attributes, kind, parent)

    @contextlib.contextmanager
    def _started(self, name: str, attributes: Attributes | None, kind: SpanKind, parent: Any) -> Iterator[Span]:
        with self._tracer.start_as_current_span(
            name, context=parent, kind=kind, attributes=dict(attributes or {}), record_exception=False
        ) as span:
            wrapped = _OtelSpan(span)
            try:
                yield wrapped
            except Exception as exc:
                wrapped.record_error(exc)
                raise


# One series of a counter or gauge: its attributes, as a hashable key.
_SeriesKey = frozenset[tuple[str, str | int | float | bool]]


def _observe(series: dict[_SeriesKey, float]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_: CallbackOptions) -> Iterable[Observation]:
        # Called on the exporter's thread: the copy is one C call, atomic under the GIL.
        return [Observation(value, dict(key)) for key, value in series.copy().items()]

    return callback


@dataclass
class OtelMetrics:
    """Counters and gauges are kept here, a dictionary update per call, and handed to the SDK
    when a reader collects (observable instruments: the same names, types and values); the
    SDK's own `Counter.add` / `Gauge.set` cost ~4 µs each, several per command. Histograms
    are the SDK's own."""

    meter: otel_metrics.Meter
    _counts: dict[str, dict[_SeriesKey, float]] = field(default_factory=dict)
    _histograms: dict[str, otel_metrics.Histogram] = field(default_factory=dict)
    _gauges: dict[str, dict[_SeriesKey, float]] = field(default_factory=dict)

    def increment(self, name: str, attrs: Attributes | None = None, value: int = 1) -> None:
        series = self._counts.get(name)
        if series is None:
            series = self._counts[name] = {}
            self.meter.create_observable_counter(name, callbacks=[_observe(series)])
        key: _SeriesKey = frozenset(attrs.items()) if attrs else frozenset()
        series[key] = series.get(key, 0) + value

    def record(self, name: str, value: float, attrs: Attributes | None = None) -> None:
        histogram = self._histograms.get(name)
        if histogram is None:
            # No unit: the Prometheus exporter would append it to the seed's `..._ms` names.
            histogram = self._histograms[name] = self.meter.create_histogram(name)
        histogram.record(value, dict(attrs or {}))

    def set(self, name: str, value: float, attrs: Attributes | None = None) -> None:
        series = self._gauges.get(name)
        if series is None:
            series = self._gauges[name] = {}
            self.meter.create_observable_gauge(name, callbacks=[_observe(series)])
        series[frozenset(attrs.items()) if attrs else frozenset()] = value


@dataclass
class Telemetry:
    tracer: Tracer
    metrics: Metrics
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def setup_telemetry(
    service: str,
    *,
    otlp_endpoint: str | None = None,
    span_processors: list[SpanProcessor] | None = None,
    metric_readers: list[MetricReader] | None = None,
    prometheus: bool = True,
    always_start_traces: bool = False,
) -> Telemetry:
    """Build this process's providers (once, in its composition root). A span with no trace
    to join starts one when traces are exported, or `always_start_traces` (see OtelTracer)."""
    resource = Resource.create({"service.name": service})
    readers: list[MetricReader] = list(metric_readers or [])
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415

        readers.append(PrometheusMetricReader())
    processors: list[SpanProcessor] = list(span_processors or [])
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        base = otlp_endpoint.rstrip("/")
        processors.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{base}/v1/metrics")))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    # Without an exporter, traces are not started here (root spans are not sampled), but a
    # trace that arrives in a message's headers is carried on to the events it causes.
    sampler = ParentBased(ALWAYS_ON if processors else ALWAYS_OFF)
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    for processor in processors:
        tracer_provider.add_span_processor(processor)
    return Telemetry(
        tracer=OtelTracer(
            tracer_provider.get_tracer("sandboxd"), starts_traces=bool(processors) or always_start_traces
        ),
        metrics=OtelMetrics(meter_provider.get_meter("sandboxd")),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )


def disabled() -> Telemetry:
    """For code paths and tests that want no telemetry at all."""
    tracer = OtelTracer(trace.NoOpTracer(), starts_traces=False)
    return Telemetry(tracer=tracer, metrics=OtelMetrics(otel_metrics.NoOpMeter("sandboxd")))


# --------------------------------------------------------------------------- propagation


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current W3C trace context (`traceparent`, `tracestate`) to NATS headers.
    With no span context and no baggage current, the propagators add nothing: skipped."""
    if trace.get_current_span().get_span_context() != trace.INVALID_SPAN_CONTEXT or baggage.get_all():
        propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context NATS headers carry. Headers with none of the names the propagators
    read give an empty context, as the propagators would, without running them."""
    if not headers or propagate.get_global_textmap().fields.isdisjoint(headers):
        return otel_context.Context()
    return propagate.extract(dict(headers))


def elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
