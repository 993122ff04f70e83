"""What sealing costs: seal and open throughput against plainly reading the same file.

    python -m bench.sealing [--size-mb 256] [--repeat 3] [--tmp-dir DIR]

Every step runs on the same random file in one process, so the ratios are comparable even where
the absolute figures depend on the machine. The baseline is "read + sha256" because a loader
must hash a plain model file anyway (its id is its sha256) before it trusts it; "read" alone is
the floor. The file was just written, so all reads come from the page cache: the figures are
CPU and memory cost, not disk speed. Writing steps include the fsync and rename that make
``seal_file`` / ``open_file`` atomic. Files go to ``--tmp-dir``, by default ``/dev/shm`` where it
exists: opened plaintext only ever lives in tmpfs on a node. One more row opens to the system's
temporary directory (usually a persistent disk) to show what the fsync to a disk adds there.
Each row also carries ``cpu_s``, the process CPU time of its best run: on a busy machine it is
the steadier figure.

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


def _best_of(repeat: int, step: Callable[[], object]) -> tuple[float, list[float], float]:
    # Best-of-N: the minimum is the run least disturbed by the rest of the machine.
    times, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    best = min(range(repeat), key=times.__getitem__)
    return times[best], times, cpu[best]


def _row(name: str, size: int, repeat: int, step: Callable[[], object], **extra: Any) -> dict[str, Any]:
    best, times, cpu = _best_of(repeat, step)
    print(f"  {name}: best {best:.3f} s of {[round(t, 3) for t in times]} (cpu {cpu:.3f} s)")
    return {"name": name, "bytes": size, "seconds": best, "all_seconds": times, "cpu_s": cpu, **extra}


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
        if tmp_dir is not None and Path(tempfile.gettempdir()).resolve() != tmp_dir.resolve():
            with tempfile.TemporaryDirectory(prefix="bench-sealing-disk-") as disk:
                rows.append(_row(f"open_file to {tempfile.gettempdir()} (fsync to its disk)", size, repeat,
                                 lambda: open_file(sealed, Path(disk) / "opened.bin", key)))
        # A benchmark of the wrong work is worthless: check, untimed, that open undid seal.
        if sha256_file(opened) != sha256_file(plain):
            raise SystemExit("open_file did not reproduce the plaintext; figures discarded")

    params = {"size_mb": size_mb, "repeat": repeat, "segment_size": segment_size, "tmp_dir": str(tmp_dir)}
    seconds = {row["name"]: row["seconds"] for row in rows}
    ratio = seconds[BASELINE] / seconds["open_file (file -> file)"]
    params["targets"] = {"open_file throughput / read + sha256 throughput": {
        "value": round(ratio, 3), "target": ">= 0.95", "met": ratio >= 0.95, "where": str(tmp_dir)}}
    print(f"\ntarget: open_file {ratio:.2f}x the throughput of read + sha256 in {tmp_dir} "
          f"(target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    return write_report("sealing", rows, BASELINE, params=params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sealing", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="test file size in MB (2^20 bytes)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per step; the best is reported")
    parser.add_argument("--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE, help="sealing segment size")
    default_tmp = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    parser.add_argument("--tmp-dir", type=Path, default=default_tmp, help="where files go (default /dev/shm)")
    args = parser.parse_args(argv)
    if args.size_mb < 1 or args.repeat < 1:
        parser.error("--size-mb and --repeat must be at least 1")
    run(args.size_mb, args.repeat, args.segment_size, args.tmp_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
