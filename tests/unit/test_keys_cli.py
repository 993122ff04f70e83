"""``sealserve keys ...`` and ``sealserve usage ...`` through ``lib.cli.main``, on a SQLite file."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import lib.cli
from lib.accounts.store import AccountStore, UsageRecord
from lib.cli import main


@pytest.fixture(autouse=True)
def only_key_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other command modules pull in heavy dependencies these tests do not need.
    assert "lib.cli.keys" in lib.cli.COMMAND_MODULES
    monkeypatch.setattr(lib.cli, "COMMAND_MODULES", ("lib.cli.keys",))
    monkeypatch.delenv("DATABASE_URL", raising=False)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


@pytest.fixture
def store(db_url: str) -> Iterator[AccountStore]:
    with AccountStore(db_url) as account_store:
        yield account_store


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def create(capsys: pytest.CaptureFixture[str], db_url: str, *extra: str) -> tuple[str, str]:
    code, out, _ = run(
        capsys, "keys", "create", "--name", "ci bot", "--scopes", "infer,classify",
        "--rate-limit", "60/minute", "--database-url", db_url, *extra,
    )
    assert code == 0
    return out, out.rstrip("\n").splitlines()[-1]


def test_create_prints_the_key_alone_on_the_last_line(
    capsys: pytest.CaptureFixture[str], db_url: str, store: AccountStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    out, key = create(capsys, db_url, "--owner", "ops@example.com", "--expires", "30d")
    assert key.startswith("ss_") and len(key) == 46 and key == key.strip()
    assert out.count(key) == 1
    record = store.lookup_key(key)
    assert record is not None
    assert record.name == "ci bot" and record.owner_email == "ops@example.com"
    assert record.expires_at is not None
    expected_expiry = datetime.now(timezone.utc) + timedelta(days=30)
    assert abs((record.expires_at - expected_expiry).total_seconds()) < 3600
    assert record.id in out and "60/minute" in out and "shown only once" in out
    for line in caplog.messages:
        assert key not in line


def test_list_shows_keys_without_secrets(capsys: pytest.CaptureFixture[str], db_url: str) -> None:
    _, key = create(capsys, db_url)
    code, out, _ = run(capsys, "keys", "list", "--database-url", db_url)
    assert code == 0
    assert key not in out
    assert hashlib.sha256(key.encode()).hexdigest() not in out
    assert key[10:20] not in out
    assert key[:10] in out and "ci bot" in out and "infer,classify" in out and "never" in out
    assert out.splitlines()[0].split() == [
        "ID", "PREFIX", "NAME", "SCOPES", "LIMIT", "BUDGET", "CONCURRENT", "EXPIRES", "REVOKED",
    ]
    assert out.splitlines()[1].split()[6:8] == ["20000/hour", "2"]  # a new key's defaults ("ci bot")


def test_keys_are_created_and_updated_with_compute_limits(
    capsys: pytest.CaptureFixture[str], db_url: str, store: AccountStore
) -> None:
    code, out, _ = run(
        capsys, "keys", "create", "--name", "gen", "--scopes", "infer", "--rate-limit", "60/minute",
        "--budget", "500/minute", "--max-concurrent", "3", "--database-url", db_url,
    )
    assert code == 0 and "500/minute image-steps" in out
    key_id = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("id:"))
    code, out, _ = run(
        capsys, "keys", "update", key_id, "--budget", "none", "--max-concurrent", "1",
        "--database-url", db_url,
    )
    assert code == 0
    record = store.get_key(key_id)
    assert record is not None and (record.budget, record.max_concurrent) == (None, 1)
    code, _, err = run(capsys, "keys", "update", key_id, "--max-concurrent", "two", "--database-url", db_url)
    assert code != 0 and "must be a number" in err
    code, _, err = run(capsys, "keys", "update", key_id, "--database-url", db_url)
    assert code != 0 and "nothing to change" in err


def test_revoke_then_list_shows_it_revoked(
    capsys: pytest.CaptureFixture[str], db_url: str, store: AccountStore
) -> None:
    _, key = create(capsys, db_url)
    record = store.lookup_key(key)
    assert record is not None
    code, out, _ = run(capsys, "keys", "revoke", record.id, "--database-url", db_url)
    assert code == 0 and record.id in out
    assert store.lookup_key(key) is None
    _, listing, _ = run(capsys, "keys", "list", "--database-url", db_url)
    assert listing.splitlines()[1].split()[-1] == "yes"
    code, _, err = run(capsys, "keys", "revoke", "nope", "--database-url", db_url)
    assert code == 2 and "no API key" in err


def test_database_url_comes_from_the_environment(
    capsys: pytest.CaptureFixture[str], db_url: str, monkeypatch: pytest.MonkeyPatch, store: AccountStore
) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    code, out, _ = run(
        capsys, "keys", "create", "--name", "env", "--scopes", "admin", "--rate-limit", "5/second"
    )
    assert code == 0
    assert store.lookup_key(out.splitlines()[-1]) is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate-limit", "60/fortnight"], "rate limit unit"),
        (["--scopes", "root"], "unknown scope"),
        (["--expires", "soon"], "invalid duration"),
    ],
)
def test_bad_input_is_a_clear_error_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], db_url: str, store: AccountStore, args: list[str], message: str
) -> None:
    base = {"--name": "x", "--scopes": "infer", "--rate-limit": "1/second", "--expires": "1d"}
    base[args[0]] = args[1]
    flat = [item for pair in base.items() for item in pair]
    code, out, err = run(capsys, "keys", "create", *flat, "--database-url", db_url)
    assert code == 2 and message in err and "ss_" not in out
    assert store.list_keys() == []


def test_usage_summary_and_cleanup(
    capsys: pytest.CaptureFixture[str], db_url: str, store: AccountStore
) -> None:
    now = datetime.now(timezone.utc)
    store.record_usage(
        [
            UsageRecord("k1", "/v1/infer", 200, 120.0, model_id="sd", image_count=2, timestamp=now),
            UsageRecord("k1", "/v1/infer", 500, 80.0, model_id="sd", timestamp=now - timedelta(days=3)),
            UsageRecord("k2", "/v1/classify", 200, 10.0, model_id="vit", timestamp=now - timedelta(days=100)),
        ]
    )
    code, out, _ = run(capsys, "usage", "--database-url", db_url)
    assert code == 0
    assert "requests:      3" in out and "successful:    2 (66.7%)" in out
    assert "/v1/classify: 1" in out and "sd: 2" in out

    _, recent, _ = run(capsys, "usage", "--key", "k1", "--since", "1d", "--database-url", db_url)
    assert "requests:      1" in recent and "avg latency:   120.0 ms" in recent

    since_date = (now - timedelta(days=5)).date().isoformat()
    _, by_date, _ = run(capsys, "usage", "--since", since_date, "--database-url", db_url)
    assert "requests:      2" in by_date

    code, out, _ = run(capsys, "usage", "--database-url", db_url, "cleanup", "--older-than", "90d")
    assert code == 0 and "Deleted 1 usage records" in out
    assert store.usage_summary().total_requests == 2


def test_the_database_file_is_private(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    old_umask = os.umask(0o022)  # the usual umask: SQLite alone would make the file 0644
    db = tmp_path / "state" / "sealserve.db"
    try:
        create(capsys, f"sqlite:///{db}")
    finally:
        os.umask(old_umask)
    files = [p for p in db.parent.iterdir() if p.name.startswith("sealserve.db")]
    assert db in files
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o600" for p in files}
    assert db.parent.stat().st_mode & 0o777 == 0o700


def test_an_existing_readable_database_file_is_made_private(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "old.db"
    create(capsys, f"sqlite:///{db}")
    db.chmod(0o644)
    create(capsys, f"sqlite:///{db}")
    assert db.stat().st_mode & 0o777 == 0o600
