"""The catalog of local models: what is in MODEL_DIRS, under which id, and whether it is usable.

A model is a file with a model extension, or a directory holding a diffusers ``model_index.json``
or a transformers ``config.json`` (not descended into). Its id is the SHA-256 of the file; for a
directory, the SHA-256 over the sorted lines ``relative-path NUL file-sha256 LF`` of its files.
File digests are cached by (path, size, mtime), so a rescan only hashes what changed.

Links are followed only where they stay inside the MODEL_DIRS entry they were found in (a
Hugging Face cache's snapshot links into its blobs do): a ``passwd.bin -> /etc/passwd``, a linked
directory elsewhere, or a model directory holding such a link is not listed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lib.digest import sha256_file
from lib.errors import ModelNotFoundError, ModelUnavailableError, WrongModelKindError
from lib.models.files import MODEL_FILE_EXTENSIONS, Recognition, is_model_dir, recognise
from lib.schemas import ModelInfo

log = logging.getLogger(__name__)

# Names a writer uses while a model is being copied or built; never half a model in the catalog.
_IN_PROGRESS_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete")


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.endswith(_IN_PROGRESS_SUFFIXES)


@dataclass(frozen=True)
class _Stamp:
    size: int
    mtime_ns: int


class DigestCache:
    """SHA-256 of files and model directories, recomputed only when size or mtime changes."""

    def __init__(self, hash_file: Callable[[Path], str] = sha256_file) -> None:
        self._hash_file = hash_file
        self._digests: dict[Path, tuple[_Stamp, str]] = {}
        self._lock = threading.Lock()
        self.files_hashed = 0

    def file_digest(self, path: Path) -> tuple[str, int]:
        """Return (digest, size) of a file."""
        st = path.stat()
        stamp = _Stamp(st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._digests.get(path)
        if cached and cached[0] == stamp:
            return cached[1], stamp.size
        digest = self._hash_file(path)
        with self._lock:
            self._digests[path] = (stamp, digest)
            self.files_hashed += 1
        return digest, stamp.size

    def digest(self, path: Path) -> tuple[str, int]:
        """Return (id, total size) of a model file or directory."""
        if not path.is_dir():
            return self.file_digest(path)
        lines = hashlib.sha256()
        total = 0
        for file in sorted(_files_under(path)):
            digest, size = self.file_digest(file)
            lines.update(f"{file.relative_to(path).as_posix()}\0{digest}\n".encode())
            total += size
        return lines.hexdigest(), total

    def forget_missing(self) -> None:
        with self._lock:
            for path in [p for p in self._digests if not p.exists()]:
                del self._digests[path]


def _files_under(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


class ModelCatalog:
    """Scans model directories and answers lookups; safe to use from several threads."""

    def __init__(
        self,
        dirs: Sequence[str | Path],
        *,
        digests: DigestCache | None = None,
        recognise_model: Callable[[Path], Recognition] | None = None,
        max_depth: int = 4,
        allow_pickle: bool = False,
    ) -> None:
        """``allow_pickle``: list pickle-format checkpoints (``ALLOW_PICKLE_MODELS``), recognised
        with ``torch.load(weights_only=True)``; otherwise they are listed as errors, never loaded."""
        self._dirs = [Path(d) for d in dirs]
        self._digests = digests or DigestCache()
        self._recognise = recognise_model or functools.partial(recognise, allow_pickle=allow_pickle)
        self._recognised: dict[str, Recognition] = {}
        self._max_depth = max_depth
        self._entries: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()

    @property
    def digests(self) -> DigestCache:
        return self._digests

    def scan(self) -> list[ModelInfo]:
        """Rescan every directory and replace the catalog with what is there now."""
        found: dict[str, ModelInfo] = {}
        for path in self._candidates():
            try:
                info = self._describe(path)
            except OSError as exc:  # removed or unreadable while we looked: next scan decides
                log.warning("skipping %s this scan: %s", path, exc)
                continue
            if info.id in found:
                log.info("%s duplicates %s (same id); listing the first", path, found[info.id].path)
                continue
            found[info.id] = info
        self._digests.forget_missing()
        with self._lock:
            added = found.keys() - self._entries.keys()
            removed = self._entries.keys() - found.keys()
            self._entries = found
        for model_id in added:
            log.info("model added: %s (%s)", found[model_id].name, model_id[:12])
        if removed:
            log.info("models removed: %s", ", ".join(m[:12] for m in removed))
        return self.entries()

    def entries(self) -> list[ModelInfo]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda m: (m.name, m.id))

    def get(self, model_id: str) -> ModelInfo:
        with self._lock:
            info = self._entries.get(model_id)
        if info is None:
            raise ModelNotFoundError(f"model {model_id!r} is not in the catalog")
        return info

    def resolve(self, id_or_name: str | None, kind: str) -> ModelInfo:
        return resolve_model(self.entries(), id_or_name, kind)

    def verify(self, model_id: str) -> ModelInfo:
        """Re-check the id of a local model against its bytes on disk before it is handed out."""
        info = self.get(model_id)
        if info.path is None:
            return info
        try:
            digest, _ = self._digests.digest(Path(info.path))
        except OSError as exc:
            raise ModelUnavailableError(f"model {info.name} cannot be read: {exc.strerror}") from None
        if digest != model_id:
            raise ModelUnavailableError(
                f"model {info.name} changed on disk; it is listed again after a rescan"
            )
        return info

    def _candidates(self) -> Iterator[Path]:
        for root in self._dirs:
            if not root.is_dir():
                log.debug("model directory %s does not exist", root)
                continue
            yield from self._walk(root, root.resolve(), depth=0)

    def _walk(self, directory: Path, boundary: Path, depth: int) -> Iterator[Path]:
        try:
            children = sorted(directory.iterdir())
        except OSError as exc:
            log.warning("cannot list %s: %s", directory, exc)
            return
        for child in children:
            if _skipped(child.name):
                continue
            if child.is_symlink() and not _inside(child, boundary):
                log.warning("skipping %s: a link out of the model directory %s", child, boundary)
                continue
            if child.is_dir():
                if is_model_dir(child):
                    escaping = _link_out_of(child, boundary)
                    if escaping is None:
                        yield child
                    else:
                        log.warning("skipping %s: %s links out of the model directory %s",
                                    child, escaping, boundary)
                elif depth < self._max_depth:
                    yield from self._walk(child, boundary, depth + 1)
            elif child.suffix in MODEL_FILE_EXTENSIONS:
                yield child

    def _describe(self, path: Path) -> ModelInfo:
        model_id, size = self._digests.digest(path)
        recognition = self._recognised.get(model_id)
        if recognition is None:
            recognition = self._recognise(path)
            self._recognised[model_id] = recognition
        return ModelInfo(
            id=model_id,
            name=path.name,
            size=size,
            path=str(path),
            source="local",
            extension="" if path.is_dir() else path.suffix,
            kind=recognition.kind,
            status="error" if recognition.error else "available",
            error=recognition.error,
            num_labels=recognition.num_labels,
        )


def _inside(path: Path, boundary: Path) -> bool:
    try:
        return path.resolve().is_relative_to(boundary)
    except (OSError, RuntimeError):  # a dangling link, or a loop
        return False


def _link_out_of(model_dir: Path, boundary: Path) -> Path | None:
    """The first link under ``model_dir`` that leads out of ``boundary`` (None: none does)."""
    for dirpath, dirnames, filenames in os.walk(model_dir):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink() and not _inside(path, boundary):
                return path
    return None


def find_model(entries: Sequence[ModelInfo], model_id: str) -> ModelInfo:
    for info in entries:
        if info.id == model_id:
            return info
    raise ModelNotFoundError(f"model {model_id!r} is not in the catalog")


def resolve_model(entries: Sequence[ModelInfo], id_or_name: str | None, kind: str) -> ModelInfo:
    """Find a model by id, else by name; with neither, the first usable one of ``kind``."""
    if id_or_name is None:
        for info in entries:
            if info.kind == kind and info.status != "error":
                return info
        raise ModelNotFoundError(f"no {kind} model is available")
    for info in entries:
        if id_or_name in (info.id, info.name):
            return require_kind(info, kind)
    raise ModelNotFoundError(f"model {id_or_name!r} is not in the catalog")


def require_kind(info: ModelInfo, kind: str) -> ModelInfo:
    if info.kind is None and info.status == "error":
        # Unrecognised or unreachable: the client's request is fine, the model is not.
        raise ModelUnavailableError(f"model {info.name} is unavailable: {info.error}")
    if info.kind != kind:
        raise WrongModelKindError(
            f"model {info.name} is a {info.kind or 'unrecognised'} model, not {kind}"
        )
    return info
