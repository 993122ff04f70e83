"""``make fuzz``: schemathesis against a live ``sealserve serve``, for a bounded time.

The service is started the way ``make serve`` starts it (``sealserve serve`` with
``serve_config.yaml``, the demo models in ``ai-models/``), on a free loopback port, with its own
state directory, and a bootstrap API key made for the run: every scope, and a rate limit high
enough that the fuzzer meets no 429. Schemathesis then runs its phases against the service's
own OpenAPI document until ``--max-time`` is spent, with these checks on every response:

- ``not_a_server_error``: no 5xx, whatever the input;
- ``response_schema_conformance``, ``status_code_conformance``, ``content_type_conformance``:
  every answer is what the OpenAPI document says;
- ``error_body_shape`` (``devservers/fuzz_checks.py``): every 4xx/5xx is the documented
  ``{"error": {"code", "message", "request_id"}}`` and nothing else.

Half the inference requests are pointed at the real models (with small generation parameters,
so a CPU answers in seconds), so the fuzzer reaches the models and not only the 404 of an
unknown model id.

The service is stopped by its pid (SIGINT, as Ctrl-C) whatever happens. The exit status is
schemathesis's: 0 when every check passed.

    python -m devservers.fuzz --max-time 120 [--port 0] [-- extra schemathesis options]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from devservers.resource_api import REPO_ROOT, SEALSERVE_CLI, free_port

READY_TIMEOUT_S = 600.0
CHECKS = (
    "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,"
    "error_body_shape"
)
HOOKS = "devservers.fuzz_checks"
# The rate limit of the run's key: far above what one fuzzer sends in the time it runs.
FUZZ_RATE_LIMIT = "100000/minute"


def fuzz_config(base: Path, state_dir: Path, models_dir: Path, port: int) -> dict[str, object]:
    """``serve_config.yaml`` with this run's port, state directory, models and high key limit."""
    config = yaml.safe_load(base.read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"] = {
        **(app.get("args") or {}),
        "environment": "development",
        "state_dir": str(state_dir),
        "model_dirs": [str(models_dir)],
        # Generation of the largest images the schema allows takes long on a CPU: the fuzzer
        # waits for it rather than count a timeout as the service's failure.
        "request_timeout_s": 900,
        "accounts": {"bootstrap_rate_limit": FUZZ_RATE_LIMIT},
    }
    return config


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"sealserve serve exited ({process.returncode}) before it was ready")
        try:
            if requests.get(f"{url}/health", timeout=5).json().get("ready"):
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(2.0)
    raise SystemExit(f"sealserve was not ready after {timeout:.0f}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for ``sealserve serve`` (it stops Serve and its local Ray), then a kill if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-time", type=int, default=120, help="seconds of fuzzing (default 120)")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "serve_config.yaml")
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "ai-models")
    parser.add_argument("schemathesis_args", nargs="*", help="extra options for schemathesis run")
    args = parser.parse_args(argv)

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    key = "ss_fuzz_" + secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="sealserve-fuzz-") as tmp:
        work = Path(tmp)
        config_path = work / "serve_config.yaml"
        config_path.write_text(
            yaml.safe_dump(fuzz_config(args.config, work / "state", args.models.resolve(), port))
        )
        env = {**os.environ, "API_KEYS": key, "SECRET_KEY": secrets.token_urlsafe(32)}
        env.pop("RAY_ADDRESS", None)  # a local Ray of its own, like make serve
        subprocess.run([*SEALSERVE_CLI, "demo-models", "--dir", str(args.models), "--if-missing"],
                       cwd=REPO_ROOT, env=env, check=True)
        print(f"starting sealserve on {url} for fuzzing ...", flush=True)
        service = subprocess.Popen(
            [*SEALSERVE_CLI, "serve", "--config", str(config_path), "--port", str(port)],
            cwd=REPO_ROOT, env=env,
        )
        try:
            wait_ready(url, service, READY_TIMEOUT_S)
            listed = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            models: dict[str, list[str]] = {}
            for model in listed.json()["models"]:
                if model["status"] == "available" and model["kind"]:
                    models.setdefault(model["kind"], []).append(model["id"])
            command = [
                str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json",
                "--header", f"Authorization: Bearer {key}",
                "--checks", CHECKS,
                "--max-time", str(args.max_time),
                "--workers", "2",
                "--request-timeout", "900",
                "--suppress-health-check", "too_slow,filter_too_much",
                *args.schemathesis_args,
            ]
            print("running", " ".join(c if key not in c else "Authorization: Bearer ***" for c in command),
                  flush=True)
            fuzz_env = {**env, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": str(REPO_ROOT),
                        "FUZZ_MODELS": json.dumps(models)}
            return subprocess.run(command, cwd=REPO_ROOT, env=fuzz_env, check=False).returncode
        finally:
            stop(service)


if __name__ == "__main__":
    sys.exit(main())
