"""UsageRecorder: batching, draining on close, retries that keep records, the queue bound."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest

from lib.accounts.records import UsageRecord
from lib.accounts.usage import UsageRecorder
from lib.retry import RetryPolicy

T0 = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
NO_WAIT = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)


def usage(n: int) -> UsageRecord:
    return UsageRecord(key_id="k", endpoint="/v1/infer", status_code=200, latency_ms=float(n), timestamp=T0)


class ListSink:
    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.batches: list[list[UsageRecord]] = []
        self.failures = failures
        self.error = error or ConnectionError("database down")
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, batch: list[UsageRecord]) -> None:
        with self.lock:
            self.calls += 1
            if self.failures > 0:
                self.failures -= 1
                raise self.error
            self.batches.append(list(batch))

    @property
    def records(self) -> list[UsageRecord]:
        return [r for batch in self.batches for r in batch]


def test_close_writes_every_record_in_order_and_in_bounded_batches() -> None:
    sink = ListSink()
    # An interval that never elapses in this test: only batch size and close() trigger writes.
    recorder = UsageRecorder(sink, max_batch=100, flush_interval_s=3600)
    sent = [usage(i) for i in range(1234)]
    for r in sent:
        assert recorder.record(r)
    assert recorder.close() == 0
    assert sink.records == sent
    assert all(len(batch) <= 100 for batch in sink.batches)
    assert recorder.written == 1234 and recorder.pending == 0


def test_flush_drains_what_was_queued() -> None:
    sink = ListSink()
    recorder = UsageRecorder(sink, max_batch=1000, flush_interval_s=3600)
    for i in range(10):
        recorder.record(usage(i))
    assert recorder.flush(timeout_s=30)
    assert len(sink.records) == 10
    recorder.close()


def test_records_from_many_threads_all_arrive_exactly_once() -> None:
    sink = ListSink()
    recorder = UsageRecorder(sink, max_batch=50, flush_interval_s=0.01)
    start = threading.Barrier(10)

    def produce(worker: int) -> None:
        start.wait()
        for i in range(200):
            recorder.record(usage(worker * 1000 + i))

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert recorder.close() == 0
    latencies = sorted(r.latency_ms for r in sink.records)
    assert latencies == sorted(float(w * 1000 + i) for w in range(10) for i in range(200))


def test_a_failing_sink_is_retried_and_nothing_is_lost_or_duplicated() -> None:
    # 5 failures: more than one round of 3 attempts, so the batch goes back to the queue once.
    sink = ListSink(failures=5)
    recorder = UsageRecorder(
        sink, max_batch=10, flush_interval_s=0.01, retry_policy=NO_WAIT, sleep=lambda _s: None
    )
    sent = [usage(i) for i in range(25)]
    for r in sent:
        recorder.record(r)
    assert recorder.close(timeout_s=30) == 0
    assert sink.records == sent
    assert sink.calls > 5 and recorder.dropped == 0


def test_a_permanent_sink_error_drops_only_that_batch() -> None:
    sink = ListSink(failures=1, error=ValueError("constraint violated"))
    recorder = UsageRecorder(
        sink,
        max_batch=10,
        flush_interval_s=3600,
        retry_on=lambda exc: not isinstance(exc, ValueError),
        sleep=lambda _s: None,
    )
    for i in range(25):
        recorder.record(usage(i))
    assert recorder.close() == 0
    assert [r.latency_ms for r in sink.records] == [float(i) for i in range(10, 25)]
    assert recorder.dropped == 10 and sink.calls == 3


def test_the_queue_bound_drops_new_records_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def blocked_sink(_batch: list[UsageRecord]) -> None:
        release.wait()

    recorder = UsageRecorder(blocked_sink, max_batch=10, flush_interval_s=3600, max_queue=20)
    # The bound counts the batch being written, so this holds however far the thread has got.
    accepted = [recorder.record(usage(i)) for i in range(25)]
    assert accepted == [True] * 20 + [False] * 5
    assert recorder.dropped == 5
    assert sum("usage queue full" in m for m in caplog.messages) == 1  # one warning per episode
    release.set()
    assert recorder.close() == 0
    assert recorder.written == 20


def test_close_gives_up_on_a_dead_sink_and_reports_what_is_left() -> None:
    sink = ListSink(failures=10**9)
    recorder = UsageRecorder(
        sink, max_batch=10, flush_interval_s=0.01, retry_policy=NO_WAIT, sleep=lambda _s: None
    )
    for i in range(15):
        recorder.record(usage(i))
    assert recorder.close(timeout_s=0.2) == 15
    assert not recorder.record(usage(99))
    assert sink.records == []


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        UsageRecorder(ListSink(), max_batch=0)
    with pytest.raises(ValueError):
        UsageRecorder(ListSink(), max_batch=10, max_queue=5)
