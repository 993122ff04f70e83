"""The request-path bench's pure helpers: parsing, percentiles, series, targets, the report's shape.

No timings and no servers: ``bench/request_path.py`` itself is run by ``make bench``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import lib.cli
from bench.load import LoadResult
from bench.measures import (
    breakdown,
    count_replicas,
    parse_created_key,
    parse_ready_url,
    parse_server_timing,
    per_second,
    percentile,
    process_label,
    replica_of,
    scaling_summary,
    stage_costs,
    target,
)
from bench.report import write_json
from bench.request_path_report import build_report, print_report, write_png

# -- Server-Timing ---------------------------------------------------------------------------------


def test_server_timing_reads_every_metric_with_a_duration() -> None:
    header = "auth;dur=0.12, limit;dur=0.4, model;dur=7.85, app;dur=10.78"
    assert parse_server_timing(header) == {"auth": 0.12, "limit": 0.4, "model": 7.85, "app": 10.78}


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, {}),
        ("", {}),
        ("cache", {}),  # a metric without dur
        ("auth;dur=abc, app;dur=3", {"app": 3.0}),  # a malformed dur is left out, the rest kept
        ('model;desc="a, b;c";dur=2.5, app;DUR=4', {"model": 2.5, "app": 4.0}),  # quoted commas
        ("auth;dur=1, auth;dur=9", {"auth": 1.0}),  # the first of a repeated metric wins
        ("  limit ; dur = 0.5 ,", {"limit": 0.5}),
        ("app;dur=nan, model;dur=inf", {}),
        ('app;dur="1.5"', {"app": 1.5}),
    ],
)
def test_server_timing_is_tolerant(header: str | None, expected: dict[str, float]) -> None:
    assert parse_server_timing(header) == expected


def test_stage_costs_per_request_gate_proxy_and_ingress_work() -> None:
    latencies = [20.0, 30.0, 40.0]
    headers = [
        "auth;dur=0.1, limit;dur=0.2, model;dur=8, app;dur=10",
        "auth;dur=0.3, limit;dur=0.4, model;dur=9, app;dur=12",
        "auth;dur=0.5, limit;dur=0.6, model;dur=10, app;dur=14",
    ]
    costs = stage_costs(latencies, headers)
    assert costs["responses"] == 3 and costs["with_server_timing"] == 3
    assert costs["p50_ms"] == {"auth": 0.3, "limit": 0.4, "model": 9.0, "app": 12.0}
    assert costs["gate_p50_ms"] == pytest.approx(0.7)
    assert costs["proxy_p50_ms"] == 18.0  # 30 - 12
    assert costs["app_minus_model_p50_ms"] == 3.0


def test_stage_costs_without_the_header_are_not_available() -> None:
    costs = stage_costs([5.0, 6.0], [None, None])
    assert costs["with_server_timing"] == 0
    assert set(costs["p50_ms"].values()) == {None}
    assert costs["gate_p50_ms"] is None and costs["proxy_p50_ms"] is None


def test_stage_costs_with_some_metrics_only() -> None:
    costs = stage_costs([20.0], ["auth;dur=0.1, limit;dur=0.2, app;dur=5"])
    assert costs["p50_ms"]["model"] is None
    assert costs["gate_p50_ms"] == pytest.approx(0.3)
    assert costs["proxy_p50_ms"] == 15.0
    assert costs["app_minus_model_p50_ms"] is None


# -- percentiles and series ------------------------------------------------------------------------


def test_percentile_is_the_load_generators_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    result = LoadResult(concurrency=1, seconds=1.0, latencies_ms=values)
    for p in (0, 50, 90, 99, 100):
        assert percentile(values, p) == result.percentile(p)
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_load_result_summary_keeps_its_shape() -> None:
    result = LoadResult(concurrency=2, seconds=2.0, latencies_ms=[1.0, 3.0], errors=1,
                        statuses={200: 2, 0: 1})
    summary = result.summary()
    assert summary["throughput_rps"] == 1.0 and summary["requests"] == 3 and summary["ok"] == 2
    assert summary["statuses"] == {"0": 1, "200": 2}
    assert result.done_at == [] and result.captured == []


def test_per_second_bins_completions() -> None:
    start = 100.0
    assert per_second([100.1, 100.9, 101.0, 102.5, 99.0, 104.0], start, 3.0) == [2, 1, 1]
    assert per_second([], start, 2.5) == [0, 0, 0]


# -- what commands print ---------------------------------------------------------------------------


def test_ready_url_from_the_banner() -> None:
    log = "starting Ray Serve ...\n\nsealserve is ready at http://127.0.0.1:8731  (OpenAPI docs: ...)\n"
    assert parse_ready_url(log) == "http://127.0.0.1:8731"
    assert parse_ready_url("sealserve is ready at http://10.0.0.2:9000/\n") == "http://10.0.0.2:9000"
    assert parse_ready_url("starting Ray Serve with serve_config.yaml on http://127.0.0.1:8000 ...") is None


def test_created_key_from_the_real_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lib.cli, "COMMAND_MODULES", ("lib.cli.keys",))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    code = lib.cli.main(["keys", "create", "--name", "bench-1", "--scopes", "infer,classify",
                         "--rate-limit", "100000/minute", "--database-url", f"sqlite:///{tmp_path / 'k.db'}"])
    assert code == 0
    key, key_id = parse_created_key(capsys.readouterr().out)
    assert key.startswith("ss_") and len(key) == 46
    assert key_id and key_id not in key


def test_created_key_refuses_output_without_a_key() -> None:
    with pytest.raises(ValueError):
        parse_created_key("Created API key 'x'\n  id:  abc\nStore this key now: it is shown only once.\n")
    with pytest.raises(ValueError):
        parse_created_key("")


# -- processes -------------------------------------------------------------------------------------


def test_replica_titles() -> None:
    assert replica_of("ray::ServeReplica:sealserve:ImageClassifier") == ("sealserve", "ImageClassifier")
    assert replica_of("ray::ServeReplica:sealserve:Ingress.handle_request_with_rejection") == (
        "sealserve", "Ingress")
    assert replica_of("ray::ServeController.listen_for_change") is None
    titles = [
        "ray::ServeReplica:sealserve:ImageClassifier   ",
        "ray::ServeReplica:sealserve:ImageClassifier.handle_request",
        "ray::ServeReplica:sealserve:TextToImage",
        "ray::ServeReplica:other:ImageClassifier",
        "ray::IDLE",
        "",
    ]
    assert count_replicas(titles, "sealserve") == {"ImageClassifier": 2, "TextToImage": 1}


@pytest.mark.parametrize(
    ("name", "cmdline", "label"),
    [
        ("ray::ServeContr", ["ray::ServeController.listen_for_change   "], "ray::ServeController"),
        ("ray::ServeRepli", ["ray::ServeReplica:sealserve:ImageClassifier   "],
         "ray::ServeReplica:sealserve:ImageClassifier"),
        ("ray-dashboard-N", ["ray-dashboard-NodeHead-0 (/x/python -B -c ...)"], "ray-dashboard-NodeHead"),
        ("python", ["/v/bin/python", "-u", "/v/ray/_private/log_monitor.py", "--x"], "log_monitor"),
        ("python", ["/v/bin/python", "-B", "-c", "from multiprocessing.forkserver import main; main(1)"],
         "multiprocessing forkserver"),
        ("raylet", ["/v/ray/core/src/ray/raylet/raylet", "--a"], "raylet"),
        ("serve", ["/v/bin/python", "/v/bin/serve", "run", "x.yaml"], "serve"),
        ("python3", ["/v/bin/python3", "-m", "bench.baseline_server"], "bench.baseline_server"),
    ],
)
def test_process_labels(name: str, cmdline: list[str], label: str) -> None:
    assert process_label(name, cmdline) == label


def test_breakdown_groups_by_label_largest_first() -> None:
    rows = [{"label": "a", "rss": 2**20}, {"label": "b", "rss": 3 * 2**20}, {"label": "a", "rss": 2**20}]
    assert breakdown(rows) == [{"label": "b", "count": 1, "rss_mib": 3.0},
                               {"label": "a", "count": 2, "rss_mib": 2.0}]


def _samples(counts: list[int]) -> list[dict[str, Any]]:
    return [{"t": float(t), "replicas": {"ImageClassifier": n}} for t, n in enumerate(counts)]


def test_scaling_summary_grew_and_shrank_back() -> None:
    summary = scaling_summary(_samples([1, 1, 2, 2, 2, 1, 1]), "ImageClassifier", 1.0, 4.0)
    assert summary == {"start": 1, "max_during_load": 2, "end": 1, "grew": True, "shrank_back": True}


def test_scaling_summary_without_growth_or_samples() -> None:
    flat = scaling_summary(_samples([1, 1, 1, 1]), "ImageClassifier", 1.0, 2.0)
    assert flat["grew"] is False and flat["shrank_back"] is False
    stayed = scaling_summary(_samples([1, 2, 2, 2]), "ImageClassifier", 1.0, 2.0)
    assert stayed["grew"] is True and stayed["shrank_back"] is False
    assert scaling_summary([], "ImageClassifier", 0.0, 1.0)["grew"] is None


def test_targets_are_met_unmet_or_not_measured() -> None:
    assert target("x", 1.6, 1.5, at_most=False)["met"] is True
    assert target("x", 1.4, 1.5, at_most=False)["met"] is False
    assert target("x", 0.9, 1.0, at_most=True)["met"] is True
    assert target("x", None, 1.0, at_most=True)["met"] is None


# -- the report ------------------------------------------------------------------------------------


def _run(rps: float, p50: float, errors: int = 0) -> dict[str, Any]:
    return {"throughput_rps": rps, "p50_ms": p50, "p99_ms": p50 * 2, "errors": errors, "requests": 10}


def sections(errors: int = 0, gate: float | None = 0.4) -> dict[str, Any]:
    samples = _samples([1, 1, 2, 2, 1])
    return {
        "classify": {"c1": {"sealserve": _run(50, 10), "baseline": _run(100, 5)},
                     "c32": {"sealserve": _run(300, 100, errors), "baseline": _run(150, 200)}},
        "stages": {"c1": stage_costs([10.0], ["auth;dur=0.1, limit;dur=0.3, model;dur=5, app;dur=7"]),
                   "usage_record_p50_ms": 0.001, "gate_plus_usage_p50_ms": gate},
        "infer": {"label": "tiny-sd", "device": "cpu", "ratio": 1.02, "ratio_of_medians": 1.06,
                  "ratio_of_minimums": 1.01,
                  "sealserve": {"median_s": 0.306, "spread": 1.1},
                  "direct": {"median_s": 0.3, "torch_threads": 2, "spread": 1.2},
                  "direct_1_thread": {"median_s": 0.3, "spread": 1.1},
                  "same_image": True, "same_image_1_thread": True},
        "memory": {"sealserve": {"total_rss_gib": 2.0, "total_pss_gib": 1.5, "processes": 20,
                                 "by_label": [{"label": "raylet", "count": 1, "rss_mib": 30.0}]},
                   "baseline": {"total_rss_gib": 0.5}, "ratio": 4.0},
        "scaling": {"load_start": 1.0, "load_seconds": 3.0, "idle_seconds": 1.0, "samples": samples,
                    "throughput_per_s": [100, 200, 300, 0],
                    "summary": {"ImageClassifier": scaling_summary(samples, "ImageClassifier", 1.0, 3.5)}},
    }


def test_report_has_ratios_and_every_target() -> None:
    report = build_report(sections())
    assert report["classify"]["c32"]["ratios"] == {"throughput": 2.0, "p50": 0.5, "p99": 0.5}
    assert report["classify"]["c1"]["ratios"]["throughput"] == 0.5
    met = {row["name"].split(",")[0].split(" ")[0]: row["met"] for row in report["targets"]}
    assert len(report["targets"]) == 6
    assert all(isinstance(row["met"], bool) or row["met"] is None for row in report["targets"])
    assert all({"name", "value", "limit", "met"} <= set(row) for row in report["targets"])
    assert met["classify"] is True and met["auth"] is True and met["/v1/infer"] is True
    assert met["sealserve"] is True and met["ImageClassifier"] is True and met["GPU:"] is None


def test_classify_target_needs_zero_errors_and_a_missing_gate_is_not_measured() -> None:
    report = build_report(sections(errors=3, gate=None))
    rows = {row["name"].split(" ")[0].rstrip(","): row for row in report["targets"]}
    assert rows["classify"]["met"] is False and rows["classify"]["errors"] == 3
    assert rows["auth"]["met"] is None and rows["auth"]["note"]


def test_a_noisy_infer_comparison_says_so() -> None:
    noisy = sections()
    noisy["infer"]["direct"]["spread"] = 6.0
    row = next(r for r in build_report(noisy)["targets"] if r["name"].startswith("/v1/infer"))
    assert row["met"] is True and "noisy" in row["note"] and "1.01x" in row["note"]
    quiet = next(r for r in build_report(sections())["targets"] if r["name"].startswith("/v1/infer"))
    assert "noisy" not in quiet["note"] and "1.01x" in quiet["note"]


def test_the_infer_target_is_judged_on_the_paired_rounds() -> None:
    row = next(r for r in build_report(sections())["targets"] if r["name"].startswith("/v1/infer"))
    # 1.02x paired meets 1.05x; the ratio of medians (1.06x) is shown, not judged.
    assert row["value"] == 1.02 and row["met"] is True and "ratio of medians 1.06x" in row["note"]


def test_merged_rounds_are_one_result() -> None:
    from bench.load import merge

    a = LoadResult(concurrency=4, seconds=2.0, latencies_ms=[1.0, 2.0], statuses={200: 2},
                   done_at=[1.0, 2.0], captured=["app;dur=1", None])
    b = LoadResult(concurrency=4, seconds=1.0, latencies_ms=[3.0], errors=1, statuses={200: 1, 503: 1},
                   done_at=[5.0], captured=["app;dur=2"])
    merged = merge([a, b])
    assert merged.seconds == 3.0 and merged.throughput == 1.0 and merged.errors == 1
    assert merged.statuses == {200: 3, 503: 1} and merged.captured == ["app;dur=1", None, "app;dur=2"]
    assert merged.latencies_ms == [1.0, 2.0, 3.0] and merged.done_at == [1.0, 2.0, 5.0]
    with pytest.raises(ValueError):
        merge([])


def test_report_prints_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = build_report(sections())
    report["classify"]["c1"]["baseline"]["p99_ms"] = math.nan
    print_report(report)
    assert "targets:" in capsys.readouterr().out
    path = write_json("request_path", report, reports_dir=tmp_path)
    written = json.loads(path.read_text())  # strict JSON: NaN became null
    assert written["classify"]["c1"]["baseline"]["p99_ms"] is None
    assert {"name", "created", "environment", "targets"} <= set(written)
    assert write_png(tmp_path / "request_path.png", report)
    assert (tmp_path / "request_path.png").stat().st_size > 10_000
