"""What sealing costs: seal and open throughput against plainly reading the same file.

    python -m bench.sealing [--size-mb 256] [--repeat 3] [--tmp-dir DIR]

Every step runs on the same random file in one process, so the ratios are comparable even where
the absolute figures depend on the machine. The baseline is "read + sha256" because a loader
must hash a plain model file anyway (its id is its sha256) before it trusts it; "read" alone is
the floor. The file was just written, so all reads come from the page cache: the figures are
CPU and memory cost, not disk speed. Writing steps include the fsync and rename that make
``seal_file`` / ``open_file`` atomic.

Each measurement is one function returning a row for :func:`bench.report.write_report`; a later
"fetch + open of a sealed file vs plain S3 download" part adds its own functions and rows.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.report import MB, write_report
from lib.digest import sha256_file
from lib.sealed.format import (
    DEFAULT_SEGMENT_SIZE,
    generate_key,
    open_file,
    open_stream,
    seal_file,
    seal_stream,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

CHUNK = 1 << 20
BASELINE = "read + sha256"


class _Discard:
    """A sink that drops what it gets, to time the crypto without the cost of writing."""

    def write(self, data: ReadableBuffer, /) -> int:
        return memoryview(data).nbytes


def _best_of(repeat: int, step: Callable[[], object]) -> tuple[float, list[float]]:
    # Best-of-N: the minimum is the run least disturbed by the rest of the machine.
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times), times


def _row(name: str, size: int, repeat: int, step: Callable[[], object], **extra: Any) -> dict[str, Any]:
    best, times = _best_of(repeat, step)
    print(f"  {name}: best {best:.3f} s of {[round(t, 3) for t in times]}")
    return {"name": name, "bytes": size, "seconds": best, "all_seconds": times, **extra}


def make_random_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def measure_read(path: Path, repeat: int) -> dict[str, Any]:
    def step() -> None:
        with path.open("rb") as f:
            while f.read(CHUNK):
                pass

    return _row("read", path.stat().st_size, repeat, step)


def measure_read_sha256(path: Path, repeat: int) -> dict[str, Any]:
    def step() -> None:
        with path.open("rb") as f:
            digest = hashlib.sha256()
            while chunk := f.read(CHUNK):
                digest.update(chunk)

    return _row(BASELINE, path.stat().st_size, repeat, step)


def measure_seal_file(src: Path, dst: Path, key: bytes, segment_size: int, repeat: int) -> dict[str, Any]:
    return _row(
        "seal_file (file -> file)",
        src.stat().st_size,
        repeat,
        lambda: seal_file(src, dst, key, segment_size=segment_size),
    )


def measure_seal_discard(src: Path, key: bytes, segment_size: int, repeat: int) -> dict[str, Any]:
    def step() -> None:
        with src.open("rb") as f:
            seal_stream(f, _Discard(), key, segment_size=segment_size)

    return _row("seal_stream (output discarded)", src.stat().st_size, repeat, step)


def measure_open_file(sealed: Path, dst: Path, key: bytes, plain_size: int, repeat: int) -> dict[str, Any]:
    return _row("open_file (file -> file)", plain_size, repeat, lambda: open_file(sealed, dst, key))


def measure_open_discard(sealed: Path, key: bytes, plain_size: int, repeat: int) -> dict[str, Any]:
    def step() -> None:
        with sealed.open("rb") as f:
            open_stream(f, _Discard(), key)

    return _row("open_stream (output discarded)", plain_size, repeat, step)


def run(size_mb: int, repeat: int, segment_size: int, tmp_dir: Path | None) -> Path:
    size = size_mb * MB
    with tempfile.TemporaryDirectory(prefix="bench-sealing-", dir=tmp_dir) as tmp:
        work = Path(tmp)
        plain, sealed, opened = work / "model.bin", work / "model.sealed", work / "opened.bin"
        print(f"writing a {size_mb} MB random file in {work}")
        make_random_file(plain, size)
        key = generate_key()
        # Warm the page cache so the first timed step is not charged for it.
        measure_read(plain, 1)

        rows = [
            measure_read(plain, repeat),
            measure_read_sha256(plain, repeat),
            measure_seal_discard(plain, key, segment_size, repeat),
            measure_seal_file(plain, sealed, key, segment_size, repeat),
            measure_open_discard(sealed, key, size, repeat),
            measure_open_file(sealed, opened, key, size, repeat),
        ]
        # A benchmark of the wrong work is worthless: check, untimed, that open undid seal.
        if sha256_file(opened) != sha256_file(plain):
            raise SystemExit("open_file did not reproduce the plaintext; figures discarded")

    params = {"size_mb": size_mb, "repeat": repeat, "segment_size": segment_size, "tmp_dir": str(tmp_dir)}
    return write_report("sealing", rows, BASELINE, params=params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sealing", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="test file size in MB (2^20 bytes)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per step; the best is reported")
    parser.add_argument("--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE, help="sealing segment size")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where to put the files (e.g. /dev/shm)")
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.repeat < 1:
        parser.error("--size-mb and --repeat must be at least 1")
    run(args.size_mb, args.repeat, args.segment_size, args.tmp_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
