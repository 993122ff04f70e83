"""CatalogView (lib/models/catalog_view.py): resolve from a snapshot; bounded refreshes."""

from __future__ import annotations

import asyncio

import pytest

from lib.errors import ModelNotFoundError, WrongModelKindError
from lib.models.catalog_view import CatalogView
from lib.schemas import ModelInfo
from tests.fake_clock import FakeClock


def info(model_id: str, name: str, kind: str) -> ModelInfo:
    return ModelInfo(id=model_id, name=name, size=1, path="/m", extension="", kind=kind, status="available")


class Source:
    def __init__(self) -> None:
        self.entries = [info("a" * 64, "sd", "text-to-image"), info("c" * 64, "cls", "image-classification")]
        self.calls = 0

    async def __call__(self) -> list[ModelInfo]:
        self.calls += 1
        return list(self.entries)


def test_resolves_by_id_name_and_default_with_one_fetch() -> None:
    source, clock = Source(), FakeClock(100.0)
    view = CatalogView(source, clock=clock)

    async def run() -> list[str]:
        return [
            (await view.resolve("sd", "text-to-image")).id,
            (await view.resolve("c" * 64, "image-classification")).id,
            (await view.resolve(None, "image-classification")).id,
        ]

    assert asyncio.run(run()) == ["a" * 64, "c" * 64, "c" * 64]
    assert source.calls == 1


def test_unknown_models_refresh_at_most_once_per_interval() -> None:
    source, clock = Source(), FakeClock(100.0)
    view = CatalogView(source, clock=clock, min_refresh_interval_s=1.0)

    async def unknown(n: int) -> None:
        for _ in range(n):
            with pytest.raises(ModelNotFoundError):
                await view.resolve("nope", "text-to-image")

    asyncio.run(unknown(50))
    assert source.calls == 1  # the first fetch; a flood of unknown ids costs nothing more
    clock.now += 1.5
    asyncio.run(unknown(50))
    assert source.calls == 2
    source.entries.append(info("d" * 64, "nope", "text-to-image"))
    clock.now += 1.5
    assert asyncio.run(view.resolve("nope", "text-to-image")).id == "d" * 64  # a new model is found


def test_a_wrong_kind_is_refused_from_the_snapshot() -> None:
    view = CatalogView(Source(), clock=FakeClock(100.0))
    with pytest.raises(WrongModelKindError):
        asyncio.run(view.resolve("sd", "image-classification"))


def test_a_stale_snapshot_is_refreshed_in_the_background() -> None:
    source, clock = Source(), FakeClock(100.0)
    view = CatalogView(source, clock=clock, max_age_s=2.0)

    async def run() -> None:
        await view.resolve("sd", "text-to-image")
        clock.now += 3.0
        await view.resolve("sd", "text-to-image")  # answered from the old snapshot
        await asyncio.sleep(0.01)  # the background refresh runs

    asyncio.run(run())
    assert source.calls == 2
