"""``sealserve serve``: start a local Ray and the application from a Serve config, in the foreground.

It resolves the app's paths to absolute ones (replicas may run in another working directory),
makes sure the development secrets exist, hands the config to Ray Serve's own ``serve run`` (so
the config means exactly what it means to ``serve deploy``), waits until ``/health`` says ready,
and prints the URL, the development API key and a ready-to-paste ``curl`` for each endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
import yaml

from lib.errors import ConfigurationError
from lib.preflight import preflight
from lib.settings import DEV_API_KEY_FILE, AppSettings

BUILD_APP = "deployments.app:build_app"
# Serve's own `serve run`, on a local Ray without the dashboard unless --dashboard is given.
LOCAL_SERVE = "deployments.local_serve"
# No hub downloads and no usage reporting: model sources are configuration, and the machine
# running this may be offline.
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray Serve's high-throughput mode (Ray's own documented switch): replicas talk over gRPC, the
# ingress replica serves HTTP itself, user code and the router share the replica's event loop.
# Measured with bench/request_path.py on 2 cores (/v1/classify, 32 clients): 105 req/s without
# it, 129 req/s with it behind Serve's Python proxy, 188 req/s with HAProxy in front.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY = "haproxy"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_dir() -> Path:
    """A private (0700) directory for HAProxy's files, with a short path: Ray puts the admin socket
    two levels below it (a 56-character session directory, then ``admin.sock``), and a Unix socket
    path may not exceed 97 characters. The caller removes it when the service stops."""
    return Path(tempfile.mkdtemp(prefix="sealserve-hp-"))


def serve_env(environ: Mapping[str, str], haproxy: str | None, private: Path | None) -> dict[str, str]:
    """The environment of ``serve run`` (and so of every Ray process it starts).

    With an ``haproxy`` binary, Ray runs HAProxy as the HTTP front (``RAY_SERVE_ENABLE_HA_PROXY``)
    and keeps its configuration and admin socket in ``private`` (mode 0700: the socket Ray creates
    is world-writable, the directory keeps other users out). Without one, Serve's own proxy fronts
    the ingress. Variables already set in ``environ`` win.
    """
    env = {**QUIET_ENV, **THROUGHPUT_ENV}
    if haproxy is not None and private is not None:
        env.update(
            {
                "RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_HAPROXY_BINARY_PATH": haproxy,
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(private / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(private / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(private),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(private / "server-state"),
                # HAProxy's stats page and Prometheus endpoint listen on every interface (Ray
                # does not make that configurable): free ports, so that two instances on one
                # machine (a bench beside a dev server) do not collide; docs/architecture.md
                # says to firewall them like Ray's own ports.
                "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                # A stopping ingress replica stays reachable this long so that load balancers
                # deregister it (Ray's default: 30 s, which every stop of the service waited
                # out). Here HAProxy is Serve's own, reconfigured by Serve within a second, and
                # it retries a refused connection on another replica.
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
                # Serve's own proxy stays on the head node as HAProxy's fallback (scale from zero).
                "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
                "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
            }
        )
    return {**env, **environ}


def stop_processes_naming(directory: Path, grace_s: float = 5.0) -> list[int]:
    """Stop the processes (other than this one) whose command line names ``directory``.

    ``directory`` is private to one run of the service, so this finds that run's processes and
    no other's; SIGTERM first, SIGKILL after ``grace_s``. Returns the pids found.
    """
    marker = os.fsencode(directory)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.1)
    return pids


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="start a local Ray and sealserve in the foreground",
        description=__doc__,
    )
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    parser.add_argument("--host", help="HTTP host (default: the config's http_options.host)")
    parser.add_argument(
        "--port", type=int, default=None, help="HTTP port (default: $PORT, else the config's)"
    )
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for ready")
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="also start Ray's dashboard (off by default: it holds ~1.2 GiB on a small machine)",
    )
    parser.add_argument(
        "--logs",
        action="store_true",
        help="stream every replica's log to this console (off by default: Ray's log monitor, ~80 MiB)",
    )
    parser.set_defaults(func=run_serve)


def prepare_config(
    config: dict[str, Any], host: str | None, port: int | None
) -> tuple[dict[str, Any], AppSettings]:
    """The config to run: our app's args made absolute, and HTTP host/port overridden."""
    apps = [a for a in config.get("applications", []) if a.get("import_path") == BUILD_APP]
    if not apps:
        raise ConfigurationError(f"the config has no application with import_path {BUILD_APP}")
    app = apps[0]
    settings = AppSettings.from_args(app.get("args"))
    app["args"] = {
        **(app.get("args") or {}),
        "state_dir": str(settings.state_path.absolute()),
        "model_dirs": [str(Path(d).absolute()) for d in settings.model_dirs],
    }
    http = dict(config.get("http_options") or {})
    http["host"] = host or http.get("host", "127.0.0.1")
    http["port"] = port or int(http.get("port", 8000))
    config["http_options"] = http
    return config, AppSettings.from_args(app["args"])


