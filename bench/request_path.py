"""The request path, end to end: sealserve (started as ``make serve`` starts it) vs one FastAPI+uvicorn
process serving the same classifier (``bench/baseline_server.py``), on loopback, in one run.

    python -m bench.request_path [--duration 10] [--scale-load 45] [--scale-idle 45] [--quick]

Measures: closed-loop ``POST /v1/classify`` at 1 and 32 clients on both servers (throughput, p50,
p99, errors, ratios); the cost of each stage from the ingress's ``Server-Timing`` header (auth,
limit, model, app; "n/a" when absent), the proxy as client latency - app, and the in-process
cost of a usage record; ``/v1/infer`` (tiny-sd) next to a direct diffusers call with the same
parameters and seed; the RSS of the whole sealserve process tree vs the baseline's; replicas per
deployment sampled every second during a long 32-client run and the idle time after it.
Writes ``bench/reports/request_path.json`` and ``.png``. Exits 0 whether or not the targets are
met (it is a report); non-zero only when the bench itself broke. Everything it starts runs in
its own session and is stopped (SIGINT, then SIGTERM, then SIGKILL, by pid) before it exits.

``sealserve serve`` gets ``RAY_ADDRESS=local`` unless the caller set ``RAY_ADDRESS``: with
another Ray running on the machine, ``serve run`` would otherwise attach to it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import requests

from bench.infer_vs_direct import infer_section
from bench.load import LoadResult, merge, run_load
from bench.measures import (
    breakdown,
    parse_created_key,
    parse_ready_url,
    per_second,
    percentile,
    ratio,
    rounded,
    scaling_summary,
    stage_costs,
)
from bench.processes import Sampler, Server, describe, free_port, wait_quiet
from bench.report import REPORTS_DIR, write_json
from bench.request_path_report import GIB, build_report, print_report, write_png

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = "sealserve"
NAME = "request_path"
# The 32-client figure is the steady state: load runs until the replica counts have not changed
# for SETTLED_S (the classifier's upscale delay plus a replica start fit well inside MAX_SETTLE_S).
SETTLED_S = 6.0
MAX_SETTLE_S = 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per load run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per load run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating baseline/sealserve rounds that share --duration")
    parser.add_argument("--scale-load", type=float, default=45.0,
                        help="seconds of 32 clients while replicas are sampled")
    parser.add_argument("--scale-idle", type=float, default=45.0, help="idle seconds sampled after it")
    parser.add_argument("--routes", type=float, default=3.0, help="seconds of GET / and GET /v1/models")
    parser.add_argument("--infer-repeats", type=int, default=15)
    parser.add_argument("--infer-size", type=int, default=256)
    parser.add_argument("--infer-steps", type=int, default=8)
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--reports-dir", type=Path, default=REPORTS_DIR)
    parser.add_argument("--quick", action="store_true", help="short runs, to check the bench itself")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.scale_load, args.scale_idle = 3.0, 1.0, 8.0, 6.0
        args.routes, args.infer_repeats = 1.0, 2
    return args


def classify_body() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, format="PNG")
    return json.dumps({"image": base64.b64encode(buffer.getvalue()).decode(), "top_k": 3}).encode()


def wait_for(what: str, server: Server, timeout_s: float, check: Any) -> Any:
    """Poll ``check()`` until it returns something truthy, the server dies, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited before {what}:\n{server.log_tail()}")
        try:
            found = check()
        except (requests.RequestException, ValueError):
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise RuntimeError(f"{server.name}: waited {timeout_s:.0f}s for {what} in vain:\n{server.log_tail()}")


