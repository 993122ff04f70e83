"""The one report writer every benchmark shares: a printed table, a JSON file and, if possible, a PNG.

A row is a dict with at least ``name`` (str), ``bytes`` (int, the payload the step processed) and
``seconds`` (float, the best of the repeats); any other keys are kept in the JSON as they are.
``write_report`` adds ``mb_per_s`` and ``ratio`` (throughput relative to the row named
``baseline_key``: 1.0 is as fast as the baseline, 0.5 half as fast).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend

REPORTS_DIR = Path(__file__).resolve().parent / "reports"
MB = 1 << 20


def environment() -> dict[str, Any]:
    """The machine and the crypto library that produced the figures (they mean little without)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
    }


def _with_ratios(rows: list[dict[str, Any]], baseline_key: str) -> list[dict[str, Any]]:
    by_name = {row["name"]: row for row in rows}
    if baseline_key not in by_name:
        raise ValueError(f"baseline {baseline_key!r} is not one of the rows: {sorted(by_name)}")
    out = []
    for row in rows:
        row = dict(row)
        row["mb_per_s"] = row["bytes"] / MB / row["seconds"]
        out.append(row)
    base = next(row["mb_per_s"] for row in out if row["name"] == baseline_key)
    for row in out:
        row["ratio"] = row["mb_per_s"] / base
    return out


def print_table(title: str, rows: list[dict[str, Any]], baseline_key: str) -> None:
    width = max(len(row["name"]) for row in rows)
    print(f"\n{title}  (MB = 2^20 bytes; ratio = throughput / '{baseline_key}')")
    print(f"{'step':<{width}}  {'seconds':>9}  {'MB/s':>9}  {'ratio':>6}")
    for row in rows:
        mark = "  <- baseline" if row["name"] == baseline_key else ""
        figures = f"{row['seconds']:>9.3f}  {row['mb_per_s']:>9.1f}  {row['ratio']:>6.2f}"
        print(f"{row['name']:<{width}}  {figures}{mark}")


def _write_png(path: Path, title: str, rows: list[dict[str, Any]], baseline_key: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [row["name"] for row in rows]
    speeds = [row["mb_per_s"] for row in rows]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.5))
    bars = ax.barh(names, speeds, color=["grey" if n == baseline_key else "tab:blue" for n in names])
    for bar, row in zip(bars, rows, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row['ratio']:.2f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("MB/s (MB = 2^20 bytes)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(
    name: str,
    rows: list[dict[str, Any]],
    baseline_key: str,
    *,
    params: dict[str, Any] | None = None,
    reports_dir: Path = REPORTS_DIR,
) -> Path:
    """Print the table and write ``<reports_dir>/<name>.json`` (and ``.png``); return the JSON path."""
    rows = _with_ratios(rows, baseline_key)
    print_table(name, rows, baseline_key)
    reports_dir.mkdir(parents=True, exist_ok=True)
    json_path = reports_dir / f"{name}.json"
    report = {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "baseline": baseline_key,
        "params": params or {},
        "environment": environment(),
        "rows": rows,
    }
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {json_path}")
    png_path = reports_dir / f"{name}.png"
    if _write_png(png_path, name, rows, baseline_key):
        print(f"wrote {png_path}")
    else:
        print("matplotlib is not installed: skipped the PNG (the JSON has every figure)")
    return json_path


# Kept for callers of the earlier private name.
_environment = environment


def write_json(name: str, report: dict[str, Any], *, reports_dir: Path = REPORTS_DIR) -> Path:
    """Write a free-form ``report`` as ``<reports_dir>/<name>.json``, with ``name``, ``created`` and
    ``environment`` filled in when absent (for benches whose rows are not MB/s figures)."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    full = {"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment()}
    full.update(report)
    json_path = reports_dir / f"{name}.json"
    json_path.write_text(json.dumps(_finite(full), indent=2, default=str, allow_nan=False) + "\n")
    print(f"wrote {json_path}")
    return json_path


def _finite(value: Any) -> Any:
    """NaN and infinities become null: they are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
