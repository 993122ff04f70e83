"""Settings for accounts, API keys, usage recording and tokens; composed into the app settings.

The token secret is deliberately not a field: secrets come from the environment, read by the code
that builds the :class:`lib.tokens.TokenService`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from lib.db import resolve_database_url


class AccountsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database_url: SecretStr | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the accounts database, e.g. "
            "postgresql+psycopg://user:password@host:5432/sealserve. Unset: $DATABASE_URL, else "
            "the SQLite file .sealserve/sealserve.db. Secret because it may hold a password."
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
    key_cache_max_entries: int = Field(
        default=10_000, ge=1, description="Most API keys a replica's key cache holds (LRU beyond that)."
    )
    usage_batch_size: int = Field(
        default=500, ge=1, le=10_000, description="Most usage records written in one transaction."
    )
    usage_flush_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="Seconds between usage writes when batches are not full."
    )
    usage_max_queue: int = Field(
        default=100_000,
        ge=1,
        description="Most usage records held in memory per replica while the database is slow or down; "
        "beyond it new records are dropped and counted.",
    )
    token_ttl_s: int = Field(
        default=900, ge=60, le=86_400, description="Lifetime in seconds of the JWTs issued for an API key."
    )
    token_issuer: str = Field(
        default="sealserve", min_length=1, description="The iss claim of issued JWTs, required on verify."
    )
    token_audience: str = Field(
        default="sealserve-api", min_length=1, description="The aud claim of issued JWTs, required on verify."
    )

    def resolved_database_url(self) -> str:
        """The URL to connect to, after the $DATABASE_URL and SQLite fallbacks."""
        explicit = self.database_url.get_secret_value() if self.database_url else None
        return resolve_database_url(explicit)
