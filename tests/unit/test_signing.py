"""Publisher and node signatures (lib/sealed/signing.py): what a forger can and cannot make pass."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest

from lib.errors import ConfigurationError, IntegrityError
from lib.sealed.signing import (
    PublisherTrust,
    SigningKey,
    dek_commitment,
    load_or_create_node_key,
    node_request_message,
    sign_manifest,
    verify,
)

DEK = os.urandom(32)


def _manifest(signer: SigningKey | None, folder: str = "models", **changes: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "id": "a" * 64, "name": "model", "kind": "text-to-image", "plaintext_size": 10, "sealed_size": 60,
        "small_size": 60, "big_key": "models/model/a.big", "segment_size": 1024, "is_directory": False,
        "dek_commitment": dek_commitment(DEK, "a" * 64),
    }
    if signer is not None:
        manifest["signature"] = sign_manifest(signer, folder, manifest)
    manifest.update(changes)
    return manifest


def test_a_trusted_publishers_manifest_passes_and_every_forgery_fails() -> None:
    publisher, stranger = SigningKey.generate(), SigningKey.generate()
    trust = PublisherTrust([publisher.public_b64])
    trust.check_manifest("models", _manifest(publisher), dek=DEK, what="m")
    forgeries = {
        "unsigned": _manifest(None),
        "signed by another key": _manifest(stranger),
        "a field changed after signing": _manifest(publisher, big_key="models/evil.big"),
        "an id changed after signing": _manifest(publisher, id="b" * 64),
        "a stranger's signature under the trusted key's name": {
            **_manifest(stranger), "signature": {"key": publisher.public_b64,
                                                 "value": _manifest(stranger)["signature"]["value"]}},
        "a malformed signature": _manifest(publisher, signature={"key": "!!", "value": 3}),
    }
    for what, manifest in forgeries.items():
        with pytest.raises(IntegrityError, match="trusted publisher"):
            trust.check_manifest("models", manifest, what=what)
    with pytest.raises(IntegrityError, match="trusted publisher"):  # moved to another folder
        trust.check_manifest("other", _manifest(publisher), what="moved")
    with pytest.raises(IntegrityError, match="data key"):  # the API swapped in its own DEK
        trust.check_manifest("models", _manifest(publisher), dek=os.urandom(32), what="swapped")


def test_without_trusted_publishers_nothing_is_checked() -> None:
    PublisherTrust().check_manifest("models", _manifest(None), dek=os.urandom(32), what="m")
    PublisherTrust().check_cdn({"bucket": "b"})
    with pytest.raises(ValueError):
        PublisherTrust(["not-a-key"])


def test_node_request_signatures_bind_every_field() -> None:
    node = SigningKey.generate()
    fields: dict[str, Any] = {"kind": "dek", "folder": "models", "name": "m", "public_key": b"k" * 32,
                              "fingerprint": "f" * 64, "nonce": "n" * 43, "node_id": node.id}
    signature = node.sign(node_request_message(**fields))
    assert verify(node.public_bytes, signature, node_request_message(**fields))
    for name, other in (("kind", "cdn"), ("name", "x"), ("public_key", b"j" * 32), ("fingerprint", "e" * 64),
                        ("nonce", "o" * 43), ("folder", None)):
        assert not verify(node.public_bytes, signature, node_request_message(**{**fields, name: other}))
    assert not verify(SigningKey.generate().public_bytes, signature, node_request_message(**fields))
    assert not verify(node.public_bytes, b"short", node_request_message(**fields))


def test_node_key_is_made_once_0600_and_never_pickled(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node.key"
    first = load_or_create_node_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_node_key(path).id == first.id
    assert "PRIVATE" not in repr(first) and first.public_b64 in repr(first)
    with pytest.raises(TypeError):
        pickle.dumps(first)
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        load_or_create_node_key(path)
    with pytest.raises(FileExistsError):
        first.save(path)


def test_keygen_signing_writes_a_0600_key_and_prints_its_public_key_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lib.cli import main

    path = tmp_path / "publisher.key"
    assert main(["keygen", "--signing", "--key-file", str(path)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.load(path).public_b64 == printed
    PublisherTrust([printed])  # a valid trusted_publishers entry
    assert main(["keygen", "--signing", "--key-file", str(path)]) == 2, "never overwrites a key"
