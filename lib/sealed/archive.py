"""The model archive: a model directory as one deterministic tar, and back.

A sealed model is one file; a directory model (diffusers, transformers) is packed first, so that
its id, the SHA-256 of that file, depends on the content only: not on file order, mtimes,
owners or umask. A node unpacks it with the tarfile "data" filter, which refuses "..", links
leaving the destination and device files.
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


def unpack_archive(tar_path: Path, dest: Path) -> None:
    """Unpack a model archive into the new directory ``dest``; IntegrityError if it is unsafe."""
    dest.mkdir(mode=0o700)
    try:
        with tarfile.open(tar_path) as archive:
            # The "data" filter refuses "..", links leaving dest and device files, and strips a
            # leading "/" so absolute names land inside dest.
            archive.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise IntegrityError(f"sealed directory archive cannot be unpacked: {exc}") from None
