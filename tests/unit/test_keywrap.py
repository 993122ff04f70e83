"""Node key release (lib/sealed/keywrap.py) and the node fingerprint (lib/sealed/fingerprint.py)."""

from __future__ import annotations

import base64
import os
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.errors import IntegrityError
from lib.sealed.fingerprint import node_fingerprint
from lib.sealed.keywrap import NodeKeyPair, WrappedSecret, b64decode, b64encode, wrap_for_node

FP = node_fingerprint(machine_id_path=os.devnull, hostname="node-a", gpu_uuids=[])
OTHER_FP = node_fingerprint(machine_id_path=os.devnull, hostname="node-b", gpu_uuids=[])


@pytest.fixture
def keypair() -> NodeKeyPair:
    return NodeKeyPair.generate()


@settings(max_examples=25, deadline=None)
@given(secret=st.binary(min_size=0, max_size=4096), context=st.sampled_from(["dek", "cdn", "x-y.z"]))
def test_round_trip(secret: bytes, context: str) -> None:
    keypair = NodeKeyPair.generate()
    wrapped = wrap_for_node(secret, keypair.public_bytes(), FP, context=context)
    assert keypair.unwrap(wrapped, FP, context=context) == secret


def test_wrapped_secret_is_json_serialisable_and_hides_the_secret(keypair: NodeKeyPair) -> None:
    secret = os.urandom(32)
    wrapped = wrap_for_node(secret, keypair.public_bytes(), FP, context="dek")
    wire = wrapped.model_dump_json()
    assert secret.hex() not in wire and b64encode(secret) not in wire
    again = WrappedSecret.model_validate_json(wire)
    assert keypair.unwrap(again, FP, context="dek") == secret
    assert len(b64decode(again.ephemeral_public_key)) == 32
    assert len(b64decode(again.nonce)) == 12


def test_each_wrap_is_fresh(keypair: NodeKeyPair) -> None:
    secret = os.urandom(32)
    first = wrap_for_node(secret, keypair.public_bytes(), FP, context="dek")
    second = wrap_for_node(secret, keypair.public_bytes(), FP, context="dek")
    assert first.ephemeral_public_key != second.ephemeral_public_key
    assert first.ciphertext != second.ciphertext


def test_other_keypair_cannot_unwrap(keypair: NodeKeyPair) -> None:
    wrapped = wrap_for_node(b"secret", keypair.public_bytes(), FP, context="dek")
    with pytest.raises(IntegrityError):
        NodeKeyPair.generate().unwrap(wrapped, FP, context="dek")


def test_other_fingerprint_cannot_unwrap(keypair: NodeKeyPair) -> None:
    wrapped = wrap_for_node(b"secret", keypair.public_bytes(), FP, context="dek")
    with pytest.raises(IntegrityError):
        keypair.unwrap(wrapped, OTHER_FP, context="dek")


def test_other_context_cannot_unwrap(keypair: NodeKeyPair) -> None:
    wrapped = wrap_for_node(b"secret", keypair.public_bytes(), FP, context="dek")
    with pytest.raises(IntegrityError):
        keypair.unwrap(wrapped, FP, context="cdn")


def _flip(b64: str, index: int) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[index % len(raw)] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("field", ["ephemeral_public_key", "nonce", "ciphertext"])
@pytest.mark.parametrize("index", [0, 7, -1])
def test_tampering_any_field_fails(keypair: NodeKeyPair, field: str, index: int) -> None:
    wrapped = wrap_for_node(os.urandom(32), keypair.public_bytes(), FP, context="dek")
    tampered = wrapped.model_copy(update={field: _flip(getattr(wrapped, field), index)})
    with pytest.raises(IntegrityError):
        keypair.unwrap(tampered, FP, context="dek")


def test_truncated_ciphertext_fails(keypair: NodeKeyPair) -> None:
    wrapped = wrap_for_node(os.urandom(32), keypair.public_bytes(), FP, context="dek")
    short = base64.b64encode(base64.b64decode(wrapped.ciphertext)[:-1]).decode()
    with pytest.raises(IntegrityError):
        keypair.unwrap(wrapped.model_copy(update={"ciphertext": short}), FP, context="dek")


def test_low_order_sender_key_is_an_integrity_error(keypair: NodeKeyPair) -> None:
    wrapped = wrap_for_node(b"secret", keypair.public_bytes(), FP, context="dek")
    zero_point = wrapped.model_copy(update={"ephemeral_public_key": b64encode(bytes(32))})
    with pytest.raises(IntegrityError):
        keypair.unwrap(zero_point, FP, context="dek")


