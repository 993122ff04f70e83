"""``sealserve serve``: the metrics port it gives Ray and prints, and LOG_FORMAT."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lib.cli import serve as serve_cli
from lib.cli.serve import DEFAULT_METRICS_PORT, apply_log_format, attached_to_cluster, banner, metrics_port
from lib.errors import ConfigurationError
from lib.settings import AppSettings


@pytest.fixture
def all_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_cli, "port_is_free", lambda _port: True)


def test_metrics_port_comes_from_the_flag_then_metrics_port_then_the_default(all_free: None) -> None:
    assert metrics_port(9100, {"METRICS_PORT": "9200"}) == 9100
    assert metrics_port(None, {"METRICS_PORT": "9200"}) == 9200
    assert metrics_port(None, {}) == DEFAULT_METRICS_PORT == 8080
    with pytest.raises(ConfigurationError):
        metrics_port(None, {"METRICS_PORT": "70000"})


@pytest.fixture
def taken() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))  # noqa: S104 - as the agent would
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_taken_port_asked_for_is_refused_clearly(taken: int) -> None:
    # Ray itself would not start: its agent fails and the node times out after half a minute.
    with pytest.raises(ConfigurationError, match=f"metrics port {taken} is in use"):
        metrics_port(None, {"METRICS_PORT": str(taken)})
    with pytest.raises(ConfigurationError):
        metrics_port(taken, {})


def test_a_taken_default_gives_way_to_a_free_port(taken: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_cli, "DEFAULT_METRICS_PORT", taken)
    chosen = metrics_port(None, {})
    assert chosen != taken and serve_cli.port_is_free(chosen)


def _config() -> dict[str, object]:
    return {"applications": [{"name": "sealserve", "logging_config": {"log_level": "DEBUG"}}, {"name": "b"}]}


def test_text_logs_leave_the_config_alone() -> None:
    config = _config()
    assert apply_log_format(config, {}, Path("/logs")) is False
    assert config == _config()


def test_json_logs_set_serves_encoding_on_every_application(tmp_path: Path) -> None:
    config = _config()
    assert apply_log_format(config, {"LOG_FORMAT": "JSON"}, tmp_path) is True
    apps = config["applications"]
    assert isinstance(apps, list)
    assert apps[0]["logging_config"] == {"log_level": "DEBUG", "encoding": "JSON", "logs_dir": str(tmp_path)}
    assert apps[1]["logging_config"] == {"encoding": "JSON", "logs_dir": str(tmp_path)}


def test_an_unknown_log_format_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="LOG_FORMAT"):
        apply_log_format(_config(), {"LOG_FORMAT": "xml"}, Path("/logs"))


def test_the_banner_prints_the_scrape_url(tmp_path: Path) -> None:
    settings = AppSettings(environment="production", state_dir=str(tmp_path))
    text = banner("http://127.0.0.1:1", settings, "http://127.0.0.1:8080/metrics")
    assert "metrics (Prometheus scrape URL): http://127.0.0.1:8080/metrics" in text


def test_only_a_real_cluster_address_skips_the_local_metrics_port() -> None:
    assert not attached_to_cluster({})
    assert not attached_to_cluster({"RAY_ADDRESS": "local"})  # bench/request_path.py sets it
    assert not attached_to_cluster({"RAY_ADDRESS": ""})
    assert attached_to_cluster({"RAY_ADDRESS": "10.0.0.5:6379"})
