"""``sealserve demo-models``: build the tiny random-weight demo models, offline."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lib.models.demo import build_demo_models, has_models


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "demo-models",
        help="build tiny random-weight demo models (Stable Diffusion + image classifier), offline",
        description=(
            "Write a tiny Stable Diffusion pipeline (diffusers format) and a tiny image classifier "
            "(transformers format) with random, seeded weights into DIR/tiny-sd and "
            "DIR/tiny-classifier. The pictures and labels they produce are meaningless; the "
            "directories load and serve like real models."
        ),
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("ai-models"),
        help="directory to build the models in (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild models whose directory exists")
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing if DIR already holds any model (file or directory)",
    )
    parser.set_defaults(func=run_demo_models)


def run_demo_models(args: argparse.Namespace) -> int:
    target: Path = args.dir
    if args.if_missing and has_models(target):
        print(f"{target} already holds models; nothing to build")
        return 0
    started = time.perf_counter()
    paths = build_demo_models(target, force=args.force, report=print)
    print(f"demo models in {target.absolute()} ({len(paths)} models, {time.perf_counter() - started:.1f} s)")
    return 0
