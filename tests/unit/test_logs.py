"""The JSON log line: one object, ASCII only, fields a record carries, and values JSON has no
type for written as text."""

from __future__ import annotations

import io
import json
import logging
import sys
import uuid
from datetime import UTC, datetime

import pytest

from shared.logs import FIELDS_ATTRIBUTE, JsonFormatter, bound_log_context, setup_json_logging


def _record(message: str, *args: object, fields: dict[str, object] | None = None) -> logging.LogRecord:
    record = logging.LogRecord("sandboxd.test", logging.WARNING, __file__, 1, message, args, None)
    if fields is not None:
        setattr(record, FIELDS_ATTRIBUTE, fields)
    return record


def test_a_line_is_one_ascii_json_object_with_the_records_fields() -> None:
    at = datetime(2026, 12, 7, 7, 30, tzinfo=UTC)
    chat = uuid.UUID("0b7a2c1e-0000-4000-8000-000000000001")
    record = _record("chat %s: caf\u00e9 \u2615", "c1", fields={"at": at, "chat": chat, "status": 200})
    with bound_log_context(command_id="cmd-1"):
        line = JsonFormatter("sandboxd-test").format(record)
    assert line.isascii()  # valid whatever the stream's encoding
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "chat c1: caf\u00e9 \u2615"
    assert entry["level"] == "warning"
    assert entry["service"] == "sandboxd-test"
    assert entry["logger"] == "sandboxd.test"
    assert entry["command_id"] == "cmd-1"
    assert entry["status"] == 200
    assert entry["at"] == str(at)  # no JSON type: its text
    assert entry["chat"] == str(chat)
    assert datetime.fromisoformat(entry["ts"]).tzinfo is not None


def test_an_exception_is_written_with_its_traceback() -> None:
    try:
        raise ValueError("boom")  # noqa: TRY301 - a real traceback to format
    except ValueError:
        record = logging.LogRecord("sandboxd.test", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter("sandboxd-test").format(record))
    assert "ValueError: boom" in entry["exception"]
    assert "Traceback" in entry["exception"]


def test_setup_writes_every_line_as_json_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    # What setup changes in the process, put back after the test by monkeypatch.
    for name in ("excepthook", "unraisablehook"):
        monkeypatch.setattr(sys, name, getattr(sys, name))
    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    try:
        setup_json_logging("sandboxd-test", "INFO")
        logging.getLogger("sandboxd.test").info("hello %s", "there")
        logging.getLogger("sandboxd.test").debug("not written at INFO")
    finally:
        logging.captureWarnings(capture=False)
    lines = stderr.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["hello there"]
