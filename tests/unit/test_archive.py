"""unpack_archive on its own: the bounds and refusals that do not depend on Python's tarfile filters."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

import lib.sealed.archive as archive_module
from lib.errors import IntegrityError
from lib.sealed.archive import pack_directory, unpack_archive


def write_tar(path: Path, members: list[tuple[str, bytes, bytes]], **attrs: object) -> Path:
    """(name, type, data) members, written as given: duplicates and odd types included."""
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mode = kind, len(data), 0o644
            for key, value in attrs.items():
                setattr(info, key, value)
            archive.addfile(info, io.BytesIO(data) if data else None)
    return path


def test_a_packed_directory_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "w.safetensors").write_bytes(b"w" * 5000)
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    pack_directory(src, tmp_path / "m.tar")

    unpack_archive(tmp_path / "m.tar", tmp_path / "out")

    out = tmp_path / "out"
    assert (out / "unet" / "w.safetensors").read_bytes() == b"w" * 5000
    assert (out / "run.sh").stat().st_mode & 0o777 == 0o700
    assert (out / "unet" / "w.safetensors").stat().st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "members",
    [
        [("a.bin", tarfile.REGTYPE, b"1"), ("a.bin", tarfile.REGTYPE, b"2")],  # a name twice
        [("d", tarfile.DIRTYPE, b""), ("d", tarfile.DIRTYPE, b"")],
        [("missing/a.bin", tarfile.REGTYPE, b"1")],  # a parent the archive never made
        [("f", tarfile.REGTYPE, b"1"), ("f/a.bin", tarfile.REGTYPE, b"1")],  # a file as a parent
        [("./a.bin", tarfile.REGTYPE, b"1")],
        [("a//b.bin", tarfile.REGTYPE, b"1")],
        [("a.bin", tarfile.CONTTYPE, b"1")],
        [("blk", tarfile.BLKTYPE, b"")],
    ],
    ids=["file twice", "dir twice", "no parent", "file as parent", "dot", "empty part", "contiguous",
         "block device"],
)
def test_an_irregular_archive_is_refused(tmp_path: Path, members: list[tuple[str, bytes, bytes]]) -> None:
    tar = write_tar(tmp_path / "x.tar", members)
    with pytest.raises(IntegrityError, match="cannot be unpacked"):
        unpack_archive(tar, tmp_path / "out")


def test_members_larger_than_the_bound_are_refused(tmp_path: Path) -> None:
    tar = write_tar(tmp_path / "x.tar", [("a.bin", tarfile.REGTYPE, b"x" * 4000)])
    with pytest.raises(IntegrityError, match="larger than"):
        unpack_archive(tar, tmp_path / "out", max_bytes=3999)
    unpack_archive(tar, tmp_path / "ok", max_bytes=4000)


def test_a_sparse_member_cannot_outgrow_the_archive(tmp_path: Path) -> None:
    # A GNU sparse (PAX 0.0) member: 1 TB of holes declared by a few bytes of header.
    tar = tmp_path / "sparse.tar"
    with tarfile.open(tar, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("big.bin")
        info.size = 1
        info.pax_headers = {"GNU.sparse.size": str(10**12), "GNU.sparse.numblocks": "1",
                            "GNU.sparse.offset": "0", "GNU.sparse.numbytes": "1", "GNU.sparse.map": "0,1"}
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(IntegrityError, match="cannot be unpacked"):
        unpack_archive(tar, tmp_path / "out")
    assert not (tmp_path / "out" / "big.bin").exists()


def test_too_many_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 3)
    tar = write_tar(tmp_path / "x.tar", [(f"{i}.bin", tarfile.REGTYPE, b"") for i in range(4)])
    with pytest.raises(IntegrityError, match="more than 3 members"):
        unpack_archive(tar, tmp_path / "out")


@pytest.mark.parametrize("gzip_mtime", [None, 1796400686], ids=["now", "header-lookalike"])
def test_a_compressed_archive_is_refused(
    tmp_path: Path, gzip_mtime: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the second timestamp the gzip stream's first block is also a valid tar header (about
    one timestamp in 250 does that): it must be refused for being compressed, not unpacked."""
    if gzip_mtime is not None:
        monkeypatch.setattr(tarfile.time, "time", lambda: float(gzip_mtime))
    tar = tmp_path / "x.tar.gz"
    with tarfile.open(tar, mode="w:gz") as archive:
        info = tarfile.TarInfo("a.bin")
        info.size = 10**6
        archive.addfile(info, io.BytesIO(bytes(10**6)))
    with pytest.raises(IntegrityError, match="cannot be unpacked: the archive is compressed"):
        unpack_archive(tar, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())
