"""The ``sealserve`` command line.

Each command group lives in its own module under ``lib/cli/`` and exposes
``register(subparsers)``, which adds its parser(s) and sets ``func`` on each: a callable taking the
parsed ``argparse.Namespace`` and returning the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from lib.errors import SealserveError

# One line per command module; a module is imported only when the CLI starts.
COMMAND_MODULES: tuple[str, ...] = (
    "lib.cli.demo",
    "lib.cli.serve",
    "lib.cli.seal",
    "lib.cli.keys",
    "lib.cli.resource_api",
    "lib.cli.publish",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sealserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except SealserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
