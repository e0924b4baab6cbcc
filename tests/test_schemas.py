"""schemas/ must be exactly what the contracts generate."""

from __future__ import annotations

import json
from pathlib import Path

from shared.schema_export import SCHEMA_DIR, generate, stale, write


def test_schemas_are_up_to_date() -> None:
    out = stale()
    assert not out, f"schemas/ is stale ({', '.join(out)}): run `just schemas` and commit the result"


def test_staleness_is_detected(tmp_path: Path) -> None:
    write(tmp_path)
    assert stale(tmp_path) == []
    (tmp_path / "commands" / "create.json").write_text("{}\n")
    (tmp_path / "events" / "gone.json").write_text("{}\n")
    assert stale(tmp_path) == ["commands/create.json", "events/gone.json"]


def test_every_event_type_has_a_schema_with_its_tag() -> None:
    docs = {rel: json.loads(text) for rel, text in generate().items()}
    for tag in ("provisioning", "running", "reused", "extended", "stopping", "stopped", "failed", "lost", "rejected"):
        doc = docs[f"events/{tag}.json"]
        name = doc["$ref"].rsplit("/", 1)[-1]
        assert doc["$defs"][name]["properties"]["type"]["enum"] == [tag]
    assert (SCHEMA_DIR / "session-record.json").is_file()
