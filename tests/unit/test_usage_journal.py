"""The usage journal: records survive a killed process, recovery ships them once, idempotently.

The database cases run on SQLite and on PostgreSQL (127.0.0.1:5432, skipped when unreachable
unless SEALSERVE_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, MetaData, Table, create_engine, inspect

from lib.accounts.journal import SEGMENT_SUFFIX, UsageJournal, decode, encode, recover_segments
from lib.accounts.records import UsageRecord
from lib.accounts.store import AccountStore
from lib.accounts.tables import USAGE_REQUEST_ID_INDEX, AccountsBase
from lib.accounts.usage import UsageRecorder

T0 = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
ROOT = Path(__file__).resolve().parents[2]


def usage(n: int, key: str = "k") -> UsageRecord:
    return UsageRecord(key_id=key, endpoint="POST /v1/classify", status_code=200, latency_ms=float(n),
                       timestamp=T0)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SEGMENT_SUFFIX))


@pytest.fixture
def store(database_url: str) -> Iterator[AccountStore]:
    with AccountStore(database_url) as account_store:
        yield account_store


def test_the_directory_is_private_and_a_written_segment_is_deleted(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "journal"
    journal = UsageJournal(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    first = journal.append(usage(1))
    journal.append(usage(2))
    [path] = segments(directory)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes().splitlines()) == 2
    journal.written([first])
    assert segments(directory) == [path]  # one record of it is not written yet
    journal.written([first])
    assert segments(directory) == []  # every record written: deleted
    journal.written([journal.append(usage(3))])  # the next append starts a new segment
    assert segments(directory) == []
    journal.close()


def test_a_directory_others_may_write_to_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        UsageJournal(directory)


def test_a_directory_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(PermissionError, match="another user"):
        UsageJournal(tmp_path / "journal")


def test_full_segments_rotate_and_go_once_written(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path, segment_records=2)
    held = [journal.append(usage(n)) for n in range(5)]
    assert len(segments(tmp_path)) == 3
    journal.written(held[:4])
    assert len(segments(tmp_path)) == 1
    assert journal.close() == 1  # the unwritten record stays for recovery
    [left] = segments(tmp_path)
    assert len(left.read_bytes().splitlines()) == 1


def test_a_live_owners_segment_is_left_alone(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    journal.append(usage(1))
    shipped: list[UsageRecord] = []
    assert recover_segments(tmp_path, shipped.extend) == 0
    assert shipped == [] and len(segments(tmp_path)) == 1
    journal.close()  # the owner stops with the record unwritten: now it is recoverable
    assert recover_segments(tmp_path, shipped.extend) == 1
    assert shipped[0].latency_ms == 1.0 and segments(tmp_path) == []


def test_a_recorder_with_a_journal_leaves_no_file_once_drained(tmp_path: Path) -> None:
    written: list[UsageRecord] = []
    with UsageRecorder(written.extend, journal=UsageJournal(tmp_path)) as recorder:
        for n in range(10):
            recorder.record(usage(n))
        assert recorder.flush(10)
        assert segments(tmp_path) == []
    assert len(written) == 10


def test_a_record_refused_by_a_full_queue_is_still_journaled(tmp_path: Path) -> None:
    def down(_batch: list[UsageRecord]) -> None:
        raise ConnectionError("database down")

    journal = UsageJournal(tmp_path)
    recorder = UsageRecorder(down, max_batch=1, max_queue=1, flush_interval_s=0.05, journal=journal)
    for n in range(3):
        recorder.record(usage(n))
    assert recorder.close(timeout_s=0.2) >= 1
    shipped: list[UsageRecord] = []
    recover_segments(tmp_path, shipped.extend)
    assert sorted(r.latency_ms for r in shipped) == [0.0, 1.0, 2.0]


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from lib.accounts.journal import UsageJournal
    from lib.accounts.records import UsageRecord
    journal = UsageJournal(sys.argv[1])
    for n in range(int(sys.argv[2])):
        journal.append(UsageRecord(key_id="killed", endpoint="POST /v1/classify", status_code=200,
                                   latency_ms=float(n), request_id=f"req{n:05d}"))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_records_of_a_process_killed_with_sigkill_are_shipped_once(
    tmp_path: Path, store: AccountStore
) -> None:
    journal_dir = tmp_path / "journal"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(journal_dir), "300"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=60, check=False,
    )
    assert done.returncode == -signal.SIGKILL
    [segment] = segments(journal_dir)
    kept = segment.read_bytes()
    # A crash inside a write leaves at most a cut-short last line: skipped, the rest shipped.
    segment.write_bytes(kept + b'{"key_id":"kil')
    assert recover_segments(journal_dir, store.record_usage, batch_size=64) == 300
    assert segments(journal_dir) == []
    # Shipped again (a replica killed between the commit and the delete): still stored once.
    segment.write_bytes(kept)
    assert recover_segments(journal_dir, store.record_usage) == 300
    assert store.usage_summary("killed").total_requests == 300


def test_a_failed_shipment_keeps_the_segment(tmp_path: Path) -> None:
    def down(_batch: list[UsageRecord]) -> None:
        raise ConnectionError("database down")

    journal = UsageJournal(tmp_path)
    journal.append(usage(2))
    journal.close()
    with pytest.raises(ConnectionError):
        recover_segments(tmp_path, down)
    assert len(segments(tmp_path)) == 1
    shipped: list[UsageRecord] = []
    assert recover_segments(tmp_path, shipped.extend) == 1
    assert [r.latency_ms for r in shipped] == [2.0] and segments(tmp_path) == []


def test_the_same_records_twice_are_stored_once(store: AccountStore) -> None:
    batch = [usage(n) for n in range(5)]
    store.record_usage(batch)
    store.record_usage([*batch, usage(6)])
    assert store.usage_summary("k").total_requests == 6


def test_a_repeated_client_request_id_cannot_merge_two_requests(store: AccountStore) -> None:
    # The attacker's try: every request with one X-Request-ID. The record's id is the server's own.
    first, second = usage(1), usage(2)
    assert first.request_id != second.request_id
    store.record_usage([first])
    store.record_usage([second])
    assert store.usage_summary("k").total_requests == 2


def test_an_older_database_gains_a_unique_request_id(database_url: str) -> None:
    old = MetaData()
    for table in AccountsBase.metadata.sorted_tables:
        columns: list[Column[Any]] = [c._copy() for c in table.columns if c.name != "request_id"]
        Table(table.name, old, *columns)
    engine = create_engine(database_url)
    try:
        old.create_all(engine)
    finally:
        engine.dispose()
    for _ in range(2):  # the second start finds nothing to add
        with AccountStore(database_url) as store:
            record = usage(1)
            store.record_usage([record])
            store.record_usage([record])
    with AccountStore(database_url) as store:
        assert store.usage_summary("k").total_requests == 2  # one record per start
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            indexes = {i["name"]: i for i in inspect(conn).get_indexes("usage_records")}
            assert indexes[USAGE_REQUEST_ID_INDEX]["unique"]
    finally:
        engine.dispose()


def test_a_journal_line_holds_the_whole_record() -> None:
    record = UsageRecord("k", "POST /v1/infer", 200, 3.5, "m", 2, T0, cost=60)
    assert decode(encode(record).rstrip(b"\n")) == record


def test_the_journal_keeps_every_field_of_a_usage_record() -> None:
    # A field added to UsageRecord but not journaled would be lost for a record recovered
    # after a crash: the journal's line must carry them all.
    from dataclasses import fields

    from lib.accounts.journal import _FIELDS
    from lib.accounts.records import UsageRecord

    assert {*_FIELDS, "timestamp"} == {f.name for f in fields(UsageRecord)}
