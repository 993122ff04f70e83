"""What the model deployments share: their settings, device, node loader, loaded models, health."""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, ClassVar

import ray

from deployments.model_loader import NodeLoader
from deployments.observability import install as install_observability
from lib.models.device import GpuAssignment, detect_device
from lib.schemas import DeploymentHealth
from lib.settings import AppSettings

log = logging.getLogger("ray.serve")


def ray_gpu_assignment() -> GpuAssignment | None:
    """The GPUs Ray reserved for this replica (none outside an actor: a driver has no reservation)."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    return GpuAssignment.of(ray.get_gpu_ids(), share, os.environ.get("CUDA_VISIBLE_DEVICES"))


class ModelReplica:
    """Base of TextToImage and ImageClassifier (plain class; each subclass is the deployment)."""

    deployment_name: ClassVar[str]

    def __init__(self, settings: AppSettings) -> None:
        install_observability(settings)
        self._settings = settings
        self._device = detect_device(ray_gpu_assignment())
        if self._device.warning:
            # Once per replica; /health repeats it for as long as the replica runs.
            log.warning("%s: %s", self.deployment_name, self._device.warning)
        self._loader = NodeLoader.for_this_replica(settings)
        # Weak: an entry disappears when multiplexing evicts the model.
        self._loaded: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

    async def __del__(self) -> None:
        """Serve's graceful-shutdown hook: let the node's loader know this replica is gone."""
        loader: NodeLoader | None = getattr(self, "_loader", None)  # __init__ may have failed
        if loader is not None:
            await loader.close()

    def health(self) -> DeploymentHealth:
        return DeploymentHealth(
            deployment=self.deployment_name,
            device=self._device.kind,
            dtype=self._device.dtype_name,
            loaded_models=sorted(self._loaded.keys()),
            warning=self._device.warning,
        )
