"""AccountStore against SQLite and PostgreSQL (each test runs on both backends).

The PostgreSQL variant uses ``$DATABASE_URL`` when it names PostgreSQL, else the local default, in a
schema of its own that is dropped afterwards. It is skipped, with the reason, when PostgreSQL cannot
be reached, unless ``SEALSERVE_REQUIRE_POSTGRES=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text

import lib.accounts.store
from lib.accounts.store import AccountStore, CreatedKey, KeyRecord, Scope, UsageRecord
from lib.accounts.usage import UsageRecorder
from lib.db import redact_url
from lib.errors import NotFoundError, ServiceUnavailableError, ValidationFailedError

T0 = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[AccountStore]:
    with AccountStore(database_url, clock=clock) as account_store:
        yield account_store


def _raw_rows(store: AccountStore, sql: str) -> list[Any]:
    with store._engine.connect() as conn:
        return list(conn.execute(text(sql)))


def usage(key_id: str, when: datetime, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {"endpoint": "/v1/infer", "status_code": 200, "latency_ms": 100.0}
    values.update(fields)
    return UsageRecord(key_id=key_id, timestamp=when, **values)


# -- keys ----------------------------------------------------------------------------------------


def test_created_key_is_returned_once_and_found_by_lookup(store: AccountStore) -> None:
    created = store.create_key("ci", "infer,classify", "60/minute", owner_email="Dev@Example.com")
    assert created.key.startswith("ss_") and len(created.key) == 46
    assert created.key not in repr(created)
    record = created.record
    assert record.prefix == created.key[:10]
    assert record.scopes == ("infer", "classify")
    assert record.rate_limit == "60/minute" and record.rate_limit_spec == (60, 60)
    assert record.owner_email == "dev@example.com"
    assert record.created_at == T0
    assert store.lookup_key(created.key) == record
    assert Scope.INFER.value in record.scopes and Scope.ADMIN.value not in record.scopes


def test_only_the_hash_of_a_key_is_stored(store: AccountStore) -> None:
    created = store.create_key("ci", ["infer"], "10/second")
    (row,) = _raw_rows(store, "SELECT * FROM api_keys")
    stored = " ".join(str(value) for value in row)
    assert created.key not in stored
    assert created.key[10:] not in stored  # not even the part after the display prefix
    assert row.key_hash == hashlib.sha256(created.key.encode()).hexdigest()
    assert row.prefix == created.key[:10]


def test_lookup_rejects_unknown_altered_and_malformed_keys(store: AccountStore) -> None:
    created = store.create_key("ci", ["infer"], "10/second")
    altered = created.key[:-1] + ("A" if created.key[-1] != "A" else "B")
    assert store.lookup_key(altered) is None
    assert store.lookup_key("ss_" + "x" * 43) is None
    assert store.lookup_key("") is None
    assert store.lookup_key("not a key") is None
    assert store.lookup_key(created.key + "x") is None


def test_lookup_confirms_the_hash_in_constant_time(
    store: AccountStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = store.create_key("ci", ["infer"], "10/second")
    calls: list[tuple[bytes, bytes]] = []
    real = lib.accounts.store.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(lib.accounts.store.hmac, "compare_digest", spy)
    assert store.lookup_key(created.key) is not None
    expected = hashlib.sha256(created.key.encode()).hexdigest().encode()
    assert calls == [(expected, expected)]


def test_revoked_key_no_longer_authenticates(store: AccountStore) -> None:
    created = store.create_key("ci", ["infer"], "10/second")
    revoked = store.revoke_key(created.record.id)
    assert revoked.revoked is True
    assert store.lookup_key(created.key) is None
    assert store.revoke_key(created.record.id).revoked is True  # idempotent
    record = store.get_key(created.record.id)
    assert record is not None and record.revoked
    with pytest.raises(NotFoundError):
        store.revoke_key("no-such-key")


def test_key_stops_working_at_its_expiry(store: AccountStore, clock: FakeClock) -> None:
    created = store.create_key("temp", ["infer"], "10/second", expires_at=T0 + timedelta(hours=1))
    assert created.record.expires_at == T0 + timedelta(hours=1)
    clock.advance(minutes=59)
    assert store.lookup_key(created.key) is not None
    clock.advance(minutes=1)
    assert store.lookup_key(created.key) is None
    with pytest.raises(ValidationFailedError):
        store.create_key("past", ["infer"], "10/second", expires_at=clock.now - timedelta(seconds=1))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scopes": "infer,superuser"}, "unknown scope"),
        ({"scopes": ""}, "at least one scope"),
        ({"rate_limit": "60/fortnight"}, "unit"),
        ({"rate_limit": "lots"}, "N/minute"),
        ({"rate_limit": "0/minute"}, "between 1"),
        ({"name": "  "}, "name"),
        ({"owner_email": "nobody"}, "email"),
        ({"expires_at": datetime(2030, 1, 1)}, "timezone-aware"),
    ],
)
def test_create_key_validates_its_input(store: AccountStore, fields: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"name": "k", "scopes": "infer", "rate_limit": "5/second"}
    arguments.update(fields)
    with pytest.raises(ValidationFailedError, match=message):
        store.create_key(**arguments)
    assert store.list_keys() == []


def test_list_keys_in_creation_order_and_owners_are_shared(store: AccountStore, clock: FakeClock) -> None:
    first = store.create_key("one", ["infer"], "1/second", owner_email="team@example.com")
    clock.advance(seconds=1)
    second = store.create_key("two", ["admin", "infer"], "2/hour", owner_email="TEAM@example.com")
    clock.advance(seconds=1)
    third = store.create_key("three", ["classify"], "3/day")
    store.revoke_key(third.record.id)
    assert [r.name for r in store.list_keys()] == ["one", "two", "three"]
    assert [r.name for r in store.list_keys(include_revoked=False)] == ["one", "two"]
    assert second.record.scopes == ("infer", "admin")
    assert len(_raw_rows(store, "SELECT id FROM users")) == 1
    assert first.record.owner_email == second.record.owner_email == "team@example.com"


def test_records_pickle(store: AccountStore) -> None:
    # Records cross Ray process boundaries; these bytes are our own, so unpickling them is safe.
    created = store.create_key("ci", ["infer"], "10/second")
    assert pickle.loads(pickle.dumps(created)) == created  # noqa: S301
    summary = store.usage_summary()
    assert pickle.loads(pickle.dumps(summary)) == summary  # noqa: S301


def test_a_second_store_on_the_same_database_shares_keys(database_url: str, store: AccountStore) -> None:
    created = store.create_key("shared", ["infer"], "10/second")
    with AccountStore(database_url) as other:  # create_all again is a no-op
        assert other.lookup_key(created.key) == created.record


# -- usage ---------------------------------------------------------------------------------------


def test_usage_summary_math_and_filters(store: AccountStore) -> None:
    a = store.create_key("a", ["infer"], "10/second").record.id
    b = store.create_key("b", ["classify"], "10/second").record.id
    store.record_usage(
        [
            usage(a, T0 - timedelta(days=2), latency_ms=100.0, model_id="sd", image_count=2),
            usage(a, T0 - timedelta(hours=1), latency_ms=200.0, model_id="sd", image_count=1),
            usage(a, T0, status_code=422, latency_ms=10.0),
            usage(b, T0, endpoint="/v1/classify", latency_ms=50.0, model_id="vit"),
            usage(b, T0, endpoint="/v1/classify", status_code=503, latency_ms=40.0, model_id="vit"),
        ]
    )
    everything = store.usage_summary()
    assert everything.total_requests == 5
    assert everything.successful_requests == 3
    assert everything.success_rate == pytest.approx(0.6)
    assert everything.avg_response_time_ms == pytest.approx(80.0)
    assert everything.total_images == 3
    assert everything.by_endpoint == {"/v1/classify": 2, "/v1/infer": 3}
    assert everything.by_model == {"sd": 2, "vit": 2}

    recent_a = store.usage_summary(key_id=a, since=T0 - timedelta(days=1))
    assert recent_a.total_requests == 2
    assert recent_a.successful_requests == 1
    assert recent_a.avg_response_time_ms == pytest.approx(105.0)
    assert recent_a.by_model == {"sd": 1}

    record_a = store.get_key(a)
    assert record_a is not None and record_a.last_used_at == T0


def test_empty_usage_summary_is_all_zero(store: AccountStore) -> None:
    summary = store.usage_summary(since=T0)
    assert (summary.total_requests, summary.success_rate, summary.avg_response_time_ms) == (0, 0.0, 0.0)
    assert summary.by_endpoint == {} and summary.by_model == {}


def test_usage_stats_group_by_key_endpoint_model_and_utc_day(store: AccountStore) -> None:
    late = datetime(2025, 3, 9, 23, 30, tzinfo=timezone.utc)
    # 00:30 UTC on the 10th, written with another offset: the day must still be the UTC day.
    early = datetime(2025, 3, 9, 19, 30, tzinfo=timezone(timedelta(hours=-5)))
    store.record_usage(
        [
            usage("k1", late, model_id="sd", image_count=4),
            usage("k1", early, status_code=500, latency_ms=300.0, model_id="sd"),
            usage("k2", early, endpoint="/v1/classify", latency_ms=50.0),
        ]
    )
    by_day = {s.group: s for s in store.usage_stats("day")}
    assert set(by_day) == {"2025-03-09", "2025-03-10"}
    assert by_day["2025-03-09"].requests == 1 and by_day["2025-03-09"].images == 4
    assert by_day["2025-03-10"].requests == 2
    assert by_day["2025-03-10"].success_rate == pytest.approx(0.5)
    assert by_day["2025-03-10"].avg_response_time_ms == pytest.approx(175.0)

    by_key = store.usage_stats("key")
    assert [(s.group, s.requests, s.successful_requests) for s in by_key] == [("k1", 2, 1), ("k2", 1, 1)]
    assert [(s.group, s.requests) for s in store.usage_stats("endpoint")] == [
        ("/v1/classify", 1),
        ("/v1/infer", 2),
    ]
    assert [(s.group, s.requests) for s in store.usage_stats("model")] == [("sd", 2), (None, 1)]
    assert [s.group for s in store.usage_stats("day", since=early)] == ["2025-03-10"]
    with pytest.raises(ValidationFailedError):
        store.usage_stats("hour")  # type: ignore[arg-type]


def test_cleanup_deletes_only_old_usage(store: AccountStore) -> None:
    store.record_usage(
        [usage("k", T0 - timedelta(days=d)) for d in (0, 10, 89, 91, 200)]
    )
    assert store.cleanup_usage(timedelta(days=90)) == 2
    assert store.usage_summary().total_requests == 3
    assert store.cleanup_usage(timedelta(days=90)) == 0
    with pytest.raises(ValidationFailedError):
        store.cleanup_usage(timedelta(0))


def test_recorder_lands_exactly_every_record_from_concurrent_threads(store: AccountStore) -> None:
    threads_count, per_thread = 8, 125
    recorder = UsageRecorder(store.record_usage, max_batch=64, flush_interval_s=0.05)
    start = threading.Barrier(threads_count)

    def produce(worker: int) -> None:
        start.wait()
        for i in range(per_thread):
            assert recorder.record(usage(f"key-{worker}", T0, latency_ms=float(i)))

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert recorder.close() == 0
    assert store.usage_summary().total_requests == threads_count * per_thread
    assert all(s.requests == per_thread for s in store.usage_stats("key"))
    assert recorder.written == threads_count * per_thread and recorder.dropped == 0


def test_nothing_secret_is_logged(store: AccountStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    created: CreatedKey = store.create_key("ci", ["infer"], "10/second")
    record: KeyRecord | None = store.lookup_key(created.key)
    assert record is not None
    store.revoke_key(record.id)
    digest = hashlib.sha256(created.key.encode()).hexdigest()
    assert caplog.records, "the store should log key creation"
    for line in caplog.messages:
        assert created.key not in line and digest not in line


# -- connection ----------------------------------------------------------------------------------


def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path: Any) -> None:
    with AccountStore(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'a.db'}") as store:
        assert _raw_rows(store, "PRAGMA journal_mode")[0][0] == "wal"
        assert _raw_rows(store, "PRAGMA busy_timeout")[0][0] == 5000
    assert (tmp_path / "nested" / "dir" / "a.db").exists()


def test_unreachable_database_is_a_503_without_the_password(caplog: pytest.LogCaptureFixture) -> None:
    url = "postgresql+psycopg://admin:hunter2-secret@127.0.0.1:1/none"
    with pytest.raises(ServiceUnavailableError) as info:
        AccountStore(url)
    assert "hunter2" not in str(info.value)
    assert all("hunter2" not in line for line in caplog.messages)
    assert "hunter2" not in redact_url(url) and "***" in redact_url(url)


def test_in_memory_sqlite_is_one_database_for_all_threads() -> None:
    with AccountStore("sqlite://") as store:
        created = store.create_key("mem", ["infer"], "1/second")
        found: list[KeyRecord | None] = []
        thread = threading.Thread(target=lambda: found.append(store.lookup_key(created.key)))
        thread.start()
        thread.join()
        assert found == [created.record]
