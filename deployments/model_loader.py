"""The ModelLoader actor: exactly one per node (per application), shared by the replicas there.

It owns the node's model catalog (one scan of MODEL_DIRS per node, not per replica) and hands
out verified model paths. Replicas find it by a name derived from the application and the node
id; ``get_if_exists`` makes find-or-create atomic in the GCS, so replicas starting together on a
node still end up with a single loader.

Lifetime: the loader is not detached. Its owner is the replica that created it, so when the
application is deleted (all its replicas stop) the loader goes too, and no loader outlives its
application. If the owner replica alone is stopped (downscaling), the loader dies with it and
the next call from another replica on the node creates a new one (``NodeLoader`` retries).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deployments.ray_errors import unwrap
from lib.catalog import ModelCatalog
from lib.schemas import ModelInfo
from lib.settings import AppSettings

log = logging.getLogger("ray.serve")

LOADER_NAMESPACE = "sealserve"
_RECONNECT_ATTEMPTS = 3


@ray.remote(num_cpus=0, max_concurrency=16)  # type: ignore[call-overload]
class ModelLoader:
    """Per-node owner of the model catalog; hands replicas verified local model paths."""

    def __init__(self, settings: AppSettings) -> None:
        self._settings = settings
        self._catalog = ModelCatalog(settings.model_dirs)
        self._catalog.scan()
        self._stop = threading.Event()
        self._scanner = threading.Thread(target=self._scan_forever, name="model-scan", daemon=True)
        self._scanner.start()
        self._ensured: dict[str, int] = {}
        self._lock = threading.Lock()

    def _scan_forever(self) -> None:
        while not self._stop.wait(self._settings.model_scan_interval):
            try:
                self._catalog.scan()
            except Exception:  # a scan failure must not end rescanning for the loader's life
                log.exception("model scan failed")

    def models(self) -> list[ModelInfo]:
        return self._catalog.entries()

    def rescan(self) -> list[ModelInfo]:
        return self._catalog.scan()

    def get(self, model_id: str) -> ModelInfo:
        return self._catalog.get(model_id)

    def resolve(self, id_or_name: str | None, kind: str) -> ModelInfo:
        return self._catalog.resolve(id_or_name, kind)

    def ensure(self, model_id: str) -> ModelInfo:
        """Return the model's entry with a local path, verified against its id."""
        info = self._catalog.verify(model_id)
        with self._lock:
            self._ensured[model_id] = self._ensured.get(model_id, 0) + 1
        return info

    def stats(self) -> dict[str, Any]:
        with self._lock:
            ensured = dict(self._ensured)
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "models": len(self._catalog.entries()),
            "files_hashed": self._catalog.digests.files_hashed,
            "ensure_calls": ensured,
        }

    def shutdown(self) -> None:
        self._stop.set()


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
    ).remote(settings)


class NodeLoader:
    """A replica's connection to its node's loader; reconnects (or recreates) when it died."""

    def __init__(self, settings: AppSettings, app_name: str) -> None:
        self._settings = settings
        self._app_name = app_name
        self._handle: Any = None

    async def call(self, method: str, *args: Any) -> Any:
        for attempt in range(1, _RECONNECT_ATTEMPTS + 1):
            if self._handle is None:
                self._handle = get_or_create_loader(self._settings, self._app_name)
            try:
                return await getattr(self._handle, method).remote(*args)
            except RayActorError:  # died or unreachable (ActorDiedError, ActorUnavailableError)
                log.warning("model loader unavailable (attempt %d); reconnecting", attempt)
                self._handle = None
                if attempt == _RECONNECT_ATTEMPTS:
                    raise
            except Exception as exc:
                raise unwrap(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def models(self) -> list[ModelInfo]:
        result: list[ModelInfo] = await self.call("models")
        return result

    async def ensure(self, model_id: str) -> ModelInfo:
        result: ModelInfo = await self.call("ensure", model_id)
        return result

    async def resolve(self, id_or_name: str | None, kind: str) -> ModelInfo:
        result: ModelInfo = await self.call("resolve", id_or_name, kind)
        return result
