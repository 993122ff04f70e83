"""One streamed GET or parallel ranged GETs? The measurement behind ``single_get_max_mb``.

    python -m bench.transfer_choice [--sizes-mb 8,32,128,512] [--repeat 2] [--workers 4]

For each size it publishes a random sealed model to a fresh S3 test server (moto, direct) and
resource API, then times the node's whole sealed fetch (``SealedFetcher.fetch``) three ways,
taking turns: one streamed GET; ``--workers`` ranged GETs of 8 MiB (the default ``part_size_mb``,
AWS's guidance for byte-range fetches); and ``--workers`` ranged GETs that split the object
evenly (the fewest requests for that parallelism). It prints, per size, the best time of each and
which won, and the threshold the figures support: one GET up to the largest size where it won.
8 MiB ranges are skipped above 128 MB on moto, which reads the whole object for every range.

The figures hold for the store measured. Point a node at another store (S3, MinIO, R2), run the
same fetches there and set ``sealed.single_get_max_mb`` from them: a store that caps the speed of
one connection (S3 serves tens of MB/s per connection) makes ranges win from a few parts up.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import MB, write_json
from bench.sealed_fetch import BUCKET, FOLDER, PUBLISHER_EMAIL, READER_EMAIL, Node
from bench.sealing import make_random_file
from devservers.stores import bench_node_key, sealed_stores
from lib.sealed.cdn import CdnClient
from lib.sealed.fetch import TransferPlan
from lib.sealed.format import DEFAULT_SEGMENT_SIZE, TAG_SIZE
from lib.sealed.publish import publish_model
from lib.sealed.resource_client import ResourceClient

PART = 8 * MB
MOTO_RANGE_LIMIT = 128 * MB


def plans(size: int, workers: int) -> dict[str, TransferPlan]:
    segments = -(-size // DEFAULT_SEGMENT_SIZE)
    even = -(-segments // workers) * (DEFAULT_SEGMENT_SIZE + TAG_SIZE)  # one batch per worker
    chosen = {
        "one GET": TransferPlan(single_get_max_bytes=1 << 62),
        f"{workers} ranges, size/{workers} each": TransferPlan(single_get_max_bytes=0, range_bytes=even,
                                                                workers=workers),
    }
    if size <= MOTO_RANGE_LIMIT:
        chosen[f"{workers} workers, 8 MiB ranges"] = TransferPlan(single_get_max_bytes=0, range_bytes=PART,
                                                                   workers=workers)
    return chosen


def run(sizes_mb: list[int], repeat: int, workers: int, tmp_dir: Path | None) -> Path:
    passwords = {PUBLISHER_EMAIL: secrets.token_urlsafe(16), READER_EMAIL: secrets.token_urlsafe(16)}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-transfer-", dir=tmp_dir) as tmp:
        work = Path(tmp)
        with sealed_stores(
            work,
            BUCKET,
            publisher=(PUBLISHER_EMAIL, passwords[PUBLISHER_EMAIL]),
            reader=(READER_EMAIL, passwords[READER_EMAIL]),
            direct=True,  # straight to moto
        ) as (s3, api):
            publisher = ResourceClient(api.url, PUBLISHER_EMAIL, passwords[PUBLISHER_EMAIL])
            cdn = CdnClient(s3.config(BUCKET, direct=True), max_workers=workers, read_timeout=120.0)
            for size_mb in sizes_mb:
                source = work / f"model-{size_mb}.bin"
                make_random_file(source, size_mb * MB)
                publish_model(source, name=f"m{size_mb}", folder=FOLDER, resources=publisher, cdn=cdn,
                              kind="text-to-image", work_dir=work)
                source.unlink()
            cache = work / "cache"
            cache.mkdir(mode=0o700)
            reader = ResourceClient(api.url, READER_EMAIL, passwords[READER_EMAIL], node_key=bench_node_key())
            node = Node(reader, cdn, cache)
            for size_mb in sizes_mb:
                results.append(measure(node, size_mb, repeat, workers))
            cdn.close()
    single_wins = [r["size_mb"] for r in results if r["winner"] == "one GET"]
    largest = max(single_wins, default=0)
    loses = [r["size_mb"] for r in results if r["winner"] != "one GET" and r["size_mb"] > largest]
    summary = (f"one GET won up to {largest} MB" + (f", ranges won from {min(loses)} MB" if loses else
               " and at every size measured"))
    print(f"\n{summary}")
    report = {"params": {"sizes_mb": sizes_mb, "repeat": repeat, "workers": workers,
                         "servers": "moto_server (direct) and the resource API, loopback"},
              "results": results, "summary": summary}
    return write_json("transfer_choice", report)


def measure(node: Node, size_mb: int, repeat: int, workers: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {}
    candidates = plans(size_mb * MB, workers)
    for _ in range(repeat):
        for label, plan in candidates.items():
            start = time.perf_counter()
            node.fetch(f"m{size_mb}", plan).path.unlink()
            times.setdefault(label, []).append(round(time.perf_counter() - start, 3))
    best = {label: min(runs) for label, runs in times.items()}
    winner = min(best, key=best.__getitem__)
    print(f"  {size_mb} MB: " + ", ".join(f"{label} {seconds:.3f} s" for label, seconds in best.items())
          + f"  -> {winner}")
    return {"size_mb": size_mb, "best_seconds": best, "all_seconds": times, "winner": winner}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer_choice",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="8,32,128,512", help="comma-separated model sizes in MB")
    parser.add_argument("--repeat", type=int, default=2, help="runs per way and size; the best counts")
    parser.add_argument("--workers", type=int, default=4, help="parallel ranged GETs")
    default_tmp = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    parser.add_argument("--tmp-dir", type=Path, default=default_tmp, help="where files go (default /dev/shm)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes_mb.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.repeat < 1 or args.workers < 2:
        parser.error("sizes and --repeat must be at least 1, --workers at least 2")
    run(sizes, args.repeat, args.workers, args.tmp_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
