"""``POST /v1/infer`` next to a direct diffusers call in this process, same parameters and seed.

The direct call uses ``lib.models.text_to_image`` (``load_pipeline``, ``resolve_params``,
``generate``) on ``lib.models.device.detect_device()``, as a script would, with torch's default
thread count. Served and direct runs alternate (served, direct, direct on one thread, ...) so
that both see the same background load; each figure is the median of its repeats, after
warm-ups (the first served call loads the pipeline in the replica).

The headline ``ratio`` is paired: the median, over the rounds, of each served call's time over
the direct call's right after it. On a small shared machine one generation's time moves by up
to 30% with what else runs (other tenants, Ray's periodic work), far more than the serving
overhead; a round's two calls see the same conditions, so their ratio cancels most of it, where
the ratio of the two medians can land several percent either way from run to run (measured:
0.97x to 1.16x over four runs of 9 to 15 rounds against one service). ``ratio_of_medians`` and
``ratio_of_minimums`` are reported beside it.

The run on one torch thread is a diagnostic: Ray runs a replica with ``num_cpus: 1`` on one
OpenMP thread, so comparing with it separates the serving overhead from the cores the replica
was given. ``same_image*`` compare the PNG bytes: different thread counts change the last bits
of the arithmetic, so the image the service returns matches the direct call that computed the
same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from bench.measures import median, ratio, rounded

PROMPT = "a lighthouse at dusk, oil painting"
WARMUPS = 2


def _stats(times: list[float], **extra: Any) -> dict[str, Any]:
    """Median, min, every run, and the spread (max / min): a spread far above 1 means the machine
    was busy, and the median says more about the neighbours than about the code."""
    return {"median_s": rounded(median(times), 4), "min_s": rounded(min(times), 4) if times else None,
            "spread": rounded(ratio(max(times), min(times)), 2) if times else None,
            "all_s": [round(t, 4) for t in times], **extra}


def _timed(call: Callable[[], str]) -> tuple[float, str]:
    started = time.perf_counter()
    image = call()
    return time.perf_counter() - started, image


def local_path(model_id: str, model_dirs: list[Path]) -> Path:
    """Where the service's model lies on this machine (the API never says: paths stay private)."""
    from lib.models.catalog import ModelCatalog, find_model

    found = find_model(ModelCatalog(model_dirs).scan(), model_id).path
    if found is None:
        raise RuntimeError(f"model {model_id[:12]} is not in {model_dirs}")
    return Path(found)


def infer_section(
    url: str, headers: dict[str, str], *, size: int, steps: int, repeats: int, model_dirs: list[Path]
) -> dict[str, Any]:
    models = requests.get(f"{url}/v1/models", headers=headers, timeout=30).json()["models"]
    sd = [m for m in models if m.get("kind") == "text-to-image"]
    model = next((m for m in sd if m.get("name") == "tiny-sd"), sd[0] if sd else None)
    if model is None:
        raise RuntimeError("sealserve lists no text-to-image model")
    fields = {"id": "bench-infer", "model_id": model["id"], "prompt": PROMPT,
              "num_inference_steps": steps, "guidance_scale": 7.5,
              "width": size, "height": size, "seed": 42, "num_images": 1}

    def served() -> str:
        response = requests.post(f"{url}/v1/infer", json=fields, headers=headers, timeout=600)
        response.raise_for_status()
        return str(response.json()["images"][0]["base64"])

    served_warm = [round(_timed(served)[0], 3) for _ in range(WARMUPS)]

    import torch

    from lib.models.device import detect_device
    from lib.models.text_to_image import generate, load_pipeline, resolve_params
    from lib.schemas import InferRequest

    device = detect_device()
    started = time.perf_counter()
    pipe = load_pipeline(local_path(model["id"], model_dirs), device)
    load_s = time.perf_counter() - started
    params = resolve_params(InferRequest(**fields), default_steps=steps, default_guidance_scale=7.5)
    default_threads = torch.get_num_threads()

    def direct(threads: int) -> Callable[[], str]:
        def call() -> str:
            torch.set_num_threads(threads)
            try:
                return str(generate(pipe, params, device).images[0].base64)
            finally:
                torch.set_num_threads(default_threads)
        return call

    for _ in range(WARMUPS):
        _timed(direct(default_threads))
        _timed(direct(1))
    runs: dict[str, list[tuple[float, str]]] = {"sealserve": [], "direct": [], "direct_1_thread": []}
    for _ in range(repeats):
        runs["sealserve"].append(_timed(served))
        runs["direct"].append(_timed(direct(default_threads)))
        runs["direct_1_thread"].append(_timed(direct(1)))
    times = {name: [t for t, _ in rows] for name, rows in runs.items()}
    images = {name: {image for _, image in rows} for name, rows in runs.items()}
    pairs = list(zip(times["sealserve"], times["direct"], strict=True))
    return {
        "label": f"{model['name']} {size}x{size}, {steps} steps",
        "request": {k: v for k, v in fields.items() if k != "model_id"},
        "device": device.kind, "dtype": device.dtype_name,
        "sealserve": _stats(times["sealserve"], warmup_s=served_warm),
        "direct": _stats(times["direct"], load_s=round(load_s, 3), torch_threads=default_threads),
        "direct_1_thread": _stats(times["direct_1_thread"], torch_threads=1),
        "ratio": rounded(median([s / d for s, d in pairs if d > 0])),
        "ratio_of_medians": rounded(ratio(median(times["sealserve"]), median(times["direct"]))),
        "ratio_1_thread": rounded(ratio(median(times["sealserve"]), median(times["direct_1_thread"]))),
        "ratio_of_minimums": rounded(ratio(min(times["sealserve"]), min(times["direct"]))),
        "same_image": images["sealserve"] == images["direct"],
        "same_image_1_thread": images["sealserve"] == images["direct_1_thread"],
    }
