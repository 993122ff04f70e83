"""Session-wide fixtures: the demo models are built once and copied where a test needs them."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lib.models.demo import build_demo_models

    target = tmp_path_factory.mktemp("demo-models")
    build_demo_models(target)
    return target
