"""The node-local usage journal: a request's usage record is on the node before its response is sent.

Why: the :class:`lib.accounts.usage.UsageRecorder` writes usage in batches, so records wait in
memory for up to a flush interval; a replica killed with SIGKILL (or by the OOM killer) lost them.
Usage is what an operator bills from.

How: :meth:`UsageJournal.append` writes the record as one JSON line with one ``os.write`` on a file
opened ``O_APPEND``. The write lands in the kernel's page cache, which outlives the process: no
``fsync``, so the cost is a few microseconds (``bench/request_path.py`` measures it as part of
``usage_record``). A power cut or a kernel crash can lose the last records; that is out of scope.

Segments: the journal appends to one segment file at a time, ``<pid>-<ns>-<n>.usage``, held with an
exclusive ``flock`` for the life of its owner (the lock goes with the process, however it dies). A
segment is created under a dot-name, locked, then renamed, so nobody can take a segment its owner
has not locked yet. The journal moves to a new segment after ``segment_records`` records, and a
segment is deleted once the recorder has written every record in it (:meth:`written`); the next
append starts a new one, so a replica whose usage is all written keeps no file.

Recovery: :func:`recover_segments` (run by every ingress replica at start and periodically,
:class:`JournalRecovery`) takes the lock of each segment it can (its owner is dead), ships its
records to the database and deletes it. Shipping is idempotent (``usage_records.request_id`` is
unique, inserted with ON CONFLICT DO NOTHING), so a record shipped twice, e.g. by an owner killed
between the database's commit and the delete, is stored once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from lib.accounts.records import UsageRecord

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".usage"
_PENDING_PREFIX = "."
_FIELDS = ("key_id", "endpoint", "status_code", "latency_ms", "model_id", "image_count", "cost", "request_id")


def encode(record: UsageRecord) -> bytes:
    line = {name: getattr(record, name) for name in _FIELDS}
    line["timestamp"] = record.timestamp.isoformat()
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> UsageRecord:
    fields: dict[str, Any] = json.loads(line)
    fields["timestamp"] = datetime.fromisoformat(fields["timestamp"])
    return UsageRecord(**fields)


class Segment:
    """One journal file, open for appending and exclusively locked by this process."""

    def __init__(self, directory: Path, name: str) -> None:
        pending = directory / (_PENDING_PREFIX + name)
        self.path = directory / name
        self.fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(pending, self.path)
        except BaseException:
            os.close(self.fd)
            pending.unlink(missing_ok=True)
            raise
        self.appended = 0
        self.written = 0

    @property
    def done(self) -> bool:
        return self.written >= self.appended

    def remove(self) -> None:
        """Delete the file, then let the lock go (no one can take a half-deleted segment)."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)

    def release(self) -> None:
        """Keep the file for recovery; let the lock go."""
        os.close(self.fd)


class UsageJournal:
    """This process's journal in ``directory`` (created 0700); thread-safe."""

    def __init__(self, directory: str | Path, *, segment_records: int = 50_000) -> None:
        if segment_records < 1:
            raise ValueError("segment_records must be at least 1")
        self.directory = make_private_directory(directory)
        self._segment_records = segment_records
        self._lock = threading.Lock()
        self._serial = 0
        self._closed = False
        self._retired: list[Segment] = []  # full, not yet written
        self._current: Segment | None = None  # made by the first append after a drain

    def append(self, record: UsageRecord) -> Segment:
        """Put ``record`` on the node (page cache); returns its segment, for :meth:`written`."""
        line = encode(record)
        with self._lock:
            if self._closed:
                raise RuntimeError("the usage journal is closed")
            segment = self._current
            if segment is None or segment.appended >= self._segment_records:
                if segment is not None:
                    self._retired.append(segment)
                segment = self._current = self._new_segment()
            os.write(segment.fd, line)
            segment.appended += 1
            return segment

    def written(self, segments: Iterable[Segment]) -> None:
        """The records appended to ``segments`` (one entry per record) are in the database."""
        with self._lock:
            for segment in segments:
                segment.written += 1
            for segment in [s for s in self._retired if s.done]:
                self._retired.remove(segment)
                segment.remove()
            current = self._current
            if current is not None and current.done:
                self._current = None
                current.remove()

    def close(self) -> int:
        """Delete the segments fully written; keep (and unlock) the rest for recovery. Returns how
        many records were left for recovery."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
            left = 0
            for segment in [*self._retired, *([self._current] if self._current else [])]:
                if segment.done:
                    segment.remove()
                else:
                    left += segment.appended - segment.written
                    segment.release()
            self._retired, self._current = [], None
            return left

    def _new_segment(self) -> Segment:
        self._serial += 1
        return Segment(self.directory, f"{os.getpid()}-{time.time_ns()}-{self._serial}{SEGMENT_SUFFIX}")


def make_private_directory(directory: str | Path) -> Path:
    """``directory`` created with mode 0700 (parents too); refused if another user owns it or others
    may write to it (they could delete usage, or add records that bill someone)."""
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"usage journal directory {path} belongs to another user")
    if info.st_mode & 0o022:
        raise PermissionError(f"usage journal directory {path} is writable by others; chmod 700 it")
    return path


def recover_segments(
    directory: str | Path, ship: Callable[[list[UsageRecord]], Any], *, batch_size: int = 500
) -> int:
    """Ship and delete every segment in ``directory`` whose owner is gone; returns records shipped.

    A segment whose lock is held (its owner lives) is left alone. When ``ship`` fails the segment
    stays for the next round and the error propagates. A line that does not parse (cut short by a
    crash inside a write) is logged and skipped.
    """
    shipped = 0
    for path in sorted(Path(directory).glob("*" + SEGMENT_SUFFIX)):
        if path.name.startswith(_PENDING_PREFIX):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # deleted by its owner or another replica meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            if not _same_file(fd, path):
                continue  # another replica shipped and deleted it before we got the lock
            records = _read_records(fd, path)
            for start in range(0, len(records), batch_size):
                ship(records[start : start + batch_size])
            path.unlink(missing_ok=True)
            shipped += len(records)
            if records:
                log.info("shipped %d usage records left by a stopped replica (%s)", len(records), path.name)
        finally:
            os.close(fd)
    return shipped


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _read_records(fd: int, path: Path) -> list[UsageRecord]:
    with os.fdopen(os.dup(fd), "rb") as stream:
        lines = stream.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(decode(line))
        except (ValueError, TypeError, KeyError):
            log.warning("skipping unreadable line %d of usage journal segment %s", number, path.name)
    return records


class JournalRecovery:
    """Runs :func:`recover_segments` now and every ``interval_s`` in a daemon thread, until closed."""

    def __init__(
        self, directory: str | Path, ship: Callable[[list[UsageRecord]], Any], *, interval_s: float = 30.0
    ) -> None:
        self._directory = Path(directory)
        self._ship = ship
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-journal-recovery", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                recover_segments(self._directory, self._ship)
            except Exception as exc:  # the database is down: the segments wait for the next round
                log.warning("could not ship usage left by a stopped replica yet (%s)", type(exc).__name__)
            if self._stop.wait(self._interval_s):
                return

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
