"""deploy/grafana/sealserve.json: every panel queries metrics sealserve exports, by labels they have.

The file is read as Grafana would (its JSON, its PromQL strings), not through the Python that
wrote it; the last test checks the file is what lib/observability/dashboard.py makes, so the two
cannot drift (regenerate with ``python -m bench.dashboard_snapshot --json-only``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from lib.observability import metrics as m
from lib.observability.dashboard import dashboard_json

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sealserve.json"
EXPORTED = {spec.exported: spec for spec in m.METRICS}
# Labels Ray's agent puts on every series besides the metric's own tags.
RAY_LABELS = {"NodeAddress", "WorkerId", "SessionName", "Component", "Version"}
METRIC = re.compile(r"\bray_[a-z0-9_]+")
BY = re.compile(r"\bby \(([^)]*)\)")


@pytest.fixture(scope="module")
def panels() -> list[dict[str, Any]]:
    model = json.loads(DASHBOARD.read_text())
    found: list[dict[str, Any]] = model["panels"]
    return found


def _exprs(panels: list[dict[str, Any]]) -> list[str]:
    return [t["expr"] for p in panels for t in p["targets"]]


def test_every_panel_has_a_query(panels: list[dict[str, Any]]) -> None:
    assert panels and all(p["targets"] for p in panels)
    assert len({p["id"] for p in panels}) == len(panels)


def test_every_query_names_an_exported_metric_by_its_own_labels(panels: list[dict[str, Any]]) -> None:
    for expr in _exprs(panels):
        names = METRIC.findall(expr)
        assert names, expr
        for name in names:
            base = name.removesuffix("_bucket")
            assert base in EXPORTED, f"{expr}: {name} is not a metric sealserve exports"
            spec = EXPORTED[base]
            assert name == base or spec.kind == "histogram", expr
            for group in BY.findall(expr):
                labels = {label.strip() for label in group.split(",") if label.strip()}
                assert labels <= {*spec.tags, *RAY_LABELS, "le"}, expr
            assert ("rate(" in expr) == (spec.kind != "gauge"), f"{expr}: rate of a gauge or a raw counter"


def test_every_metric_has_a_panel(panels: list[dict[str, Any]]) -> None:
    shown = {name.removesuffix("_bucket") for expr in _exprs(panels) for name in METRIC.findall(expr)}
    assert shown == set(EXPORTED)


def test_panels_do_not_overlap(panels: list[dict[str, Any]]) -> None:
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        xs, ys = range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
        area = {(x, y) for x in xs for y in ys}
        assert not cells & area, panel["title"]
        assert pos["x"] + pos["w"] <= 24
        cells |= area


def test_the_file_is_the_one_the_code_describes() -> None:
    assert DASHBOARD.read_text() == dashboard_json()
