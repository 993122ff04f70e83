"""The ModelLoader actor: exactly one per node (per application), shared by the replicas there.

It owns the node's model catalog (one scan of MODEL_DIRS per node, not per replica) and hands
out verified model paths; with ``sealed`` settings it also lists the sealed models and fetches,
verifies and decrypts each of them once for the node into its tmpfs cache.

Replicas find it by a name derived from the application and the node id; ``get_if_exists``
makes find-or-create atomic in the GCS, so replicas starting together on a node still end up
with a single loader.

Lifetime: the loader is not detached. Its owner is the replica that created it, so when the
application is deleted (all its replicas stop) the loader goes too, and no loader outlives its
application. If the owner replica alone is stopped (downscaling), the loader dies with it and
the next call from another replica on the node creates a new one (``NodeLoader`` retries).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import sys
import threading
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deployments.ray_errors import unwrap
from lib.models.catalog import ModelCatalog, find_model, resolve_model
from lib.schemas import ModelInfo
from lib.sealed.catalog import SealedCatalog
from lib.settings import AppSettings

log = logging.getLogger("ray.serve")

LOADER_NAMESPACE = "sealserve"
_RECONNECT_ATTEMPTS = 3
DETACH_TIMEOUT_S = 5.0


@ray.remote(num_cpus=0, max_concurrency=16)  # type: ignore[call-overload]
class ModelLoader:
    """Per-node owner of the model catalog; hands replicas verified local model paths."""

    def __init__(self, settings: AppSettings, app_name: str) -> None:
        self._settings = settings
        self._catalog = ModelCatalog(settings.model_dirs)
        self._sealed: SealedCatalog | None = None
        if settings.sealed is not None:
            node = ray.get_runtime_context().get_node_id()[:16]
            self._sealed = SealedCatalog(settings.sealed, owner=f"{app_name}-{node}")
            _remove_plaintext_on_exit(self._sealed)
        self._scan()
        self._stop = threading.Event()
        self._scanner = threading.Thread(target=self._scan_forever, name="model-scan", daemon=True)
        self._scanner.start()
        self._ensured: dict[str, int] = {}
        self._users: set[str] = set()
        self._lock = threading.Lock()

    def _scan(self) -> None:
        self._catalog.scan()
        if self._sealed is not None:
            self._sealed.refresh()

    def _scan_forever(self) -> None:
        while not self._stop.wait(self._settings.model_scan_interval):
            try:
                self._scan()
            except Exception:  # a scan failure must not end rescanning for the loader's life
                log.exception("model scan failed")

    def models(self) -> list[ModelInfo]:
        sealed = self._sealed.entries() if self._sealed is not None else []
        return self._catalog.entries() + sealed

    def rescan(self) -> list[ModelInfo]:
        self._scan()
        return self.models()

    def get(self, model_id: str) -> ModelInfo:
        return find_model(self.models(), model_id)

    def resolve(self, id_or_name: str | None, kind: str) -> ModelInfo:
        return resolve_model(self.models(), id_or_name, kind)

    def ensure(self, model_id: str) -> ModelInfo:
        """Return the model's entry with a local path, verified against its id.

        A sealed model is fetched, verified and decrypted into the node cache on first use;
        concurrent calls for it wait for that one fetch.
        """
        if self._sealed is not None and self._sealed.owns(model_id):
            info = self._sealed.ensure(model_id)
        else:
            info = self._catalog.verify(model_id)
        with self._lock:
            self._ensured[model_id] = self._ensured.get(model_id, 0) + 1
        return info

    def attach(self, user: str) -> None:
        with self._lock:
            self._users.add(user)

    def detach(self, user: str) -> None:
        """A replica of this node stopped; after the last one, no plaintext stays on the node."""
        with self._lock:
            self._users.discard(user)
            last = not self._users
        if last and self._sealed is not None:
            self._sealed.cache.release()
            log.info("no replica uses this node's loader any more: sealed plaintext removed")

    def errors(self) -> dict[str, str]:
        """Problems worth showing in /health: sealed models that cannot be listed or fetched."""
        return self._sealed.errors() if self._sealed is not None else {}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            ensured = dict(self._ensured)
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "models": len(self.models()),
            "files_hashed": self._catalog.digests.files_hashed,
            "ensure_calls": ensured,
            "sealed": self._sealed.stats() if self._sealed is not None else {},
            "cache_dir": str(self._sealed.cache.root) if self._sealed is not None else None,
        }

    def shutdown(self) -> None:
        self._stop.set()
        if self._sealed is not None:
            self._sealed.close()


def _remove_plaintext_on_exit(sealed: SealedCatalog) -> None:
    """Remove the node cache however this process ends short of SIGKILL.

    Ray sends SIGTERM to an actor whose owner died (our owner is a replica of the application),
    so this covers ``serve delete`` and ``serve shutdown``; a SIGKILLed loader's cache is removed
    by the next loader on the node (see ``process_cache_dir``).
    """
    atexit.register(sealed.close)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        sealed.close()
        if callable(previous):
            previous(signum, frame)
        else:
            sys.exit(0)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: atexit and the next loader's sweep still apply
        log.warning("could not install the SIGTERM cleanup of the model cache")


def loader_name(app_name: str, node_id: str) -> str:
    return f"{app_name}:model-loader:{node_id}"


def get_or_create_loader(settings: AppSettings, app_name: str) -> Any:
    """The loader of this node for ``app_name``, created here if there is none yet."""
    node_id = ray.get_runtime_context().get_node_id()
    return ModelLoader.options(  # type: ignore[attr-defined]
        name=loader_name(app_name, node_id),
        namespace=LOADER_NAMESPACE,
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(settings, app_name)


class NodeLoader:
    """A replica's connection to its node's loader; reconnects (or recreates) when it died.

    The replica attaches itself to the loader on connecting and detaches in ``close`` (called
    from the replica's graceful shutdown): when the last replica of the node detaches, as when
    the application is deleted, the loader drops every plaintext at once instead of relying on
    the signal Ray sends it afterwards.
    """

    def __init__(self, settings: AppSettings, app_name: str, user: str) -> None:
        self._settings = settings
        self._app_name = app_name
        self._user = user
        self._handle: Any = None

    @classmethod
    def for_this_replica(cls, settings: AppSettings) -> NodeLoader:
        from ray import serve  # here, not at the top: the loader's own process never imports Serve

        context = serve.get_replica_context()
        return cls(settings, context.app_name, context.replica_id.unique_id)

    async def call(self, method: str, *args: Any) -> Any:
        for attempt in range(1, _RECONNECT_ATTEMPTS + 1):
            try:
                if self._handle is None:
                    self._handle = get_or_create_loader(self._settings, self._app_name)
                    await self._handle.attach.remote(self._user)
                return await getattr(self._handle, method).remote(*args)
            except RayActorError:  # died or unreachable (ActorDiedError, ActorUnavailableError)
                log.warning("model loader unavailable (attempt %d); reconnecting", attempt)
                self._handle = None
                if attempt == _RECONNECT_ATTEMPTS:
                    raise
                # The GCS frees a dead actor's name shortly after it dies; give it that moment.
                await asyncio.sleep(0.5 * attempt)
            except Exception as exc:
                raise unwrap(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """Detach from the loader (bounded: a shutdown must not hang on a dead loader)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            await asyncio.wait_for(handle.detach.remote(self._user), DETACH_TIMEOUT_S)
        except Exception as exc:  # the loader is gone or busy: its exit handlers still apply
            log.warning("could not detach from the model loader: %s", type(unwrap(exc)).__name__)

    async def models(self) -> list[ModelInfo]:
        result: list[ModelInfo] = await self.call("models")
        return result

    async def ensure(self, model_id: str) -> ModelInfo:
        result: ModelInfo = await self.call("ensure", model_id)
        return result

    async def resolve(self, id_or_name: str | None, kind: str) -> ModelInfo:
        result: ModelInfo = await self.call("resolve", id_or_name, kind)
        return result
