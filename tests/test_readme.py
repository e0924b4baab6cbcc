"""The README's configuration table and commands must match the code."""

from __future__ import annotations

from pathlib import Path

import msgspec

from shared.config import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_configuration_key() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = []
    for section in msgspec.structs.fields(Settings):
        for field in msgspec.structs.fields(section.type):
            row = f"| `{section.name}.{field.name}` | `{env_name(section.name, field.name)}` |"
            if row not in readme:
                missing.append(row)
    assert not missing, "README configuration table lacks:\n" + "\n".join(missing)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    assert "just test" in (ROOT / "README.md").read_text()
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines[-1] == "just test"
