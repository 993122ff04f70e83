"""sealserve serve's environment for Ray: high-throughput mode, HAProxy kept private and collision-free."""

from __future__ import annotations

import stat
from pathlib import Path

from lib.cli.serve import haproxy_dir, serve_env

PORT_VARIABLES = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def test_without_haproxy_serve_runs_its_throughput_mode_behind_its_own_proxy() -> None:
    env = serve_env({}, haproxy=None, private=None)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in env


def test_haproxy_files_live_in_a_private_directory_and_its_ports_are_free() -> None:
    private = haproxy_dir()
    try:
        env = serve_env({}, haproxy="/usr/sbin/haproxy", private=private)
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        # Ray adds a 56-character directory and "/admin.sock"; a Unix socket path takes 97 at most.
        assert len(str(private)) + 1 + 56 + len("/admin.sock") <= 97
    finally:
        private.rmdir()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # A stop must not wait out Ray's 30 s deregistration window for external load balancers.
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 5
    for name in ("CONFIG_FILE_LOC", "SOCKET_PATH", "SERVER_STATE_BASE", "SERVER_STATE_FILE"):
        assert Path(env[f"RAY_SERVE_HAPROXY_{name}"]).is_relative_to(private)
    ports = [int(env[name]) for name in PORT_VARIABLES]
    assert len(set(ports)) == len(ports) and all(port > 1024 for port in ports)
    # Ray's fixed defaults would collide between two instances on one machine.
    assert not {8404, 9101, 8500, 9500} & set(ports)


def test_the_callers_environment_wins() -> None:
    env = serve_env({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "PATH": "/bin"}, haproxy=None, private=None)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and env["PATH"] == "/bin"


def test_the_banners_sample_image_is_a_png_the_classifier_accepts() -> None:
    import base64
    import io

    from PIL import Image

    from lib.cli.serve import SAMPLE_PNG

    image = Image.open(io.BytesIO(base64.b64decode(SAMPLE_PNG)))
    assert image.format == "PNG" and image.size == (16, 16)


def test_a_stop_ends_the_processes_naming_the_private_directory_and_no_other(tmp_path: Path) -> None:
    import subprocess
    import sys

    from lib.cli.serve import stop_processes_naming

    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
            "time.sleep(60)")
    # Ours ignores SIGTERM, as a stuck process would: the SIGKILL after the grace must end it.
    ours = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "haproxy.cfg")],
                            stdout=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path.parent / "elsewhere")],
                             stdout=subprocess.PIPE)
    for proc in (ours, other):
        assert proc.stdout is not None and proc.stdout.readline()  # its handler is in place
    try:
        assert stop_processes_naming(tmp_path, grace_s=1.0) == [ours.pid]
        assert ours.wait(timeout=5) == -9
        assert other.poll() is None
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
