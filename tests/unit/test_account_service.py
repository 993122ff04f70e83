"""AccountService and the account schemas, on a real SQLite store; the app's database URL rules."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
import pydantic
import pytest

from lib.accounts.auth import ALL_SCOPES, Principal
from lib.accounts.rate_limit import RateLimitSpec
from lib.accounts.records import UsageRecord
from lib.accounts.schemas import CleanupRequest, CreatedKeyResponse, CreateKeyRequest, TokenResponse
from lib.accounts.service import AccountService
from lib.accounts.settings import AccountsSettings
from lib.accounts.store import AccountStore
from lib.errors import ConfigurationError, NotFoundError, PermissionDeniedError, ValidationFailedError
from lib.settings import AppSettings, Secrets, accounts_database_url
from lib.tokens import TokenService

SECRET = "Zq3v-7pLk2_Xw9rTb4nYc8sHd1fMj6gU0aEo5iRt"
T0 = datetime(2030, 6, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[AccountStore]:
    with AccountStore(f"sqlite:///{tmp_path / 'accounts.db'}", clock=clock) as account_store:
        yield account_store


@pytest.fixture
def revoked() -> list[str]:
    return []


@pytest.fixture
def service(store: AccountStore, clock: Clock, revoked: list[str]) -> AccountService:
    tokens = TokenService(
        SECRET, "sealserve", "sealserve-api", ttl_s=600, clock=lambda: clock.now.timestamp()
    )
    return AccountService(store, tokens, on_revoked=revoked.append, clock=clock)


def key_request(**overrides: Any) -> CreateKeyRequest:
    values: dict[str, Any] = {"name": "ci", "scopes": ["infer", "classify"], "rate_limit": "60/minute"}
    values.update(overrides)
    return CreateKeyRequest(**values)


# --- keys -----------------------------------------------------------------------------------------


def test_create_key_returns_the_key_once_and_lists_it_without(service: AccountService) -> None:
    created = service.create_key(key_request(expires_in="30d", owner_email="Ops@Example.com"))
    assert created.key.startswith("ss_") and created.prefix == created.key[:10]
    assert created.key not in repr(created)
    assert created.scopes == ["infer", "classify"] and created.rate_limit == "60/minute"
    assert created.expires_at == T0 + timedelta(days=30)
    assert created.owner_email == "ops@example.com"
    listing = service.list_keys()
    assert listing.count == 1 and listing.keys[0].id == created.id
    assert created.key not in listing.model_dump_json()
    assert service.get_key(created.id) == listing.keys[0]


def test_revoke_marks_the_key_tells_the_cache_and_hides_it_from_the_active_list(
    service: AccountService, revoked: list[str]
) -> None:
    keep = service.create_key(key_request(name="keep"))
    gone = service.create_key(key_request(name="gone"))
    info = service.revoke_key(gone.id)
    assert info.revoked is True and revoked == [gone.id]
    assert [k.id for k in service.list_keys(include_revoked=False).keys] == [keep.id]
    assert service.list_keys().count == 2


def test_unknown_key_ids_are_404(service: AccountService) -> None:
    with pytest.raises(NotFoundError):
        service.get_key("nope")
    with pytest.raises(NotFoundError):
        service.revoke_key("nope")


# --- tokens ---------------------------------------------------------------------------------------


def test_a_token_is_issued_for_an_api_key_with_its_scopes(service: AccountService, clock: Clock) -> None:
    principal = Principal("key-1", frozenset({"infer", "classify"}), "api_key", RateLimitSpec(5, 60))
    issued = service.issue_token(principal)
    assert (issued.token_type, issued.expires_in, issued.scope) == ("bearer", 600, "classify infer")
    assert issued.access_token not in repr(issued)
    claims = jwt.decode(issued.access_token, SECRET, algorithms=["HS256"], audience="sealserve-api",
                        issuer="sealserve", options={"verify_exp": False, "verify_iat": False,
                                                     "verify_nbf": False})
    assert claims["sub"] == "key-1" and claims["scopes"] == ["classify", "infer"]
    assert claims["iat"] == int(clock.now.timestamp()) and claims["exp"] == claims["iat"] + 600


def test_a_token_cannot_be_exchanged_for_another(service: AccountService) -> None:
    with pytest.raises(PermissionDeniedError, match="API key"):
        service.issue_token(Principal("key-1", ALL_SCOPES, "jwt"))


# --- usage ----------------------------------------------------------------------------------------


def _usage(key_id: str, when: datetime, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {"endpoint": "GET /v1/models", "status_code": 200, "latency_ms": 10.0}
    values.update(fields)
    return UsageRecord(key_id=key_id, timestamp=when, **values)


def test_own_usage_and_stats(service: AccountService, store: AccountStore, clock: Clock) -> None:
    store.record_usage([
        _usage("a", T0, endpoint="POST /v1/infer", model_id="m1", image_count=2, latency_ms=30.0),
        _usage("a", T0 - timedelta(days=2), status_code=500),
        _usage("b", T0),
    ])
    mine = service.own_usage(Principal("a", frozenset(), "jwt"))
    assert (mine.key_id, mine.total_requests, mine.successful_requests, mine.total_images) == ("a", 2, 1, 2)
    assert mine.success_rate == pytest.approx(0.5) and mine.avg_response_time_ms == pytest.approx(20.0)
    assert mine.by_endpoint == {"GET /v1/models": 1, "POST /v1/infer": 1} and mine.by_model == {"m1": 1}
    recent = service.own_usage(Principal("a", frozenset(), "jwt"), since="1d")
    assert recent.total_requests == 1 and recent.since == T0 - timedelta(days=1)
    assert service.usage_summary(None, "2030-05-01").total_requests == 3

    by_key = service.usage_stats("key")
    assert by_key.by == "key" and [(g.group, g.requests) for g in by_key.groups] == [("a", 2), ("b", 1)]
    by_day = service.usage_stats("day", since="7d")
    assert [(g.group, g.requests) for g in by_day.groups] == [("2030-05-30", 1), ("2030-06-01", 2)]
    assert [g.group for g in service.usage_stats("model").groups] == ["m1", None]
    with pytest.raises(ValidationFailedError):
        service.usage_stats("key", since="last tuesday")


def test_cleanup_deletes_records_older_than_the_duration(
    service: AccountService, store: AccountStore
) -> None:
    store.record_usage([_usage("a", T0 - timedelta(days=d)) for d in (1, 91, 200)])
    result = service.cleanup_usage(CleanupRequest(older_than="90d"))
    assert (result.deleted, result.older_than) == (2, "90d")
    assert store.usage_summary().total_requests == 1


# --- schemas --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"scopes": []}, {"scopes": ["root"]}, {"rate_limit": "5/fortnight"}, {"rate_limit": "0/second"},
     {"expires_in": "later"}, {"expires_in": "0d"}, {"name": ""}, {"name": "x" * 201}, {"extra": 1}],
)
def test_create_key_request_refuses_bad_values(overrides: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        key_request(**overrides)


def test_create_key_request_normalises_the_rate_limit() -> None:
    assert key_request(rate_limit=" 60 / Minutes ").rate_limit == "60/minute"


@pytest.mark.parametrize("older_than", ["", "90", "0d", "ninety days"])
def test_cleanup_request_needs_a_positive_duration(older_than: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        CleanupRequest(older_than=older_than)


def test_credentials_stay_out_of_reprs() -> None:
    token = TokenResponse(access_token="eyJ.secret.token", expires_in=1, scope="infer")
    assert "secret" not in repr(token)
    created = CreatedKeyResponse(
        id="i", prefix="ss_abc", name="n", scopes=[], rate_limit="1/second", created_at=T0,
        expires_at=None, revoked=False, last_used_at=None, owner_email=None, key="ss_supersecret",
    )
    assert "supersecret" not in repr(created) and "supersecret" not in str(created)


# --- settings -------------------------------------------------------------------------------------


def test_bootstrap_rate_limit_setting() -> None:
    assert AccountsSettings().bootstrap_rate_limit_spec == RateLimitSpec(1000, 60)
    assert AccountsSettings(bootstrap_rate_limit="10/Seconds").bootstrap_rate_limit == "10/second"
    assert AccountsSettings(bootstrap_rate_limit=None).bootstrap_rate_limit_spec is None
    with pytest.raises(pydantic.ValidationError, match="rate limit"):
        AccountsSettings(bootstrap_rate_limit="lots")


def test_accounts_settings_compose_into_the_app_settings() -> None:
    settings = AppSettings.from_args({"accounts": {"key_cache_ttl_s": 1, "usage_batch_size": 7}}, env={})
    assert settings.accounts.key_cache_ttl_s == 1.0 and settings.accounts.usage_batch_size == 7
    with pytest.raises(pydantic.ValidationError):
        AppSettings.from_args({"accounts": {"no_such_field": 1}}, env={})


def _secrets(settings: AppSettings, **env: str) -> Secrets:
    return Secrets.from_env(settings, env={"SECRET_KEY": SECRET, **env})


def test_database_url_comes_from_the_args_then_the_environment_then_state_dir(tmp_path: Path) -> None:
    settings = AppSettings.from_args({"environment": "production", "state_dir": str(tmp_path)}, env={})
    assert accounts_database_url(settings, _secrets(settings)) == f"sqlite:///{tmp_path}/sealserve.db"
    pg = "postgresql+psycopg://app:hunter2@db:5432/sealserve"
    from_env = _secrets(settings, DATABASE_URL=pg)
    assert accounts_database_url(settings, from_env) == pg
    assert "hunter2" not in repr(from_env)
    explicit = settings.model_copy(
        update={"accounts": AccountsSettings(database_url="postgresql+psycopg://app@db/other")}
    )
    assert accounts_database_url(explicit, from_env) == "postgresql+psycopg://app@db/other"


def test_a_password_in_the_args_is_refused_without_echoing_it(tmp_path: Path) -> None:
    settings = AppSettings.from_args(
        {"environment": "production", "accounts": {"database_url": "postgresql+psycopg://app:hunter2@db/x"}},
        env={},
    )
    with pytest.raises(ConfigurationError, match="DATABASE_URL") as caught:
        accounts_database_url(settings, _secrets(settings))
    assert "hunter2" not in str(caught.value)