def create_key() -> tuple[str, str | None]:
    out = subprocess.run(
        [str(BIN / "sealserve"), "keys", "create", "--name", f"bench-{int(time.time())}",
         # The bench measures the path, not the limits: no budget or cap to run into.
         "--scopes", "infer,classify", "--rate-limit", "100000/minute", "--budget", "none",
         "--max-concurrent", "none"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    return parse_created_key(out.stdout)


def load(url: str, body: bytes | None, headers: dict[str, str], clients: int, warmup_s: float,
         duration_s: float, method: str = "POST", capture: bool = False) -> LoadResult:
    if warmup_s > 0:
        run_load(url, body=body, headers=headers, method=method, concurrency=clients, duration_s=warmup_s)
    if duration_s <= 0:
        return LoadResult(concurrency=clients, seconds=0.0)
    return run_load(url, body=body, headers=headers, method=method, concurrency=clients,
                    duration_s=duration_s, capture_header="Server-Timing" if capture else None)


def usage_record_cost(n: int = 20_000) -> dict[str, Any]:
    """``UsageRecorder.record`` with a no-op writer and the usage journal in a temporary directory
    (its append is part of the request path): what a request pays to be accounted for. The
    journal append alone and the in-memory queue alone are reported beside it."""
    from lib.accounts.journal import UsageJournal
    from lib.accounts.records import UsageRecord
    from lib.accounts.usage import UsageRecorder

    record = UsageRecord(key_id="bench", endpoint="/v1/classify", status_code=200, latency_ms=1.0)

    def timed(call: Any) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter_ns()
            call(record)
            times.append((time.perf_counter_ns() - started) / 1e6)
        return times

    with tempfile.TemporaryDirectory(prefix="sealserve-journal-") as directory:
        journal = UsageJournal(Path(directory) / "journal")
        with UsageRecorder(lambda _batch: None, max_queue=2 * n, journal=journal) as recorder:
            times = timed(recorder.record)
        append_only = UsageJournal(Path(directory) / "append-only")
        append = timed(append_only.append)
        append_only.close()
    with UsageRecorder(lambda _batch: None, max_queue=2 * n) as recorder:
        memory = timed(recorder.record)
    return {"calls": n, "p50_ms": rounded(percentile(times, 50), 5),
            "p99_ms": rounded(percentile(times, 99), 5),
            "journal_append_p50_ms": rounded(percentile(append, 50), 5),
            "journal_append_p99_ms": rounded(percentile(append, 99), 5),
            "memory_only_p50_ms": rounded(percentile(memory, 50), 5)}


def wait_at_rest(sampler: Sampler, timeout_s: float) -> dict[str, int]:
    """Wait (at most ``timeout_s``) until the replica counts are back to the first sample's."""
    first = sampler.samples[0]["replicas"] if sampler.samples else {}
    deadline = time.monotonic() + timeout_s
    time.sleep(2)  # at least one sample after the traffic
    while time.monotonic() < deadline and sampler.samples[-1]["replicas"] != first:
        time.sleep(1)
    return dict(sampler.samples[-1]["replicas"]) if sampler.samples else {}


def memory_of(server: Server, since: float) -> dict[str, Any]:
    rows = describe(server.members(since))
    pss = [r["pss"] for r in rows if r["pss"] is not None]
    return {
        "processes": len(rows),
        "total_rss_gib": rounded(sum(r["rss"] for r in rows) / GIB),
        "total_pss_gib": rounded(sum(pss) / GIB) if len(pss) == len(rows) else None,
        "by_label": breakdown(rows),
    }


def run(args: argparse.Namespace, servers: list[Server], state: dict[str, Any]) -> dict[str, Any]:
    began, origin = state["began"], state["origin"]
    sections: dict[str, Any] = {"params": {k: str(v) if isinstance(v, Path) else v
                                           for k, v in vars(args).items()}}
    stages: dict[str, Any] = {"usage_record": usage_record_cost()}
    subprocess.run([str(BIN / "sealserve"), "demo-models", "--dir", "ai-models", "--if-missing"],
                   cwd=ROOT, check=True, timeout=600)
    logs = Path(tempfile.mkdtemp(prefix="sealserve-bench-"))
    port, base_port = free_port(), free_port()
    env = {**os.environ}
    env.setdefault("RAY_ADDRESS", "local")
    seal = Server("sealserve", [str(BIN / "sealserve"), "serve", "--config", "serve_config.yaml",
                                "--port", str(port)], logs / "sealserve.log", cwd=ROOT, env=env)
    servers.append(seal)
    base_key = secrets.token_urlsafe(24)
    base = Server("baseline", [sys.executable, "-m", "bench.baseline_server", "--model-dir",
                               "ai-models/tiny-classifier", "--port", str(base_port)],
                  logs / "baseline.log", cwd=ROOT, env={**os.environ, "BASELINE_API_KEYS": base_key})
    servers.append(base)
    body = classify_body()
    json_type = {"Content-Type": "application/json"}
    base_url = f"http://127.0.0.1:{base_port}"
    base_headers = {"Authorization": f"Bearer {base_key}", **json_type}
    wait_for("a classification", base, 180, lambda: requests.post(
        f"{base_url}/v1/classify", data=body, headers=base_headers, timeout=30).ok)
    url = wait_for("the 'is ready' banner", seal, args.ready_timeout,
                   lambda: parse_ready_url(seal.log_text()))
    wait_for("GET /health ready", seal, 60, lambda: requests.get(f"{url}/health", timeout=10).json()["ready"])
    sections["sealserve"] = {"url": url, "ready_s": round(time.perf_counter() - seal.started, 1),
                             "logs": str(logs)}
    print(f"sealserve ready at {url} after {sections['sealserve']['ready_s']} s; baseline at {base_url}")
    key, state["key_id"] = create_key()
    headers = {"Authorization": f"Bearer {key}", **json_type}
    # A list, so that a refusal (4xx) ends the wait as well as a success; 5xx mean "not yet".
    answered = wait_for("an answer to classify", seal, 120, lambda: [r for r in [requests.post(
        f"{url}/v1/classify", data=body, headers=headers, timeout=60)] if r.status_code < 500])
    first = answered[0]
    if not first.ok:
        raise RuntimeError(f"sealserve refused the bench's classify: {first.status_code} {first.text}")
    sampler = Sampler(seal, APP, began, origin)
    state["sampler"] = sampler
    sampler.start()

    classify: dict[str, Any] = {"c1": {}, "c32": {}}

    def settle(seal_load: tuple[str, bytes | None, dict[str, str], int]) -> None:
        """Keep the load on until no deployment's replica count has changed for SETTLED_S: the
        figure is the steady state the autoscaler reaches, not the minute it takes to get there."""
        deadline = time.perf_counter() + MAX_SETTLE_S
        while time.perf_counter() < deadline:
            load(*seal_load, 0, 2.0)
            now = time.perf_counter() - origin
            recent = [s["replicas"] for s in sampler.samples if s["t"] >= now - SETTLED_S]
            spans_window = any(s["t"] <= now - SETTLED_S + 1 for s in sampler.samples)
            if spans_window and recent and all(r == recent[-1] for r in recent):
                return
        print(f"replicas still changing after {MAX_SETTLE_S:.0f} s of load; measuring anyway")

    def compare(level: str, clients: int) -> None:
        """Warm both up, then alternate rounds (baseline, sealserve, ...) so both see the same
        background load; each server's rounds are merged into one result."""
        print(f"classify, {clients} client(s), {args.rounds} alternating rounds ...", flush=True)
        base_load = (f"{base_url}/v1/classify", body, base_headers, clients)
        seal_load = (f"{url}/v1/classify", body, headers, clients)
        load(*base_load, args.warmup, 0)
        load(*seal_load, args.warmup, 0)
        if clients > 1:
            settle(seal_load)
        t0, loadavg = time.perf_counter() - origin, os.getloadavg()
        rounds: dict[str, list[LoadResult]] = {"baseline": [], "sealserve": []}
        for _ in range(args.rounds):
            rounds["baseline"].append(load(*base_load, 0, args.duration / args.rounds))
            rounds["sealserve"].append(load(*seal_load, 0, args.duration / args.rounds, capture=True))
        b, s = merge(rounds["baseline"]), merge(rounds["sealserve"])
        seen: dict[str, int] = {}
        for sample in (x for x in sampler.samples if x["t"] >= t0):
            for deployment, n in sample["replicas"].items():
                seen[deployment] = max(n, seen.get(deployment, 0))
        classify[level] = {"baseline": b.summary(), "sealserve": {**s.summary(), "max_replicas": seen},
                           "loadavg_1m_before": round(loadavg[0], 2)}
        stages[level] = stage_costs(s.latencies_ms, s.captured)

    compare("c1", 1)
    print("GET / and GET /v1/models, 1 client ...", flush=True)
    root = load(f"{url}/", None, {}, 1, 1.0, args.routes, method="GET")
    listing = load(f"{url}/v1/models", None, headers, 1, 1.0, args.routes, method="GET")
    stages["routes"] = {"root_p50_ms": rounded(root.percentile(50)),
                        "models_p50_ms": rounded(listing.percentile(50)),
                        "root_errors": root.errors, "models_errors": listing.errors}
    print(f"32 clients for {args.scale_load:.0f} s, then {args.scale_idle:.0f} s idle; sampling replicas ...",
          flush=True)
    scale = run_load(f"{url}/v1/classify", body=body, headers=headers, concurrency=32,
                     duration_s=args.scale_load)
    load_start, load_end = scale.started_at - origin, scale.started_at - origin + scale.seconds
    time.sleep(args.scale_idle)
    sampled = list(sampler.samples)
    sections["scaling"] = {
        "load_start": round(load_start, 2), "load_seconds": round(scale.seconds, 2),
        "idle_seconds": args.scale_idle, "load": scale.summary(),
        "throughput_per_s": per_second(scale.done_at, scale.started_at, args.scale_load + args.scale_idle),
        "summary": {d: scaling_summary(sampled, d, load_start, load_end)
                    for d in sorted({d for s in sampled for d in s["replicas"]})},
    }
    compare("c32", 32)
    # What the service holds after traffic is measured once the autoscaler has brought the
    # replicas back to where they were before the load (the peak under load is reported beside
    # it); the generation is timed on that quiet service too, not beside a replica that is
    # stopping or a usage backlog being written (on 2 cores either costs a generation ~10%).
    rest = wait_at_rest(sampler, args.scale_idle + 30.0)
    busy = wait_quiet(seal, began)
    print(f"/v1/infer and a direct diffusers call (sealserve at rest, {busy:.2f} cores busy) ...", flush=True)
    with sampler.paused():
        sections["infer"] = infer_section(
            url, headers, size=args.infer_size, steps=args.infer_steps, repeats=args.infer_repeats,
            model_dirs=[ROOT / "ai-models"])
    sections["infer"]["service_cores_busy_before"] = round(busy, 3)
    c1 = stages.get("c1", {})
    usage_p50 = stages["usage_record"]["p50_ms"]
    stages["usage_record_p50_ms"] = usage_p50
    stages["gate_plus_usage_p50_ms"] = (
        rounded(c1["gate_p50_ms"] + usage_p50) if c1.get("gate_p50_ms") is not None else None)
    sections["classify"], sections["stages"] = classify, stages
    sampler.stop()
    seal_memory = memory_of(seal, began)
    seal_memory["replicas"] = rest
    seal_memory["peak_rss_gib"] = rounded(max((s["rss_mib"] for s in sampler.samples), default=0) / 1024)
    base_memory = memory_of(base, began)
    sections["memory"] = {"sealserve": seal_memory, "baseline": base_memory,
                          "ratio": rounded(ratio(seal_memory["total_rss_gib"], base_memory["total_rss_gib"]))}
    sections["scaling"]["samples"] = sampler.samples
    return sections


def environment_extra() -> dict[str, Any]:
    versions = {}
    for module in ("ray", "torch", "diffusers", "transformers", "fastapi", "uvicorn", "aiohttp"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: S112 - a version we cannot read is left out
            continue
    return {"versions": versions, "loadavg": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A shell that runs us in the background ignores SIGINT; children would inherit that, and the
    # serve process group could not be interrupted. A handler here is reset to default in them.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    state: dict[str, Any] = {"began": time.time(), "origin": time.perf_counter()}
    load_before = environment_extra()["loadavg"]
    servers: list[Server] = []
    sections: dict[str, Any] | None = None
    try:
        sections = run(args, servers, state)
    except (Exception, KeyboardInterrupt):
        traceback.print_exc()
    finally:
        if state.get("sampler"):
            state["sampler"].stop()
        if state.get("key_id"):
            subprocess.run([str(BIN / "sealserve"), "keys", "revoke", state["key_id"]], cwd=ROOT,
                           capture_output=True, timeout=120, check=False)
        print("stopping everything the bench started ...", flush=True)
        cleanup = {server.name: server.stop() for server in servers}
    left = {name: c["left"] for name, c in cleanup.items() if c["left"]}
    if left:
        print(f"processes left running (pids): {left}", file=sys.stderr)
    if sections is None:
        for server in servers:
            print(f"--- {server.name} log tail ({server.log_path}) ---\n{server.log_tail()}", file=sys.stderr)
        return 1
    sections["cleanup"] = cleanup
    sections["total_seconds"] = round(time.perf_counter() - state["origin"], 1)
    sections["machine"] = {**environment_extra(), "loadavg_before": load_before,
                           "note": "a shared 2-core machine: figures are noisy; compare ratios of one run"}
    report = build_report(sections)
    print_report(report)
    args.reports_dir.mkdir(parents=True, exist_ok=True)
    write_json(NAME, report, reports_dir=args.reports_dir)
    png = args.reports_dir / f"{NAME}.png"
    print(f"wrote {png}" if write_png(png, report) else "matplotlib is not installed: no PNG")
    print(f"total {sections['total_seconds']} s")
    return 2 if left else 0


if __name__ == "__main__":
    sys.exit(main())
