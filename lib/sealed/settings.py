"""Settings of sealed models: the ``sealed`` section of the application arguments.

``lib/settings.py`` composes :class:`SealedSettings` into ``AppSettings``; the sealed package
reads only this module, never the application's settings. The reader's password is a secret: it
never travels in the arguments, :func:`reader_credentials` reads it from the environment of the
process that fetches.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lib.errors import ConfigurationError

PASSWORD_ENV = "RESOURCE_API_PASSWORD"  # noqa: S105 - the name of the variable
EMAIL_ENV = "RESOURCE_API_EMAIL"
CACHE_DIR_ENV = "MODEL_CACHE_DIR"
NODE_KEY_FILE_ENV = "SEALSERVE_NODE_KEY_FILE"
TRUSTED_PUBLISHERS_ENV = "SEALSERVE_TRUSTED_PUBLISHERS"
# The node's Ed25519 key (lib/sealed/signing.py): made on first start, 0600, never sent.
DEFAULT_NODE_KEY_FILE = "~/.sealserve/node.key"
SHA256_HEX = r"^[0-9a-f]{64}$"
# tmpfs: plaintext weights never reach a persistent disk. The cache refuses a directory here
# that another user owns (see lib.sealed.node_cache.process_cache_dir).
DEFAULT_MODEL_CACHE_DIR = "/dev/shm/sealserve"  # noqa: S108


class SealedModelSpec(BaseModel):
    """One sealed model to serve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Resource name the model was published under.")
    folder: str | None = Field(None, description="Resource folder; default: the sealed.folder.")
    id: str | None = Field(
        None, pattern=SHA256_HEX, description="Pin: refuse the model unless its id is this SHA-256."
    )


class SealedSettings(BaseModel):
    """Where sealed models come from (``args.sealed``); reader credentials are secrets.

    The reader's password is read from RESOURCE_API_PASSWORD by the loader process itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resource_api_url: str = Field(description="Base URL of the resource API.")
    folder: str = Field(min_length=1, description="Default resource folder of the models.")
    models: list[SealedModelSpec] = Field(min_length=1, description="The sealed models to serve.")
    email: str | None = Field(
        None, description="Reader account; default: the RESOURCE_API_EMAIL environment variable."
    )
    cache_dir: str = Field(
        default_factory=lambda: os.environ.get(CACHE_DIR_ENV, DEFAULT_MODEL_CACHE_DIR),
        description="Node-local tmpfs directory for decrypted models (MODEL_CACHE_DIR).",
    )
    cache_budget_bytes: int = Field(
        16 * 1024**3, gt=0, description="Plaintext bytes the node cache keeps before evicting (LRU)."
    )
    # The measurements behind these three defaults are at DEFAULT_SINGLE_GET_MAX in lib/sealed/fetch.py.
    single_get_max_mb: int = Field(
        1024, ge=0, le=1 << 20,
        description="Big parts up to this size (MiB) are one streamed GET, larger ones parallel ranged "
                    "GETs (download_workers of part_size_mb); 0: always ranges.",
    )
    download_workers: int = Field(4, ge=1, le=32, description="Parallel ranged GETs per download.")
    part_size_mb: int = Field(8, ge=1, le=512, description="Size of one ranged GET, in MiB.")
    retry_attempts: int = Field(4, ge=1, le=10, description="Attempts per network call (first included).")
    timeout_s: float = Field(30.0, gt=0, description="Read timeout of each network call.")
    node_key_file: str = Field(
        default_factory=lambda: os.environ.get(NODE_KEY_FILE_ENV, DEFAULT_NODE_KEY_FILE),
        description="This node's Ed25519 key (SEALSERVE_NODE_KEY_FILE), made 0600 on first start; "
                    "an operator approves it on the resource API before any key is released.",
    )
    trusted_publishers: list[str] = Field(
        default_factory=lambda: os.environ.get(TRUSTED_PUBLISHERS_ENV, "").replace(",", " ").split(),
        description="Publishers' Ed25519 public keys (base64, from `sealserve keygen --signing`; default: "
                    "SEALSERVE_TRUSTED_PUBLISHERS, comma-separated): a manifest, data key or storage "
                    "config none of them signed is refused. Empty: nothing is checked (a warning says so).",
    )
    allow_plain_http: bool = Field(
        False, description="Accept plain HTTP to a resource API or S3 endpoint that is not loopback "
                           "(development only: passwords and keys would travel unencrypted).",
    )

    @field_validator("trusted_publishers")
    @classmethod
    def _check_publisher_keys(cls, value: list[str]) -> list[str]:
        from lib.sealed.signing import decode_ed25519_public_key

        for text in value:
            try:
                decode_ed25519_public_key(text)
            except ValueError:
                raise ValueError("each trusted publisher is a base64 Ed25519 public key (32 bytes)") from None
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _names_as_specs(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


def reader_credentials(settings: SealedSettings) -> tuple[str, str]:
    """The reader's email and password, from the settings and this process's environment."""
    email = settings.email or os.environ.get(EMAIL_ENV)
    password = os.environ.get(PASSWORD_ENV)
    if not email or not password:
        raise ConfigurationError(
            f"sealed models need reader credentials: set {EMAIL_ENV} (or sealed.email) and {PASSWORD_ENV}"
        )
    return email, password
