"""Typed settings of the sealserve application.

``AppSettings`` are the application arguments of ``serve_config.yaml`` (validated by
``build_app``). A field absent from the args falls back to its environment variable (the names
users of earlier inference services expect: ``MODEL_DIRS``, ``MODEL_SCAN_INTERVAL``, ...), then to
its default. Secrets never travel in the args: ``Secrets.from_env`` reads them where they are used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from lib.accounts.settings import AccountsSettings
from lib.db import DATABASE_URL_ENV, resolve_database_url
from lib.errors import ConfigurationError
from lib.sealed.settings import SealedSettings
from lib.secrets import (
    MIN_SECRET_BYTES,
    PLACEHOLDER_SECRETS,
    Environment,
    is_weak_secret,
    read_or_create_secret,
)

# Field name -> environment variable consulted when the app args leave the field out.
ENV_VARS: dict[str, str] = {
    "environment": "SEALSERVE_ENV",
    "state_dir": "SEALSERVE_STATE_DIR",
    "model_dirs": "MODEL_DIRS",
    "model_scan_interval": "MODEL_SCAN_INTERVAL",
    "default_inference_steps": "DEFAULT_INFERENCE_STEPS",
    "default_guidance_scale": "DEFAULT_GUIDANCE_SCALE",
    "cors_origins": "CORS_ORIGINS",
    "request_timeout_s": "REQUEST_TIMEOUT_S",
    "generation_threads": "GENERATION_THREADS",
    "allow_pickle_models": "ALLOW_PICKLE_MODELS",
    "metrics_per_key": "METRICS_PER_KEY",
}

MIN_API_KEY_CHARS = 32
DEV_API_KEY_FILE = "dev-api-key"
DEV_SECRET_FILE = "dev-secret-key"  # noqa: S105 - a file name, not a secret


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class AppSettings(BaseModel):
    """Arguments of the sealserve application (``args:`` in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: Environment = Field(
        "development",
        description="'development' allows generated secrets and the local dev API key; "
        "'production' refuses to start without real secrets.",
    )
    state_dir: str = Field(
        ".sealserve", description="Directory for local state: dev key, dev secret, SQLite files."
    )
    model_dirs: list[str] = Field(
        default_factory=lambda: ["ai-models/"],
        description="Directories scanned for local models (comma-separated in MODEL_DIRS).",
    )
    allow_pickle_models: bool = Field(
        False,
        description="List and load pickle-format checkpoints (.bin, .pt, .pth, .ckpt) found in "
        "model_dirs, with torch.load(weights_only=True); off: they are listed as errors and never "
        "loaded (ALLOW_PICKLE_MODELS=1).",
    )
    model_scan_interval: float = Field(
        10.0, gt=0, le=3600, description="Seconds between two scans of the model directories."
    )
    default_inference_steps: int = Field(
        30, ge=1, le=150, description="num_inference_steps when a request leaves it out."
    )
    default_guidance_scale: float = Field(
        7.5, ge=1.0, le=20.0, description="guidance_scale when a request leaves it out."
    )
    cors_origins: list[str] = Field(
        default_factory=lambda: ["*"], description="Allowed CORS origins (comma-separated)."
    )
    generation_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="CPU threads a text-to-image replica gives one generation (torch intra-op "
        "threads); default: every core of its node. Ray would otherwise give it one per CPU it "
        "reserved. No effect on a GPU.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Longest time the ingress waits for a model deployment."
    )
    max_body_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="Largest accepted request body; larger is 413."
    )
    max_image_pixels: int = Field(
        4096 * 4096, gt=0, description="Largest decoded image accepted by /v1/classify."
    )
    default_classifier: str | None = Field(
        None,
        description="Model id or name used by /v1/classify when the request names none; "
        "default: the first image-classification model of the catalog by name.",
    )
    metrics_per_key: bool = Field(
        True, description="Label the request-cost metric by key id (off for fleets with many keys)."
    )
    jwt_issuer: str = Field("sealserve", description="Required `iss` of accepted JWTs.")
    jwt_audience: str = Field("sealserve-api", description="Required `aud` of accepted JWTs.")
    accounts: AccountsSettings = Field(
        default_factory=AccountsSettings,
        description="API keys, tokens, rate limits and usage recording (lib.accounts.settings).",
    )
    sealed: SealedSettings | None = Field(
        None,
        description="Sealed models fetched through the resource API and S3 (none: local only; "
        "lib.sealed.settings).",
    )

    _csv = field_validator("model_dirs", "cors_origins", mode="before")(_split_csv)

    @classmethod
    def from_args(
        cls, args: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> AppSettings:
        """Validate app args, taking each missing field from its environment variable."""
        env = os.environ if env is None else env
        merged: dict[str, Any] = dict(args or {})
        for field, var in ENV_VARS.items():
            if field not in merged and env.get(var):
                merged[field] = env[var]
        return cls.model_validate(merged)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


class Secrets(BaseModel):
    """Secrets of the ingress, read from the environment of the process that uses them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret_key: SecretStr = Field(description="HMAC secret for JWTs (SECRET_KEY, >= 32 bytes).")
    api_keys: tuple[SecretStr, ...] = Field(
        (), description="Bootstrap API keys (API_KEYS, comma-separated)."
    )
    database_url: SecretStr | None = Field(
        None, description="SQLAlchemy URL of the accounts database (DATABASE_URL)."
    )

    @classmethod
    def from_env(cls, settings: AppSettings, env: Mapping[str, str] | None = None) -> Secrets:
        """Read the secrets; in development, generate what is missing and keep it in state_dir.

        A missing, short or placeholder SECRET_KEY refuses to start outside development, and a
        short bootstrap API key anywhere; in production a SECRET_KEY or API key that is plainly
        not random (``'a' * 32``, a repeated pattern) is refused too.
        """
        env = os.environ if env is None else env
        secret = env.get("SECRET_KEY", "")
        keys = [SecretStr(k) for k in _split_csv(env.get("API_KEYS", ""))]
        if settings.environment == "development":
            if not secret:
                secret = read_or_create_secret(settings.state_path / DEV_SECRET_FILE)
            keys.append(SecretStr(read_or_create_secret(settings.state_path / DEV_API_KEY_FILE)))
        production = settings.environment == "production"
        if (
            secret.strip().lower() in PLACEHOLDER_SECRETS
            or len(secret.encode()) < MIN_SECRET_BYTES
            or (production and is_weak_secret(secret))
        ):
            raise ConfigurationError(
                f"SECRET_KEY must be set to a random value of at least {MIN_SECRET_BYTES} bytes outside "
                f"development, e.g. from secrets.token_urlsafe(32) (environment={settings.environment})"
            )
        for key in keys:
            # Short keys can be guessed; a key with dots would be taken for a JWT and never match.
            value = key.get_secret_value()
            if len(value) < MIN_API_KEY_CHARS or "." in value or (production and is_weak_secret(value)):
                raise ConfigurationError(
                    f"every API_KEYS entry must be a random string of at least {MIN_API_KEY_CHARS} "
                    "characters without dots, e.g. from secrets.token_urlsafe(32)"
                )
        database_url = SecretStr(env[DATABASE_URL_ENV]) if env.get(DATABASE_URL_ENV) else None
        return cls(secret_key=SecretStr(secret), api_keys=tuple(keys), database_url=database_url)


def accounts_database_url(settings: AppSettings, secrets: Secrets) -> str:
    """The accounts database: ``accounts.database_url`` from the args, else DATABASE_URL, else SQLite.

    The SQLite default is ``state_dir/sealserve.db`` (the CLI's default with the default state_dir).
    A URL in the args must not hold a password: the args are stored in Ray's control plane.
    """
    if settings.accounts.database_url is not None:
        url = settings.accounts.database_url.get_secret_value()
        try:
            has_password = bool(make_url(url).password)
        except ArgumentError:
            raise ConfigurationError("accounts.database_url cannot be parsed") from None
        if has_password:
            raise ConfigurationError(
                "accounts.database_url must not hold a password (the app args are not secret): "
                "set DATABASE_URL in the environment of the ingress, or PGPASSWORD"
            )
        return url
    from_env = secrets.database_url.get_secret_value() if secrets.database_url else None
    return resolve_database_url(from_env, state_dir=settings.state_path)
