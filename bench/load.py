"""A closed-loop HTTP load generator: N clients, each sending its next request when the last returns.

Bounded in requests and time (it stops by itself), loopback targets only in this project's use.
Latencies are measured per request on the client, so they include the whole server path.

Besides the latencies, a run keeps when each successful request completed (``done_at``, on the
``time.perf_counter`` clock, for throughput per second) and, when asked with ``capture_header``,
the value of one response header per successful request (``captured``, aligned with
``latencies_ms``; ``None`` where the response had no such header), e.g. ``Server-Timing``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

REQUEST_TIMEOUT_S = 60.0


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    started_at: float = 0.0  # time.perf_counter() when the first client started
    done_at: list[float] = field(default_factory=list)  # perf_counter() of each success, in order
    captured: list[str | None] = field(default_factory=list)  # one header per success, if asked

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + self.errors

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "ok": len(self.latencies_ms),
            "errors": self.errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "seconds": round(self.seconds, 3),
            "throughput_rps": round(self.throughput, 2),
            "p50_ms": round(self.percentile(50), 2),
            "p99_ms": round(self.percentile(99), 2),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 2) if self.latencies_ms else None,
        }


async def _client(
    session: aiohttp.ClientSession, method: str, url: str, body: bytes | None,
    deadline: float, budget: list[int], result: LoadResult, headers: Mapping[str, str],
    capture_header: str | None = None,
) -> None:
    while time.perf_counter() < deadline and budget[0] > 0:
        budget[0] -= 1
        started = time.perf_counter()
        captured: str | None = None
        try:
            async with session.request(method, url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
                if capture_header is not None:
                    captured = response.headers.get(capture_header)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = 0
        done = time.perf_counter()
        elapsed_ms = (done - started) * 1000
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            result.latencies_ms.append(elapsed_ms)
            result.done_at.append(done)
            if capture_header is not None:
                result.captured.append(captured)
        else:
            result.errors += 1


async def _run(
    method: str, url: str, body: bytes | None, headers: Mapping[str, str],
    concurrency: int, duration_s: float, max_requests: int, capture_header: str | None = None,
) -> LoadResult:
    result = LoadResult(concurrency=concurrency, seconds=0.0)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        result.started_at = started
        deadline = started + duration_s
        budget = [max_requests]
        await asyncio.gather(*(
            _client(session, method, url, body, deadline, budget, result, headers, capture_header)
            for _ in range(concurrency)
        ))
        result.seconds = time.perf_counter() - started
    return result


def merge(results: list[LoadResult]) -> LoadResult:
    """Several runs of the same load as one: their requests together over their summed seconds
    (e.g. rounds interleaved with another server's, so both see the same background load)."""
    if not results:
        raise ValueError("nothing to merge")
    merged = LoadResult(concurrency=results[0].concurrency, seconds=0.0, started_at=results[0].started_at)
    for result in results:
        merged.seconds += result.seconds
        merged.latencies_ms.extend(result.latencies_ms)
        merged.errors += result.errors
        for status, count in result.statuses.items():
            merged.statuses[status] = merged.statuses.get(status, 0) + count
        merged.done_at.extend(result.done_at)
        merged.captured.extend(result.captured)
    return merged


def run_load(
    url: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None,
    method: str = "POST", concurrency: int = 1, duration_s: float = 10.0, max_requests: int = 100_000,
    capture_header: str | None = None,
) -> LoadResult:
    """Closed-loop load for ``duration_s`` (or ``max_requests``), whichever ends first."""
    return asyncio.run(_run(
        method, url, body, dict(headers or {}), concurrency, duration_s, max_requests, capture_header
    ))