def test_malformed_wire_fields_are_rejected() -> None:
    good = {"ephemeral_public_key": b64encode(bytes(range(32))), "nonce": b64encode(bytes(12)),
            "ciphertext": b64encode(bytes(16))}
    WrappedSecret.model_validate(good)
    for field, value in [("nonce", b64encode(bytes(11))), ("ephemeral_public_key", "not base64!"),
                         ("ciphertext", b64encode(bytes(15)))]:
        with pytest.raises(ValueError):
            WrappedSecret.model_validate({**good, field: value})
    with pytest.raises(ValueError):
        WrappedSecret.model_validate({**good, "extra": "x"})


def test_context_with_separator_is_refused(keypair: NodeKeyPair) -> None:
    with pytest.raises(ValueError):
        wrap_for_node(b"s", keypair.public_bytes(), FP, context="dek|x")
    with pytest.raises(ValueError):
        wrap_for_node(b"s", keypair.public_bytes(), "", context="dek")
    with pytest.raises(ValueError):
        wrap_for_node(b"s", b"short", FP, context="dek")


def test_keypair_refuses_pickling_and_hides_private_key(keypair: NodeKeyPair) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(keypair)
    assert keypair.public_key_b64() in repr(keypair)
    assert len(keypair.public_bytes()) == 32


# -- fingerprint -------------------------------------------------------------------------------


@pytest.fixture
def machine_id(tmp_path: Path) -> Path:
    path = tmp_path / "machine-id"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    return path


def test_fingerprint_is_deterministic_hex(machine_id: Path) -> None:
    first = node_fingerprint(machine_id_path=machine_id, hostname="h", gpu_uuids=["GPU-1", "GPU-2"])
    second = node_fingerprint(machine_id_path=machine_id, hostname="h", gpu_uuids=["GPU-2", "GPU-1"])
    assert first == second
    assert len(first) == 64 and int(first, 16) >= 0


def test_fingerprint_changes_with_each_input(machine_id: Path, tmp_path: Path) -> None:
    base = node_fingerprint(machine_id_path=machine_id, hostname="h", gpu_uuids=["GPU-1"])
    other_id = tmp_path / "other-id"
    other_id.write_text("fedcba9876543210fedcba9876543210\n")
    variants = {
        node_fingerprint(machine_id_path=other_id, hostname="h", gpu_uuids=["GPU-1"]),
        node_fingerprint(machine_id_path=machine_id, hostname="h2", gpu_uuids=["GPU-1"]),
        node_fingerprint(machine_id_path=machine_id, hostname="h", gpu_uuids=["GPU-2"]),
        node_fingerprint(machine_id_path=machine_id, hostname="h", gpu_uuids=[]),
        node_fingerprint(machine_id_path=machine_id, hostname="h", gpu_uuids=["GPU-1"], app_key=b"other"),
    }
    assert base not in variants and len(variants) == 5


def test_fingerprint_field_boundaries_are_unambiguous(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    assert node_fingerprint(machine_id_path=empty, hostname="ab", gpu_uuids=["c"]) != node_fingerprint(
        machine_id_path=empty, hostname="a", gpu_uuids=["bc"]
    )


def test_fingerprint_never_contains_the_machine_id(machine_id: Path) -> None:
    raw = machine_id.read_text().strip()
    fingerprint = node_fingerprint(machine_id_path=machine_id, hostname="h", gpu_uuids=[])
    assert raw not in fingerprint and raw[:16] not in fingerprint and raw[16:] not in fingerprint


def test_fingerprint_without_machine_id_still_works(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    assert node_fingerprint(machine_id_path=missing, hostname="h", gpu_uuids=[]) == node_fingerprint(
        machine_id_path=missing, hostname="h", gpu_uuids=[]
    )


def test_fingerprint_reads_gpus_from_nvidia_smi(monkeypatch: pytest.MonkeyPatch, machine_id: Path,
                                                tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho GPU-bbb\necho GPU-aaa\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    detected = node_fingerprint(machine_id_path=machine_id, hostname="h")
    expected = node_fingerprint(machine_id_path=machine_id, hostname="h", gpu_uuids=["GPU-aaa", "GPU-bbb"])
    assert detected == expected
    fake.write_text("#!/bin/sh\nexit 9\n")
    assert node_fingerprint(machine_id_path=machine_id, hostname="h") == node_fingerprint(
        machine_id_path=machine_id, hostname="h", gpu_uuids=[]
    )


def test_hanging_nvidia_smi_times_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lib.sealed.fingerprint import read_gpu_uuids

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexec sleep 10\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert read_gpu_uuids(timeout=0.3) == []
