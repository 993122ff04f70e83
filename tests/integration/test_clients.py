"""The generation loop and its clients through a real Serve over real HTTP, on the demo models:
a client that hangs up stops its generation, progress streams on ``/v1/infer``, and the official
``openai`` client against ``/v1``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
import requests
from PIL import Image

from tests.serve_harness import TEST_API_KEY, ServeInstance, serving_demo_models

DEFAULT_STEPS = 2
# Far beyond the bounded waits below: a generation that stops here was stopped by its hang-up.
REQUEST_TIMEOUT_S = 900.0
STOP_WAIT_S = 120.0
# The most expensive request the API takes.
EXPENSIVE = {"width": 1024, "height": 1024, "num_inference_steps": 150, "num_images": 4}


@pytest.fixture(scope="module")
def api(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInstance]:
    args = {"default_inference_steps": DEFAULT_STEPS, "request_timeout_s": REQUEST_TIMEOUT_S}
    with serving_demo_models(demo_models_dir, tmp_path_factory, args) as instance:
        yield instance


@pytest.fixture(scope="module")
def sd_id(api: ServeInstance) -> str:
    models = api.get("/v1/models", headers=api.auth()).json()["models"]
    return str(next(m["id"] for m in models if m["name"] == "tiny-sd"))


@pytest.fixture(scope="module")
def client(api: ServeInstance) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.base_url}/v1", api_key=TEST_API_KEY, timeout=300, max_retries=0)


def generations(api: ServeInstance) -> dict[str, int]:
    health = api.get("/health", headers=api.auth(), timeout=30).json()  # details: admin only
    [t2i] = [d for d in health["deployments"] if d["deployment"] == "TextToImage"]
    return {"running": t2i["running_generations"], "cancelled": t2i["cancelled_generations"]}


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout_s:g}s")
        time.sleep(0.2)


def open_request(
    api: ServeInstance, path: str, body: dict[str, Any], accept: str = "application/json"
) -> socket.socket:
    """Send a POST over a raw socket and leave the answer unread: the test decides when to hang up."""
    url = urlsplit(api.base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    raw = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {TEST_API_KEY}\r\n"
        f"Content-Type: application/json\r\nAccept: {accept}\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    sock.sendall(head.encode() + raw)
    return sock


def png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(raw))


def infer_body(model_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "req-1", "model_id": model_id, "prompt": "a red square", "width": 256, "height": 256,
        "num_inference_steps": 2, "seed": 42,
    }
    body.update(overrides)
    return body


# --- cancellation -------------------------------------------------------------------------------


def test_a_client_that_hangs_up_on_the_most_expensive_request_stops_its_generation(
    api: ServeInstance, sd_id: str
) -> None:
    before = generations(api)
    assert before["running"] == 0
    sock = open_request(api, "/v1/infer", infer_body(sd_id, **EXPENSIVE))
    try:
        wait_for(lambda: generations(api)["running"] == 1, STOP_WAIT_S, "generating")
    finally:
        sock.close()  # the client hangs up
    wait_for(lambda: generations(api)["running"] == 0, STOP_WAIT_S, "stopped")
    after = generations(api)
    # Stopped early, not finished: a generation that ran to its end is not counted as cancelled.
    assert after["cancelled"] == before["cancelled"] + 1
    # The pipeline is free again: the next request is answered.
    ok = api.post("/v1/infer", json=infer_body(sd_id), headers=api.auth())
    assert ok.status_code == 200, ok.text


def test_hanging_up_on_a_progress_stream_stops_its_generation(api: ServeInstance, sd_id: str) -> None:
    before = generations(api)
    sock = open_request(api, "/v1/infer", infer_body(sd_id, **EXPENSIVE), accept="text/event-stream")
    try:
        sock.settimeout(STOP_WAIT_S)
        received = b""
        while b"event: progress" not in received:
            chunk = sock.recv(65536)
            assert chunk, received[:500]
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    wait_for(lambda: generations(api)["running"] == 0, STOP_WAIT_S, "stopped")
    assert generations(api)["cancelled"] == before["cancelled"] + 1


# --- progress on the native API -----------------------------------------------------------------


def sse_events(response: requests.Response) -> list[tuple[str, dict[str, Any]]]:
    found, name = [], ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            found.append((name, json.loads(line[len("data: "):])))
    return found


def test_infer_streams_progress_previews_and_the_result(api: ServeInstance, sd_id: str) -> None:
    body = infer_body(sd_id, num_inference_steps=6, num_images=2)
    headers = {**api.auth(), "Accept": "text/event-stream"}
    with requests.post(
        f"{api.base_url}/v1/infer?previews=2", json=body, headers=headers, stream=True, timeout=300
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        found = sse_events(response)
    progress = [data for name, data in found if name == "progress"]
    assert [(p["step"], p["image_index"]) for p in progress] == [(s, i) for s in range(1, 7) for i in (0, 1)]
    previews = [p for p in progress if "preview" in p]
    assert [p["step"] for p in previews] == [2, 2, 4, 4]
    assert png(previews[0]["preview"]).size == (256, 256)
    name, result = found[-1]
    assert name == "result" and len(result["images"]) == 2
    # The streamed result is the same as the plain one.
    plain = api.post("/v1/infer", json=body, headers=api.auth()).json()
    assert [i["base64"] for i in plain["images"]] == [i["base64"] for i in result["images"]]


# --- the openai client --------------------------------------------------------------------------


def test_openai_client_lists_the_models(client: openai.OpenAI, sd_id: str) -> None:
    models = client.models.list()
    assert sd_id in [m.id for m in models.data]
    assert all(m.object == "model" for m in models.data)


def test_openai_client_generates_reproducible_images(client: openai.OpenAI, sd_id: str) -> None:
    def generate() -> list[bytes]:
        result = client.images.generate(
            model="tiny-sd", prompt="a red square", n=2, size="256x320",
            extra_body={"seed": 7, "num_inference_steps": 3},
        )
        assert isinstance(result.created, int) and result.data is not None
        return [base64.b64decode(image.b64_json or "") for image in result.data]

    first = generate()
    assert len(first) == 2 and first[0] != first[1]
    for raw in first:
        image = Image.open(io.BytesIO(raw))
        assert (image.format, image.size) == ("PNG", (256, 320))
    assert generate() == first


def test_openai_client_streams_partial_images_then_completed(client: openai.OpenAI) -> None:
    stream = client.images.generate(
        prompt="a red square", n=2, size="256x256", stream=True, partial_images=2,
        extra_body={"seed": 3, "num_inference_steps": 6},
    )
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    partial_indices = [getattr(event, "partial_image_index", None) for event in events[:4]]
    assert partial_indices == [0, 0, 1, 1]
    for event in events:
        assert png(event.b64_json).format == "PNG"
    assert png(events[-1].b64_json).size == (256, 256)


def test_openai_client_raises_its_exception_types(api: ServeInstance, client: openai.OpenAI) -> None:
    wrong_key = openai.OpenAI(base_url=f"{api.base_url}/v1", api_key="ss_wrong_key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.images.generate(prompt="a red square")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.images.generate(prompt="a red square", model="dall-e-3")
    assert isinstance(unknown.value.body, dict) and unknown.value.body["code"] == "model_not_found"
    with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)) as bad_size:
        client.images.generate(prompt="a red square", size="2048x2048")
    assert isinstance(bad_size.value.body, dict) and bad_size.value.body["param"] == "size"

    created = api.post(
        "/v1/admin/keys", json={"name": "openai-limit", "scopes": ["infer"], "rate_limit": "1/minute"},
        headers=api.auth(),
    )
    assert created.status_code == 201, created.text
    limited = openai.OpenAI(base_url=f"{api.base_url}/v1", api_key=created.json()["key"], max_retries=0)
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as over:
        limited.images.generate(prompt="a red square", size="256x256")
    assert int(over.value.response.headers["Retry-After"]) > 0


# --- the playground in a real browser ----------------------------------------------------------


def chromium() -> Any:
    """Headless Chromium from the system's packages, driven by Selenium; skipped without it,
    unless ``SEALSERVE_REQUIRE_BROWSER=1`` (CI, which installs it), where that is a failure."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        reason = "no Chromium and chromedriver installed (apt-get install chromium chromium-driver)"
        if os.environ.get("SEALSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def test_the_playground_has_a_strict_content_security_policy(api: ServeInstance) -> None:
    for path in ("/playground", "/playground/playground.js", "/playground/playground.css"):
        response = api.get(path)
        assert response.status_code == 200
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = api.get("/playground").text
    # No inline code, nothing from another origin.
    assert "<script>" not in page and "http://" not in page and "https://" not in page


def test_the_playground_generates_an_image_with_progress(api: ServeInstance, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 180)
    browser.get(f"{api.base_url}/playground")
    browser.find_element(By.ID, "key").send_keys(TEST_API_KEY)
    browser.find_element(By.ID, "connect").click()
    wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) > 0)
    assert Select(browser.find_element(By.ID, "model")).first_selected_option.text == "tiny-sd"
    for field, value in (("width", "256"), ("height", "256"), ("steps", "8"), ("seed", "11"), ("count", "2")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "run").click()
    wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#results img.result")))
    results = "[...document.querySelectorAll('#results img.result')]"
    wait.until(lambda b: b.execute_script(f"return {results}.every(i => i.complete && i.naturalWidth)"))
    progress = browser.find_element(By.ID, "progress")
    # The bar moved step by step (one update per step and image) and ended full.
    assert int(progress.get_attribute("data-updates")) == 8 * 2
    assert progress.get_attribute("value") == progress.get_attribute("max") == "8"
    sizes = browser.execute_script(f"return {results}.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[256, 256], [256, 256]]
    links = browser.find_elements(By.CSS_SELECTOR, "#results a[download]")
    assert [link.get_attribute("download") for link in links] == ["sealserve-11.png", "sealserve-12.png"]
    # The key is in this tab's session storage and nowhere else.
    assert browser.execute_script("return sessionStorage.getItem('sealserve.apiKey')") == TEST_API_KEY
    assert browser.execute_script("return localStorage.length") == 0
    violations = [e for e in browser.get_log("browser") if "Content Security Policy" in e.get("message", "")]
    assert violations == []


def test_the_playground_classifies_a_dropped_image(api: ServeInstance, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(image)
    browser.get(f"{api.base_url}/playground")  # the key is still in this tab's session storage
    browser.find_element(By.CSS_SELECTOR, ".tab[data-tab='classify']").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "classifier").get_attribute("value"))
    browser.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#predictions li"))
    bars = browser.find_elements(By.CSS_SELECTOR, "#predictions li progress")
    assert 1 <= len(bars) <= 5
    values = [float(bar.get_attribute("value")) for bar in bars]
    assert values == sorted(values, reverse=True) and 0 < sum(values) <= 1.0001
