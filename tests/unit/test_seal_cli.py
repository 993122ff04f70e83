"""``sealserve keygen | seal | open`` through ``lib.cli.main``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import lib.cli
from lib.cli import main
from lib.cli.seal import read_key_file
from lib.sealed.format import HEADER_SIZE, sealed_size


@pytest.fixture(autouse=True)
def only_seal_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other command modules pull in heavy dependencies (torch, diffusers) that these tests do not need.
    assert "lib.cli.seal" in lib.cli.COMMAND_MODULES
    monkeypatch.setattr(lib.cli, "COMMAND_MODULES", ("lib.cli.seal",))


def sealserve(*args: str | Path) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "dek.hex"
    assert sealserve("keygen", "--key-file", path) == 0
    return path


def test_keygen_writes_a_private_hex_key_and_refuses_to_overwrite(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    text = key_file.read_text()
    assert len(text.strip()) == 64 and len(read_key_file(key_file)) == 32
    assert text.strip() not in capsys.readouterr().out
    assert sealserve("keygen", "--key-file", key_file) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert key_file.read_text() == text


def test_seal_then_open_round_trip(tmp_path: Path, key_file: Path) -> None:
    data = os.urandom(10_000)
    (tmp_path / "model.bin").write_bytes(data)
    sealed, opened = tmp_path / "model.sealed", tmp_path / "opened.bin"
    assert (
        sealserve("seal", tmp_path / "model.bin", sealed, "--key-file", key_file, "--segment-size", "4096")
        == 0
    )
    assert sealed.stat().st_size == sealed_size(10_000, 4096)
    assert int.from_bytes(sealed.read_bytes()[9:13], "big") == 4096
    assert sealserve("open", sealed, opened, "--key-file", key_file) == 0
    assert opened.read_bytes() == data


def test_tampered_file_fails_and_writes_nothing(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.bin").write_bytes(os.urandom(3000))
    sealed = tmp_path / "model.sealed"
    assert sealserve("seal", tmp_path / "model.bin", sealed, "--key-file", key_file) == 0
    blob = bytearray(sealed.read_bytes())
    blob[HEADER_SIZE + 100] ^= 0x01
    sealed.write_bytes(bytes(blob))
    capsys.readouterr()
    out = tmp_path / "out.bin"
    assert sealserve("open", sealed, out, "--key-file", key_file) == 2
    assert "failed verification" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dek.hex", "model.bin", "model.sealed"]


def test_wrong_key_fails(tmp_path: Path, key_file: Path) -> None:
    (tmp_path / "m").write_bytes(b"weights")
    assert sealserve("seal", tmp_path / "m", tmp_path / "m.sealed", "--key-file", key_file) == 0
    other = tmp_path / "other.hex"
    assert sealserve("keygen", "--key-file", other) == 0
    assert sealserve("open", tmp_path / "m.sealed", tmp_path / "out", "--key-file", other) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"ab" * 31, "found 62"),
        (b"ab" * 33, "found 66"),
        (b"zz" * 32, "other than hex"),
        (b"0x" + b"ab" * 31, "other than hex"),
        (b"\xff" * 64, "not ASCII"),
        (b"", "found 0"),
    ],
)
def test_bad_key_file_is_a_clear_error(
    tmp_path: Path, content: bytes, complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m").write_bytes(b"weights")
    bad = tmp_path / "bad.hex"
    bad.write_bytes(content)
    assert sealserve("seal", tmp_path / "m", tmp_path / "m.sealed", "--key-file", bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and complaint in err
    assert not (tmp_path / "m.sealed").exists()


def test_key_file_whitespace_is_tolerated_and_key_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = bytes(range(32))
    spaced = tmp_path / "spaced.hex"
    spaced.write_text("  " + key.hex()[:32] + "\n" + key.hex()[32:].upper() + "\r\n\n")
    assert read_key_file(spaced) == key
    truncated = tmp_path / "short.hex"
    truncated.write_text(key.hex()[:40])
    (tmp_path / "m").write_bytes(b"x")
    assert sealserve("seal", tmp_path / "m", tmp_path / "o", "--key-file", truncated) == 2
    assert key.hex()[:40] not in capsys.readouterr().err


def test_missing_files_are_clear_errors(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sealserve("open", tmp_path / "nope", tmp_path / "o", "--key-file", key_file) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sealserve("open", key_file, tmp_path / "o", "--key-file", tmp_path / "nokey") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "m").write_bytes(b"x")
    assert sealserve("seal", tmp_path / "m", tmp_path / "no" / "o", "--key-file", key_file) == 2
    assert "output directory" in capsys.readouterr().err


def test_open_of_a_non_sealed_file_fails(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plain").write_bytes(b"not sealed at all" * 10)
    assert sealserve("open", tmp_path / "plain", tmp_path / "o", "--key-file", key_file) == 2
    assert "bad magic" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_segment_size_is_rejected_by_argparse(tmp_path: Path, key_file: Path) -> None:
    (tmp_path / "m").write_bytes(b"x")
    for bad in ["0", "-5", "abc", str(1 << 30)]:
        with pytest.raises(SystemExit) as info:
            sealserve("seal", tmp_path / "m", tmp_path / "o", "--key-file", key_file, "--segment-size", bad)
        assert info.value.code != 0
