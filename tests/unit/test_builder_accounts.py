"""build_accounts (lib/accounts/wiring.py): one replica's account collaborators, built and drained."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest

import lib.accounts.wiring as wiring_module
from lib.accounts.auth import bootstrap_subject
from lib.accounts.gate import Admission, usage_record
from lib.accounts.rate_limit import Grant, RateDecision
from lib.accounts.records import Scope
from lib.accounts.settings import AccountsSettings
from lib.accounts.store import AccountStore
from lib.accounts.wiring import AccountsWiring, build_accounts, database_unavailable
from lib.errors import (
    AuthenticationError,
    ConfigurationError,
    PermissionDeniedError,
    ServiceUnavailableError,
    ValidationFailedError,
)

SECRET = "wiring-test-secret-0123456789abcdefghijklmn"
BOOTSTRAP = "ss_wiring_test_bootstrap_key_0123456789abcd"
WIRING = Path(wiring_module.__file__)


class CountingLimiter:
    def __init__(self) -> None:
        self.hits: list[tuple[str, int, int]] = []

    async def take(self, key: str, limit: int, window_s: int, count: int, minimum: int = 1) -> Grant:
        # Limits of 10 and 5 per minute lease one hit at a time (lib/accounts/leases.py).
        assert count == 1
        self.hits.append((key, limit, window_s))
        return Grant(1, RateDecision(True, limit, limit - len(self.hits), float(window_s), 0.0))


def build(tmp_path: Path, limiter: Any = None, journal: Path | None = None, **fields: Any) -> AccountsWiring:
    return build_accounts(
        AccountsSettings(**fields),
        database_url=f"sqlite:///{(tmp_path / 'accounts.db').as_posix()}",
        secret_key=SECRET,
        bootstrap_keys=[BOOTSTRAP],
        issuer="sealserve",
        audience="sealserve-api",
        limiter=limiter or CountingLimiter(),
        usage_journal_dir=journal,
    )


def test_the_gate_admits_bootstrap_and_stored_keys_through_the_shared_limiter(tmp_path: Path) -> None:
    limiter = CountingLimiter()
    accounts = build(tmp_path, limiter, bootstrap_rate_limit="10/minute")
    try:
        admission = asyncio.run(accounts.gate.admit(f"Bearer {BOOTSTRAP}"))
        admission.require(Scope.ADMIN)
        assert limiter.hits == [(bootstrap_subject(BOOTSTRAP), 10, 60)]
        created = accounts.store.create_key("k", ["infer"], "5/minute")
        stored = asyncio.run(accounts.gate.admit(f"Bearer {created.key}"))
        assert stored.principal.subject == created.record.id
        assert limiter.hits[-1] == (created.record.id, 5, 60)
        token = accounts.service.issue_token(stored.principal)
        by_token = asyncio.run(accounts.gate.admit(f"Bearer {token.access_token}"))
        assert by_token.principal.method == "jwt" and by_token.principal.subject == created.record.id
    finally:
        accounts.close(5.0)


def test_revoking_through_the_service_refuses_the_keys_tokens_at_once(tmp_path: Path) -> None:
    accounts = build(tmp_path, key_cache_ttl_s=300)
    try:
        created = accounts.store.create_key("k", ["infer"], "5/minute")
        principal = asyncio.run(accounts.gate.admit(f"Bearer {created.key}")).principal
        token = accounts.service.issue_token(principal).access_token
        asyncio.run(accounts.gate.admit(f"Bearer {token}"))  # the key id is now cached (300 s)
        accounts.service.revoke_key(created.record.id)
        with pytest.raises(AuthenticationError):
            asyncio.run(accounts.gate.admit(f"Bearer {token}"))
    finally:
        accounts.close(5.0)


def test_close_drains_the_usage_into_the_database_and_reports_it(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    accounts = build(tmp_path, journal=journal, usage_flush_interval_s=3600, usage_batch_size=100)
    admission = asyncio.run(accounts.gate.admit(f"Bearer {BOOTSTRAP}"))
    for _ in range(3):  # three requests, three records (each with its own request_id)
        accounts.usage.record(
            usage_record(admission, endpoint="GET /v1/models", status_code=200, latency_ms=1)
        )
    assert list(journal.iterdir())  # on the node before any write to the database
    drain = accounts.close(5.0)
    assert (drain.queued, drain.written, drain.unwritten, drain.dropped) == (3, 3, 0, 0)
    with AccountStore(f"sqlite:///{(tmp_path / 'accounts.db').as_posix()}") as store:
        assert store.usage_summary(key_id=bootstrap_subject(BOOTSTRAP)).total_requests == 3
    assert list(journal.iterdir()) == []  # all written: no segment left
    record = usage_record(admission, endpoint="GET /v1/models", status_code=200, latency_ms=1)
    assert not accounts.usage.record(record)  # closed


def test_a_new_replica_ships_what_a_stopped_one_left_in_the_journal(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    first = build(tmp_path, journal=journal, usage_flush_interval_s=3600)
    admission = asyncio.run(first.gate.admit(f"Bearer {BOOTSTRAP}"))
    first.usage.record(usage_record(admission, endpoint="GET /v1/models", status_code=200, latency_ms=1))
    first.usage.close(0.0)  # stopped before writing: the record stays in the journal
    first.store.close()
    second = build(tmp_path, journal=journal)
    try:
        assert second.recovery is not None
        second.recovery.close()  # its first round ran at start; wait for it
        assert list(journal.iterdir()) == []
        assert second.store.usage_summary(key_id=bootstrap_subject(BOOTSTRAP)).total_requests == 1
    finally:
        second.close(5.0)


def test_a_failure_after_the_store_closes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[AccountStore] = []

    class RecordingStore(AccountStore):
        def close(self) -> None:
            closed.append(self)
            super().close()

    monkeypatch.setattr(wiring_module, "AccountStore", RecordingStore)
    with pytest.raises(ConfigurationError, match="at least 32 bytes"):
        build_accounts(
            AccountsSettings(),
            database_url=f"sqlite:///{(tmp_path / 'accounts.db').as_posix()}",
            secret_key="short",
            bootstrap_keys=[],
            issuer="sealserve",
            audience="sealserve-api",
            limiter=CountingLimiter(),
        )
    assert len(closed) == 1


def test_only_an_unavailable_database_is_worth_retrying_a_usage_batch() -> None:
    assert database_unavailable(ServiceUnavailableError("database down"))
    assert not database_unavailable(ValidationFailedError("constraint"))
    assert not database_unavailable(RuntimeError("bug"))


def test_an_admission_from_the_gate_records_its_scope_refusal(tmp_path: Path) -> None:
    accounts = build(tmp_path)
    try:
        created = accounts.store.create_key("k", ["classify"], "5/minute")
        admission: Admission = asyncio.run(accounts.gate.admit(f"Bearer {created.key}"))
        with pytest.raises(PermissionDeniedError):
            admission.require(Scope.INFER)
    finally:
        accounts.close(5.0)


def test_wiring_imports_only_lib_accounts_and_top_level_lib_modules() -> None:
    """It takes plain values: no settings file, no Ray, no HTTP, nothing of deployments/."""
    tree = ast.parse(WIRING.read_text())
    imported = [
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    ] + [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    project = [name for name in imported if name.split(".")[0] in {"lib", "deployments"}]
    assert project, "no project import found: the check would be void"
    for name in project:
        parts = name.split(".")
        assert parts[0] == "lib", name
        top_level_module = len(parts) == 2 and (WIRING.parents[1] / f"{parts[1]}.py").is_file()
        assert parts[1] == "accounts" or top_level_module, name
        assert name != "lib.settings", name
    third_party = {name.split(".")[0] for name in imported} - {"lib", "__future__"}
    assert not third_party & {"ray", "fastapi", "starlette", "deployments"}, third_party
