"""The S3/CDN connection settings that the resource API releases to nodes (``POST /cdn``).

The secret key is a :class:`~pydantic.SecretStr`, so a repr, a log line or a plain
``model_dump_json()`` shows ``**********``. Only :meth:`CdnConfig.plaintext_json` reveals it, and
its bytes are meant for encryption (at rest under the master key, in transit wrapped to a node).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class CdnConfig(BaseModel):
    """Where the big parts of sealed models live, and the credentials to read them."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    endpoint_url: str | None = Field(
        default=None,
        max_length=2048,
        description="S3-compatible endpoint (MinIO, R2, a local test server); None means AWS S3",
    )
    bucket: str = Field(min_length=1, max_length=255, description="bucket holding the big parts")
    region: str = Field(default="us-east-1", min_length=1, max_length=64, description="bucket region")
    access_key_id: str = Field(min_length=1, max_length=256, description="S3 access key id")
    secret_access_key: SecretStr = Field(description="S3 secret access key")

    def plaintext_json(self) -> bytes:
        """The config as JSON with the secret revealed: only ever encrypt these bytes."""
        data = self.model_dump(mode="json")
        data["secret_access_key"] = self.secret_access_key.get_secret_value()
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_plaintext_json(cls, raw: bytes) -> CdnConfig:
        return cls.model_validate_json(raw)
