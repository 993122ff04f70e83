"""The model archive: a model directory as one deterministic tar, and back.

A sealed model is one file; a directory model (diffusers, transformers) is packed first, so that
its id, the SHA-256 of that file, depends on the content only: not on file order, mtimes,
owners or umask. A node unpacks it itself (:func:`unpack_archive`): regular files and directories
with plain relative names only, each created under a directory descriptor without following
links, whatever Python's tarfile filters would let through.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from lib.digest import HashingIO
from lib.errors import IntegrityError, PublishError

_DIR_MODE = 0o755
_FILE_MODE = 0o644
_EXEC_FILE_MODE = 0o755


@dataclass(frozen=True)
class _Entry:
    rel: str  # POSIX path relative to the packed directory
    path: Path
    is_dir: bool
    executable: bool


def _scan(root: Path) -> list[_Entry]:
    """Every directory and regular file under ``root``, sorted; links and special files refused.

    Hidden names (``.git``, ``.cache/huggingface`` download metadata with timestamps) are left out,
    as the catalog leaves them out: they are not the model, and they would make its id unstable.
    """
    entries: list[_Entry] = []
    pending: list[tuple[Path, str]] = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as listing:
            for item in listing:
                if item.name.startswith("."):
                    continue
                rel = prefix + item.name
                _check_name(rel)
                mode = item.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    # A link can point outside the model, and a tar entry for it would be
                    # extracted as a link on the node: neither is something to seal blindly.
                    raise PublishError(f"{rel} in {root} is a symbolic link; copy its target in instead")
                if stat.S_ISDIR(mode):
                    entries.append(_Entry(rel, Path(item.path), is_dir=True, executable=True))
                    pending.append((Path(item.path), rel + "/"))
                elif stat.S_ISREG(mode):
                    entries.append(_Entry(rel, Path(item.path), is_dir=False, executable=bool(mode & 0o111)))
                else:
                    raise PublishError(f"{rel} in {root} is not a regular file or directory")
    # A parent sorts before its children (a string sorts before its extensions), as extraction needs.
    entries.sort(key=lambda entry: entry.rel)
    return entries


def _check_name(rel: str) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        # A name that is not valid UTF-8 (surrogate-escaped bytes) would be mangled in the tar.
        raise PublishError(f"{rel.encode('utf-8', 'replace').decode()!r} is not a UTF-8 file name") from None


def _tarinfo(entry: _Entry, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.rel)
    info.type = tarfile.DIRTYPE if entry.is_dir else tarfile.REGTYPE
    info.mode = _DIR_MODE if entry.is_dir else (_EXEC_FILE_MODE if entry.executable else _FILE_MODE)
    info.size = size
    # Ints, not floats: a float mtime would add a PAX header with the fraction.
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_directory(src: Path, dst: Path) -> tuple[str, int]:
    """Write the tar of directory ``src`` to the file ``dst``; return its (sha256 hex, size).

    Entries are the sorted relative paths of directories and regular files; mtime 0, uid/gid 0,
    no user or group names, mode 0755 for directories and executables, 0644 otherwise; hard links
    become plain copies. So equal trees give identical bytes, whatever the order or time they
    were written in. PAX format: long and non-ASCII names and files over 8 GiB need no GNU quirks.
    """
    src = Path(src)
    if not src.is_dir():
        raise PublishError(f"{src} is not a directory")
    with Path(dst).open("wb") as out:
        writer = HashingIO(out)
        # encoding pinned: tarfile would otherwise take the locale's, and the bytes must not vary.
        with tarfile.open(
            fileobj=writer, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8"  # type: ignore[call-overload]
        ) as tar:
            for entry in _scan(src):
                if entry.is_dir:
                    tar.addfile(_tarinfo(entry, 0))
                    continue
                # O_NOFOLLOW: a file swapped for a link after the scan is refused, not followed.
                try:
                    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError as exc:
                    raise PublishError(f"cannot read {entry.rel} in {src}: {exc.strerror}") from None
                with os.fdopen(fd, "rb") as handle:
                    st = os.fstat(handle.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        raise PublishError(f"{entry.rel} in {src} is not a regular file")
                    tar.addfile(_tarinfo(entry, st.st_size), handle)
    return writer.hexdigest(), writer.size


# Bounds of an archive a node agrees to unpack. The total size is bounded by the archive itself
# (sparse members, the only way a member can outgrow the bytes it occupies, are refused).
MAX_MEMBERS = 100_000
MAX_NAME_BYTES = 4096
_COPY_CHUNK = 1 << 20
_TREE_DIR_MODE = 0o700
_TREE_FILE_MODE = 0o600
_TREE_EXEC_MODE = 0o700
# The first bytes of gzip, bzip2, xz and zstd streams. A compressed archive is refused by its
# magic, not left to tarfile's "r:": the first 512 bytes of a gzip stream of mostly zeros parse
# as a valid tar header about once in 250 gzip timestamps (measured), and were then unpacked as a
# file named after the gzip header.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def _member_parts(member: tarfile.TarInfo) -> list[str]:
    """The components of a member's name; IntegrityError unless relative, normalised and plain."""
    name = member.name
    if not name or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise IntegrityError("an archive member has an empty or overlong name")
    if "\0" in name:
        raise IntegrityError("an archive member's name holds a NUL byte")
    if name.startswith("/"):
        raise IntegrityError(f"archive member {name!r} has an absolute name")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise IntegrityError(f"archive member {name!r} is not a normalised relative name")
    return parts


