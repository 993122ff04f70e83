"""Many nodes fetching one sealed model at once: what it costs the resource API and the store.

    python -m bench.fleet [--nodes 1,2,4,8] [--size-mb 64]

One run starts moto (behind the counting proxy of ``devservers.s3``) and the resource API as
processes, publishes a random model, and then, for each N, starts N loader processes on this
machine. Each does what a node's ModelLoader does: log in and list the folder at start-up, then,
on a shared "go", fetch the model into its own tmpfs cache (``SealedFetcher.fetch``: key release,
CDN config, one streamed GET, decrypt, verify, hash). Every process records the requests its
resource API client sent; the proxy counts the store's requests and bytes; the resource API's
own audit counts key releases, and its CPU time is read from ``/proc``.

Reported per N: the total time from "go" to the last verified model against N x the time of one
fetch (N = 1 of the same run; below 1.0 the fetches overlap, above it they contend), the
requests each side served, and the resource API's CPU per request — the figures behind the
100-node estimate in docs/sealed-models.md. All N processes share this machine's cores, so the
total time measures contention here, not a network; the request counts do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.report import MB, write_json
from bench.sealing import make_random_file
from devservers.resource_api import RecordingSession, ResourceApiServer
from devservers.s3 import S3Server
from devservers.stores import bench_node_key, sealed_stores

BUCKET = "bench-fleet"
FOLDER = "fleet"
NAME = "fleet-model"
PUBLISHER_EMAIL = "fleet-publisher@example.com"
READER_EMAIL = "fleet-node@example.com"
PASSWORD_ENV = "FLEET_READER_PASSWORD"  # noqa: S105 - the name of the variable
PROCESS_DEADLINE_S = 600.0


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- one node (a child process) --------------------------------------------------------------------


def node_main(api_url: str, cache: Path) -> int:
    """A loader: start up (login + listing), wait for "go" on stdin, fetch, print one JSON line;
    then, on "again", fetch once more to measure memory with the S3 client already built."""
    from lib.sealed.cdn import CdnClient
    from lib.sealed.fetch import SealedFetcher, SealedRef
    from lib.sealed.fingerprint import node_fingerprint
    from lib.sealed.resource_client import ResourceClient

    session = RecordingSession()
    resources = ResourceClient(api_url, READER_EMAIL, os.environ[PASSWORD_ENV], session=session,
                               node_key=bench_node_key())
    listed = {m.name: m for m in resources.list(FOLDER)}[NAME]
    fetcher = SealedFetcher(resources, fingerprint=node_fingerprint(),
                            cdn_factory=lambda config: CdnClient(config, read_timeout=120.0))
    startup_calls = len(session.calls)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts over from here
    rss_before = _status_bytes("VmRSS")
    started = time.time()
    outcome = fetcher.fetch(SealedRef(FOLDER, NAME, listed.id), cache, hint=listed)
    ended = time.time()
    rss_growth = _status_bytes("VmHWM") - rss_before
    outcome.path.unlink()
    calls = [f"{method} {path.rsplit('/', 1)[0] if path.startswith('/resources/get') else path}"
             for method, path, _ in session.calls]
    report = {
        "started": started, "ended": ended, "fetch_s": outcome.seconds, "details": outcome.details,
        "peak_rss_growth": rss_growth,
        "startup_calls": calls[:startup_calls], "fetch_calls": calls[startup_calls:],
    }
    print(json.dumps(report), flush=True)
    if sys.stdin.readline().strip() != "again":
        return 1
    # The first fetch's growth includes building the S3 client (botocore loads its service
    # model); a second fetch shows what fetching itself holds.
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = _status_bytes("VmRSS")
    fetcher.fetch(SealedRef(FOLDER, NAME, listed.id), cache, hint=listed).path.unlink()
    print(json.dumps({"peak_rss_growth": _status_bytes("VmHWM") - rss_before}), flush=True)
    return 0


# -- the fleet (the parent) ------------------------------------------------------------------------


def _start_nodes(
    count: int, api: ResourceApiServer, password: str, work: Path
) -> list[subprocess.Popen[str]]:
    env = {**os.environ, PASSWORD_ENV: password}
    nodes = []
    for index in range(count):
        cache = work / f"node-{index}"
        cache.mkdir(mode=0o700, parents=True)
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "bench.fleet", "--node", "--api", api.url, "--cache", str(cache)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd=Path(__file__).resolve().parents[1],
        ))
    return nodes


def _line(node: subprocess.Popen[str]) -> str:
    assert node.stdout is not None
    line = node.stdout.readline()
    if not line:
        raise SystemExit(f"a node failed its fetch (exit {node.wait(timeout=30)})")
    return line


def run_fleet(count: int, api: ResourceApiServer, s3: S3Server, password: str, work: Path) -> dict[str, Any]:
    startup_cpu = _cpu_seconds(api.pid)
    nodes = _start_nodes(count, api, password, work)
    try:
        for node in nodes:  # every node has logged in and listed: only the fetches remain
            assert node.stdout is not None
            if node.stdout.readline().strip() != "ready":
                raise SystemExit(f"a node failed to start (exit {node.wait(timeout=30)})")
        s3.reset_counts()
        api_cpu = _cpu_seconds(api.pid)
        startup_cpu = api_cpu - startup_cpu
        go = time.time()
        for node in nodes:
            assert node.stdin is not None
            node.stdin.write("go\n")
            node.stdin.flush()
        reports = [json.loads(_line(node)) for node in nodes]
        api_cpu = _cpu_seconds(api.pid) - api_cpu
        store_requests = s3.requests()
        for node, report in zip(nodes, reports, strict=True):  # one at a time: memory, not speed
            assert node.stdin is not None
            node.stdin.write("again\n")
            node.stdin.flush()
            report["peak_rss_growth_again"] = json.loads(_line(node))["peak_rss_growth"]
            node.communicate(timeout=PROCESS_DEADLINE_S)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    gets = [r for r in store_requests if r.method == "GET"]
    fetch_calls = Counter(call for report in reports for call in report["fetch_calls"])
    startup_calls = Counter(call for report in reports for call in report["startup_calls"])
    return {
        "nodes": count,
        "total_s": max(r["ended"] for r in reports) - go,
        "fetch_s": sorted(round(r["fetch_s"], 3) for r in reports),
        "resource_api_requests_at_startup": dict(startup_calls),
        "resource_api_requests_per_fetch": dict(fetch_calls),
        "resource_api_requests": sum(fetch_calls.values()),
        "resource_api_cpu_s": round(api_cpu, 3),
        "resource_api_startup_cpu_s": round(startup_cpu, 3),
        "store_requests": len(store_requests),
        "store_gets": len(gets),
        "store_bytes": sum(r.sent for r in gets),
        "resumes": sum(r["details"]["resumes"] for r in reports),
        # Resident set growth of each loader process during its first fetch (which builds the S3
        # client) and during a second one; the plaintext is in tmpfs, not in the process.
        "peak_rss_growth_mb": sorted(round(r["peak_rss_growth"] / MB, 1) for r in reports),
        "peak_rss_growth_again_mb": sorted(round(r["peak_rss_growth_again"] / MB, 1) for r in reports),
    }


def run(counts: list[int], size_mb: int, tmp_dir: Path | None) -> Path:
    passwords = {PUBLISHER_EMAIL: secrets.token_urlsafe(16), READER_EMAIL: secrets.token_urlsafe(16)}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir=tmp_dir) as tmp:
        work = Path(tmp)
        with sealed_stores(
            work,
            BUCKET,
            publisher=(PUBLISHER_EMAIL, passwords[PUBLISHER_EMAIL]),
            reader=(READER_EMAIL, passwords[READER_EMAIL]),
            direct=False,  # through the counting proxy
        ) as (s3, api):
            published = _publish(api, s3, passwords[PUBLISHER_EMAIL], work, size_mb)
            for count in counts:
                result = run_fleet(count, api, s3, passwords[READER_EMAIL], work / f"fleet-{count}")
                results.append(result)
                print(f"  {count} nodes: {result['total_s']:.2f} s in all; resource API "
                      f"{result['resource_api_requests']} requests "
                      f"({result['resource_api_cpu_s']:.2f} s CPU), store {result['store_gets']} GETs, "
                      f"{result['store_bytes'] / MB:.0f} MB")
    one = next((r["total_s"] for r in results if r["nodes"] == 1), None)
    for result in results:
        if one:
            result["vs_n_times_one_fetch"] = round(result["total_s"] / (result["nodes"] * one), 3)
    report = {
        "params": {"nodes": counts, "size_mb": size_mb, "sealed_size": published,
                   "servers": "moto_server behind the counting proxy and the resource API, loopback; "
                              "every node a process on this machine"},
        "results": results,
        "per_node_per_model": _per_node(results),
    }
    print(json.dumps(report["per_node_per_model"], indent=2))
    return write_json("fleet", report)


def _per_node(results: list[dict[str, Any]]) -> dict[str, Any]:
    largest = max(results, key=lambda r: r["nodes"])
    count = largest["nodes"]
    startup_cpu = largest["resource_api_startup_cpu_s"]
    requests = largest["resource_api_requests"]
    return {
        "resource_api_requests_per_fetch": requests / count,
        "resource_api_requests_at_startup": sum(largest["resource_api_requests_at_startup"].values()) / count,
        "resource_api_cpu_ms_per_fetch": round(1000 * largest["resource_api_cpu_s"] / count, 2),
        "resource_api_cpu_ms_per_node_startup": round(1000 * startup_cpu / count, 2),
        "store_gets_per_fetch": largest["store_gets"] / count,
    }


def _publish(api: ResourceApiServer, s3: S3Server, password: str, work: Path, size_mb: int) -> int:
    from lib.sealed.cdn import CdnClient
    from lib.sealed.publish import publish_model
    from lib.sealed.resource_client import ResourceClient

    source = work / "model.bin"
    make_random_file(source, size_mb * MB)
    published = publish_model(source, name=NAME, folder=FOLDER, kind="text-to-image", work_dir=work,
                              resources=ResourceClient(api.url, PUBLISHER_EMAIL, password),
                              cdn=CdnClient(s3.config(BUCKET)))
    source.unlink()
    return published.sealed_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,4,8", help="comma-separated fleet sizes")
    parser.add_argument("--size-mb", type=int, default=64, help="model size in MB (2^20 bytes)")
    default_tmp = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    parser.add_argument("--tmp-dir", type=Path, default=default_tmp, help="where files go (default /dev/shm)")
    parser.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--api", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node:
        return node_main(args.api, args.cache)
    counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    if not counts or min(counts) < 1 or args.size_mb < 1:
        parser.error("--nodes and --size-mb must be at least 1")
    run(counts, args.size_mb, args.tmp_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
