"""Usage recording off the request path: queue in memory, write in batches from one thread.

``record()`` only appends to a queue and never blocks on the database. A background thread hands
batches of up to ``max_batch`` records to the sink (e.g. ``AccountStore.record_usage``) as soon as
a batch is full, when :meth:`flush` asks, and otherwise every ``flush_interval_s``.

Failure handling: a failing batch is retried with backoff (:func:`lib.retry.call_with_retries`);
if every attempt fails the records go back to the head of the queue and the thread tries again
after ``flush_interval_s``, so an outage of the database delays usage but does not lose it. An
error ``retry_on`` calls permanent (a bug or a constraint violation) drops that one batch with an
error log, since retrying it would block every later record forever.

The bound: the queue (including the batch being written) holds at most ``max_queue`` records.
Beyond that ``record()`` drops the *incoming* record, counts it in :attr:`dropped` and logs a
warning once per overflow episode: serving requests matters more than accounting for them, and
memory must stay bounded while the database is down.

Durability: with a :class:`lib.accounts.journal.UsageJournal`, ``record()`` first appends the
record to the node's journal (a few microseconds, page cache), then queues it; a written batch is
acknowledged to the journal, which deletes a segment once all its records are written. A replica
killed before its queue was written leaves its segment behind, and another replica on the node
ships it (``lib/accounts/journal.py``). A record refused by a full queue is still in the journal
and is shipped from there once this replica stops.

Shutdown: :meth:`close` drains the queue (retrying as above) before it returns, so nothing is lost
on a graceful shutdown unless the sink stays down past ``timeout_s``; it returns how many records
were left unwritten.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from lib.accounts.journal import Segment, UsageJournal
from lib.accounts.records import UsageRecord
from lib.observability import metrics
from lib.retry import RetryPolicy, call_with_retries

log = logging.getLogger(__name__)


def _retry_everything(_exc: BaseException) -> bool:
    return True


class UsageRecorder:
    def __init__(
        self,
        sink: Callable[[list[UsageRecord]], Any],
        *,
        max_batch: int = 500,
        flush_interval_s: float = 1.0,
        max_queue: int = 100_000,
        retry_policy: RetryPolicy = RetryPolicy(attempts=3, base_delay=0.1, max_delay=2.0),
        retry_on: Callable[[BaseException], bool] = _retry_everything,
        sleep: Callable[[float], None] = time.sleep,
        journal: UsageJournal | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < max_batch or flush_interval_s <= 0:
            raise ValueError("need max_batch >= 1, max_queue >= max_batch and flush_interval_s > 0")
        self._sink = sink
        self._max_batch = max_batch
        self._flush_interval_s = flush_interval_s
        self._max_queue = max_queue
        self._retry_policy = retry_policy
        self._retry_on = retry_on
        self._sleep = sleep
        self._journal = journal

        self._queue: deque[tuple[UsageRecord, Segment | None]] = deque()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False
        self._flush_requested = False
        self._overflowing = False
        self._dropped = 0
        self._written = 0
        self._thread = threading.Thread(target=self._run, name="usage-recorder", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Records refused because the queue was full, or discarded after a permanent sink error."""
        with self._cond:
            return self._dropped

    @property
    def written(self) -> int:
        with self._cond:
            return self._written

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_flight

    def record(self, record: UsageRecord) -> bool:
        """Queue one record; returns False if it was dropped (queue full, or recorder closed)."""
        with self._cond:
            if self._closing:
                self._dropped += 1
                metrics.usage("dropped")
                log.warning("usage recorder is closed; dropped a usage record")
                return False
            if len(self._queue) + self._in_flight >= self._max_queue:
                self._journaled(record)  # not lost: shipped from the journal once this replica stops
                self._dropped += 1
                metrics.usage("dropped")
                if not self._overflowing:
                    self._overflowing = True
                    log.warning(
                        "usage queue full (%d records): dropping new usage records until it drains",
                        self._max_queue,
                    )
                return False
            self._overflowing = False
            self._queue.append((record, self._journaled(record)))
            metrics.usage("queued")
            if len(self._queue) >= self._max_batch:
                self._cond.notify_all()
            return True

    def flush(self, timeout_s: float | None = 30.0) -> bool:
        """Write everything queued so far; True once the queue is empty, False on timeout."""
        with self._cond:
            self._flush_requested = True
            self._cond.notify_all()
            return self._cond.wait_for(self._drained, timeout=timeout_s)

    def close(self, timeout_s: float | None = 30.0) -> int:
        """Stop accepting records, drain the queue, stop the thread; returns records left unwritten."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            # Still retrying a dead sink after the timeout: the thread stops after its current
            # attempt, and what remains is reported rather than silently discarded.
            self._stopped = True
            self._cond.notify_all()
            left = len(self._queue) + self._in_flight
        if self._journal is not None:
            # What is left stays in the journal's segments, shipped by the next replica on the node.
            self._journal.close()
        if left:
            log.error("usage recorder closed with %d records unwritten", left)
        return left

    def __enter__(self) -> UsageRecorder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _journaled(self, record: UsageRecord) -> Segment | None:
        if self._journal is None:
            return None
        try:
            return self._journal.append(record)
        except Exception as exc:  # a full disk must not fail the request: memory only, as before
            log.warning("could not journal a usage record (%s); queued in memory only", type(exc).__name__)
            return None

    def _acknowledge(self, batch: list[tuple[UsageRecord, Segment | None]]) -> None:
        if self._journal is not None:
            self._journal.written(segment for _, segment in batch if segment is not None)

    # -- background thread ------------------------------------------------------------------------

    def _drained(self) -> bool:
        return not self._queue and self._in_flight == 0

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closing or self._flush_requested or len(self._queue) >= self._max_batch,
                    timeout=self._flush_interval_s,
                )
                if not self._queue:
                    self._flush_requested = False
                    self._cond.notify_all()
                    if self._closing:
                        return
                    continue
                batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
                self._in_flight = len(batch)
            if not self._write(batch) and not self._wait_before_retrying():
                return
            with self._cond:
                if self._stopped:
                    return

    def _write(self, batch: list[tuple[UsageRecord, Segment | None]]) -> bool:
        """Hand one batch to the sink. False if it failed and went back to the head of the queue."""
        records = [record for record, _ in batch]
        try:
            call_with_retries(
                lambda: self._sink(records),
                policy=self._retry_policy,
                retry_on=self._retry_on,
                what="writing a usage batch",
                sleep=self._sleep,
            )
        except Exception as exc:
            permanent = not self._retry_on(exc)
            with self._cond:
                self._in_flight = 0
                metrics.usage("dropped" if permanent else "retried", len(batch))
                if permanent:
                    self._dropped += len(batch)
                else:
                    self._queue.extendleft(reversed(batch))
                self._cond.notify_all()
            if permanent:
                self._acknowledge(batch)  # it would be rejected again from the journal
                log.error(
                    "usage sink rejected a batch of %d records (%s); discarding it",
                    len(batch), type(exc).__name__,
                )
                return True
            log.warning(
                "usage sink still failing (%s); keeping %d records to retry", type(exc).__name__, len(batch)
            )
            return False
        self._acknowledge(batch)
        with self._cond:
            self._in_flight = 0
            self._written += len(batch)
            metrics.usage("written", len(batch))
            self._cond.notify_all()
        return True

    def _wait_before_retrying(self) -> bool:
        """Pause after a failed round; False once a timed-out close() has told the thread to stop."""
        with self._cond:
            if not self._stopped:
                self._cond.wait(timeout=self._flush_interval_s)
            return not self._stopped
