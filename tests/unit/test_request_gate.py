"""RequestGate and Admission: authenticate -> rate limit -> scope, the headers, the usage record."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from lib.accounts.auth import ALL_SCOPES, Authenticator, Principal, bootstrap_subject
from lib.accounts.gate import Admission, RequestGate, retry_after_seconds, usage_record
from lib.accounts.key_cache import KeyCache
from lib.accounts.rate_limit import RateDecision, RateLimitSpec, SlidingWindowLimiter
from lib.accounts.records import KeyRecord, hash_api_key
from lib.errors import AuthenticationError, PermissionDeniedError, RateLimitedError, ServiceUnavailableError
from lib.tokens import TokenService
from tests.fake_clock import FakeClock

SECRET = "s" * 40
BOOTSTRAP_KEY = "ss_bootstrap_" + "B" * 40
STORED_KEY = "ss_" + "K" * 43
NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


class RecordingLimiter:
    """The shared limiter as the gate sees it (async), on a real SlidingWindowLimiter."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.limiter = SlidingWindowLimiter(clock=self.clock)
        self.calls: list[tuple[str, int, int]] = []
        self.failure: Exception | None = None

    async def hit(self, key: str, limit: int, window_s: int) -> RateDecision:
        self.calls.append((key, limit, window_s))
        if self.failure is not None:
            raise self.failure
        return self.limiter.hit(key, limit, window_s)


def stored_record(**overrides: Any) -> KeyRecord:
    values: dict[str, Any] = {
        "id": "k1", "prefix": STORED_KEY[:10], "name": "n", "scopes": ("infer",),
        "rate_limit": "3/minute", "created_at": NOW - timedelta(days=1),
    }
    values.update(overrides)
    return KeyRecord(**values)


def make_gate(limiter: RecordingLimiter, *, bootstrap_limit: RateLimitSpec | None = RateLimitSpec(100, 60)
              ) -> tuple[RequestGate, TokenService]:
    tokens = TokenService(SECRET, "iss", "aud")
    record = stored_record()
    authenticator = Authenticator(
        tokens=tokens,
        bootstrap_keys=[BOOTSTRAP_KEY],
        lookup_key=lambda key: record if key == STORED_KEY else None,
        lookup_key_id=lambda key_id: record if key_id == record.id else None,
        bootstrap_rate_limit=bootstrap_limit,
        clock=lambda: NOW,
    )
    return RequestGate(authenticator=authenticator, limiter=limiter), tokens


def admit(gate: RequestGate, credential: str | None) -> Admission:
    header = None if credential is None else f"Bearer {credential}"
    return asyncio.run(gate.admit(header))


def test_stored_key_is_counted_against_its_own_limit() -> None:
    limiter = RecordingLimiter()
    gate, _ = make_gate(limiter)
    decisions = [admit(gate, STORED_KEY).decision for _ in range(4)]
    assert limiter.calls == [("k1", 3, 60)] * 4
    assert [d.allowed for d in decisions if d] == [True, True, True, False]
    assert [d.remaining for d in decisions if d] == [2, 1, 0, 0]


def test_a_token_shares_the_budget_of_its_key() -> None:
    limiter = RecordingLimiter()
    gate, tokens = make_gate(limiter)
    token = tokens.issue("k1", ["infer"]).token
    allowed = [admit(gate, c).decision.allowed for c in (STORED_KEY, token, token, STORED_KEY)]  # type: ignore[union-attr]
    assert allowed == [True, True, True, False]
    assert {call[0] for call in limiter.calls} == {"k1"}


def test_bootstrap_key_uses_the_bootstrap_limit_under_its_subject() -> None:
    limiter = RecordingLimiter()
    gate, _ = make_gate(limiter)
    admission = admit(gate, BOOTSTRAP_KEY)
    assert admission.principal.scopes == ALL_SCOPES
    assert limiter.calls == [(bootstrap_subject(BOOTSTRAP_KEY), 100, 60)]
    assert admission.headers()["X-RateLimit-Limit"] == "100"


def test_unlimited_caller_costs_no_limiter_call_and_gets_no_headers() -> None:
    limiter = RecordingLimiter()
    gate, _ = make_gate(limiter, bootstrap_limit=None)
    admission = admit(gate, BOOTSTRAP_KEY)
    assert admission.decision is None and limiter.calls == []
    assert admission.headers() == {}
    admission.require("admin")  # no limit, every scope


@pytest.mark.parametrize("credential", [None, "", "ss_unknown_" + "x" * 40, "not-a-key"])
def test_unauthenticated_requests_never_reach_the_limiter(credential: str | None) -> None:
    limiter = RecordingLimiter()
    gate, _ = make_gate(limiter)
    with pytest.raises(AuthenticationError):
        admit(gate, credential)
    assert limiter.calls == []


