"""bench/soak.py: its durations, its per-replica comparison and its latency windows (the live run is
`make soak`)."""

from __future__ import annotations

from bench.soak import compare, parse_args, windows


def test_durations_are_read_as_seconds() -> None:
    args = parse_args(["--duration", "30m", "--warmup", "45s", "--window", "2m"])
    assert (args.duration, args.warmup, args.window) == (1800, 45, 120)


def test_growth_is_per_replica_and_a_replaced_one_is_named() -> None:
    start = {1: {"replica": "sealserve:Ingress", "rss_mib": 200.0, "fds": 40},
             2: {"replica": "sealserve:TextToImage", "rss_mib": 500.0, "fds": 60}}
    end = {1: {"replica": "sealserve:Ingress", "rss_mib": 212.0, "fds": 41}}
    rows = {row["replica"]: row for row in compare(start, end)}
    assert rows["sealserve:Ingress"]["memory_growth"] == 0.06
    assert rows["sealserve:Ingress"]["fd_growth"] == 1
    assert "replaced" in rows["sealserve:TextToImage"]["note"]


def test_latency_windows_count_successes_only() -> None:
    answers = [(0.0, 0.1, 200), (1.0, 1.3, 200), (61.0, 61.05, 200), (62.0, 62.5, 503)]
    assert windows(answers, origin=0.0, window_s=60) == [
        {"from_s": 0, "requests": 2, "p50_ms": 300.0, "p99_ms": 300.0},  # nearest rank
        {"from_s": 60, "requests": 1, "p50_ms": 50.0, "p99_ms": 50.0},
    ]
