"""Structured JSON logs: one object a line, with the current trace id and the ids bound to
the work in hand (`chat_id`, `session_id`, `command_id`). Secrets are never logged: nothing
here reads headers or settings."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType

from opentelemetry import trace

_context: ContextVar[dict[str, str] | None] = ContextVar("sandboxd_log_context", default=None)


@contextlib.contextmanager
def bound_log_context(**ids: str) -> Iterator[None]:
    """Attach ids to every log line written inside the block (in this task)."""
    token = _context.set({**(_context.get() or {}), **ids})
    try:
        yield
    finally:
        _context.reset(token)


# A record attribute holding a dict of fields to add to the line (`extra={"fields": {...}}`).
FIELDS_ATTRIBUTE = "fields"

# `json.dumps(..., default=str)` builds a new encoder on every call (only its all-defaults
# form reuses one); this one is built once and writes the same text.
_ENCODER = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = f"{span.trace_id:032x}"
            entry["span_id"] = f"{span.span_id:016x}"
        entry.update(_context.get() or {})
        fields = getattr(record, FIELDS_ATTRIBUTE, None)  # set by a filter or `extra=`
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


def skip_unused_record_fields() -> None:
    """Records stop looking up what no line shows: the calling frame, thread, process and
    multiprocessing names (the logging HOWTO's "Optimization"). Each record cost ~2 µs
    more with them; the API writes one (its access line) per request."""
    logging._srcfile = None  # noqa: SLF001 - the switch the HOWTO names for caller lookup
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def setup_json_logging(service: str, level: str = "INFO") -> None:
    """Every line the process writes to stderr becomes one JSON object: the root logger's
    records, Python warnings, and what the interpreter would print on its own (an uncaught
    exception, an exception it ignores, e.g. in a finaliser)."""
    skip_unused_record_fields()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(capture=True)
    uncaught = logging.getLogger("uncaught")

    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        uncaught.critical("uncaught exception: %s", value, exc_info=(kind, value, tb))

    def unraisablehook(unraisable: sys.UnraisableHookArgs) -> None:
        what = unraisable.err_msg or "exception ignored"
        exc = unraisable.exc_value
        info = (type(exc), exc, unraisable.exc_traceback) if exc is not None else None
        uncaught.error("%s: %r", what, unraisable.object, exc_info=info)

    sys.excepthook = excepthook
    sys.unraisablehook = unraisablehook
