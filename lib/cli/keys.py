"""``sealserve keys create|list|update|revoke`` and ``sealserve usage [cleanup]``.

A new key is printed once, alone on the last line of ``keys create`` (so ``| tail -n1`` captures
it); nothing else ever prints a key or its hash. The database comes from ``--database-url``, else
``$DATABASE_URL``, else the SQLite file default.
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime

from lib.accounts.records import DEFAULT_BUDGET, DEFAULT_MAX_CONCURRENT
from lib.accounts.store import UNCHANGED, AccountStore, KeyRecord, UsageSummary
from lib.clock import utc_now
from lib.db import DATABASE_URL_ENV, resolve_database_url
from lib.durations import parse_duration, parse_since
from lib.errors import ValidationFailedError

UNLIMITED = "none"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="create, list, update and revoke API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = key_commands.add_parser("create", help="create an API key and print it once")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--scopes", required=True, help="comma-separated: infer, classify, admin")
    create.add_argument("--rate-limit", required=True, help="N/second|minute|hour|day, e.g. 60/minute")
    create.add_argument("--expires", help="lifetime, e.g. 30d or 12h (default: never)")
    create.add_argument("--owner", help="owner's email address")
    create.add_argument(
        "--budget",
        default=DEFAULT_BUDGET,
        help=f"compute budget in image-steps (one denoising step of one 512x512 image) per "
        f"second|minute|hour|day, or {UNLIMITED} (default {DEFAULT_BUDGET})",
    )
    create.add_argument(
        "--max-concurrent",
        default=str(DEFAULT_MAX_CONCURRENT),
        help=f"most generations at once, or {UNLIMITED} (default {DEFAULT_MAX_CONCURRENT})",
    )
    _add_database_option(create)
    create.set_defaults(func=create_key_command)

    listing = key_commands.add_parser("list", help="list keys (never shows a key or its hash)")
    _add_database_option(listing)
    listing.set_defaults(func=list_keys_command)

    change = key_commands.add_parser("update", help="change a key's limits (none: unlimited)")
    change.add_argument("key_id", metavar="ID")
    change.add_argument("--rate-limit", help="N/second|minute|hour|day")
    change.add_argument("--budget", help=f"image-steps per second|minute|hour|day, or {UNLIMITED}")
    change.add_argument("--max-concurrent", help=f"most generations at once, or {UNLIMITED}")
    _add_database_option(change)
    change.set_defaults(func=update_key_command)

    revoke = key_commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id", metavar="ID")
    _add_database_option(revoke)
    revoke.set_defaults(func=revoke_key_command)

    usage = subparsers.add_parser("usage", help="usage summary; `usage cleanup` deletes old records")
    usage.add_argument("--key", help="only this key id")
    usage.add_argument("--since", help="a duration back from now (7d) or an ISO date")
    _add_database_option(usage)
    usage.set_defaults(func=usage_command)
    usage_commands = usage.add_subparsers(dest="usage_command", required=False, metavar="ACTION")
    cleanup = usage_commands.add_parser("cleanup", help="delete usage records older than a duration")
    cleanup.add_argument("--older-than", required=True, help="e.g. 90d")
    _add_database_option(cleanup)
    cleanup.set_defaults(func=usage_cleanup_command)


def _add_database_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS so that `usage --database-url X cleanup` is not reset by the subcommand's default.
    parser.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="SQLAlchemy URL (default: $DATABASE_URL, else .sealserve/sealserve.db)",
    )


def _open_store(args: argparse.Namespace) -> AccountStore:
    return AccountStore(
        resolve_database_url(getattr(args, "database_url", None), os.environ.get(DATABASE_URL_ENV))
    )


def create_key_command(args: argparse.Namespace) -> int:
    expires_at = utc_now() + parse_duration(args.expires) if args.expires else None
    with _open_store(args) as store:
        created = store.create_key(
            args.name,
            args.scopes,
            args.rate_limit,
            expires_at=expires_at,
            owner_email=args.owner,
            budget=_optional(args.budget),
            max_concurrent=_optional_int(args.max_concurrent),
        )
    record = created.record
    print(f"Created API key {record.name!r}")
    for label, value in _key_fields(record):
        print(f"  {label + ':':<12}{value}")
    print("Store this key now: it is shown only once and cannot be recovered.")
    print(created.key)
    return 0


def list_keys_command(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        records = store.list_keys()
    if not records:
        print("no API keys")
        return 0
    header = ("ID", "PREFIX", "NAME", "SCOPES", "LIMIT", "BUDGET", "CONCURRENT", "EXPIRES", "REVOKED")
    rows = [
        (
            r.id,
            r.prefix + "...",
            r.name,
            ",".join(r.scopes),
            r.rate_limit,
            r.budget or UNLIMITED,
            str(r.max_concurrent or UNLIMITED),
            _when(r.expires_at),
            "yes" if r.revoked else "no",
        )
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def update_key_command(args: argparse.Namespace) -> int:
    if args.rate_limit is None and args.budget is None and args.max_concurrent is None:
        raise ValidationFailedError("nothing to change: give --rate-limit, --budget or --max-concurrent")
    with _open_store(args) as store:
        record = store.update_key(
            args.key_id,
            rate_limit=UNCHANGED if args.rate_limit is None else args.rate_limit,
            budget=UNCHANGED if args.budget is None else _optional(args.budget),
            max_concurrent=UNCHANGED if args.max_concurrent is None else _optional_int(args.max_concurrent),
        )
    print(f"Updated API key {record.id} ({record.prefix}..., {record.name!r})")
    for label, value in _key_fields(record):
        print(f"  {label + ':':<12}{value}")
    return 0


def revoke_key_command(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        record = store.revoke_key(args.key_id)
    print(f"Revoked API key {record.id} ({record.prefix}..., {record.name!r})")
    return 0


def usage_command(args: argparse.Namespace) -> int:
    since = parse_since(args.since, utc_now()) if args.since else None
    with _open_store(args) as store:
        summary = store.usage_summary(key_id=args.key, since=since)
    scope = f"key {args.key}" if args.key else "all keys"
    print(f"Usage for {scope} since {_when(since) if since else 'the beginning'}")
    _print_summary(summary)
    return 0


def usage_cleanup_command(args: argparse.Namespace) -> int:
    older_than = parse_duration(args.older_than)
    with _open_store(args) as store:
        deleted = store.cleanup_usage(older_than)
    print(f"Deleted {deleted} usage records older than {args.older_than}")
    return 0


def _print_summary(summary: UsageSummary) -> None:
    print(f"  requests:      {summary.total_requests}")
    print(f"  successful:    {summary.successful_requests} ({summary.success_rate:.1%})")
    print(f"  avg latency:   {summary.avg_response_time_ms:.1f} ms")
    print(f"  images:        {summary.total_images}")
    print(f"  cost:          {summary.total_cost} image-steps")
    for title, counts in (("by endpoint", summary.by_endpoint), ("by model", summary.by_model)):
        if counts:
            print(f"  {title}:")
            for name, count in counts.items():
                print(f"    {name}: {count}")


def _key_fields(record: KeyRecord) -> list[tuple[str, str]]:
    return [
        ("id", record.id),
        ("prefix", record.prefix + "..."),
        ("scopes", ",".join(record.scopes)),
        ("rate limit", record.rate_limit),
        ("budget", f"{record.budget} image-steps" if record.budget else UNLIMITED),
        ("concurrent", str(record.max_concurrent or UNLIMITED)),
        ("expires", _when(record.expires_at)),
        ("owner", record.owner_email or "-"),
    ]


def _optional(value: str) -> str | None:
    return None if value.strip().lower() == UNLIMITED else value


def _optional_int(value: str) -> int | None:
    if value.strip().lower() == UNLIMITED:
        return None
    if not value.strip().isdigit():
        raise ValidationFailedError(f"--max-concurrent must be a number or {UNLIMITED}, not {value[:20]!r}")
    return int(value)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "never"
