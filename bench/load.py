"""A closed-loop HTTP load generator: N clients, each sending its next request when the last returns.

Bounded in requests and time (it stops by itself), loopback targets only in this project's use.
Latencies are measured per request on the client, so they include the whole server path.
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
) -> None:
    while time.perf_counter() < deadline and budget[0] > 0:
        budget[0] -= 1
        started = time.perf_counter()
        try:
            async with session.request(method, url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = 0
        elapsed_ms = (time.perf_counter() - started) * 1000
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            result.latencies_ms.append(elapsed_ms)
        else:
            result.errors += 1


async def _run(
    method: str, url: str, body: bytes | None, headers: Mapping[str, str],
    concurrency: int, duration_s: float, max_requests: int,
) -> LoadResult:
    result = LoadResult(concurrency=concurrency, seconds=0.0)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + duration_s
        budget = [max_requests]
        await asyncio.gather(*(
            _client(session, method, url, body, deadline, budget, result, headers)
            for _ in range(concurrency)
        ))
        result.seconds = time.perf_counter() - started
    return result


def run_load(
    url: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None,
    method: str = "POST", concurrency: int = 1, duration_s: float = 10.0, max_requests: int = 100_000,
) -> LoadResult:
    """Closed-loop load for ``duration_s`` (or ``max_requests``), whichever ends first."""
    return asyncio.run(_run(method, url, body, dict(headers or {}), concurrency, duration_s, max_requests))
