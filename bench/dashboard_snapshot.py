"""``python -m bench.dashboard_snapshot``: the Grafana dashboard's panels drawn from real data.

It starts what ``make serve`` starts (``sealserve serve``, its own local Ray, ``METRICS_PORT``)
with the text-to-image demo model sealed behind a local resource API and S3 server
(``devservers``) and the classifier local, sends a mixed traffic for ``--seconds`` (classify and
generate calls, missing and unknown credentials, a key over its rate limit, undecodable images),
scrapes the printed metrics URL every ``--every`` seconds, and draws every panel of
``lib/observability/dashboard.py`` (the panels of deploy/grafana/sealserve.json) with
matplotlib into ``docs/img/dashboard.png``.

The drawing is not Grafana: each panel's queries are evaluated over the scrapes as their PromQL
says (``rate`` as the per-second increase over the last ``--window`` seconds, ``sum by`` as the
sum over the other labels, ``histogram_quantile`` from the buckets' increase over the same
window), which is what Prometheus computes at a coarser resolution.

``--json-only`` only rewrites deploy/grafana/sealserve.json from its description.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import interrupt, write_serve_config
from devservers.resource_api import free_port
from devservers.stores import sealed_stores
from lib.cli.publish import detect_kind
from lib.models.demo import build_demo_models
from lib.models.imaging import encode_png
from lib.observability.dashboard import PANELS, Panel, Query, dashboard_json
from lib.sealed.cdn import CdnClient
from lib.sealed.publish import publish_model
from lib.sealed.resource_client import ResourceClient

ROOT = Path(__file__).resolve().parent.parent
PNG = ROOT / "docs" / "img" / "dashboard.png"
DASHBOARD = ROOT / "deploy" / "grafana" / "sealserve.json"
BUCKET, FOLDER = "sealed-models", "models"
PUBLISHER = ("publisher@bench.local", secrets.token_urlsafe(16))
READER = ("reader@bench.local", secrets.token_urlsafe(16))
API_KEY = "ss_bench_" + secrets.token_hex(20)
Scrape = tuple[float, dict[str, list[tuple[dict[str, str], float]]]]


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return samples


def _grouped(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
             by: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for labels, value in samples.get(name, []):
        sums[tuple(labels.get(k, "") for k in by)] += value
    return sums


def evaluate(query: Query, scrapes: list[Scrape], window_s: float) -> dict[str, list[tuple[float, float]]]:
    """Series (legend -> [(seconds, value)]) of one query over the scrapes."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    start = scrapes[0][0]
    name = query.metric.exported
    for i, (t, samples) in enumerate(scrapes):
        if query.fn == "value":
            for key, value in _grouped(samples, name, query.by).items():
                series[_legend(query, key)].append((t - start, value))
            continue
        earlier = [s for s in scrapes[:i] if t - s[0] >= window_s]  # rate(...[window]) of PromQL
        if not earlier:
            continue
        t0, old = earlier[-1]
        if query.fn == "rate":
            before = _grouped(old, name, query.by)
            for key, value in _grouped(samples, name, query.by).items():
                rate = max(0.0, value - before.get(key, 0.0)) / (t - t0)
                series[_legend(query, key)].append((t - start, rate))
        else:
            for key, value in _quantiles(query, old, samples).items():
                series[_legend(query, key)].append((t - start, value))
    return series


def _quantiles(query: Query, old: dict[str, Any], new: dict[str, Any]) -> dict[tuple[str, ...], float]:
    bucket = query.metric.exported + "_bucket"
    by = (*query.by, "le")
    delta = {k: v - _grouped(old, bucket, by).get(k, 0.0) for k, v in _grouped(new, bucket, by).items()}
    found: dict[tuple[str, ...], float] = {}
    for key in {k[:-1] for k in delta}:
        buckets = sorted((float(k[-1]), v) for k, v in delta.items() if k[:-1] == key)
        total = buckets[-1][1] if buckets else 0.0
        if total <= 0:
            continue
        rank, lower, below = query.quantile * total, 0.0, 0.0
        for upper, count in buckets:  # linear inside the bucket, as histogram_quantile does
            if count >= rank:
                if math.isinf(upper):
                    found[key] = lower
                else:
                    found[key] = lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
                break
            lower, below = upper, count
    return found


def _legend(query: Query, key: tuple[str, ...]) -> str:
    legend = query.legend
    for label, value in zip(query.by, key, strict=True):
        legend = legend.replace("{{" + label + "}}", value[:18])
    return legend


def draw(scrapes: list[Scrape], window_s: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = math.ceil(len(PANELS) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 5.2, rows * 3.2), squeeze=False)
    for ax, panel in zip(axes.flat, PANELS, strict=False):
        _draw_panel(ax, panel, scrapes, window_s)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.suptitle("sealserve: deploy/grafana/sealserve.json's panels, from real scrapes "
                 "(bench/dashboard_snapshot.py)", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def _draw_panel(ax: Any, panel: Panel, scrapes: list[Scrape], window_s: float) -> None:
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_ylabel(panel.unit, fontsize=8)
    ax.tick_params(labelsize=7)
    drawn = 0
    for query in panel.queries:
        for legend, points in sorted(evaluate(query, scrapes, window_s).items())[:8]:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=legend)
            drawn += 1
    if drawn:
        ax.legend(fontsize=6, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no data (nothing happened)", ha="center", va="center", transform=ax.transAxes,
                fontsize=8, color="gray")


