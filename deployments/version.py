"""The version the service reports (``GET /``, ``/health``, the OpenAPI document)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("sealserve")
except PackageNotFoundError:  # running from a source tree without installing
    VERSION = "0.0.0"
