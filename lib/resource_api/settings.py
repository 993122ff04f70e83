"""Settings of the resource API.

Plain settings come from arguments (CLI flags, Serve app args), else their environment variable,
else the default. The two secrets come from the environment only, through
:meth:`ResourceApiSettings.from_env`: ``RESOURCE_MASTER_KEY`` (32 bytes, 64 hex characters or
base64) encrypts DEKs and the CDN config at rest; ``RESOURCE_JWT_SECRET`` (>= 32 bytes) signs
tokens. Outside development a missing, malformed or placeholder secret refuses to start.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from lib.errors import ConfigurationError
from lib.secrets import MIN_SECRET_BYTES, PLACEHOLDER_SECRETS, Environment, read_or_create_secret

log = logging.getLogger(__name__)

# The same two modes as the application's (lib/settings.py), which this server does not import:
# it runs standalone, and shares only the protocol with the sealserve application.

MASTER_KEY_ENV = "RESOURCE_MASTER_KEY"
JWT_SECRET_ENV = "RESOURCE_JWT_SECRET"  # noqa: S105 - the variable's name, not a secret
MASTER_KEY_BYTES = 32

# Field name -> environment variable consulted when the arguments leave the field out.
ENV_VARS: dict[str, str] = {
    "environment": "RESOURCE_API_ENV",
    "state_dir": "RESOURCE_API_STATE_DIR",
    "database_url": "RESOURCE_API_DATABASE_URL",
    "token_ttl_seconds": "RESOURCE_API_TOKEN_TTL_SECONDS",
    "token_leeway_seconds": "RESOURCE_API_TOKEN_LEEWAY_SECONDS",
    "max_upload_bytes": "RESOURCE_API_MAX_UPLOAD_BYTES",
    "max_concurrent_logins": "RESOURCE_API_MAX_CONCURRENT_LOGINS",
}
DEV_MASTER_KEY_FILE = "dev-resource-master-key"
DEV_JWT_SECRET_FILE = "dev-resource-jwt-secret"  # noqa: S105 - a file name

# 32 random bytes have about 30 distinct values; fewer than 20 means a pattern someone typed.
_MIN_DISTINCT_KEY_BYTES = 20
# A random JWT secret of >= 32 characters uses far more than 10 distinct characters.
_MIN_DISTINCT_SECRET_CHARS = 10


def parse_master_key(text: str) -> bytes:
    """The 32-byte master key from 64 hex characters or (standard or URL-safe) base64."""
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    padded = text + "=" * (-len(text) % 4)
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == MASTER_KEY_BYTES:
            return raw
    raise ValueError(f"{MASTER_KEY_ENV} must be {MASTER_KEY_BYTES} bytes as 64 hex characters or base64")


def _is_placeholder_key(text: str, raw: bytes) -> bool:
    return text.strip().lower() in PLACEHOLDER_SECRETS or len(set(raw)) < _MIN_DISTINCT_KEY_BYTES


def _is_placeholder_secret(text: str) -> bool:
    return text.strip().lower() in PLACEHOLDER_SECRETS or len(set(text)) < _MIN_DISTINCT_SECRET_CHARS


class ResourceApiSettings(BaseModel):
    """Everything the resource API needs to start; validated before it serves a request."""

    # Inputs are hidden from validation errors: two of these fields are secrets.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    environment: Environment = Field(
        "development",
        description="'development' generates missing secrets (kept in state_dir) and tolerates "
        "placeholders; 'production' refuses to start without real secrets.",
    )
    state_dir: str = Field(".sealserve", description="Directory for development secrets.")
    database_url: str = Field(
        "sqlite:///.sealserve/resource-api.db",
        description="SQLAlchemy URL of the resource database (SQLite file or PostgreSQL).",
    )
    token_ttl_seconds: int = Field(
        900, ge=1, le=86400, description="Lifetime of a login token; clients re-login on 401."
    )
    token_leeway_seconds: int = Field(
        10, ge=0, le=300, description="Clock skew tolerated when checking a token's exp/nbf/iat."
    )
    jwt_issuer: str = Field("sealserve-resource-api", min_length=1, description="`iss` of tokens.")
    jwt_audience: str = Field("sealserve-resource-api", min_length=1, description="`aud` of tokens.")
    max_upload_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest accepted request body in bytes (base64 inflates uploads by 4/3); "
        "larger is 413.",
    )
    max_concurrent_logins: int = Field(
        2, ge=1, le=64,
        description="Password hashes (scrypt, 32 MiB each) run at once; more logins wait, then 429.",
    )
    master_key: SecretStr = Field(
        description=f"{MASTER_KEY_ENV}: 32 bytes (hex or base64) encrypting DEKs and CDN config at rest."
    )
    jwt_secret: SecretStr = Field(description=f"{JWT_SECRET_ENV}: HMAC secret for tokens, >= 32 bytes.")

    @model_validator(mode="after")
    def _check_secrets(self) -> ResourceApiSettings:
        # Messages name the variable, never its value.
        master_text = self.master_key.get_secret_value()
        raw = parse_master_key(master_text)
        secret = self.jwt_secret.get_secret_value()
        if len(self.jwt_secret_bytes()) < MIN_SECRET_BYTES:
            raise ValueError(f"{JWT_SECRET_ENV} must be at least {MIN_SECRET_BYTES} bytes")
        weak = [
            name
            for name, is_weak in (
                (MASTER_KEY_ENV, _is_placeholder_key(master_text, raw)),
                (JWT_SECRET_ENV, _is_placeholder_secret(secret)),
            )
            if is_weak
        ]
        if weak and self.environment != "development":
            raise ValueError(f"{', '.join(weak)} look like placeholders; set random values")
        if weak:
            log.warning("%s look like placeholders: acceptable in development only", ", ".join(weak))
        return self

    def master_key_bytes(self) -> bytes:
        return parse_master_key(self.master_key.get_secret_value())

    def jwt_secret_bytes(self) -> bytes:
        return self.jwt_secret.get_secret_value().encode("utf-8")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ResourceApiSettings:
        """Settings from ``overrides`` (None means "not given"), else the environment, else defaults.

        Raises :class:`ConfigurationError` (never a message holding a secret) when they are unusable.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {field: env[var] for field, var in ENV_VARS.items() if env.get(var)}
        values.update({key: value for key, value in overrides.items() if value is not None})
        environment = values.get("environment", "development")
        secrets = {"master_key": env.get(MASTER_KEY_ENV, ""), "jwt_secret": env.get(JWT_SECRET_ENV, "")}
        dev_files = {"master_key": DEV_MASTER_KEY_FILE, "jwt_secret": DEV_JWT_SECRET_FILE}
        names = {"master_key": MASTER_KEY_ENV, "jwt_secret": JWT_SECRET_ENV}
        for field, value in secrets.items():
            if value:
                continue
            if environment != "development":
                raise ConfigurationError(
                    f"{names[field]} is not set; it is required outside development "
                    f"(environment={environment})"
                )
            # Kept next to the data: fine on a laptop, and why production refuses this path.
            path = Path(values.get("state_dir", ".sealserve")) / dev_files[field]
            log.warning("%s not set: using the development secret in %s", names[field], path)
            secrets[field] = read_or_create_secret(path)
        try:
            return cls(**values, **secrets)
        except ValidationError as exc:
            raise ConfigurationError(f"invalid resource API settings: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """A validation error as ``loc: message`` pairs, without the offending input values."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
        for error in exc.errors()
    )