def run_serve(args: argparse.Namespace) -> int:
    config = yaml.safe_load(args.config.read_text())
    port = args.port or (int(os.environ["PORT"]) if os.environ.get("PORT") else None)
    config, settings = prepare_config(config, args.host, port)
    preflight(settings)  # refuses bad secrets and missing credentials; creates the dev key in development
    run_config = settings.state_path / "serve_config.run.yaml"
    run_config.parent.mkdir(parents=True, exist_ok=True)
    run_config.write_text(yaml.safe_dump(config, sort_keys=False))

    http = config["http_options"]
    wildcard = http["host"] in ("0.0.0.0", "::")  # noqa: S104 - detecting it, not binding
    url = f"http://{'127.0.0.1' if wildcard else http['host']}:{http['port']}"
    haproxy = shutil.which(HAPROXY)
    private = haproxy_dir() if haproxy else None
    env = serve_env(os.environ, haproxy, private)
    front = "HAProxy" if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Serve's HTTP proxy"
    print(f"starting Ray Serve with {args.config} on {url} ({front} in front) ...", flush=True)
    command = [sys.executable, "-m", LOCAL_SERVE, str(run_config), "--url", url,
               "--ready-timeout", str(args.ready_timeout)]
    if private is not None:
        command += ["--remove-on-exit", str(private)]
    command += [flag for flag, wanted in (("--dashboard", args.dashboard), ("--logs", args.logs)) if wanted]
    # This process becomes the driver: one process to signal (Ctrl-C or a process manager's
    # SIGTERM stop it gracefully) and ~80 MiB less than a CLI waiting on a child.
    os.execve(sys.executable, command, env)  # noqa: S606 - our own interpreter and module
    return 0  # not reached


def announce_when_ready(url: str, run_config: Path, timeout: float) -> bool:
    """Wait until ``url`` says ready, then print the banner (run by the driver, on a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=5).json().get("ready"):
                print(banner(url, run_settings(run_config)), flush=True)
                return True
        except (requests.RequestException, ValueError):
            pass
        time.sleep(1.0)
    print(f"sealserve is not ready after {timeout:.0f}s; see the logs", file=sys.stderr, flush=True)
    return False


def run_settings(run_config: Path) -> AppSettings:
    """The settings of the application in a config written by ``prepare_config``."""
    config = yaml.safe_load(run_config.read_text())
    app = next(a for a in config["applications"] if a.get("import_path") == BUILD_APP)
    return AppSettings.from_args(app.get("args"))


def banner(url: str, settings: AppSettings) -> str:
    key_file = settings.state_path / DEV_API_KEY_FILE
    if settings.environment == "development" and key_file.exists():
        key = key_file.read_text().strip()
        key_line = f"development API key (kept in {key_file}): {key}"
    else:
        key = "$API_KEY"
        key_line = "use one of the keys in API_KEYS as $API_KEY"
    models = _models(url, key)
    sd = next((m["id"] for m in models if m.get("kind") == "text-to-image"), "<text-to-image model id>")
    auth = f"-H {shlex.quote('Authorization: Bearer ' + key)}"
    json_header = "-H 'Content-Type: application/json'"
    infer = {"id": "demo-1", "model_id": sd, "prompt": "a lighthouse at dusk, oil painting",
             "num_inference_steps": 4, "width": 256, "height": 256, "seed": 42, "num_images": 1}
    classify = {"image": SAMPLE_PNG, "top_k": 3}
    return "\n".join([
        "",
        f"sealserve is ready at {url}  (OpenAPI docs: {url}/docs)",
        key_line,
        "",
        f"curl -s {url}/health",
        f"curl -s {auth} {url}/v1/models",
        f"curl -s {auth} {url}/v1/models/{sd}",
        f"curl -s {auth} {json_header} -d {shlex.quote(json.dumps(infer))} {url}/v1/infer",
        f"curl -s {auth} {json_header} -d {shlex.quote(json.dumps(classify))} {url}/v1/classify",
        "",
        "Ctrl-C stops the service.",
    ])


def _models(url: str, key: str) -> list[dict[str, Any]]:
    try:
        response = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        return list(response.json().get("models", [])) if response.ok else []
    except (requests.RequestException, ValueError):
        return []


# A 16x16 solid-colour PNG for the banner's classify example, as PIL writes it: a literal, so that
# the driver process that prints the banner does not load PIL for it.
SAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGUlEQVR4nGOUqzjBQApgIkn1qIZRDUNKAwBgxgF+DAqMFgAAAABJRU5ErkJggg=="
)
