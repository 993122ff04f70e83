"""The request-path report: ratios and targets from the measured sections, a printed table, a PNG.

``build_report`` is pure (it only reads the sections ``bench/request_path.py`` measured), so its
shape is unit-tested; ``print_report`` and ``write_png`` only present it.

Ratios are sealserve / baseline: above 1 for throughput is better, below 1 for latency is better.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.measures import met_text, ratio, rounded, target

GIB = 2**30
CLASSIFY_THROUGHPUT_TARGET = 1.5  # x the baseline at 32 clients, zero errors
GATE_TARGET_MS = 1.0  # auth + limit + usage record, p50
INFER_TARGET = 1.05  # x a direct diffusers call
MEMORY_TARGET_GIB = 2.5  # total RSS of the sealserve process tree
NOISY_SPREAD = 1.5  # slowest / fastest run of one series above this: the machine was busy


def classify_ratios(sealserve: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    return {
        "throughput": rounded(ratio(sealserve.get("throughput_rps"), baseline.get("throughput_rps"))),
        "p50": rounded(ratio(sealserve.get("p50_ms"), baseline.get("p50_ms"))),
        "p99": rounded(ratio(sealserve.get("p99_ms"), baseline.get("p99_ms"))),
    }


def build_report(sections: dict[str, Any]) -> dict[str, Any]:
    """Add ``ratios`` to each classify level and the ``targets`` list to the measured sections."""
    report = dict(sections)
    classify = {}
    for level, runs in sections.get("classify", {}).items():
        classify[level] = {**runs, "ratios": classify_ratios(runs["sealserve"], runs["baseline"])}
    report["classify"] = classify
    report["targets"] = targets(report)
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    c32 = report.get("classify", {}).get("c32")
    if c32:
        errors = c32["sealserve"].get("errors", 0)
        row = target("classify, 32 clients: throughput vs baseline (zero errors)",
                     c32["ratios"]["throughput"], CLASSIFY_THROUGHPUT_TARGET, at_most=False,
                     unit="x", errors=errors)
        if row["met"] is not None:
            row["met"] = bool(row["met"] and errors == 0)
        rows.append(row)
    stages = report.get("stages", {})
    rows.append(target("auth + rate limit + usage record, p50 (1 client)",
                       stages.get("gate_plus_usage_p50_ms"), GATE_TARGET_MS, at_most=True, unit="ms",
                       note=None if stages.get("gate_plus_usage_p50_ms") is not None
                       else "no Server-Timing auth/limit from the ingress"))
    infer = report.get("infer", {})
    spreads = [infer.get(k, {}).get("spread") or 1.0 for k in ("sealserve", "direct")]
    noisy = max(spreads) > NOISY_SPREAD
    label = infer.get("label", "tiny-sd")
    rows.append(target(f"/v1/infer vs direct diffusers ({label}), median of paired rounds",
                       infer.get("ratio"), INFER_TARGET, at_most=True, unit="x",
                       note=(f"noisy: runs spread up to {max(spreads):.1f}x; " if noisy else "")
                       + f"ratio of medians {_fmt(infer.get('ratio_of_medians'), 'x')}, of minimums "
                       f"{_fmt(infer.get('ratio_of_minimums'), 'x')}"))
    memory = report.get("memory", {}).get("sealserve", {})
    rows.append(target("sealserve total RSS after traffic, replicas back at rest",
                       memory.get("total_rss_gib"), MEMORY_TARGET_GIB, at_most=True, unit="GiB",
                       note=f"peak under load {_fmt(memory.get('peak_rss_gib'), ' GiB')}; replicas "
                       f"at the measurement {memory.get('replicas')}"))
    scaling = report.get("scaling", {}).get("summary", {}).get("ImageClassifier", {})
    grew_back = scaling.get("shrank_back")
    path = f"{scaling.get('start')} -> {scaling.get('max_during_load')} -> {scaling.get('end')}"
    rows.append({"name": "ImageClassifier grew from its minimum under load and shrank back when idle",
                 "value": path,
                 "limit": None, "op": None, "met": grew_back})
    gpu = report.get("infer", {}).get("device") == "cuda"
    rows.append({"name": "GPU: /v1/infer 512x512, 30 steps, fp16 vs direct <= 1.03x", "value": None,
                 "limit": 1.03, "op": "<=", "met": None,
                 "note": "run with --infer-size 512 --infer-steps 30 on a GPU" if not gpu
                 else "see the infer section"})
    return rows


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def print_report(report: dict[str, Any]) -> None:
    print("\nrequest path: sealserve vs one FastAPI+uvicorn process (ratio = sealserve / baseline)")
    print(f"{'classify':<10} {'server':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for level, runs in report.get("classify", {}).items():
        if runs.get("loadavg_1m_before") is not None:
            print(f"{level:<10} (machine load average before: {runs['loadavg_1m_before']})")
        for server in ("sealserve", "baseline"):
            s = runs[server]
            print(f"{level:<10} {server:<10} {_fmt(s['throughput_rps']):>8} {_fmt(s['p50_ms']):>8} "
                  f"{_fmt(s['p99_ms']):>8} {s['errors']:>7}")
        r = runs["ratios"]
        print(f"{level:<10} {'ratio':<10} {_fmt(r['throughput'], 'x'):>8} {_fmt(r['p50'], 'x'):>8} "
              f"{_fmt(r['p99'], 'x'):>8}")
    stages = report.get("stages", {})
    for level in ("c1", "c32"):
        costs = stages.get(level)
        if not costs:
            continue
        p50 = costs["p50_ms"]
        print(f"stages {level} p50 ms: " + ", ".join(f"{k} {_fmt(v)}" for k, v in p50.items())
              + f"; gate {_fmt(costs['gate_p50_ms'])}; proxy+transport {_fmt(costs['proxy_p50_ms'])}"
              + f"; app-model {_fmt(costs['app_minus_model_p50_ms'])}"
              + f"  ({costs['with_server_timing']}/{costs['responses']} with Server-Timing)")
    print(f"usage record (journal + queue) p50: {_fmt(stages.get('usage_record_p50_ms'), ' ms', 4)}")
    routes = stages.get("routes")
    if routes:
        print(f"GET / p50 {_fmt(routes['root_p50_ms'])} ms -> GET /v1/models p50 "
              f"{_fmt(routes['models_p50_ms'])} ms (auth + limiter + catalog listing)")
    infer = report.get("infer", {})
    if infer:
        served, direct, one = infer["sealserve"], infer["direct"], infer["direct_1_thread"]
        print(f"infer {infer.get('label')}, medians (spread max/min): sealserve "
              f"{_fmt(served['median_s'], ' s', 3)} ({_fmt(served.get('spread'))}) vs direct "
              f"{_fmt(direct['median_s'], ' s', 3)} ({_fmt(direct.get('spread'))}, "
              f"{direct.get('torch_threads')} torch threads) = {_fmt(infer.get('ratio_of_medians'), 'x')} "
              f"[paired rounds: {_fmt(infer.get('ratio'), 'x')}, minimums: "
              f"{_fmt(infer.get('ratio_of_minimums'), 'x')}]; vs direct on 1 thread "
              f"{_fmt(one['median_s'], ' s', 3)} ({_fmt(one.get('spread'))}) = "
              f"{_fmt(infer.get('ratio_1_thread'), 'x')}; same image bytes as direct: "
              f"{infer.get('same_image')}, as direct on 1 thread: {infer.get('same_image_1_thread')}")
    memory = report.get("memory", {})
    if memory:
        seal, base = memory["sealserve"], memory["baseline"]
        print(f"memory: sealserve {_fmt(seal['total_rss_gib'], ' GiB')} RSS over {seal['processes']} "
              f"processes (PSS {_fmt(seal.get('total_pss_gib'), ' GiB')}) vs baseline "
              f"{_fmt(base['total_rss_gib'], ' GiB')} = {_fmt(memory.get('ratio'), 'x')}")
        for row in seal["by_label"][:12]:
            print(f"    {row['rss_mib']:>8.1f} MiB  x{row['count']:<3} {row['label']}")
    scaling = report.get("scaling", {}).get("summary", {})
    for deployment, s in scaling.items():
        print(f"replicas {deployment}: {s['start']} at load start -> max {s['max_during_load']} "
              f"under load -> {s['end']} after idle")
    print("\ntargets:")
    for row in report.get("targets", []):
        value = _fmt(row.get("value"), row.get("unit", ""))
        limit = f" (target {row['op']} {row['limit']}{row.get('unit', '')})" if row.get("op") else ""
        note = f"  [{row['note']}]" if row.get("note") else ""
        print(f"  {met_text(row['met']):<8} {row['name']}: {value}{limit}{note}")


def write_png(path: Path, report: dict[str, Any]) -> bool:
    """Four panels: throughput and p50 vs baseline, replicas and throughput over time, memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    levels = list(report.get("classify", {}))
    for ax, key, label in ((axes[0][0], "throughput_rps", "req/s (higher is better)"),
                           (axes[0][1], "p50_ms", "p50 ms (lower is better)")):
        width = 0.38
        for i, server in enumerate(("baseline", "sealserve")):
            values = [report["classify"][lv][server][key] or 0 for lv in levels]
            xs = [x + (i - 0.5) * width for x in range(len(levels))]
            color = "grey" if server == "baseline" else "tab:blue"
            bars = ax.bar(xs, values, width, label=server, color=color)
            if server == "sealserve":
                rkey = "throughput" if key == "throughput_rps" else "p50"
                for bar, lv in zip(bars, levels, strict=True):
                    r = report["classify"][lv]["ratios"][rkey]
                    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), _fmt(r, "x"),
                            ha="center", va="bottom")
        ax.set_xticks(range(len(levels)), [f"{lv.removeprefix('c')} client(s)" for lv in levels])
        ax.set_title(f"POST /v1/classify: {label}")
        ax.legend()
    _plot_scaling(axes[1][0], report.get("scaling", {}))
    _plot_memory(axes[1][1], report.get("memory", {}))
    fig.suptitle("sealserve request path vs one FastAPI+uvicorn process (ratios of one run matter)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_scaling(ax: Any, scaling: dict[str, Any]) -> None:
    origin = scaling.get("load_start", 0.0)
    span = (scaling.get("load_seconds") or 0) + (scaling.get("idle_seconds") or 0)
    samples = [s for s in scaling.get("samples", []) if -5 <= s["t"] - origin <= span + 5]
    deployments = sorted({d for s in samples for d in s["replicas"]})
    most = max((n for s in samples for n in s["replicas"].values()), default=1)
    for i, deployment in enumerate(deployments):
        offset = 0.04 * (i - (len(deployments) - 1) / 2)  # equal counts stay visible side by side
        ax.step([s["t"] - origin for s in samples],
                [s["replicas"].get(deployment, 0) + offset for s in samples],
                where="post", label=deployment, linewidth=2.2 if "Image" in deployment else 1.4)
    ax.set_xlabel("seconds since the 32-client load started")
    ax.set_ylabel("replicas (lines offset slightly)")
    ax.set_ylim(0, most + 1)
    ax.set_yticks(range(most + 2))
    if scaling.get("load_seconds") is not None:
        ax.axvspan(0, scaling["load_seconds"], color="orange", alpha=0.12, label="32 clients")
    ax.legend(loc="upper right", fontsize=8)
    rates = scaling.get("throughput_per_s", [])
    if rates:
        twin = ax.twinx()
        twin.plot([i + 0.5 for i in range(len(rates))], rates, color="black", alpha=0.6, label="req/s")
        twin.set_ylabel("classify req/s")
        twin.set_ylim(0, max(rates) * 1.15 + 1)
        twin.legend(loc="center right", fontsize=8)
    ax.set_title("replicas over time, next to throughput per second")


def _plot_memory(ax: Any, memory: dict[str, Any]) -> None:
    seal = memory.get("sealserve", {})
    rows = list(seal.get("by_label", []))
    top, rest = rows[:18], rows[18:]
    labels = [f"{r['label']} x{r['count']}" for r in top]
    values = [r["rss_mib"] for r in top]
    if rest:
        labels.append(f"other x{sum(r['count'] for r in rest)}")
        values.append(sum(r["rss_mib"] for r in rest))
    base = memory.get("baseline", {})
    labels.append("BASELINE (whole server)")
    values.append((base.get("total_rss_gib") or 0) * 1024)
    ax.barh(labels, values, color=["tab:blue"] * (len(labels) - 1) + ["grey"])
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=6.5)
    ax.set_xlabel("RSS MiB")
    ax.set_title(f"memory: sealserve {_fmt(seal.get('total_rss_gib'), ' GiB')} in "
                 f"{seal.get('processes')} processes vs baseline {_fmt(base.get('total_rss_gib'), ' GiB')}")
