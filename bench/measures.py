"""Pure helpers of the request-path bench: percentiles, ``Server-Timing``, parsing what commands
print, process titles, series and targets. No I/O and no timing here, so all of it is unit-tested
(tests/unit/test_bench_request_path.py).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

STAGES = ("auth", "limit", "model", "app")
_READY = re.compile(r"is ready at (https?://[^\s/]+(?:/[^\s]*)?)")
_KEY_ID = re.compile(r"^\s*id:\s*(\S+)\s*$", re.MULTILINE)
_REPLICA = re.compile(r"^ray::ServeReplica:(?P<app>[^:\s]+):(?P<deployment>[A-Za-z0-9_\-]+)")


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest rank, as :meth:`bench.load.LoadResult.percentile`; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or math.isnan(denominator):
        return None
    return numerator / denominator


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``auth;dur=0.1, limit;dur=0.4;desc="x"`` → ``{"auth": 0.1, "limit": 0.4}`` (W3C Server-Timing).

    Metrics without a ``dur`` and malformed durations are left out; a repeated metric keeps its
    first value (as the spec says for duplicate names). Never raises: the header is advisory.
    """
    out: dict[str, float] = {}
    if not value:
        return out
    for metric in _split_outside_quotes(value, ","):
        parts = _split_outside_quotes(metric, ";")
        name = parts[0].strip() if parts else ""
        if not name or name in out:
            continue
        for param in parts[1:]:
            key, _, raw = param.partition("=")
            if key.strip().lower() != "dur":
                continue
            try:
                dur = float(raw.strip().strip('"'))
            except ValueError:
                break
            if math.isfinite(dur):
                out[name] = dur
            break
    return out


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def stage_costs(latencies_ms: Sequence[float], headers: Sequence[str | None]) -> dict[str, Any]:
    """p50 of each ``Server-Timing`` stage, the gate (auth + limit per request), the proxy/transport
    (client latency - app per request) and the ingress's own work (app - model).

    ``headers`` is aligned with ``latencies_ms``; every figure is ``None`` ("n/a") when no response
    carried the metrics it needs.
    """
    parsed = [parse_server_timing(h) for h in headers]
    pairs = list(zip(latencies_ms, parsed, strict=False))
    p50 = {stage: rounded(percentile([t[stage] for t in parsed if stage in t], 50)) for stage in STAGES}
    gate = [t["auth"] + t["limit"] for t in parsed if "auth" in t and "limit" in t]
    proxy = [lat - t["app"] for lat, t in pairs if "app" in t]
    own = [t["app"] - t["model"] for t in parsed if "app" in t and "model" in t]
    return {
        "responses": len(headers),
        "with_server_timing": sum(1 for t in parsed if t),
        "p50_ms": p50,
        "gate_p50_ms": rounded(percentile(gate, 50)),
        "proxy_p50_ms": rounded(percentile(proxy, 50)),
        "app_minus_model_p50_ms": rounded(percentile(own, 50)),
    }


def per_second(done_at: Iterable[float], start: float, seconds: float) -> list[int]:
    """Completions per 1 s bin from ``start`` over ``seconds`` (rounded up); later ones are dropped."""
    bins = [0] * max(0, math.ceil(seconds))
    for moment in done_at:
        index = int(moment - start)
        if moment >= start and index < len(bins):
            bins[index] += 1
    return bins


def parse_ready_url(text: str) -> str | None:
    """The URL of ``sealserve serve``'s banner line ("sealserve is ready at URL ..."), if printed."""
    match = _READY.search(text)
    return match.group(1).rstrip("/") if match else None


def parse_created_key(output: str) -> tuple[str, str | None]:
    """(key, key id) from ``sealserve keys create``: the key is alone on the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines or any(c.isspace() for c in lines[-1]) or len(lines[-1]) < 16:
        raise ValueError("`sealserve keys create` printed no key on its last line")
    key_id = _KEY_ID.search(output)
    return lines[-1], key_id.group(1) if key_id else None


def replica_of(title: str) -> tuple[str, str] | None:
    """(app, deployment) of a Serve replica's process title ``ray::ServeReplica:<app>:<Deployment>``."""
    match = _REPLICA.match(title)
    return (match.group("app"), match.group("deployment")) if match else None


def count_replicas(titles: Iterable[str], app: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for title in titles:
        found = replica_of(title)
        if found and found[0] == app:
            counts[found[1]] = counts.get(found[1], 0) + 1
    return dict(sorted(counts.items()))


def process_label(name: str, cmdline: Sequence[str]) -> str:
    """A short, stable label for a memory breakdown: Ray titles without the method being run,
    Python processes by their script (``dashboard``, ``log_monitor``), others by name."""
    title = cmdline[0] if cmdline else name
    if title.startswith("ray::"):
        return re.split(r"[.\s]", title, maxsplit=1)[0]
    if title.startswith("ray-dashboard-"):
        return re.sub(r"-\d+$", "", title.split(" ", 1)[0])
    if name.startswith("python") or title.endswith(("/python", "/python3")) or "python" in title:
        for arg in cmdline[1:]:
            if arg.endswith(".py"):
                return arg.rsplit("/", 1)[-1].removesuffix(".py")
            if arg.startswith("from multiprocessing."):
                return "multiprocessing " + arg.split("import", 1)[0].split(".")[-1].strip()
        for arg in cmdline[1:]:
            if not arg.startswith("-"):
                return arg.rsplit("/", 1)[-1]
    return name


def breakdown(processes: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group ``{"label", "rss"}`` rows by label: count and MiB, largest first."""
    groups: dict[str, dict[str, Any]] = {}
    for proc in processes:
        group = groups.setdefault(proc["label"], {"label": proc["label"], "count": 0, "rss": 0})
        group["count"] += 1
        group["rss"] += proc["rss"]
    rows = sorted(groups.values(), key=lambda g: -g["rss"])
    return [{"label": g["label"], "count": g["count"], "rss_mib": round(g["rss"] / 2**20, 1)} for g in rows]


def scaling_summary(
    samples: Sequence[Mapping[str, Any]], deployment: str, load_start: float, load_end: float
) -> dict[str, Any]:
    """From ``{"t", "replicas": {deployment: n}}`` samples: replicas when the load started, the
    most during it, at the end; whether it grew and came back down to where it started."""
    def count(sample: Mapping[str, Any]) -> int:
        return int(sample["replicas"].get(deployment, 0))

    before = [count(s) for s in samples if s["t"] < load_start]
    during = [count(s) for s in samples if load_start <= s["t"] <= load_end]
    after = [count(s) for s in samples if s["t"] > load_end]
    if not during:
        return {"start": None, "max_during_load": None, "end": None, "grew": None, "shrank_back": None}
    start = before[-1] if before else during[0]
    most = max(during)
    end = after[-1] if after else during[-1]
    grew = most > start
    return {"start": start, "max_during_load": most, "end": end, "grew": grew,
            "shrank_back": grew and end <= start}


def target(name: str, value: float | None, limit: float, *, at_most: bool, **extra: Any) -> dict[str, Any]:
    """A target row: ``met`` is ``None`` ("not measured") when there is no value."""
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"name": name, "value": rounded(value), "limit": limit,
            "op": "<=" if at_most else ">=", "met": met, **extra}


def met_text(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[met]
