"""AccountsSettings, durations, and the default database location."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from lib.accounts.settings import AccountsSettings
from lib.db import DATABASE_URL_ENV, resolve_database_url
from lib.durations import parse_duration, parse_since
from lib.errors import ValidationFailedError


def test_defaults_and_every_field_is_described() -> None:
    settings = AccountsSettings()
    assert settings.key_cache_ttl_s == 5.0 and settings.token_ttl_s == 900
    assert all(field.description for field in AccountsSettings.model_fields.values())
    with pytest.raises(ValidationError):
        AccountsSettings(unknown_field=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        AccountsSettings(usage_batch_size=0)


def test_database_url_falls_back_to_env_then_sqlite() -> None:
    # The CLI's order: --database-url, then $DATABASE_URL, then the SQLite file in .sealserve/.
    assert resolve_database_url(None, None) == resolve_database_url()
    assert resolve_database_url() == "sqlite:///.sealserve/sealserve.db"
    assert resolve_database_url(None, "postgresql+psycopg://db/x") == "postgresql+psycopg://db/x"
    assert resolve_database_url("sqlite:///explicit.db", "postgresql+psycopg://db/x") == "sqlite:///explicit.db"
    assert DATABASE_URL_ENV == "DATABASE_URL"


def test_a_database_password_does_not_show_in_repr() -> None:
    settings = AccountsSettings(database_url="postgresql+psycopg://u:hunter2@db/x")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value().endswith("u:hunter2@db/x")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90m", timedelta(minutes=90)), ("12h", timedelta(hours=12)), ("30d", timedelta(days=30)),
     ("2w", timedelta(weeks=2)), ("45s", timedelta(seconds=45)), (" 7D ", timedelta(days=7))],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "0d", "-1d", "1.5h", "30 days", "1y"])
def test_parse_duration_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValidationFailedError):
        parse_duration(text)


def test_parse_since_takes_durations_and_iso_dates() -> None:
    now = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2025-01-31", now) == datetime(2025, 1, 31, tzinfo=timezone.utc)
    offset = parse_since("2025-01-31T10:00:00+02:00", now)
    assert offset == datetime(2025, 1, 31, 8, 0, tzinfo=timezone.utc)
    with pytest.raises(ValidationFailedError, match="ISO date"):
        parse_since("last tuesday", now)
