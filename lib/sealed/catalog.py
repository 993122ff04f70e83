"""The sealed models of a node: catalog entries from the resource API, plaintext from the cache.

Listing (``refresh``) asks the resource API for the manifests of the configured models; it
releases no key. A key is released only when a replica needs the model (``ensure``), once per
node thanks to :class:`~lib.sealed.node_cache.SealedModelCache`. Every failure of a sealed model is
reported as :class:`~lib.errors.ModelUnavailableError` (503) naming the cause, kept for
``/health`` and logged; a wrong reader password, for instance, is the service's problem, never
a 401 for the client.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib.errors import ConfigurationError, ModelNotFoundError, ModelUnavailableError
from lib.retry import RetryPolicy
from lib.schemas import ModelInfo
from lib.sealed.fetch import BigPartSource, ResourceSource, SealedFetcher, SealedRef, TransferPlan
from lib.sealed.fingerprint import node_fingerprint
from lib.sealed.node_cache import SealedModelCache, describe, process_cache_dir
from lib.sealed.resource_client import ResourceClient
from lib.sealed.settings import SealedSettings, reader_credentials
from lib.sealed.signing import PublisherTrust, load_or_create_node_key
from lib.sealed.transfer import MiB
from lib.sealed.wire import CdnConfig, ResourceManifest, plain_http_refusal

log = logging.getLogger(__name__)

LISTING = "listing"
MODEL_KINDS = ("text-to-image", "image-classification")


def _with_id(ref: SealedRef, manifest: ResourceManifest) -> SealedRef:
    return ref if ref.id is not None else dataclasses.replace(ref, id=manifest.id)


def _entry(ref: SealedRef, manifest: ResourceManifest, path: Path | None, error: str | None) -> ModelInfo:
    return ModelInfo(
        id=manifest.id,
        name=ref.name,
        size=manifest.plaintext_size,
        path=str(path) if path else None,
        source="sealed",
        extension="" if manifest.is_directory else Path(manifest.name).suffix,
        kind=manifest.kind if manifest.kind in MODEL_KINDS else None,
        status="available" if path else ("error" if error else "sealed"),
        error=error if not path else None,
    )


def _unlisted_entry(ref: SealedRef, error: str) -> ModelInfo:
    assert ref.id is not None
    return ModelInfo(
        id=ref.id, name=ref.name, size=0, source="sealed", extension="", status="error", error=error
    )


def resource_client_from_env(settings: SealedSettings) -> ResourceClient:
    """The reader's client, holding this node's key (made on the first start)."""
    email, password = reader_credentials(settings)
    node_key = load_or_create_node_key(Path(settings.node_key_file))
    log.info("node key %s (%s)", node_key.id[:16], settings.node_key_file)
    return ResourceClient(
        settings.resource_api_url,
        email,
        password,
        timeout=(3.05, settings.timeout_s),
        retry=RetryPolicy(attempts=settings.retry_attempts),
        node_key=node_key,
        allow_plain_http=settings.allow_plain_http,
    )


class SealedCatalog:
    """Catalog entries and verified local paths for the sealed models of one node."""

    def __init__(
        self,
        settings: SealedSettings,
        *,
        owner: str,
        resources: ResourceSource | None = None,
        fingerprint: str | None = None,
        cdn_factory: Callable[[CdnConfig], BigPartSource] | None = None,
    ) -> None:
        self._settings = settings
        self._refs = [
            SealedRef(spec.folder or settings.folder, spec.name, spec.id) for spec in settings.models
        ]
        # Our own client (not one a test injects) enrolls the node key on the first listing, so an
        # operator sees the node pending before any model is asked for.
        self._client = resource_client_from_env(settings) if resources is None else None
        self._enrolled = False
        self._fingerprint = fingerprint or node_fingerprint()
        self._trust = PublisherTrust(settings.trusted_publishers)
        if not self._trust.enforced:
            log.warning("sealed.trusted_publishers is empty: manifests are not checked for a publisher's "
                        "signature, so a compromised resource API could substitute a model")
        self._fetcher = SealedFetcher(
            resources or self._client,  # type: ignore[arg-type]
            trust=self._trust,
            fingerprint=self._fingerprint,
            cdn_factory=cdn_factory or self._cdn_client,
            plan=TransferPlan(
                single_get_max_bytes=settings.single_get_max_mb * MiB,
                range_bytes=settings.part_size_mb * MiB,
                workers=settings.download_workers,
                retry=RetryPolicy(attempts=settings.retry_attempts),
            ),
        )
        self.cache = SealedModelCache(
            process_cache_dir(Path(settings.cache_dir), owner),
            fetcher=self._fetcher,
            budget_bytes=settings.cache_budget_bytes,
        )
        self._manifests: dict[tuple[str, str], ResourceManifest] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def _cdn_client(self, config: CdnConfig) -> BigPartSource:
        # Imported on the first fetch: boto3 is heavy, and a process that serves no sealed
        # model (an ingress, a loader that only lists) never needs it (tests/unit/test_layout.py).
        from lib.sealed.cdn import CdnClient

        endpoint = config.endpoint_url
        refusal = plain_http_refusal(endpoint, "the storage endpoint") if endpoint else None
        if refusal is not None and not self._settings.allow_plain_http:
            raise ConfigurationError(refusal)
        return CdnClient(
            config,
            read_timeout=self._settings.timeout_s,
            max_attempts=self._settings.retry_attempts,
            part_size=self._settings.part_size_mb * MiB,
            max_workers=self._settings.download_workers,
        )

    def _enroll(self) -> None:
        if self._client is None or self._enrolled:
            return
        try:
            node = self._client.enroll(self._fingerprint)
        except Exception as exc:
            log.warning("cannot enroll this node's key yet: %s", describe(exc))
            return
        self._enrolled = True
        if node.status == "approved":
            log.info("node %s is approved for key releases", node.node_id[:16])
        elif node.status == "revoked":
            log.error("node %s is revoked: it receives no keys (a new node key must be enrolled)",
                      node.node_id[:16])
        else:
            log.warning("node %s is %s: approve it with `sealserve resource-api nodes approve %s`",
                        node.node_id[:16], node.status, node.node_id)

    def refresh(self) -> None:
        """Re-read the manifests of the configured models; keeps the last good ones on failure."""
        self._enroll()
        found: dict[tuple[str, str], ResourceManifest] = {}
        try:
            for folder in sorted({ref.folder for ref in self._refs}):
                for manifest in self._fetcher.list(folder):
                    found[(folder, manifest.name)] = manifest
            refused = self._unsigned(found)
        except Exception as exc:
            self._note_error(LISTING, f"cannot list sealed models: {describe(exc)}")
            return
        with self._lock:
            self._errors.pop(LISTING, None)
            for ref in self._refs:
                listed = found.get(ref.location)
                if ref.location in refused:
                    self._errors[ref.name] = refused[ref.location]
                    self._manifests.pop(ref.location, None)
                    continue
                if listed is None:
                    self._errors[ref.name] = f"sealed model {ref.folder}/{ref.name} is not published"
                    continue
                if self._errors.get(ref.name, "").endswith(("is not published", "trusted publisher")):
                    del self._errors[ref.name]
                self._manifests[ref.location] = listed

    def _unsigned(self, found: dict[tuple[str, str], ResourceManifest]) -> dict[tuple[str, str], str]:
        """The listed manifests no trusted publisher signed, with the reason; dropped from ``found``."""
        refused = {}
        for (folder, name), manifest in list(found.items()):
            try:
                self._trust.check_manifest(folder, manifest.model_dump(mode="json"),
                                           what=f"sealed model {folder}/{name}")
            except Exception as exc:
                refused[(folder, name)] = describe(exc)
                del found[(folder, name)]
        if refused:
            log.error("refused listed manifests: %s", "; ".join(refused.values()))
        return refused

    def entries(self) -> list[ModelInfo]:
        with self._lock:
            known = [(ref, self._manifests.get(ref.location)) for ref in self._refs]
            errors = dict(self._errors)
        entries = []
        for ref, manifest in known:
            error = errors.get(ref.name) or self.cache.errors().get(ref.name) or errors.get(LISTING)
            if manifest is None:
                if ref.id is not None:  # pinned: a client asking for it gets a 503 naming the cause
                    entries.append(_unlisted_entry(ref, error or "sealed model is not listed yet"))
                continue
            path = self.cache.cached(_with_id(ref, manifest))
            entries.append(_entry(ref, manifest, path, error))
        return entries

    def owns(self, model_id: str) -> bool:
        return self._ref_for(model_id) is not None

    def ensure(self, model_id: str) -> ModelInfo:
        """Fetch (once per node) and return the entry of a sealed model with its local path."""
        ref = self._ref_for(model_id)
        if ref is None:
            raise ModelNotFoundError(f"model {model_id!r} is not in the catalog")
        # Fetch exactly the version the client asked for: if another was published since the
        # listing, the fetch fails its id check (503) until the next refresh lists it.
        if ref.id is None:
            ref = dataclasses.replace(ref, id=model_id)
        with self._lock:
            hint = self._manifests.get(ref.location)
        try:
            path, manifest = self.cache.ensure(ref, hint=hint)
        except Exception as exc:
            reason = describe(exc)
            log.error("sealed model %s is unavailable: %s", ref.name, reason)
            raise ModelUnavailableError(f"sealed model {ref.name} is unavailable: {reason}") from None
        with self._lock:  # a pinned model fetched before any listing succeeded is known now
            self._manifests[ref.location] = manifest
        return _entry(ref, manifest, path, None)

    def errors(self) -> dict[str, str]:
        with self._lock:
            errors = dict(self._errors)
        return {**errors, **self.cache.errors()}

    def stats(self) -> dict[str, Any]:
        return self.cache.stats()

    def close(self) -> None:
        self.cache.clear()

    def _ref_for(self, model_id: str) -> SealedRef | None:
        with self._lock:
            for ref in self._refs:
                manifest = self._manifests.get(ref.location)
                if model_id in (ref.id, manifest.id if manifest else None):
                    return ref
        return None

    def _note_error(self, key: str, message: str) -> None:
        log.error("%s", message)
        with self._lock:
            self._errors[key] = message
