"""The account collaborators of one ingress replica, built and torn down together.

:func:`build_accounts` connects what a replica needs to admit requests and answer the account
routes: its own :class:`AccountStore` (a connection pool), the key caches that keep the database
off the hot path, the :class:`RequestGate`, the :class:`AccountService` and the
:class:`UsageRecorder` with its background thread. It takes plain values (a URL, a secret, the
bootstrap keys, the shared limiter) so that it knows nothing of settings files, Ray or HTTP; the
ingress (``deployments/ingress.py``) reads those from its settings and environment.

With a usage journal directory, each usage record is also appended to the node's journal before
its response is sent, and a :class:`JournalRecovery` ships what stopped replicas left there
(``lib/accounts/journal.py``).

Shutdown: :meth:`AccountsWiring.close` drains the queued usage into the database, then closes the
pool. It blocks (up to its timeout), so an event loop runs it in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lib.accounts.auth import Authenticator
from lib.accounts.compute import ComputeGate, SharedCompute
from lib.accounts.gate import RequestGate
from lib.accounts.journal import JournalRecovery, UsageJournal
from lib.accounts.key_cache import KeyCache
from lib.accounts.leases import LeasedLimiter
from lib.accounts.records import KeyRecord
from lib.accounts.service import AccountService
from lib.accounts.settings import AccountsSettings
from lib.accounts.store import AccountStore
from lib.accounts.usage import UsageRecorder
from lib.errors import ServiceUnavailableError
from lib.tokens import TokenService
from lib.ttl_cache import TtlCache


@dataclass(frozen=True)
class UsageDrain:
    """What the usage recorder did, as counted when it closed."""

    queued: int  # records waiting when the drain began
    written: int  # records written over the recorder's life
    unwritten: int  # records still unwritten when the drain gave up
    dropped: int  # records refused (queue full, closed) or discarded after a permanent error


@dataclass(frozen=True)
class AccountsWiring:
    store: AccountStore
    gate: RequestGate
    service: AccountService
    usage: UsageRecorder
    recovery: JournalRecovery | None = None

    def close(self, timeout_s: float) -> UsageDrain:
        """Write the queued usage (for up to ``timeout_s``), then close the connection pool."""
        try:
            if self.recovery is not None:
                self.recovery.close()
            queued = self.usage.pending
            unwritten = self.usage.close(timeout_s)
            return UsageDrain(queued, self.usage.written, unwritten, self.usage.dropped)
        finally:
            self.store.close()


def build_accounts(
    settings: AccountsSettings,
    *,
    database_url: str,
    secret_key: str,
    bootstrap_keys: Sequence[str],
    issuer: str,
    audience: str,
    limiter: SharedCompute,
    default_inference_steps: int = 30,
    slot_ttl_s: float = 360.0,
    usage_journal_dir: Path | None = None,
) -> AccountsWiring:
    """The account collaborators for ``settings``, reading and writing the database at ``database_url``.

    ``secret_key`` signs and verifies the JWTs (``issuer`` / ``audience``); ``bootstrap_keys`` are
    the plaintext keys accepted without a database row; ``limiter`` is the application's one
    shared rate limiter, taken from in leases (``lib/accounts/leases.py``), which also counts the
    compute budgets and concurrency slots (``lib/accounts/compute.py``: a generation's cost uses
    ``default_inference_steps`` when the request names none; a slot not given back frees itself
    after ``slot_ttl_s``, longer than any request). ``usage_journal_dir``: the node's usage
    journal (None: usage waits in memory only). The store is closed again if anything after it
    fails.
    """
    store = AccountStore(database_url)
    try:
        tokens = TokenService(secret_key, issuer=issuer, audience=audience, ttl_s=settings.token_ttl_s)
        keys = KeyCache(
            store.lookup_key_hash,
            ttl_s=settings.key_cache_ttl_s,
            negative_ttl_s=settings.key_cache_negative_ttl_s,
            max_entries=settings.key_cache_max_entries,
            stale_grace_s=settings.key_cache_stale_grace_s,
            stale_on=(ServiceUnavailableError,),
        )
        # Tokens name their key by id: looked up (and cached) to apply its limit and revocation.
        key_ids: TtlCache[str, KeyRecord] = TtlCache(
            store.get_key,
            ttl_s=settings.key_cache_ttl_s,
            negative_ttl_s=settings.key_cache_negative_ttl_s,
            max_entries=settings.key_cache_max_entries,
            stale_grace_s=settings.key_cache_stale_grace_s,
            stale_on=(ServiceUnavailableError,),
        )
        gate = RequestGate(
            authenticator=Authenticator(
                tokens=tokens,
                bootstrap_keys=bootstrap_keys,
                lookup_key=keys.get,
                lookup_key_id=key_ids.get,
                bootstrap_rate_limit=settings.bootstrap_rate_limit_spec,
                bootstrap_budget=settings.bootstrap_budget_spec,
                bootstrap_max_concurrent=settings.bootstrap_max_concurrent,
            ),
            limiter=LeasedLimiter(limiter),
            compute=ComputeGate(limiter, default_steps=default_inference_steps, slot_ttl_s=slot_ttl_s),
        )
        service = AccountService(store, tokens, on_revoked=key_ids.invalidate)
        journal = UsageJournal(usage_journal_dir) if usage_journal_dir is not None else None
        usage = UsageRecorder(
            store.record_usage,
            max_batch=settings.usage_batch_size,
            flush_interval_s=settings.usage_flush_interval_s,
            max_queue=settings.usage_max_queue,
            retry_on=database_unavailable,
            journal=journal,
        )
        recovery = None
        if usage_journal_dir is not None:
            recovery = JournalRecovery(
                usage_journal_dir, store.record_usage, interval_s=settings.usage_recovery_interval_s
            )
    except BaseException:
        store.close()
        raise
    return AccountsWiring(store=store, gate=gate, service=service, usage=usage, recovery=recovery)


def database_unavailable(exc: BaseException) -> bool:
    """Worth retrying a usage batch: the database is down or unreachable (the store says so with a
    503). Anything else (a bug, a constraint) would fail the same way forever."""
    return isinstance(exc, ServiceUnavailableError)
