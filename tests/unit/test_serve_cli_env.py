"""sealserve serve's environment for Ray: high-throughput mode, HAProxy kept private and collision-free."""

from __future__ import annotations

import stat
from pathlib import Path

from lib.cli.serve import serve_env

PORT_VARIABLES = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def test_without_haproxy_serve_runs_its_throughput_mode_behind_its_own_proxy(tmp_path: Path) -> None:
    env = serve_env(tmp_path, {}, haproxy=None)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in env
    assert not (tmp_path / "haproxy").exists()


def test_haproxy_files_live_in_a_private_directory_and_its_ports_are_free(tmp_path: Path) -> None:
    env = serve_env(tmp_path, {}, haproxy="/usr/sbin/haproxy")
    private = tmp_path / "haproxy"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    for name in ("CONFIG_FILE_LOC", "SOCKET_PATH", "SERVER_STATE_BASE", "SERVER_STATE_FILE"):
        assert Path(env[f"RAY_SERVE_HAPROXY_{name}"]).is_relative_to(private)
    ports = [int(env[name]) for name in PORT_VARIABLES]
    assert len(set(ports)) == len(ports) and all(port > 1024 for port in ports)
    # Ray's fixed defaults would collide between two instances on one machine.
    assert not {8404, 9101, 8500, 9500} & set(ports)


def test_the_callers_environment_wins(tmp_path: Path) -> None:
    env = serve_env(tmp_path, {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "PATH": "/bin"}, haproxy=None)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and env["PATH"] == "/bin"
