"""``sealserve publish PATH --name NAME --folder FOLDER``: seal a model and publish it.

See docs/sealed-models.md. The kind of model is recognised from its files unless ``--kind``
gives it (``detect_kind``: recognition is :mod:`lib.models.files`, which the sealed package
does not import).

A publisher brings its own S3 write credential: ``--bucket`` (with ``--cdn-endpoint-url`` for a
non-AWS store) and ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``. The resource API only ever
releases the nodes' read-only credential, and only to approved nodes. ``--signing-key`` (or
``$SEALSERVE_SIGNING_KEY_FILE``, made by ``sealserve keygen --signing``) signs the manifest.
Passwords and keys come from the environment (or a prompt), never the command line. Plain HTTP to
a host other than loopback is refused unless ``--allow-plain-http``.

The id is printed alone on the last line, so ``id=$(sealserve publish ... | tail -n1)`` works.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from lib.errors import BadRequestError, PublishError
from lib.models.files import recognise
from lib.sealed.cdn import CdnClient
from lib.sealed.format import DEFAULT_SEGMENT_SIZE, MAX_SEGMENT_SIZE
from lib.sealed.publish import DEFAULT_SMALL_SIZE_KB, KINDS, check_kind, publish_model
from lib.sealed.resource_client import ResourceClient
from lib.sealed.signing import SigningKey
from lib.sealed.wire import CdnConfig, plain_http_refusal

URL_ENV = "RESOURCE_API_URL"
EMAIL_ENV = "RESOURCE_API_EMAIL"
PASSWORD_ENV = "RESOURCE_API_PASSWORD"  # noqa: S105 - the name of a variable, not a password
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 - the name of a variable
SIGNING_KEY_ENV = "SEALSERVE_SIGNING_KEY_FILE"


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "publish", help="seal a model and publish it (big part to S3, small part and key to the resource API)"
    )
    add = parser.add_argument
    add("path", type=Path, metavar="PATH", help="model file, or model directory (published as a tar)")
    add("--name", required=True, help="resource name, e.g. tiny-sd")
    add("--folder", required=True, help="resource folder, e.g. models")
    add("--kind", choices=KINDS, default=None, help="model kind (default: detected from the files)")
    add("--small-size-kb", type=_int_in(0, 1 << 20), default=DEFAULT_SMALL_SIZE_KB, metavar="KB",
        help=f"at most this many KiB stay with the resource API (default {DEFAULT_SMALL_SIZE_KB})")
    add("--segment-size", type=_int_in(1, MAX_SEGMENT_SIZE), default=DEFAULT_SEGMENT_SIZE, metavar="BYTES",
        help=f"plaintext bytes per sealed segment (default {DEFAULT_SEGMENT_SIZE})")
    add("--work-dir", type=Path, default=None, help="where temporary files go (default: the system temp dir)")
    add("--resource-api", metavar="URL", default=None, help=f"resource API URL (default ${URL_ENV})")
    add("--email", default=None,
        help=f"publisher email (default ${EMAIL_ENV}); the password comes from ${PASSWORD_ENV} or a prompt")
    add("--cdn-endpoint-url", default=None, help="S3-compatible endpoint for the big part (default: AWS)")
    add("--bucket", required=True,
        help=f"bucket for the big part; your own write credential comes from ${ACCESS_KEY_ENV} "
             f"and ${SECRET_KEY_ENV}")
    add("--region", default="us-east-1", help="bucket region (default us-east-1)")
    add("--signing-key", type=Path, default=None, metavar="FILE",
        help=f"publisher signing key (`sealserve keygen --signing`; default ${SIGNING_KEY_ENV})")
    add("--allow-plain-http", action="store_true",
        help="accept plain HTTP to a resource API or S3 endpoint that is not loopback (development only)")
    parser.set_defaults(func=_publish)


def _required(value: str | None, flag: str, env: str) -> str:
    value = value or os.environ.get(env, "")
    if not value:
        raise BadRequestError(f"no {flag.lstrip('-').replace('-', ' ')}: pass {flag} or set ${env}")
    return value


def _password() -> str:
    password = os.environ.get(PASSWORD_ENV, "")
    if password:
        return password
    if not sys.stdin.isatty():
        raise BadRequestError(f"no password: set ${PASSWORD_ENV} (or run in a terminal to be prompted)")
    return getpass.getpass("resource API password: ")


def _write_config(args: argparse.Namespace) -> CdnConfig:
    if args.cdn_endpoint_url and not args.allow_plain_http:
        refusal = plain_http_refusal(args.cdn_endpoint_url, "the S3 endpoint")
        if refusal is not None:
            raise BadRequestError(refusal)
    access, secret = os.environ.get(ACCESS_KEY_ENV, ""), os.environ.get(SECRET_KEY_ENV, "")
    if not access or not secret:
        raise BadRequestError(f"publishing needs your S3 write credential: ${ACCESS_KEY_ENV} and "
                              f"${SECRET_KEY_ENV} in the environment")
    try:
        return CdnConfig(endpoint_url=args.cdn_endpoint_url, bucket=args.bucket, region=args.region,
                         access_key_id=access, secret_access_key=SecretStr(secret))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise BadRequestError(f"invalid S3 settings: {where}: {first['msg']}") from None


def _local_failure(path: Path, exc: OSError) -> BadRequestError:
    return BadRequestError(f"publishing {path} failed: {exc.strerror or exc}")


def detect_kind(path: Path, kind: str | None = None) -> str:
    """``kind`` if given (checked against the known kinds), else what :func:`recognise` finds."""
    if kind is not None:
        return check_kind(kind)
    if not path.exists():
        raise PublishError(f"{path} does not exist")
    recognition = recognise(path)
    if recognition.kind is None:
        raise PublishError(
            f"{path} is not a recognised model ({recognition.error}); "
            "give its kind (--kind) to publish it anyway"
        )
    return recognition.kind


def _publish(args: argparse.Namespace) -> int:
    url = _required(args.resource_api, "--resource-api", URL_ENV)
    email = _required(args.email, "--email", EMAIL_ENV)
    config = _write_config(args)  # checked before any network call
    key_path = args.signing_key or (Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV)
                                    else None)
    signing_key = SigningKey.load(key_path) if key_path is not None else None
    try:
        # resolve(): recognised as publish_model reads it (a link is published by its target).
        kind = detect_kind(args.path.resolve(), args.kind)
    except OSError as exc:
        raise _local_failure(args.path, exc) from None
    resources = ResourceClient(url, email, _password(), allow_plain_http=args.allow_plain_http)
    try:
        cdn = CdnClient(config)
        try:
            result = publish_model(
                args.path, name=args.name, folder=args.folder, kind=kind, resources=resources, cdn=cdn,
                small_size_kb=args.small_size_kb, segment_size=args.segment_size, work_dir=args.work_dir,
                signing_key=signing_key,
            )
        except OSError as exc:
            raise _local_failure(args.path, exc) from None
        finally:
            cdn.close()
    finally:
        resources.close()
    print(f"{result.status}: {result.folder}/{result.name} ({result.plaintext_size} bytes plaintext, "
          f"{result.sealed_size} sealed: {result.small_size} on the resource API, "
          f"{result.sealed_size - result.small_size} at s3://{config.bucket}/{result.big_key})")
    print(result.id)
    return 0
