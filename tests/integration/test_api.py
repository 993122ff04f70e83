"""The whole request path through a real Serve instance over real HTTP, on the demo models."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from PIL import Image

from tests.serve_harness import (
    TEST_API_KEY,
    TEST_SECRET_KEY,
    ServeInstance,
    serving_demo_models,
)

SCAN_INTERVAL_S = 1.0
DEFAULT_STEPS = 2


@pytest.fixture(scope="module")
def api(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInstance]:
    args = {"model_scan_interval": SCAN_INTERVAL_S, "default_inference_steps": DEFAULT_STEPS,
            "max_body_bytes": 2 * 1024 * 1024}
    with serving_demo_models(demo_models_dir, tmp_path_factory, args) as instance:
        yield instance


@pytest.fixture(scope="module")
def models(api: ServeInstance) -> dict[str, dict[str, Any]]:
    body = api.get("/v1/models", headers=api.auth()).json()
    return {m["name"]: m for m in body["models"]}


def sd_id(models: dict[str, dict[str, Any]]) -> str:
    return str(models["tiny-sd"]["id"])


def png_b64(color: tuple[int, int, int] = (200, 30, 30), size: int = 32) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def infer_body(model_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "req-1", "model_id": model_id, "prompt": "a red square",
        "width": 256, "height": 256, "num_inference_steps": 2, "seed": 42,
    }
    body.update(overrides)
    return body


def make_jwt(**overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        # A bootstrap subject: a token whose sub is no stored key and no bootstrap key is refused.
        "iss": "sealserve", "aud": "sealserve-api", "sub": "bootstrap:0123456789ab",
        "scopes": ["infer", "classify"],
        "iat": now, "nbf": now, "exp": now + 300, "jti": "t1",
    }
    secret = overrides.pop("_secret", TEST_SECRET_KEY)
    claims.update(overrides)
    return jwt.encode(claims, secret, algorithm="HS256")


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["request_id"] == response.headers["X-Request-ID"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


# --- open endpoints -------------------------------------------------------------------------

def test_health_is_open_and_ready(api: ServeInstance) -> None:
    for path in ("/health", "/v1/health"):
        anonymous = api.get(path)
        assert anonymous.status_code == 200
        assert set(anonymous.json()) == {"status", "ready", "version"}  # no internals without a key
        assert anonymous.json()["ready"] is True
        response = api.get(path, headers=api.auth())
        assert response.status_code == 200
        body = response.json()
        assert body["ready"] is True and body["status"] == "ok"
        assert body["device"] == "cpu"
        assert {d["deployment"] for d in body["deployments"]} == {"TextToImage", "ImageClassifier"}
        assert body["models"] >= 2
        assert response.headers["X-Request-ID"]


def test_root_links_and_docs(api: ServeInstance) -> None:
    for path in ("/", "/v1"):
        body = api.get(path).json()
        assert body["links"]["infer"] == "/v1/infer"
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/infer", "/infer", "/v1/classify", "/v1/models/{model_id}"} <= set(paths)


def test_client_request_id_is_echoed(api: ServeInstance) -> None:
    response = api.get("/health", headers={"X-Request-ID": "my-trace-123"})
    assert response.headers["X-Request-ID"] == "my-trace-123"


def test_unknown_route_has_error_body(api: ServeInstance) -> None:
    assert_error(api.get("/v1/nope", headers=api.auth()), 404)


def test_cors_preflight(api: ServeInstance) -> None:
    response = requests.options(
        api.base_url + "/v1/infer",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "https://app.example")


# --- authentication -------------------------------------------------------------------------

@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {TEST_API_KEY}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {make_jwt(exp=int(time.time()) - 60, iat=int(time.time()) - 120)}"},
        {"Authorization": f"Bearer {make_jwt(aud='someone-else')}"},
        {"Authorization": f"Bearer {make_jwt(iss='someone-else')}"},
        {"Authorization": f"Bearer {make_jwt(_secret='another-secret-of-at-least-32-bytes-long!')}"},
    ],
    ids=["none", "bad-key", "basic-scheme", "empty", "expired-jwt", "wrong-aud", "wrong-iss", "other-secret"],
)
def test_protected_routes_need_valid_credentials(api: ServeInstance, headers: dict[str, str]) -> None:
    for method, path in (("get", "/v1/models"), ("post", "/v1/infer"), ("post", "/v1/classify")):
        kwargs: dict[str, Any] = {"headers": headers}
        if method == "post":
            kwargs["json"] = {}
        assert_error(getattr(api, method)(path, **kwargs), 401, "unauthorized")


def test_alg_none_jwt_is_refused(api: ServeInstance) -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    claims = make_jwt().split(".")[1]
    assert_error(api.get("/v1/models", headers=api.auth(f"{header}.{claims}.")), 401)


def test_valid_jwt_is_accepted_and_scopes_apply(api: ServeInstance) -> None:
    assert api.get("/v1/models", headers=api.auth(make_jwt())).status_code == 200
    classify_only = make_jwt(scopes=["classify"])
    assert_error(api.get("/v1/models", headers=api.auth(classify_only)), 403, "forbidden")
    # Signed with SECRET_KEY, but its subject is no key (deleted, or never one): refused.
    no_key = make_jwt(sub="a-deleted-key-id")
    assert_error(api.get("/v1/models", headers=api.auth(no_key)), 401, "unauthorized")


# --- catalog --------------------------------------------------------------------------------

def test_models_list_and_detail(api: ServeInstance, models: dict[str, dict[str, Any]]) -> None:
    sd, clf = models["tiny-sd"], models["tiny-classifier"]
    assert sd["kind"] == "text-to-image" and sd["status"] == "available"
    assert clf["kind"] == "image-classification" and clf["num_labels"] == 10
    assert len(sd["id"]) == 64 and sd["extension"] == "" and sd["size"] > 0
    body = api.get("/v1/models", headers=api.auth()).json()
    assert body["count"] == len(body["models"])
    detail = api.get(f"/v1/models/{sd['id']}", headers=api.auth()).json()
    assert detail == sd
    assert_error(api.get("/v1/models/" + "0" * 64, headers=api.auth()), 404, "model_not_found")


def _wait_for(api: ServeInstance, predicate: Any, timeout: float = 30) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        current = {m["name"]: m for m in api.get("/v1/models", headers=api.auth()).json()["models"]}
        if predicate(current) or time.monotonic() > deadline:
            return current
        time.sleep(SCAN_INTERVAL_S / 2)


def test_catalog_picks_up_new_model_and_drops_deleted(api: ServeInstance) -> None:
    source = api.model_dir / "tiny-classifier"
    staging = api.model_dir / ".staging-copy"
    shutil.copytree(source, staging)
    config = (staging / "config.json").read_text().replace('"cat"', '"lynx"')
    (staging / "config.json").write_text(config)
    staging.rename(api.model_dir / "copied-classifier")  # appears atomically
    current = _wait_for(api, lambda m: "copied-classifier" in m)
    assert "copied-classifier" in current
    assert current["copied-classifier"]["id"] != current["tiny-classifier"]["id"]

    shutil.rmtree(api.model_dir / "copied-classifier")
    current = _wait_for(api, lambda m: "copied-classifier" not in m)
    assert "copied-classifier" not in current


def test_unsafe_pickle_is_listed_with_error_and_never_executed(api: ServeInstance, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    import pickle

    (api.model_dir / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Exploit()}))
    try:
        current = _wait_for(api, lambda m: "evil.ckpt" in m)
        assert current["evil.ckpt"]["status"] == "error"
        assert "weights_only" in current["evil.ckpt"]["error"]
        assert not marker.exists()
    finally:
        (api.model_dir / "evil.ckpt").unlink()


# --- text to image --------------------------------------------------------------------------

def decode_png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(raw))


def mean_abs_diff(a: str, b: str) -> float:
    pixels_a, pixels_b = decode_png(a).convert("RGB").tobytes(), decode_png(b).convert("RGB").tobytes()
    assert len(pixels_a) == len(pixels_b)
    return sum(abs(x - y) for x, y in zip(pixels_a, pixels_b, strict=True)) / len(pixels_a)


def test_infer_returns_reproducible_pngs(api: ServeInstance, models: dict[str, dict[str, Any]]) -> None:
    body = infer_body(sd_id(models), num_images=2, width=256, height=320, negative_prompt="blurry")
    first = api.post("/v1/infer", json=body, headers=api.auth())
    assert first.status_code == 200, first.text
    result = first.json()
    assert set(result) == {
        "id", "model_id", "images", "processing_time", "prompt", "negative_prompt",
        "num_inference_steps", "guidance_scale",
    }
    assert result["id"] == "req-1" and result["model_id"] == sd_id(models)
    assert result["prompt"] == "a red square" and result["negative_prompt"] == "blurry"
    assert result["num_inference_steps"] == 2 and result["guidance_scale"] == 7.5
    assert [img["seed"] for img in result["images"]] == [42, 43]
    for image in result["images"]:
        assert (image["width"], image["height"]) == (256, 320)
        assert decode_png(image["base64"]).size == (256, 320)
    second = api.post("/infer", json=body, headers=api.auth()).json()
    assert [i["base64"] for i in second["images"]] == [i["base64"] for i in result["images"]]
    # Each image's seed regenerates the same picture alone; batched float maths may move a pixel
    # value by a step or two, so compare pixels, not bytes.
    alone = api.post("/v1/infer", json={**body, "num_images": 1, "seed": 43}, headers=api.auth()).json()
    assert mean_abs_diff(alone["images"][0]["base64"], result["images"][1]["base64"]) < 1.0
    other = api.post("/v1/infer", json={**body, "num_images": 1, "seed": 7}, headers=api.auth()).json()
    assert mean_abs_diff(other["images"][0]["base64"], result["images"][0]["base64"]) > 5.0


def test_infer_defaults_and_random_seed(api: ServeInstance, models: dict[str, dict[str, Any]]) -> None:
    body = infer_body(sd_id(models))
    for field in ("seed", "num_inference_steps", "width", "height"):
        body.pop(field)
    body["width"] = 256
    body["height"] = 256
    result = api.post("/v1/infer", json=body, headers=api.auth()).json()
    assert result["num_inference_steps"] == DEFAULT_STEPS  # from the app args
    assert result["guidance_scale"] == 7.5
    assert 0 <= result["images"][0]["seed"] < 2**32
    assert decode_png(result["images"][0]["base64"]).size == (256, 256)


OUT_OF_RANGE = [
    ("prompt", "x" * 1001), ("prompt", ""), ("negative_prompt", "x" * 1001),
    ("num_inference_steps", 0), ("num_inference_steps", 151),
    ("guidance_scale", 0.99), ("guidance_scale", 20.01),
    ("width", 248), ("width", 1032), ("width", 260), ("height", 248), ("height", 1032), ("height", 300),
    ("num_images", 0), ("num_images", 5), ("seed", -1), ("seed", 2**32), ("unknown_field", 1),
    ("id", ""), ("num_inference_steps", "many"),
]


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE, ids=[f"{f}={str(v)[:8]}" for f, v in OUT_OF_RANGE])
def test_infer_validation_bounds(
    api: ServeInstance, models: dict[str, dict[str, Any]], field: str, value: Any
) -> None:
    error = assert_error(
        api.post("/v1/infer", json=infer_body(sd_id(models), **{field: value}), headers=api.auth()),
        422, "validation_error",
    )
    assert field in error["message"]


@pytest.mark.parametrize("missing", ["id", "model_id", "prompt"])
def test_infer_required_fields(api: ServeInstance, models: dict[str, dict[str, Any]], missing: str) -> None:
    body = infer_body(sd_id(models))
    del body[missing]
    error = assert_error(api.post("/v1/infer", json=body, headers=api.auth()), 422)
    assert missing in error["message"]


def test_infer_unknown_and_wrong_kind_models(api: ServeInstance, models: dict[str, dict[str, Any]]) -> None:
    assert_error(api.post("/v1/infer", json=infer_body("f" * 64), headers=api.auth()), 404, "model_not_found")
    wrong = infer_body(models["tiny-classifier"]["id"])
    assert_error(api.post("/v1/infer", json=wrong, headers=api.auth()), 422, "wrong_model_kind")


def test_bad_bodies(api: ServeInstance, models: dict[str, dict[str, Any]]) -> None:
    json_headers = {**api.auth(), "Content-Type": "application/json"}
    text_headers = {**api.auth(), "Content-Type": "text/plain"}
    assert_error(api.post("/v1/infer", data="{not json", headers=json_headers), 400, "bad_request")
    assert_error(api.post("/v1/infer", data="x", headers=text_headers), 415, "unsupported_media_type")
    headers = api.auth()
    huge = {"image": "A" * (3 * 1024 * 1024)}
    assert_error(api.post("/v1/classify", json=huge, headers=headers), 413, "payload_too_large")


# --- classification -------------------------------------------------------------------------

def test_classify_top_k(api: ServeInstance, models: dict[str, dict[str, Any]]) -> None:
    response = api.post("/v1/classify", json={"image": png_b64(), "top_k": 3}, headers=api.auth())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == models["tiny-classifier"]["id"]
    predictions = body["predictions"]
    assert len(predictions) == 3
    confidences = [p["confidence"] for p in predictions]
    assert confidences == sorted(confidences, reverse=True)
    assert all(0.0 <= c <= 1.0 for c in confidences)
    all_labels = api.post("/v1/classify", json={"image": png_b64(), "top_k": 20}, headers=api.auth()).json()
    assert len(all_labels["predictions"]) == 10  # capped at num_labels
    assert abs(sum(p["confidence"] for p in all_labels["predictions"]) - 1.0) < 1e-3
    assert "cat" in {p["label"] for p in all_labels["predictions"]}


def test_classify_data_url_and_model_by_name(api: ServeInstance, models: dict[str, dict[str, Any]]) -> None:
    body = {"image": "data:image/png;base64," + png_b64(), "model_id": "tiny-classifier", "filename": "x.png"}
    response = api.post("/v1/classify", json=body, headers=api.auth())
    assert response.status_code == 200, response.text
    assert response.json()["model"] == models["tiny-classifier"]["id"]


def test_classify_errors(api: ServeInstance, models: dict[str, dict[str, Any]]) -> None:
    post = lambda body: api.post("/v1/classify", json=body, headers=api.auth())  # noqa: E731
    assert_error(post({"image": png_b64(), "top_k": 0}), 422)
    assert_error(post({"image": png_b64(), "top_k": 21}), 422)
    assert_error(post({}), 422)
    assert_error(post({"image": "!!!not base64!!!"}), 400, "invalid_image")
    assert_error(post({"image": base64.b64encode(b"not an image").decode()}), 400, "invalid_image")
    assert_error(post({"image": "data:text/plain;base64,aGVsbG8="}), 415, "unsupported_media_type")
    assert_error(post({"image": png_b64(), "model_id": "nope"}), 404, "model_not_found")
    assert_error(post({"image": png_b64(), "model_id": sd_id(models)}), 422, "wrong_model_kind")


# --- Python handle API from another Serve application ------------------------------------

def test_handle_call_from_second_application(api: ServeInstance, models: dict[str, dict[str, Any]]) -> None:
    from ray import serve

    from lib.schemas import ClassifyRequest, InferRequest

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Caller:
        async def __call__(self, model_id: str, image: str) -> tuple[Any, Any]:
            t2i = serve.get_deployment_handle("TextToImage", app_name="sealserve")
            clf = serve.get_deployment_handle("ImageClassifier", app_name="sealserve")
            request = InferRequest(id="h1", model_id=model_id, prompt="a red square",
                                   width=256, height=256, num_inference_steps=2, seed=42)
            generated = await t2i.options(multiplexed_model_id=model_id).generate.remote(request)
            classified = await clf.classify.remote(ClassifyRequest(image=image, top_k=2))
            return generated, classified

    handle = serve.run(Caller.bind(), name="caller", route_prefix=None)
    try:
        generated, classified = handle.remote(sd_id(models), png_b64()).result(timeout_s=180)
    finally:
        serve.delete("caller")
    from lib.schemas import ClassifyResponse, InferResponse

    assert isinstance(generated, InferResponse) and isinstance(classified, ClassifyResponse)
    over_http = api.post("/v1/infer", json=infer_body(sd_id(models), id="h1"), headers=api.auth()).json()
    assert generated.images[0].base64 == over_http["images"][0]["base64"]
    assert len(classified.predictions) == 2


# --- loader lifecycle -----------------------------------------------------------------------

def test_replicas_get_a_new_loader_when_it_dies(
    api: ServeInstance, models: dict[str, dict[str, Any]]
) -> None:
    import ray

    from deployments.model_loader import LOADER_NAMESPACE, loader_name
    from tests.serve_harness import APP_NAME

    name = loader_name(APP_NAME, ray.get_runtime_context().get_node_id())
    old = ray.get_actor(name, namespace=LOADER_NAMESPACE)
    old_pid = ray.get(old.stats.remote(), timeout=30)["pid"]
    ray.kill(old, no_restart=True)

    response = api.get("/v1/models", headers=api.auth())
    assert response.status_code == 200, response.text
    assert {m["name"] for m in response.json()["models"]} >= {"tiny-sd", "tiny-classifier"}
    new = ray.get_actor(name, namespace=LOADER_NAMESPACE)
    assert ray.get(new.stats.remote(), timeout=30)["pid"] != old_pid
    # the model deployments keep serving the models they hold
    response = api.post("/v1/infer", json=infer_body(sd_id(models), seed=5), headers=api.auth())
    assert response.status_code == 200, response.text
