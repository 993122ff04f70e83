"""Schemathesis hooks of ``make fuzz`` (``devservers/fuzz.py``).

``error_body_shape``: every 4xx and 5xx of the ingress must be
``{"error": {"code", "message", "request_id"}}`` (``lib/http/errors.py``), with non-empty strings
in all three and nothing else, so a client can always read an error the same way.
``before_call``: inference requests reach the real models (``FUZZ_MODELS``).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import schemathesis

# Routes whose errors take OpenAI's shape (deployments/routes/openai.py).
OPENAI_PATH_PREFIX = "/v1/images/"


@schemathesis.check
def error_body_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"a {response.status_code} whose body is not JSON") from None
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        raise AssertionError(f"a {response.status_code} whose body is not an error object: {body!r:.200}")
    error = body["error"]
    # OpenAI's error shape, which the openai client parses (docs/clients.md), from the route
    # family's handlers; a method no route has (405) is answered by the router, in ours.
    if str(getattr(case, "path", "")).startswith(OPENAI_PATH_PREFIX) and response.status_code != 405:
        if set(error) != {"code", "message", "type", "param", "request_id"}:
            raise AssertionError(f"OpenAI error fields are {sorted(error)}")
        if not all(isinstance(error[f], str) and error[f] for f in ("code", "message", "type", "request_id")):
            raise AssertionError(f"OpenAI error fields must be non-empty strings: {error!r:.200}")
        if error["param"] is not None and not isinstance(error["param"], str):
            raise AssertionError(f"OpenAI error param must be a string or null: {error!r:.200}")
        return None
    if set(error) != {"code", "message", "request_id"}:
        raise AssertionError(f"error fields are {sorted(error)}, not code, message, request_id")
    if not all(isinstance(error[field], str) and error[field] for field in ("code", "message", "request_id")):
        raise AssertionError(f"error fields must be non-empty strings: {error!r:.200}")
    return None


# A 16x16 PNG: what a classify request needs to get past decoding to the model.
VALID_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGUlEQVR4nGOUqzjBQApgIkn1qIZRDUNKAwBgxgF+DAqMFgAAAABJRU5ErkJggg=="
)
_KINDS = {"/v1/infer": "text-to-image", "/infer": "text-to-image", "/v1/classify": "image-classification"}
_random = random.Random(0)  # noqa: S311 - choosing test inputs, not secrets


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    """Half the inference bodies name a real model (and classify ones carry a real image), so the
    fuzzer reaches the models and not only the 404 of a random id. Those get small generation
    parameters: the largest images at 150 steps take minutes each on a CPU, and the bounds
    themselves are checked on the other half, and by the coverage phase."""
    kind = _KINDS.get(case.operation.path)
    models = json.loads(os.environ.get("FUZZ_MODELS", "{}")).get(kind or "", [])
    if kind is None or not models or not isinstance(case.body, dict) or _random.random() < 0.5:
        return
    case.body["model_id"] = _random.choice(models)
    if kind == "image-classification":
        case.body["image"] = VALID_PNG
        return
    for field, most in (("num_inference_steps", 2), ("width", 256), ("height", 256), ("num_images", 2)):
        if isinstance(case.body.get(field), int) and not isinstance(case.body[field], bool):
            case.body[field] = min(case.body[field], most)
