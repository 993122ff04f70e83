"""The request-path baseline: one FastAPI + uvicorn process serving the classifier the tutorial way.

API keys in a set, the model loaded at start, one forward pass per request, no batching, no
limits, no usage records. ``bench/request_path.py`` runs it beside sealserve, on the same model,
so the ratio says what sealserve's graph costs (or gains) against the naive server it replaces.

    python -m bench.baseline_server --model-dir ai-models/<classifier> --port 8100
    (API keys: BASELINE_API_KEYS, comma-separated)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Header, HTTPException

from lib.models.classification import classify, load_classifier
from lib.models.device import detect_device
from lib.models.imaging import decode_image
from lib.schemas import ClassifyRequest, ClassifyResponse

MAX_PIXELS = 4096 * 4096


def create_app(model_dir: Path, api_keys: set[str]) -> FastAPI:
    app = FastAPI(title="baseline classifier")
    classifier = load_classifier(model_dir, detect_device())

    @app.post("/v1/classify", response_model=ClassifyResponse)
    def classify_image(body: ClassifyRequest, authorization: str = Header("")) -> ClassifyResponse:
        if authorization.removeprefix("Bearer ") not in api_keys:
            raise HTTPException(status_code=401, detail="invalid API key")
        image = decode_image(body.image, max_pixels=MAX_PIXELS)
        predictions = classify(classifier, [image], [body.top_k])[0]
        return ClassifyResponse(predictions=predictions, model=model_dir.name)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    keys = {k for k in os.environ.get("BASELINE_API_KEYS", "").split(",") if k}
    uvicorn.run(create_app(args.model_dir, keys), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