def _traffic(url: str, models: dict[str, str], limited_key: str, stop: threading.Event) -> None:
    from PIL import Image

    image = encode_png(Image.new("RGB", (16, 16), (30, 120, 200)))
    good = {"Authorization": f"Bearer {API_KEY}"}
    tick = 0
    while not stop.is_set():
        tick += 1
        calls: list[tuple[str, dict[str, Any], dict[str, str]]] = [
            ("/v1/classify", {"image": image, "top_k": 1}, good),
            ("/v1/classify", {"image": image, "top_k": 1}, {"Authorization": f"Bearer {limited_key}"}),
        ]
        if tick % 3 == 0:
            calls.append(("/v1/classify", {"image": image}, {}))
        if tick % 5 == 0:
            unknown = {"Authorization": "Bearer ss_unknown_" + "x" * 30}
            calls.append(("/v1/classify", {"image": image}, unknown))
        if tick % 7 == 0:
            calls.append(("/v1/classify", {"image": "not base64!"}, good))
        if tick % 10 == 1:
            infer = {"id": f"b-{tick}", "model_id": models["tiny-sd"], "prompt": "a lighthouse",
                     "num_inference_steps": 2, "width": 256, "height": 256, "seed": tick}
            calls.append(("/v1/infer", infer, good))
        for path, body, headers in calls:
            with contextlib.suppress(requests.RequestException):
                requests.post(url + path, json=body, headers=headers, timeout=120)
        stop.wait(0.5)


def run(seconds: float, every: float, window_s: float, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        work = Path(tmp)
        demo = work / "demo"
        build_demo_models(demo)
        local = work / "models"
        local.mkdir()
        (local / "tiny-classifier").symlink_to(demo / "tiny-classifier")
        with sealed_stores(work, BUCKET, publisher=PUBLISHER, reader=READER, direct=True) as (s3, api):
            publish_model(demo / "tiny-sd", name="tiny-sd", folder=FOLDER, kind=detect_kind(demo / "tiny-sd"),
                          resources=ResourceClient(api.url, *PUBLISHER),
                          cdn=CdnClient(s3.config(BUCKET, direct=True)))
            write_serve_config(work / "config.yaml", {
                "environment": "production", "model_dirs": [str(local)], "state_dir": str(work / "state"),
                "default_inference_steps": 2,
                "sealed": {"resource_api_url": api.url, "folder": FOLDER, "models": ["tiny-sd"],
                           "cache_dir": str(work / "cache")},
            })
            _serve_and_draw(work, seconds, every, window_s, out)


def _serve_and_draw(work: Path, seconds: float, every: float, window_s: float, out: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "SECRET_KEY": secrets.token_urlsafe(40), "API_KEYS": API_KEY,
           "RESOURCE_API_EMAIL": READER[0], "RESOURCE_API_PASSWORD": READER[1],
           "METRICS_PORT": str(metrics_port), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    log = (work / "serve.out").open("wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "sealserve"), "serve", "--config", str(work / "config.yaml"),
         "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while "sealserve is ready" not in (work / "serve.out").read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "serve.out").read_text()[-3000:])
            time.sleep(1)
        good = {"Authorization": f"Bearer {API_KEY}"}
        limited = requests.post(f"{url}/v1/admin/keys", headers=good, timeout=30, json={
            "name": "bench-limited", "scopes": ["classify"], "rate_limit": "30/minute"}).json()["key"]
        listed = requests.get(f"{url}/v1/models", headers=good, timeout=30).json()["models"]
        models = {m["name"]: m["id"] for m in listed}
        stop = threading.Event()
        sender = threading.Thread(target=_traffic, args=(url, models, limited, stop), daemon=True)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        scrapes: list[Scrape] = [(time.monotonic(), scrape(metrics_url))]
        sender.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(every)
            scrapes.append((time.monotonic(), scrape(metrics_url)))
        stop.set()
        sender.join(timeout=150)
        draw(scrapes, window_s, out)
        print(f"{len(scrapes)} scrapes of {metrics_url} over {seconds:.0f}s drawn into {out}")
    finally:
        interrupt(process)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard_snapshot", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180.0, help="how long to send traffic")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between scrapes")
    parser.add_argument("--window", type=float, default=30.0, help="window of rate and quantiles (s)")
    parser.add_argument("--out", type=Path, default=PNG)
    parser.add_argument("--json-only", action="store_true", help="only rewrite the dashboard JSON")
    args = parser.parse_args(argv)
    DASHBOARD.write_text(dashboard_json())
    if not args.json_only:
        run(args.seconds, args.every, args.window, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
