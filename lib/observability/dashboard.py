"""The Grafana dashboard (deploy/grafana/sealserve.json), described once in Python.

Each panel is a list of :class:`Query` objects over the metrics of :mod:`lib.observability.metrics`;
:func:`dashboard` renders them as PromQL in Grafana's JSON model. The same objects drive
``bench/dashboard_snapshot.py``, which draws the panels from real scrapes (a PNG for the docs), and
the test that checks the committed JSON is this one and names only exported metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from lib.observability import metrics as m
from lib.observability.metrics import MetricSpec

Fn = Literal["rate", "value", "quantile"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Query:
    metric: MetricSpec
    fn: Fn
    by: tuple[str, ...] = ()
    quantile: float = 0.95
    window: str = "5m"
    legend: str = ""

    @property
    def expr(self) -> str:
        by = f" by ({', '.join(self.by)})" if self.by else ""
        name = self.metric.exported
        if self.fn == "rate":
            return f"sum{by} (rate({name}[{self.window}]))"
        if self.fn == "value":
            return f"sum{by} ({name})"
        le_by = f" by ({', '.join(('le', *self.by))})"
        return f"histogram_quantile({self.quantile}, sum{le_by} (rate({name}_bucket[{self.window}])))"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...]


def _q(metric: MetricSpec, fn: Fn, *by: str, legend: str = "", quantile: float = 0.95) -> Query:
    default = "{{" + "}} {{".join(by) + "}}" if by else metric.name
    return Query(metric, fn, by, quantile, "5m", legend or default)


PANELS: tuple[Panel, ...] = (
    Panel("Requests by route and status", "reqps", (_q(m.REQUESTS, "rate", "route", "status"),)),
    Panel("Auth failures by reason", "reqps", (_q(m.AUTH_FAILURES, "rate", "reason"),)),
    Panel("Rate-limited and over-budget answers", "reqps",
          (_q(m.RATE_LIMITED, "rate", legend="rate limited"),
           _q(m.OVER_BUDGET, "rate", legend="over budget"))),
    Panel("Cost by key id (image-steps/s)", "short", (_q(m.REQUEST_COST, "rate", "key_id"),)),
    Panel("Generation latency by model", "s",
          (_q(m.GENERATION_SECONDS, "quantile", "model", legend="p50 {{model}}", quantile=0.5),
           _q(m.GENERATION_SECONDS, "quantile", "model", legend="p95 {{model}}"))),
    Panel("Classification latency by model", "s",
          (_q(m.CLASSIFICATION_SECONDS, "quantile", "model", legend="p50 {{model}}", quantile=0.5),
           _q(m.CLASSIFICATION_SECONDS, "quantile", "model", legend="p95 {{model}}"))),
    Panel("Running generations", "short", (_q(m.GENERATIONS_RUNNING, "value", "model"),)),
    Panel("Classifier batch size", "short",
          (_q(m.BATCH_SIZE, "quantile", "model", legend="p50 {{model}}", quantile=0.5),
           _q(m.BATCH_SIZE, "quantile", "model", legend="p95 {{model}}"))),
    Panel("Loader cache hits and misses", "ops",
          (_q(m.LOADER_CACHE_HITS, "rate", legend="hits"),
           _q(m.LOADER_CACHE_MISSES, "rate", legend="misses"))),
    Panel("Sealed fetches by result", "ops", (_q(m.LOADER_FETCHES, "rate", "result"),)),
    Panel("Bytes fetched and decrypted", "Bps",
          (_q(m.LOADER_FETCHED_BYTES, "rate", legend="fetched"),
           _q(m.LOADER_DECRYPTED_BYTES, "rate", legend="decrypted"))),
    Panel("Key releases", "ops", (_q(m.LOADER_KEY_RELEASES, "rate", legend="key releases"),)),
    Panel("Node cache in use", "bytes", (_q(m.LOADER_CACHE_BYTES, "value", "NodeAddress"),)),
    Panel("Node cache evictions", "ops", (_q(m.LOADER_EVICTIONS, "rate", legend="evictions"),)),
    Panel("Time to model-ready", "s",
          (_q(m.MODEL_READY_SECONDS, "quantile", "deployment", legend="p95 {{deployment}}"),)),
    Panel("Usage records", "ops",
          (_q(m.USAGE_QUEUED, "rate", legend="queued"), _q(m.USAGE_WRITTEN, "rate", legend="written"),
           _q(m.USAGE_RETRIED, "rate", legend="retried"), _q(m.USAGE_DROPPED, "rate", legend="dropped"))),
)
COLUMNS = 4
PANEL_WIDTH, PANEL_HEIGHT = 6, 8


def dashboard() -> dict[str, Any]:
    """Grafana's JSON model of the dashboard (importable as is; pick the Prometheus data source)."""
    panels = []
    for index, panel in enumerate(PANELS):
        panels.append({
            "id": index + 1,
            "type": "timeseries",
            "title": panel.title,
            "datasource": DATASOURCE,
            "gridPos": {"h": PANEL_HEIGHT, "w": PANEL_WIDTH, "x": (index % COLUMNS) * PANEL_WIDTH,
                        "y": (index // COLUMNS) * PANEL_HEIGHT},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [
                {"refId": chr(ord("A") + n), "datasource": DATASOURCE, "expr": q.expr,
                 "legendFormat": q.legend}
                for n, q in enumerate(panel.queries)
            ],
        })
    return {
        "title": "sealserve",
        "uid": "sealserve",
        "tags": ["sealserve", "ray-serve"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
