"""The CPU fallback of a replica Ray gave a GPU that CUDA cannot use: the device, the warning line,
what ``/health`` reports and the one log line at replica start (docs/configuration.md,
"Fractional GPUs"). tests/integration/test_gpu_placement.py shows the same through real Ray.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from deployments import model_replica
from deployments.model_replica import ModelReplica, ray_gpu_assignment
from lib.models import device as device_module
from lib.models.device import Device, GpuAssignment, detect_device, gpu_fallback_warning
from lib.schemas import DeploymentHealth, Health

HALF_OF_GPU_0 = GpuAssignment.of([0], 0.5, "0")


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module.torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def cpu_only_torch(no_accelerator: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module.torch.version, "cuda", None)


def test_assignment_keeps_ray_ids_as_strings() -> None:
    assert GpuAssignment.of([0, 1], 2.0, "0,1") == GpuAssignment(("0", "1"), 2.0, "0,1")
    assert GpuAssignment.of(["3"]).ids == ("3",)


@pytest.mark.usefixtures("cpu_only_torch")
def test_gpu_assigned_without_cuda_runs_on_cpu_and_says_so() -> None:
    device = detect_device(HALF_OF_GPU_0)
    assert (device.kind, device.dtype) == ("cpu", torch.float32)
    assert device.warning == (
        "0.5 GPU assigned by Ray (GPU 0, CUDA_VISIBLE_DEVICES=0) but CUDA is not available "
        "(this torch build has no CUDA): running on CPU (float32)"
    )


@pytest.mark.usefixtures("no_accelerator")
def test_warning_tells_a_cuda_build_without_a_device_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module.torch.version, "cuda", "12.4")
    warning = detect_device(GpuAssignment.of([1], 1.0, "1")).warning
    assert warning is not None
    assert warning.startswith("1 GPU assigned by Ray (GPU 1, CUDA_VISIBLE_DEVICES=1)")
    assert "(no CUDA device or driver)" in warning and "this torch build" not in warning


@pytest.mark.usefixtures("cpu_only_torch")
@pytest.mark.parametrize(
    ("assigned", "expected"),
    [
        (GpuAssignment.of([0, 1], 2.0, "0,1"), "2 GPU assigned by Ray (GPU 0,1, CUDA_VISIBLE_DEVICES=0,1)"),
        (GpuAssignment.of([0], 0.25, None), "0.25 GPU assigned by Ray (GPU 0, CUDA_VISIBLE_DEVICES=(unset))"),
        (GpuAssignment.of([2]), "a GPU assigned by Ray (GPU 2, CUDA_VISIBLE_DEVICES=(unset))"),
    ],
    ids=["two-gpus", "no-visible-devices", "share-unknown"],
)
def test_warning_names_what_ray_assigned(assigned: GpuAssignment, expected: str) -> None:
    warning = detect_device(assigned).warning
    assert warning is not None and warning.startswith(expected)
    assert warning.endswith("running on CPU (float32)")


@pytest.mark.usefixtures("no_accelerator")
@pytest.mark.parametrize("assigned", [None, GpuAssignment(), GpuAssignment.of([], None, "")])
def test_no_gpu_assigned_means_no_warning(assigned: GpuAssignment | None) -> None:
    assert detect_device(assigned) == Device("cpu", torch.float32)


def test_cuda_available_uses_the_assigned_gpu_without_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    assert detect_device(HALF_OF_GPU_0) == Device("cuda", torch.float16)


def test_fallback_names_mps_when_that_is_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module.torch.backends.mps, "is_available", lambda: True)
    device = detect_device(HALF_OF_GPU_0)
    assert device.kind == "mps"
    assert device.warning is not None and device.warning.endswith("running on MPS (float32)")


def test_warning_is_built_from_the_device_it_is_given() -> None:
    line = gpu_fallback_warning(HALF_OF_GPU_0, Device("cpu", torch.float32))
    assert "0.5 GPU" in line and line.endswith("running on CPU (float32)")


# --- the replica: /health and the start-up log line -----------------------------------------------


class _Replica(ModelReplica):
    deployment_name = "ImageClassifier"

    def __del__(self) -> None:  # type: ignore[override]
        """No loader to close here, and no coroutine left unawaited at garbage collection."""


def _replica(
    monkeypatch: pytest.MonkeyPatch, assigned: GpuAssignment | None
) -> tuple[ModelReplica, list[str]]:
    logged: list[str] = []
    monkeypatch.setattr(model_replica, "ray_gpu_assignment", lambda: assigned)
    monkeypatch.setattr(model_replica.NodeLoader, "for_this_replica", classmethod(lambda cls, settings: None))

    class _Log:
        def warning(self, message: str, *args: Any) -> None:
            logged.append(message % args)

    monkeypatch.setattr(model_replica, "log", _Log())
    return _Replica(settings=None), logged  # type: ignore[arg-type]


@pytest.mark.usefixtures("cpu_only_torch")
def test_replica_logs_the_fallback_once_and_health_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    replica, logged = _replica(monkeypatch, HALF_OF_GPU_0)
    warning = detect_device(HALF_OF_GPU_0).warning
    assert logged == [f"ImageClassifier: {warning}"]
    for _ in range(3):
        health = replica.health()
        assert (health.device, health.dtype, health.warning) == ("cpu", "float32", warning)
    assert len(logged) == 1  # at start only, not per health probe


@pytest.mark.usefixtures("no_accelerator")
def test_replica_without_a_gpu_logs_nothing_and_reports_no_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    replica, logged = _replica(monkeypatch, None)
    assert logged == []
    assert replica.health().warning is None


def test_outside_a_replica_no_gpu_is_assigned() -> None:
    # This process may or may not be a Ray driver by now (integration tests start one); either
    # way it is no replica, and Ray reserved no GPU for it.
    assert ray_gpu_assignment() is None


def test_health_schema_carries_the_warning_optionally() -> None:
    plain = DeploymentHealth(deployment="TextToImage", device="cpu", dtype="float32", loaded_models=[])
    assert plain.warning is None
    assert DeploymentHealth.model_validate(plain.model_dump()) == plain
    entry = plain.model_copy(update={"warning": "0.5 GPU assigned by Ray ..."})
    health = Health(status="ok", ready=True, version="x", device="cpu", deployments=[entry], models=0)
    assert health.model_dump(mode="json")["deployments"][0]["warning"] == "0.5 GPU assigned by Ray ..."