def _check_member(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        raise IntegrityError(f"archive member {member.name!r} is a link")
    # REGTYPE/AREGTYPE (isreg) and DIRTYPE only; isreg() is also true of CONTTYPE and GNU sparse
    # members, which a packed model never holds (and a sparse one could outgrow its bytes).
    regular = member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and member.sparse is None
    if not (regular or member.isdir()):
        raise IntegrityError(f"archive member {member.name!r} is not a regular file or directory")


def _open_parent(root_fd: int, parts: list[str]) -> int:
    """A descriptor of the member's parent directory, walked from ``root_fd`` without following links."""
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_member(archive: tarfile.TarFile, member: tarfile.TarInfo, parent_fd: int, name: str) -> None:
    mode = _TREE_EXEC_MODE if member.mode & 0o100 else _TREE_FILE_MODE
    # O_EXCL: a member named twice, or anything already there, is refused; O_NOFOLLOW: never a link.
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                 dir_fd=parent_fd)
    with os.fdopen(fd, "wb") as out:
        source = archive.extractfile(member)
        if source is None:
            raise IntegrityError(f"archive member {member.name!r} has no data")
        left = member.size
        while left:
            chunk = source.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise IntegrityError(f"archive member {member.name!r} is truncated")
            out.write(chunk)
            left -= len(chunk)


def unpack_archive(tar_path: Path, dest: Path, *, max_bytes: int | None = None) -> None:
    """Unpack a model archive into the new directory ``dest``; IntegrityError if it is unsafe.

    Python's tarfile filters are not relied on (the "data" filter had bypasses, CVE-2025-4517 and
    later): only regular files and directories with relative, normalised names are accepted (no
    links, devices, absolute or ``..`` names), at most :data:`MAX_MEMBERS` members whose sizes add
    up to at most ``max_bytes`` (default: the archive's own size, which a verified archive has
    from its manifest). Every file is created with ``O_NOFOLLOW | O_EXCL`` under a directory
    descriptor walked from ``dest`` with ``O_NOFOLLOW``, so nothing on the way can be a link.
    """
    dest.mkdir(mode=_TREE_DIR_MODE)
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        budget = os.stat(tar_path).st_size if max_bytes is None else max_bytes
        with tar_path.open("rb") as head:
            if head.read(6).startswith(_COMPRESSED_MAGIC):
                raise IntegrityError("the archive is compressed (only a plain tar is unpacked)")
        members = 0
        # "r:": an uncompressed tar only, so the size bound means what it says.
        with tarfile.open(tar_path, mode="r:") as archive:
            for member in archive:
                members += 1
                if members > MAX_MEMBERS:
                    raise IntegrityError(f"the archive has more than {MAX_MEMBERS} members")
                _check_member(member)
                parts = _member_parts(member)
                budget -= member.size
                if budget < 0:
                    raise IntegrityError("the archive's members are larger than the archive may be")
                parent_fd = _open_parent(root_fd, parts)
                try:
                    if member.isdir():
                        os.mkdir(parts[-1], _TREE_DIR_MODE, dir_fd=parent_fd)
                    else:
                        _write_member(archive, member, parent_fd, parts[-1])
                finally:
                    os.close(parent_fd)
    except IntegrityError as exc:
        raise IntegrityError(f"sealed directory archive cannot be unpacked: {exc.message}") from None
    except (tarfile.TarError, OSError, UnicodeError) as exc:
        raise IntegrityError(f"sealed directory archive cannot be unpacked: {exc}") from None
    finally:
        os.close(root_fd)
