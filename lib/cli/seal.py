"""``sealserve keygen | seal | open``: make a data key, seal a model file, open a sealed one.

The key file holds the 32-byte data key (DEK) as 64 hex characters. It is a secret: keygen
creates it with mode 0600, and no message here ever prints its contents.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
from pathlib import Path
from typing import Any

from lib.errors import BadRequestError, KeyFileError, NotFoundError
from lib.sealed.format import (
    DEFAULT_SEGMENT_SIZE,
    KEY_SIZE,
    MAX_SEGMENT_SIZE,
    generate_key,
    open_file,
    seal_file,
)

log = logging.getLogger(__name__)

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def read_key_file(path: Path) -> bytes:
    """The DEK in ``path``; surrounding and embedded whitespace is tolerated, nothing else."""
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s is accessible by group or others; chmod 600 it", path)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path} is not ASCII hex") from None
    digits = "".join(text.split())
    # Describe the problem by length and character class only: echoing the content would leak
    # (part of) the key into terminals and logs.
    if not set(digits) <= _HEX_DIGITS:
        raise KeyFileError(f"key file {path} contains characters other than hex digits and whitespace")
    if len(digits) != 2 * KEY_SIZE:
        raise KeyFileError(f"key file {path} must hold {2 * KEY_SIZE} hex characters, found {len(digits)}")
    return bytes.fromhex(digits)


def write_key_file(path: Path, key: bytes) -> None:
    """Create ``path`` holding ``key`` in hex, mode 0600; never replace an existing file."""
    try:
        # O_EXCL makes "refuse to overwrite" atomic: no window where another writer's key is clobbered.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be created: {exc.strerror}") from None
    try:
        # The umask can only narrow the mode given to open(); set it exactly anyway.
        os.fchmod(fd, 0o600)
        os.write(fd, (key.hex() + "\n").encode("ascii"))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _input_file(path: Path) -> Path:
    if not path.is_file():
        raise NotFoundError(f"input file {path} does not exist or is not a regular file")
    return path


def _output_dir_exists(path: Path) -> Path:
    if not path.parent.is_dir():
        raise NotFoundError(f"output directory {path.parent} does not exist")
    return path


def _segment_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_SEGMENT_SIZE:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_SEGMENT_SIZE}")
    return value


def _keygen(args: argparse.Namespace) -> int:
    if args.signing:
        from lib.sealed.signing import SigningKey

        key = SigningKey.generate()
        try:
            key.save(args.key_file)
        except FileExistsError:
            raise KeyFileError(f"{args.key_file} exists; refusing to overwrite a key") from None
        except OSError as exc:
            raise KeyFileError(f"cannot write {args.key_file}: {exc.strerror or exc}") from None
        print(f"wrote a new Ed25519 publisher signing key to {args.key_file} (mode 0600); "
              "give nodes its public key (sealed.trusted_publishers):")
        print(key.public_b64)
        return 0
    write_key_file(args.key_file, generate_key())
    print(f"wrote a new {KEY_SIZE}-byte key to {args.key_file} (mode 0600)")
    return 0


def _seal(args: argparse.Namespace) -> int:
    key = read_key_file(args.key_file)
    src, dst = _input_file(args.input), _output_dir_exists(args.output)
    try:
        written = seal_file(src, dst, key, segment_size=args.segment_size)
    except OSError as exc:
        raise BadRequestError(f"sealing {src} failed: {exc.strerror or exc}") from None
    print(f"sealed {src} -> {dst} ({written} bytes, segment size {args.segment_size})")
    return 0


def _open(args: argparse.Namespace) -> int:
    key = read_key_file(args.key_file)
    src, dst = _input_file(args.input), _output_dir_exists(args.output)
    try:
        # IntegrityError propagates: lib.cli.main prints it and exits non-zero; open_file has
        # already made sure nothing was written to dst.
        size = open_file(src, dst, key)
    except OSError as exc:
        raise BadRequestError(f"opening {src} failed: {exc.strerror or exc}") from None
    print(f"verified and opened {src} -> {dst} ({size} bytes)")
    return 0


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    key_help = f"file holding the {KEY_SIZE}-byte data key as {2 * KEY_SIZE} hex characters"

    keygen = subparsers.add_parser(
        "keygen", help="create a new random data key file, or a publisher signing key (mode 0600)"
    )
    keygen.add_argument("--key-file", type=Path, required=True, help="where to write the key; must not exist")
    keygen.add_argument("--signing", action="store_true",
                        help="an Ed25519 publisher signing key (PEM); its public key is printed last")
    keygen.set_defaults(func=_keygen)

    seal = subparsers.add_parser("seal", help="encrypt a model file into the sealed format v1")
    seal.add_argument("input", type=Path, metavar="IN", help="plaintext model file")
    seal.add_argument("output", type=Path, metavar="OUT", help="sealed file to write (replaced atomically)")
    seal.add_argument("--key-file", type=Path, required=True, help=key_help)
    seal.add_argument(
        "--segment-size",
        type=_segment_size,
        default=DEFAULT_SEGMENT_SIZE,
        metavar="BYTES",
        help=f"plaintext bytes per segment (default {DEFAULT_SEGMENT_SIZE})",
    )
    seal.set_defaults(func=_seal)

    open_ = subparsers.add_parser("open", help="verify and decrypt a sealed file")
    open_.add_argument("input", type=Path, metavar="IN", help="sealed file")
    open_.add_argument(
        "output", type=Path, metavar="OUT", help="plaintext file; written only if the whole input verifies"
    )
    open_.add_argument("--key-file", type=Path, required=True, help=key_help)
    open_.set_defaults(func=_open)
