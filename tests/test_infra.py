"""The shipped dashboard charts metrics the code records."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recorded_metric_names() -> set[str]:
    names: set[str] = set()
    for path in [*ROOT.glob("services/**/*.py"), *ROOT.glob("shared/**/*.py")]:
        names |= set(re.findall(r'"(sandbox\.[a-z_.]+)"', path.read_text()))
        names |= {
            f"sandbox.runtime.{op}.duration_ms" for op in re.findall(r'"sandbox\.runtime\.\{(\w+)\}', path.read_text())
        }
    names |= {f"sandbox.runtime.{op}.duration_ms" for op in ("create", "stop", "list_active")}
    return {n.replace(".", "_") for n in names}


def test_every_dashboard_metric_is_recorded_somewhere() -> None:
    dashboard = json.loads((ROOT / "infra" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = set(re.findall(r"\bsandbox_[a-z_]+", exprs))
    recorded = recorded_metric_names()
    missing = {m for m in used if m not in recorded and re.sub(r"_(bucket|count|sum)$", "", m) not in recorded}
    assert not missing, f"the dashboard charts metrics nothing records: {sorted(missing)}"
    assert {"sandbox_create_total", "sandbox_active_count", "sandbox_cleanup_total"} <= used
