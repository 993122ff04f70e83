"""SealedCatalog: catalog entries of the configured sealed models, and every failure as a 503.

The resource API and S3 are the fakes of ``test_sealed_cache`` (real sealed bytes, real key wrap);
S3 comes in where the catalog builds its ``CdnClient``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from lib.errors import (
    AuthenticationError,
    ConfigurationError,
    ModelNotFoundError,
    ModelUnavailableError,
    UpstreamError,
)
from lib.sealed import cdn as sealed_cdn
from lib.sealed.catalog import LISTING, SealedCatalog, resource_client_from_env
from lib.sealed.keywrap import b64encode
from lib.sealed.node_cache import MARKER
from lib.sealed.resource_client import ResourceClient
from lib.sealed.settings import SealedSettings
from lib.sealed.signing import SigningKey, cdn_message, dek_commitment, sign_manifest
from lib.sealed.transfer import MiB
from lib.sealed.wire import CdnConfig
from tests.unit.test_sealed_cache import (
    FINGERPRINT,
    FOLDER,
    HANG_GUARD_S,
    FakeCdn,
    FakeStore,
    make_tar,
    payload,
)

OWNER = "test-loader"


@pytest.fixture
def store() -> FakeStore:
    store = FakeStore()
    store.publish("classifier.safetensors", payload(20_000, seed=1), kind="image-classification")
    store.publish(
        "tiny-sd", make_tar({"unet/w.safetensors": payload(9000, seed=2)}), kind="text-to-image",
        is_directory=True,
    )
    store.publish("unconfigured.bin", payload(500, seed=3))
    store.publish("odd-kind.bin", payload(700, seed=4), kind="audio")
    return store


@pytest.fixture
def cdn_built(monkeypatch: pytest.MonkeyPatch, store: FakeStore) -> list[dict[str, Any]]:
    """Replace S3 where the catalog builds its client; records the options it was built with."""
    built: list[dict[str, Any]] = []

    def fake_cdn_client(config: CdnConfig, **options: Any) -> FakeCdn:
        built.append({"config": config, **options})
        return FakeCdn(store)

    # The catalog imports CdnClient on its first fetch, from lib.sealed.cdn.
    monkeypatch.setattr(sealed_cdn, "CdnClient", fake_cdn_client)
    return built


def make_settings(tmp_path: Path, models: list[Any], **extra: Any) -> SealedSettings:
    return SealedSettings(
        resource_api_url="http://127.0.0.1:9",
        folder=FOLDER,
        models=models,
        cache_dir=str(tmp_path / "shm"),
        **{"node_key_file": str(tmp_path / "node" / "node.key"), **extra},
    )


@pytest.fixture
def catalog(tmp_path: Path, store: FakeStore, cdn_built: list[dict[str, Any]]) -> SealedCatalog:
    settings = make_settings(
        tmp_path, ["classifier.safetensors", "tiny-sd", "odd-kind.bin"], part_size_mb=2, download_workers=3
    )
    return SealedCatalog(settings, owner=OWNER, resources=store, fingerprint=FINGERPRINT)


def model_id(store: FakeStore, name: str) -> str:
    return str(store.resources[(FOLDER, name)].manifest["id"])


def by_name(catalog: SealedCatalog) -> dict[str, Any]:
    return {entry.name: entry for entry in catalog.entries()}


def test_construction_lists_nothing_and_releases_no_key(catalog: SealedCatalog, store: FakeStore) -> None:
    assert catalog.entries() == []
    assert store.calls == {}


def test_refresh_lists_the_configured_models_only_as_sealed(catalog: SealedCatalog, store: FakeStore) -> None:
    catalog.refresh()

    entries = by_name(catalog)
    assert sorted(entries) == ["classifier.safetensors", "odd-kind.bin", "tiny-sd"]
    classifier = entries["classifier.safetensors"]
    assert classifier.id == model_id(store, "classifier.safetensors")
    assert classifier.source == "sealed"
    assert classifier.status == "sealed"
    assert classifier.path is None
    assert classifier.error is None
    assert classifier.size == 20_000
    assert classifier.extension == ".safetensors"
    assert classifier.kind == "image-classification"
    assert entries["tiny-sd"].extension == ""
    assert entries["tiny-sd"].kind == "text-to-image"
    assert entries["odd-kind.bin"].kind is None  # not a kind the service can serve
    # Listing releases no key and downloads nothing.
    assert store.calls["get"] == 0
    assert store.calls["download"] == 0
    assert store.calls["cdn_config"] == 0
    assert catalog.errors() == {}


def test_owns_only_listed_configured_ids(catalog: SealedCatalog, store: FakeStore) -> None:
    assert not catalog.owns(model_id(store, "classifier.safetensors"))  # not listed yet
    catalog.refresh()
    assert catalog.owns(model_id(store, "classifier.safetensors"))
    assert catalog.owns(model_id(store, "tiny-sd"))
    assert not catalog.owns(model_id(store, "unconfigured.bin"))
    assert not catalog.owns("0" * 64)


def test_ensure_fetches_once_and_the_entry_becomes_available(
    catalog: SealedCatalog, store: FakeStore, cdn_built: list[dict[str, Any]]
) -> None:
    catalog.refresh()
    classifier_id = model_id(store, "classifier.safetensors")

    info = catalog.ensure(classifier_id)

    assert info.id == classifier_id
    assert info.status == "available"
    assert info.error is None
    assert info.path is not None
    assert Path(info.path).read_bytes() == store.resources[(FOLDER, "classifier.safetensors")].plaintext
    assert Path(info.path).parent == catalog.cache.root
    assert by_name(catalog)["classifier.safetensors"].status == "available"
    assert by_name(catalog)["tiny-sd"].status == "sealed"

    again = catalog.ensure(classifier_id)
    assert again.path == info.path
    assert store.calls["get"] == 1
    assert store.calls["download"] == 1
    stats = catalog.stats()["classifier.safetensors"]
    assert (stats["fetches"], stats["cache_hits"]) == (1, 1)
    # The S3 client is built once, from the settings.
    assert len(cdn_built) == 1
    assert cdn_built[0]["part_size"] == 2 * MiB
    assert cdn_built[0]["max_workers"] == 3


def test_ensure_sends_the_first_get_from_the_listing_before_the_key_arrives(
    catalog: SealedCatalog, store: FakeStore, cdn_built: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog.refresh()
    sent = threading.Event()
    real_open = FakeCdn.open_range

    def open_and_tell(self: FakeCdn, *args: Any, **kwargs: Any) -> Any:
        stream = real_open(self, *args, **kwargs)
        sent.set()
        return stream

    monkeypatch.setattr(FakeCdn, "open_range", open_and_tell)
    # The key release answers only once the GET went out: a catalog that fetched without the
    # listed manifest as a hint would send it after the release, and this would wait in vain.
    released_after_get: list[bool] = []
    store.get_gate = lambda: released_after_get.append(sent.wait(HANG_GUARD_S))

    info = catalog.ensure(model_id(store, "classifier.safetensors"))

    assert released_after_get == [True]
    assert info.status == "available"
    assert len(store.requests) == 1 and store.requests[0][3] is True  # one plain GET, and it was used


def test_transfer_settings_reach_the_fetch_plan(tmp_path: Path, store: FakeStore) -> None:
    settings = make_settings(tmp_path, ["classifier.safetensors"], single_get_max_mb=0, part_size_mb=3,
                             download_workers=5, retry_attempts=2)
    catalog = SealedCatalog(settings, owner=OWNER, resources=store, fingerprint=FINGERPRINT)
    plan = catalog._fetcher.plan
    assert (plan.single_get_max_bytes, plan.range_bytes, plan.workers) == (0, 3 * MiB, 5)
    assert plan.retry.attempts == 2


def test_ensure_of_a_directory_model_hands_out_the_unpacked_tree(
    catalog: SealedCatalog, store: FakeStore
) -> None:
    catalog.refresh()
    info = catalog.ensure(model_id(store, "tiny-sd"))
    assert info.path is not None
    assert (Path(info.path) / "unet" / "w.safetensors").read_bytes() == payload(9000, seed=2)


def test_ensure_of_an_unknown_id_is_model_not_found(catalog: SealedCatalog, store: FakeStore) -> None:
    catalog.refresh()
    with pytest.raises(ModelNotFoundError) as caught:
        catalog.ensure(model_id(store, "unconfigured.bin"))
    assert caught.value.status_code == 404
    assert store.calls["get"] == 0


def _tamper_big(store: FakeStore) -> None:
    store.flip_big_bit("classifier.safetensors", 10)


def _reject_reader(store: FakeStore) -> None:
    store.get_error[(FOLDER, "classifier.safetensors")] = AuthenticationError(
        "resource API at http://127.0.0.1:9 rejected the credentials of reader@example.com"
    )


def _s3_down(store: FakeStore) -> None:
    store.download_error = UpstreamError("S3 GET of s3://big-parts/x failed: EndpointConnectionError")


def _resource_api_down(store: FakeStore) -> None:
    store.get_error[(FOLDER, "classifier.safetensors")] = UpstreamError(
        "resource API POST /resources/get/models failed: http://127.0.0.1:9 unreachable after 4 attempts"
    )


FAILURES = {
    "IntegrityError": _tamper_big,
    "AuthenticationError": _reject_reader,
    "UpstreamError (S3)": _s3_down,
    "UpstreamError (resource API)": _resource_api_down,
}


@pytest.mark.parametrize("failure", list(FAILURES), ids=list(FAILURES))
def test_every_fetch_failure_is_a_503_naming_its_cause_and_shows_in_the_entry(
    catalog: SealedCatalog, store: FakeStore, failure: str
) -> None:
    catalog.refresh()
    classifier_id = model_id(store, "classifier.safetensors")
    FAILURES[failure](store)
    cause = failure.split(" ")[0]

    with pytest.raises(ModelUnavailableError) as caught:
        catalog.ensure(classifier_id)

    error = caught.value
    assert error.status_code == 503  # never a 401/403 for the client: the service's own problem
    assert type(error) is ModelUnavailableError
    assert error.message.startswith(f"sealed model classifier.safetensors is unavailable: {cause}: ")
    assert error.__cause__ is None and error.__suppress_context__
    entry = by_name(catalog)["classifier.safetensors"]
    assert entry.status == "error"
    assert entry.path is None
    assert entry.error is not None and entry.error.startswith(f"{cause}: ")
    assert catalog.errors()["classifier.safetensors"] == entry.error
    assert by_name(catalog)["tiny-sd"].status == "sealed"  # the others are unaffected
    assert [p.name for p in catalog.cache.root.iterdir()] == [MARKER]  # no plaintext, no temp file


def test_a_failed_model_recovers_on_the_next_ensure(catalog: SealedCatalog, store: FakeStore) -> None:
    catalog.refresh()
    classifier_id = model_id(store, "classifier.safetensors")
    _s3_down(store)
    with pytest.raises(ModelUnavailableError):
        catalog.ensure(classifier_id)
    store.download_error = None

    info = catalog.ensure(classifier_id)

    assert info.status == "available"
    assert info.error is None
    assert catalog.errors() == {}


def test_a_pinned_id_that_differs_makes_the_model_unavailable(
    tmp_path: Path, store: FakeStore, cdn_built: list[dict[str, Any]]
) -> None:
    settings = make_settings(tmp_path, [{"name": "classifier.safetensors", "id": "a" * 64}])
    catalog = SealedCatalog(settings, owner=OWNER, resources=store, fingerprint=FINGERPRINT)
    catalog.refresh()
    with pytest.raises(ModelUnavailableError, match="IntegrityError"):
        catalog.ensure(model_id(store, "classifier.safetensors"))
    assert store.calls["download"] == 0


def test_an_unpublished_model_is_reported_until_it_is_published(
    tmp_path: Path, store: FakeStore, cdn_built: list[dict[str, Any]]
) -> None:
    settings = make_settings(tmp_path, ["classifier.safetensors", "later.bin"])
    catalog = SealedCatalog(settings, owner=OWNER, resources=store, fingerprint=FINGERPRINT)

    catalog.refresh()

    assert catalog.errors() == {"later.bin": f"sealed model {FOLDER}/later.bin is not published"}
    assert sorted(by_name(catalog)) == ["classifier.safetensors"]

    store.publish("later.bin", payload(300, seed=8))
    catalog.refresh()

    assert catalog.errors() == {}
    assert by_name(catalog)["later.bin"].status == "sealed"


def test_a_model_in_another_folder_is_listed_from_that_folder(
    tmp_path: Path, store: FakeStore, cdn_built: list[dict[str, Any]]
) -> None:
    published = store.publish("elsewhere.bin", payload(400, seed=6), folder="team-b")
    store.publish("classifier.safetensors", payload(10, seed=7), folder="team-b")  # same name, other folder
    settings = make_settings(
        tmp_path, [{"name": "elsewhere.bin", "folder": "team-b"}, "classifier.safetensors"]
    )
    catalog = SealedCatalog(settings, owner=OWNER, resources=store, fingerprint=FINGERPRINT)
    catalog.refresh()

    entries = by_name(catalog)
    assert entries["elsewhere.bin"].id == published.manifest["id"]
    assert entries["classifier.safetensors"].id == model_id(store, "classifier.safetensors")
    info = catalog.ensure(published.manifest["id"])
    assert info.path is not None and Path(info.path).read_bytes() == published.plaintext
    assert store.gets == [("team-b", "elsewhere.bin")]


def test_a_pinned_model_is_listed_and_fetchable_before_any_listing_succeeds(
    tmp_path: Path, store: FakeStore, cdn_built: list[dict[str, Any]]
) -> None:
    pinned = model_id(store, "classifier.safetensors")
    settings = make_settings(tmp_path, [{"name": "classifier.safetensors", "id": pinned}, "tiny-sd"])
    catalog = SealedCatalog(settings, owner=OWNER, resources=store, fingerprint=FINGERPRINT)
    store.list_error = UpstreamError("resource API GET /resources/models failed: unreachable")
    catalog.refresh()

    entries = by_name(catalog)
    assert sorted(entries) == ["classifier.safetensors"]  # the unpinned one has no id to show
    assert entries["classifier.safetensors"].id == pinned
    assert entries["classifier.safetensors"].status == "error"
    assert entries["classifier.safetensors"].error == (
        "cannot list sealed models: UpstreamError: resource API GET /resources/models failed: unreachable"
    )
    assert catalog.owns(pinned)

    info = catalog.ensure(pinned)

    assert info.status == "available"
    assert info.id == pinned
    assert info.size == 20_000
    assert info.extension == ".safetensors"
    assert info.path is not None and Path(info.path).read_bytes() == payload(20_000, seed=1)


def test_a_pinned_model_never_listed_reports_why(
    tmp_path: Path, store: FakeStore, cdn_built: list[dict[str, Any]]
) -> None:
    settings = make_settings(tmp_path, [{"name": "classifier.safetensors", "id": "b" * 64}])
    catalog = SealedCatalog(settings, owner=OWNER, resources=store, fingerprint=FINGERPRINT)
    (entry,) = catalog.entries()
    assert (entry.id, entry.status, entry.error) == ("b" * 64, "error", "sealed model is not listed yet")


def test_a_listing_failure_keeps_the_last_manifests_and_is_reported(
    catalog: SealedCatalog, store: FakeStore
) -> None:
    catalog.refresh()
    fetched = catalog.ensure(model_id(store, "classifier.safetensors"))
    before = {entry.name: entry.id for entry in catalog.entries()}
    store.list_error = UpstreamError("resource API GET /resources/models failed: HTTP 502 after 4 attempts")
    message = (
        "cannot list sealed models: UpstreamError: "
        "resource API GET /resources/models failed: HTTP 502 after 4 attempts"
    )

    catalog.refresh()

    assert catalog.errors() == {LISTING: message}
    entries = by_name(catalog)
    assert {name: entry.id for name, entry in entries.items()} == before
    assert catalog.owns(model_id(store, "tiny-sd"))
    # A model already on the node stays available; the others say why they cannot be checked.
    assert entries["classifier.safetensors"].status == "available"
    assert entries["classifier.safetensors"].path == fetched.path
    assert entries["tiny-sd"].status == "error"
    assert entries["tiny-sd"].error == message
    # ... yet stay usable from the last good listing while the listing is down.
    info = catalog.ensure(model_id(store, "tiny-sd"))
    assert info.status == "available"

    store.list_error = None
    catalog.refresh()
    assert catalog.errors() == {}
    assert {entry.status for entry in catalog.entries()} == {"available", "sealed"}


def test_a_listing_failure_before_any_success_leaves_an_empty_catalog(
    catalog: SealedCatalog, store: FakeStore
) -> None:
    store.list_error = AuthenticationError("resource API at http://127.0.0.1:9 rejected the credentials")
    catalog.refresh()
    assert catalog.entries() == []
    assert catalog.errors()[LISTING].startswith("cannot list sealed models: AuthenticationError: ")


def test_close_removes_the_process_cache_dir(
    catalog: SealedCatalog, store: FakeStore, tmp_path: Path
) -> None:
    catalog.refresh()
    info = catalog.ensure(model_id(store, "classifier.safetensors"))
    root = catalog.cache.root
    assert root.parent == tmp_path / "shm" and root.name.startswith(f"{OWNER}-{os.getpid()}-")
    assert info.path is not None and Path(info.path).exists()

    catalog.close()

    assert not root.exists()
    assert (tmp_path / "shm").is_dir()  # the shared base stays, only this process's dir goes


def test_catalog_refuses_a_cache_base_owned_by_another_user(
    tmp_path: Path, store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shm").mkdir()
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)
    with pytest.raises(ConfigurationError, match="another user"):
        SealedCatalog(
            make_settings(tmp_path, ["classifier.safetensors"]),
            owner=OWNER, resources=store, fingerprint=FINGERPRINT,
        )


def test_catalog_refuses_a_symlinked_cache_base(tmp_path: Path, store: FakeStore) -> None:
    # A local user plants the cache base as a link to a directory of the service user on disk:
    # the node must neither chmod it, nor sweep it, nor put plaintext there.
    target = tmp_path / "persistent"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    (tmp_path / "shm").symlink_to(target)
    with pytest.raises(ConfigurationError, match="symbolic link"):
        SealedCatalog(
            make_settings(tmp_path, ["classifier.safetensors"]),
            owner=OWNER, resources=store, fingerprint=FINGERPRINT,
        )
    assert target.stat().st_mode & 0o777 == 0o755
    assert list(target.iterdir()) == []


def test_ensure_error_message_carries_no_key_material(catalog: SealedCatalog, store: FakeStore) -> None:
    published = store.resources[(FOLDER, "classifier.safetensors")]
    # The resource API lists and hands out a manifest whose id is not the digest of the bytes.
    store.tamper(
        "classifier.safetensors", manifest={**published.manifest, "id": hashlib.sha256(b"x").hexdigest()}
    )
    catalog.refresh()
    with pytest.raises(ModelUnavailableError) as caught:
        catalog.ensure(hashlib.sha256(b"x").hexdigest())
    assert caught.value.message == (
        "sealed model classifier.safetensors is unavailable: "
        "IntegrityError: plaintext of sealed model classifier.safetensors does not match its id"
    )
    assert published.dek.hex() not in caught.value.message


# -- reader credentials ----------------------------------------------------------------------------


def test_resource_client_from_env_needs_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESOURCE_API_EMAIL", "reader@example.com")
    monkeypatch.delenv("RESOURCE_API_PASSWORD", raising=False)
    with pytest.raises(ConfigurationError, match="RESOURCE_API_PASSWORD"):
        resource_client_from_env(make_settings(tmp_path, ["m"]))


def test_resource_client_from_env_needs_an_email(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESOURCE_API_EMAIL", raising=False)
    monkeypatch.setenv("RESOURCE_API_PASSWORD", "reader-password")
    with pytest.raises(ConfigurationError, match="RESOURCE_API_EMAIL"):
        resource_client_from_env(make_settings(tmp_path, ["m"]))


def test_resource_client_from_env_prefers_the_settings_email(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESOURCE_API_EMAIL", "env@example.com")
    monkeypatch.setenv("RESOURCE_API_PASSWORD", "reader-password")
    client = resource_client_from_env(make_settings(tmp_path, ["m"], email="settings@example.com"))
    try:
        assert isinstance(client, ResourceClient)
        assert client.email == "settings@example.com"
        assert "reader-password" not in repr(client)
    finally:
        client.close()


def test_catalog_without_a_source_or_password_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESOURCE_API_EMAIL", "reader@example.com")
    monkeypatch.delenv("RESOURCE_API_PASSWORD", raising=False)
    with pytest.raises(ConfigurationError):
        SealedCatalog(make_settings(tmp_path, ["m"]), owner=OWNER, fingerprint=FINGERPRINT)
    assert not (tmp_path / "shm").exists()  # refused before creating any cache directory


def test_the_node_key_is_made_0600_on_first_start_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESOURCE_API_EMAIL", "reader@example.com")
    monkeypatch.setenv("RESOURCE_API_PASSWORD", "reader-password")
    settings = make_settings(tmp_path, ["m"])
    resource_client_from_env(settings).close()
    key_file = Path(settings.node_key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    first = key_file.read_bytes()
    resource_client_from_env(settings).close()
    assert key_file.read_bytes() == first


# -- trusted publishers ----------------------------------------------------------------------------


def _sign(store: FakeStore, name: str, signer: SigningKey) -> None:
    published = store.resources[(FOLDER, name)]
    commitment = dek_commitment(published.dek, published.manifest["id"])
    manifest = {**published.manifest, "dek_commitment": commitment}
    store.tamper(name, manifest={**manifest, "signature": sign_manifest(signer, FOLDER, manifest)})


def test_a_trusting_catalog_serves_only_what_a_trusted_publisher_signed(
    tmp_path: Path, store: FakeStore, cdn_built: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    signer, stranger = SigningKey.generate(), SigningKey.generate()
    _sign(store, "classifier.safetensors", signer)
    _sign(store, "tiny-sd", signer)
    _sign(store, "odd-kind.bin", stranger)  # a forged manifest: signed, but not by a trusted key
    config = CdnConfig(bucket="big-parts", access_key_id="reader",
                       secret_access_key="not-a-secret")  # type: ignore[arg-type]
    fields = json.loads(config.plaintext_json())
    signed = CdnConfig.model_validate({**fields, "signature": {
        "key": signer.public_b64, "value": b64encode(signer.sign(cdn_message(fields)))}})
    monkeypatch.setattr(store, "cdn_config", lambda keypair, fingerprint: signed)
    settings = make_settings(tmp_path, ["classifier.safetensors", "tiny-sd", "odd-kind.bin"],
                             trusted_publishers=[signer.public_b64])
    catalog = SealedCatalog(settings, owner=OWNER, resources=store, fingerprint=FINGERPRINT)
    catalog.refresh()
    assert sorted(by_name(catalog)) == ["classifier.safetensors", "tiny-sd"]
    assert "not signed by a trusted publisher" in catalog.errors()["odd-kind.bin"]
    info = catalog.ensure(model_id(store, "classifier.safetensors"))
    assert info.path is not None and Path(info.path).read_bytes() == payload(20_000, seed=1)
    # The resource API swaps in a data key of its own (and a small part sealed with it).
    store.tamper("tiny-sd", dek=os.urandom(32))
    with pytest.raises(ModelUnavailableError, match="not the one the publisher signed"):
        catalog.ensure(model_id(store, "tiny-sd"))
    assert store.calls["download"] <= 2, "nothing fetched with the swapped key"


def test_an_unsigned_storage_config_is_refused_by_a_trusting_catalog(
    tmp_path: Path, store: FakeStore, cdn_built: list[dict[str, Any]]
) -> None:
    signer = SigningKey.generate()
    _sign(store, "classifier.safetensors", signer)
    settings = make_settings(tmp_path, ["classifier.safetensors"], trusted_publishers=[signer.public_b64])
    catalog = SealedCatalog(settings, owner=OWNER, resources=store, fingerprint=FINGERPRINT)
    catalog.refresh()
    with pytest.raises(ModelUnavailableError, match="storage config is not signed"):
        catalog.ensure(model_id(store, "classifier.safetensors"))
    assert cdn_built == [], "no S3 client was built from it"


def test_plain_http_storage_is_refused_unless_allowed(
    tmp_path: Path, store: FakeStore, cdn_built: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = CdnConfig(endpoint_url="http://s3.example.com", bucket="b", access_key_id="r",
                       secret_access_key="s")  # type: ignore[arg-type]
    monkeypatch.setattr(store, "cdn_config", lambda keypair, fingerprint: remote)
    catalog = SealedCatalog(make_settings(tmp_path, ["classifier.safetensors"]), owner=OWNER, resources=store,
                            fingerprint=FINGERPRINT)
    catalog.refresh()
    with pytest.raises(ModelUnavailableError, match="plain HTTP"):
        catalog.ensure(model_id(store, "classifier.safetensors"))
    assert cdn_built == []


# -- known bugs ------------------------------------------------------------------------------------


def test_a_republished_model_is_fetched_again(catalog: SealedCatalog, store: FakeStore) -> None:
    catalog.refresh()
    catalog.ensure(model_id(store, "classifier.safetensors"))
    v2 = store.publish("classifier.safetensors", payload(20_000, seed=99))
    catalog.refresh()

    info = catalog.ensure(v2.manifest["id"])

    assert info.id == v2.manifest["id"]
    assert info.path is not None
    assert Path(info.path).read_bytes() == v2.plaintext


def test_a_model_republished_after_listing_is_refused_or_served_with_its_own_id(
    catalog: SealedCatalog, store: FakeStore
) -> None:
    catalog.refresh()
    listed = model_id(store, "classifier.safetensors")
    store.publish("classifier.safetensors", payload(20_000, seed=98))  # republished, not yet re-listed

    try:
        info = catalog.ensure(listed)
    except ModelUnavailableError:
        return  # refusing is a correct answer too
    assert info.path is not None
    assert hashlib.sha256(Path(info.path).read_bytes()).hexdigest() == info.id



def test_trusted_publishers_come_from_the_settings_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = SigningKey.generate().public_b64, SigningKey.generate().public_b64
    monkeypatch.setenv("SEALSERVE_TRUSTED_PUBLISHERS", f"{first}, {second}")
    assert make_settings(tmp_path, ["m"]).trusted_publishers == [first, second]
    assert make_settings(tmp_path, ["m"], trusted_publishers=[second]).trusted_publishers == [second]
    with pytest.raises(ValueError, match="Ed25519 public key"):
        make_settings(tmp_path, ["m"], trusted_publishers=["not-a-key"])