def test_a_limiter_failure_propagates() -> None:
    limiter = RecordingLimiter()
    limiter.failure = ServiceUnavailableError("the rate limiter is not available; retry")
    gate, _ = make_gate(limiter)
    with pytest.raises(ServiceUnavailableError):
        admit(gate, STORED_KEY)


def decision(allowed: bool, **overrides: Any) -> RateDecision:
    values: dict[str, Any] = {"allowed": allowed, "limit": 10, "remaining": 0 if not allowed else 4,
                              "reset_after_s": 12.2, "retry_after_s": 0.0 if allowed else 3.1}
    values.update(overrides)
    return RateDecision(**values)


PRINCIPAL = Principal("k1", frozenset({"infer"}), "api_key", RateLimitSpec(10, 60))


def test_require_is_429_before_403() -> None:
    over = Admission(PRINCIPAL, decision(False))
    with pytest.raises(RateLimitedError, match="retry after 4s") as caught:
        over.require("admin")
    assert caught.value.status_code == 429
    with pytest.raises(PermissionDeniedError, match="admin"):
        Admission(PRINCIPAL, decision(True)).require("admin")
    Admission(PRINCIPAL, decision(True)).require("infer")
    Admission(PRINCIPAL, decision(True)).require(None)  # any authenticated caller


def test_require_refuses_unknown_scope_names() -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        Admission(PRINCIPAL, None).require("root")


def test_headers_of_an_allowed_and_a_refused_request() -> None:
    assert Admission(PRINCIPAL, decision(True)).headers() == {
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "4", "X-RateLimit-Reset": "13",
    }
    assert Admission(PRINCIPAL, decision(False)).headers() == {
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "13",
        "Retry-After": "4",
    }


@pytest.mark.parametrize(("seconds", "expected"), [(0.0, 1), (0.01, 1), (1.0, 1), (1.01, 2), (59.5, 60)])
def test_retry_after_is_rounded_up_and_at_least_one(seconds: float, expected: int) -> None:
    assert retry_after_seconds(decision(False, retry_after_s=seconds)) == expected


def test_usage_record_fields_and_bounds() -> None:
    admission = Admission(Principal("x" * 50, frozenset(), "jwt"), None, model_id="m" * 300, image_count=3)
    when = datetime(2030, 1, 2, tzinfo=timezone.utc)
    record = usage_record(admission, endpoint="POST /v1/infer", status_code=200, latency_ms=-1.0,
                          timestamp=when)
    assert record.key_id == "x" * 32  # the column's width: cut, never refused
    assert record.model_id == "m" * 200
    assert (record.endpoint, record.status_code, record.latency_ms, record.image_count) == (
        "POST /v1/infer", 200, 0.0, 3,
    )
    assert record.timestamp == when
    plain = usage_record(Admission(PRINCIPAL, None), endpoint="GET /v1/models", status_code=403,
                         latency_ms=2.5)
    assert plain.model_id is None and plain.image_count == 0 and plain.timestamp.tzinfo is not None


def test_a_cached_key_is_admitted_on_the_event_loop_and_a_miss_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The common case (the key is in the cache) costs no thread hop; only a miss blocks."""
    lookups: list[str] = []

    def lookup_by_hash(key_hash: str) -> KeyRecord | None:
        lookups.append(key_hash)
        return stored_record() if key_hash == hash_api_key(STORED_KEY) else None

    cache = KeyCache(lookup_by_hash, ttl_s=60)
    authenticator = Authenticator(
        tokens=TokenService(SECRET, "iss", "aud"), lookup_key=cache.get, clock=lambda: NOW
    )
    gate = RequestGate(authenticator=authenticator, limiter=RecordingLimiter())
    threads: list[object] = []
    real_to_thread = asyncio.to_thread

    async def counting_to_thread(fn: Any, *args: Any) -> Any:
        threads.append(fn)
        return await real_to_thread(fn, *args)

    monkeypatch.setattr("lib.accounts.gate.asyncio.to_thread", counting_to_thread)
    first = admit(gate, STORED_KEY)
    second = admit(gate, STORED_KEY)
    assert first.principal.subject == second.principal.subject == "k1"
    assert len(threads) == 1 and len(lookups) == 1  # the miss went to a thread, the hit did not
    with pytest.raises(AuthenticationError):
        admit(gate, "ss_" + "X" * 43)  # unknown: a miss, looked up in a thread, then refused
    assert len(threads) == 2


def test_the_admission_times_its_stages_for_server_timing() -> None:
    gate, _ = make_gate(RecordingLimiter())
    admission = admit(gate, STORED_KEY)
    assert set(admission.timings) == {"auth", "limit"}
    assert all(ms >= 0 for ms in admission.timings.values())
    admission.timings["model"] = 12.5
    header = admission.server_timing(20.0)
    assert header.startswith("auth;dur=") and header.endswith("model;dur=12.50, app;dur=20.00")
