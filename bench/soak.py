"""Soak: moderate load on a live ``sealserve serve`` for a long time; does anything grow?

    make soak DURATION=30m
    python -m bench.soak --duration 5m --clients 2

Starts ``sealserve serve`` (as ``make drill`` does: production mode, the demo models, a fresh
SQLite or PostgreSQL database) and runs ``--clients`` closed-loop clients, every
``--infer-every``-th request a small generation and the rest classifications, for ``--duration``.
It reports each replica's memory (RSS) and open file descriptors (the fewest over 5 s) after a
warm-up and at the end (a replica that was replaced meanwhile is reported as such), p50/p99 latency per
``--window`` of time, and answers by status; to ``bench/reports/soak.json``. The targets: memory
growth at most 5 % per replica, no descriptor growth.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections import Counter
from typing import Any

import requests

from bench.drill import Service, classify_image, running_service
from bench.measures import percentile, process_label, rounded
from bench.processes import psutil
from bench.report import write_json
from lib.durations import parse_duration

MEMORY_GROWTH_LIMIT = 0.05
SETTLE_S = 10.0  # the load goes on while the last measure (5 samples a second apart) is taken


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", default="30m", help="how long the load runs, e.g. 30m, 2h")
    parser.add_argument("--warmup", default="1m", help="load before the first measure of the replicas")
    parser.add_argument("--window", default="1m", help="latency percentiles per window of this length")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients (moderate: 2)")
    parser.add_argument("--infer-every", type=int, default=20, help="every Nth request generates an image")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    for name in ("duration", "warmup", "window"):
        setattr(args, name, parse_duration(getattr(args, name)).total_seconds())
    return args


def settled(service: Service, samples: int = 5, interval_s: float = 1.0) -> dict[int, dict[str, Any]]:
    """:func:`replicas` over a few seconds: the fewest descriptors seen (a usage journal segment or
    a keep-alive connection opens and closes from moment to moment) and the last memory."""
    found: dict[int, dict[str, Any]] = {}
    for index in range(samples):
        for pid, now in replicas(service).items():
            seen = found.setdefault(pid, now)
            seen.update(rss_mib=now["rss_mib"], fds=min(seen["fds"], now["fds"]))
        if index < samples - 1:
            time.sleep(interval_s)
    return found


def replicas(service: Service) -> dict[int, dict[str, Any]]:
    """{pid: label, rss_mib, fds} of the run's replica processes."""
    found = {}
    for proc in service.server.members():
        with contextlib.suppress(psutil.Error):
            label = process_label(proc.name(), proc.cmdline())
            if label.startswith("ray::ServeReplica:"):
                found[proc.pid] = {"replica": label.removeprefix("ray::ServeReplica:"),
                                   "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                                   "fds": proc.num_fds()}
    return found


class SoakLoad:
    def __init__(self, service: Service, key: str, clients: int, infer_every: int, until: float) -> None:
        self.answers: list[tuple[float, float, int]] = []
        self._lock = threading.Lock()
        self._count = 0
        self._until = until
        self._infer_every = infer_every
        self._url = service.url
        self._headers = {"Authorization": f"Bearer {key}"}
        self._classify = {"image": classify_image(), "top_k": 1}
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        session = requests.Session()
        while time.monotonic() < self._until:
            with self._lock:
                self._count += 1
                infer = self._infer_every > 0 and self._count % self._infer_every == 0
            if infer:
                path, body = "/v1/infer", {"id": f"soak-{self._count}", "model_id": "tiny-sd",
                                           "prompt": "a quiet harbour", "width": 256, "height": 256,
                                           "num_inference_steps": 2, "seed": self._count}
            else:
                path, body = "/v1/classify", self._classify
            sent = time.monotonic()
            try:
                answer = session.post(self._url + path, json=body, headers=self._headers, timeout=120)
                status = answer.status_code
            except requests.RequestException:
                status = 0
            with self._lock:
                self.answers.append((sent, time.monotonic(), status))

    def join(self) -> None:
        for thread in self._threads:
            thread.join(max(1.0, self._until - time.monotonic() + 130))


def compare(start: dict[int, dict[str, Any]], end: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for pid, first in sorted(start.items(), key=lambda item: item[1]["replica"]):
        last = end.get(pid)
        row: dict[str, Any] = {"replica": first["replica"], "pid": pid, "start": first, "end": last}
        if last is None:
            row["note"] = "replaced or stopped during the soak"
        else:
            before = first["rss_mib"]
            row["memory_growth"] = rounded(last["rss_mib"] / before - 1, 4) if before else None
            row["fd_growth"] = last["fds"] - first["fds"]
        rows.append(row)
    return rows


def windows(answers: list[tuple[float, float, int]], origin: float, window_s: float) -> list[dict[str, Any]]:
    buckets: dict[int, list[float]] = {}
    for sent, done, status in answers:
        if 200 <= status < 300:
            buckets.setdefault(int((done - origin) // window_s), []).append((done - sent) * 1000)
    return [{"from_s": round(index * window_s), "requests": len(values),
             "p50_ms": rounded(percentile(values, 50), 1), "p99_ms": rounded(percentile(values, 99), 1)}
            for index, values in sorted(buckets.items())]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with running_service(args.database, args.ready_timeout, "soak") as service:
        admin = {"Authorization": f"Bearer {service.admin_key}"}
        created = requests.post(service.url + "/v1/admin/keys", headers=admin, timeout=30, json={
            "name": "soak", "scopes": ["infer", "classify"], "rate_limit": "100000/minute",
            "budget": None, "max_concurrent": None}).json()
        origin = time.monotonic()
        # Both measures under load: the load outlasts the last one.
        load = SoakLoad(service, created["key"], args.clients, args.infer_every,
                        origin + args.warmup + args.duration + SETTLE_S)
        time.sleep(args.warmup)
        start = settled(service)
        print(f"soak: {len(start)} replicas measured after the warm-up; loading for {args.duration:.0f} s",
              flush=True)
        time.sleep(max(0.0, origin + args.warmup + args.duration - time.monotonic()))
        end = settled(service)
        load.join()
    rows = compare(start, end)
    statuses = Counter(status for _, _, status in load.answers)
    grown = [r for r in rows
             if (r.get("memory_growth") or 0) > MEMORY_GROWTH_LIMIT or (r.get("fd_growth") or 0) > 0]
    report = {"duration_s": args.duration, "warmup_s": args.warmup, "clients": args.clients,
              "database": args.database, "answers": {str(k): v for k, v in sorted(statuses.items())},
              "replicas": rows, "windows": windows(load.answers, origin, args.window),
              "targets": {"memory_growth_at_most": MEMORY_GROWTH_LIMIT, "fd_growth_at_most": 0,
                          "met": not grown},
              "stop": service.stopped, "logs": str(service.workdir)}
    write_json("soak", report)
    for row in rows:
        if row.get("end"):
            print(f"{row['replica']:<28} rss {row['start']['rss_mib']:>8} -> {row['end']['rss_mib']:>8} MiB "
                  f"({row['memory_growth']:+.1%})  fds {row['start']['fds']} -> {row['end']['fds']}")
        else:
            print(f"{row['replica']:<28} {row['note']}")
    for window in report["windows"]:
        print(f"t={window['from_s']:>6}s  {window['requests']:>6} ok  p50 {window['p50_ms']} ms  "
              f"p99 {window['p99_ms']} ms")
    print(f"answers by status: {dict(statuses)}; targets met: {not grown}")
    return 0 if not grown else 1


if __name__ == "__main__":
    sys.exit(main())
