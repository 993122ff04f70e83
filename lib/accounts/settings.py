"""Settings for accounts, API keys, usage recording and tokens; composed into the app settings.

The token secret is deliberately not a field: secrets come from the environment, read by the code
that builds the :class:`lib.tokens.TokenService`. The tokens' ``iss`` and ``aud`` are the app
settings ``jwt_issuer`` and ``jwt_audience`` (one definition for issuing and verifying).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from lib.accounts.rate_limit import (
    RateLimitSpec,
    budget_field,
    parse_budget,
    parse_rate_limit,
    rate_limit_field,
)


class AccountsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database_url: SecretStr | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the accounts database, e.g. "
            "postgresql+psycopg://user@host:5432/sealserve. Unset: $DATABASE_URL, else the SQLite "
            "file sealserve.db in the app's state_dir (.sealserve/ for the CLI). Secret because it "
            "may hold a password; the app refuses one in its args (set DATABASE_URL or PGPASSWORD)."
        ),
    )
    key_cache_ttl_s: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="Seconds a valid API key lookup is cached per replica: a revoked key works at most "
        "this long.",
    )
    key_cache_negative_ttl_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="Seconds an unknown, revoked or expired key is cached as invalid (absorbs floods "
        "of bad keys).",
    )
    key_cache_stale_grace_s: float = Field(
        default=300.0,
        ge=0,
        le=86_400,
        description="While the database is down, seconds past its TTL a key a replica had looked up "
        "keeps working (expiry still applies); 0: every lookup needs the database. Keys not seen "
        "before the outage are answered 503.",
    )
    key_cache_max_entries: int = Field(
        default=10_000, ge=1, description="Most API keys a replica's key cache holds (LRU beyond that)."
    )
    usage_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="Most usage records written in one transaction."
    )
    usage_flush_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="Seconds between usage writes when batches are not full (usage reports lag by up "
        "to this much; a graceful shutdown writes what is queued).",
    )
    usage_max_queue: int = Field(
        default=100_000,
        ge=1,
        description="Most usage records held in memory per replica while the database is slow or down; "
        "beyond it new records are dropped and counted.",
    )
    usage_journal_dir: str | None = Field(
        default=None,
        description="Directory of the node's usage journal, where each usage record is appended "
        "before its response is sent, so usage survives a killed replica (created 0700). Unset: "
        "usage-journal/ in the app's state_dir. Every ingress replica on a node must use the same one.",
    )
    usage_recovery_interval_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Seconds between an ingress replica's looks for journal segments left by a stopped "
        "replica on its node (shipped to the database, then deleted); also done at start.",
    )
    token_ttl_s: int = Field(
        default=900, ge=60, le=86_400, description="Lifetime in seconds of the JWTs issued for an API key."
    )
    bootstrap_rate_limit: str | None = Field(
        default="1000/minute",
        description="Rate limit of the bootstrap keys (API_KEYS, the development key) and of tokens "
        "whose subject is no stored key, as N/second|minute|hour|day; null: unlimited, and their "
        "responses carry no X-RateLimit-* headers.",
    )

    bootstrap_budget: str | None = Field(
        default=None,
        description="Compute budget of the bootstrap keys and of tokens whose subject is no stored "
        "key, in image-steps per window (N/second|minute|hour|day); null: unlimited. Stored keys "
        "carry their own (sealserve keys create --budget).",
    )
    bootstrap_max_concurrent: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Most generations the bootstrap keys may run at once, across the application; "
        "null: unlimited.",
    )

    _valid_budget = field_validator("bootstrap_budget")(budget_field)
    _valid_rate_limit = field_validator("bootstrap_rate_limit")(rate_limit_field)

    @property
    def bootstrap_rate_limit_spec(self) -> RateLimitSpec | None:
        return parse_rate_limit(self.bootstrap_rate_limit) if self.bootstrap_rate_limit else None


    @property
    def bootstrap_budget_spec(self) -> RateLimitSpec | None:
        return parse_budget(self.bootstrap_budget) if self.bootstrap_budget else None
