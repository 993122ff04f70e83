"""Checks that a configuration can run, made before anything starts.

``build_app`` runs them at deploy time and ``sealserve serve`` before it starts Ray, so a missing
secret or credential is one clear error instead of replicas failing one by one.
"""

from __future__ import annotations

from lib.sealed.settings import reader_credentials
from lib.settings import AppSettings, Secrets, accounts_database_url


def preflight(settings: AppSettings) -> Secrets:
    """The secrets, or ConfigurationError if this configuration cannot run as it stands."""
    secrets = Secrets.from_env(settings)
    accounts_database_url(settings, secrets)  # a password in the args is refused here
    if settings.sealed is not None:
        reader_credentials(settings.sealed)
    return secrets
