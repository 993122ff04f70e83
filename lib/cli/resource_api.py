"""``sealserve resource-api serve | users create | users list | nodes list|approve|revoke | cdn set``.

``nodes``: a node enrolls its key on its first key release; it receives nothing until approved
here (``approve ID``, the id or its first 8+ characters, as ``nodes list`` shows it), and
``revoke ID`` stops it for good. ``cdn set --signing-key FILE`` signs the storage config with a
publisher key, so nodes that trust that key accept it.

``serve`` runs the resource API standalone with uvicorn. Secrets come from the environment only
(``RESOURCE_MASTER_KEY``, ``RESOURCE_JWT_SECRET``; see :mod:`lib.resource_api.settings`), and
so do user passwords and CDN keys: ``--password-env VAR`` / ``--secret-key-env VAR`` name a
variable, or the password is prompted for. Nothing here prints a secret.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from lib.errors import BadRequestError, ConfigurationError
from lib.resource_api.nodes import NodeRegistry
from lib.resource_api.passwords import PasswordHasher
from lib.resource_api.service import ROLES, ResourceService, create_user
from lib.resource_api.settings import ENV_VARS, ResourceApiSettings, describe_errors
from lib.resource_api.store import ResourceStore
from lib.sealed.keywrap import b64encode
from lib.sealed.signing import SigningKey, cdn_message
from lib.sealed.wire import CdnConfig, is_loopback_host

log = logging.getLogger(__name__)

DEFAULT_PORT = 8100


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "resource-api", help="run and administer the resource API (small parts and sealed keys)"
    )
    commands = parser.add_subparsers(dest="resource_api_command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the resource API with uvicorn")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--environment", choices=["development", "production"], default=None)
    serve.add_argument("--token-ttl", type=int, dest="token_ttl_seconds", default=None,
                       help="login token lifetime in seconds")
    serve.add_argument("--token-leeway", type=int, dest="token_leeway_seconds", default=None,
                       help="clock skew tolerated on token times, in seconds (default 10)")
    serve.add_argument("--max-upload-bytes", type=int, default=None)
    serve.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    serve.add_argument("--ssl-keyfile", default=None)
    serve.add_argument("--behind-tls-proxy", action="store_true",
                       help="production on a non-loopback address without --ssl-certfile: a TLS proxy "
                            "terminates HTTPS in front (otherwise refused)")
    _add_store_arguments(serve)
    serve.set_defaults(func=_serve)

    users = commands.add_parser("users", help="manage resource API users")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="COMMAND")
    create = user_commands.add_parser("create", help="add a user")
    create.add_argument("--email", required=True)
    password = create.add_mutually_exclusive_group()
    password.add_argument("--password-env", metavar="VAR", help="read the password from $VAR")
    password.add_argument("--password", help="the password (visible to `ps`; prefer --password-env)")
    create.add_argument("--role", choices=ROLES, required=True)
    create.add_argument("--fingerprint", action="append", default=[], metavar="FP",
                        help="allow only this node fingerprint (repeatable; default: any node)")
    _add_store_arguments(create, secrets=False)
    create.set_defaults(func=_users_create)
    listing = user_commands.add_parser("list", help="list users (never their password hashes)")
    _add_store_arguments(listing, secrets=False)
    listing.set_defaults(func=_users_list)

    nodes = commands.add_parser("nodes", help="enrolled nodes: list, approve, revoke")
    node_commands = nodes.add_subparsers(dest="nodes_command", required=True, metavar="COMMAND")
    node_list = node_commands.add_parser("list", help="list enrolled nodes and their status")
    _add_store_arguments(node_list, secrets=False)
    node_list.set_defaults(func=_nodes_list)
    actions = (("approve", "let a pending node receive keys"), ("revoke", "refuse a node for good"))
    for action, what in actions:
        command = node_commands.add_parser(action, help=what)
        command.add_argument("node_id", metavar="ID", help="node id, or its first 8+ characters")
        _add_store_arguments(command, secrets=False)
        command.set_defaults(func=_nodes_set, status="approved" if action == "approve" else "revoked")

    cdn = commands.add_parser("cdn", help="manage the CDN config released to nodes")
    cdn_commands = cdn.add_subparsers(dest="cdn_command", required=True, metavar="COMMAND")
    cdn_set = cdn_commands.add_parser("set", help="store the S3/CDN config, sealed under the master key")
    cdn_set.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint; omit for AWS")
    cdn_set.add_argument("--bucket", required=True)
    cdn_set.add_argument("--region", default="us-east-1")
    cdn_set.add_argument("--access-key-env", required=True, metavar="VAR")
    cdn_set.add_argument("--secret-key-env", required=True, metavar="VAR")
    cdn_set.add_argument("--environment", choices=["development", "production"], default=None)
    cdn_set.add_argument("--signing-key", type=Path, default=None, metavar="FILE",
                         help="publisher signing key (`sealserve keygen --signing`) that signs the config")
    _add_store_arguments(cdn_set)
    cdn_set.set_defaults(func=_cdn_set)


def _add_store_arguments(parser: argparse.ArgumentParser, *, secrets: bool = True) -> None:
    parser.add_argument("--database-url", default=None,
                        help=f"SQLAlchemy URL (default: ${ENV_VARS['database_url']} or the SQLite file)")
    if secrets:
        parser.add_argument("--state-dir", default=None, help="directory for development secrets")


def _database_url(args: argparse.Namespace) -> str:
    default = ResourceApiSettings.model_fields["database_url"].default
    return str(args.database_url or os.environ.get(ENV_VARS["database_url"]) or default)


def _from_env(var: str, what: str) -> str:
    value = os.environ.get(var, "")
    if not value:
        raise BadRequestError(f"environment variable {var} ({what}) is not set or empty")
    return value


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lib.resource_api.app import create_app

    settings = ResourceApiSettings.from_env(
        environment=args.environment,
        database_url=args.database_url,
        state_dir=args.state_dir,
        token_ttl_seconds=args.token_ttl_seconds,
        token_leeway_seconds=args.token_leeway_seconds,
        max_upload_bytes=args.max_upload_bytes,
    )
    if not args.ssl_certfile and not is_loopback_host(args.host):
        if settings.environment != "development" and not args.behind_tls_proxy:
            raise ConfigurationError(
                f"refusing plain HTTP on {args.host} in {settings.environment}: give --ssl-certfile/"
                "--ssl-keyfile, or --behind-tls-proxy when a proxy terminates TLS in front"
            )
        log.warning(
            "serving plain HTTP on %s: uploads carry DEKs and logins passwords; put TLS in front",
            args.host,
        )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        server_header=False,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_env:
        return _from_env(args.password_env, "the password")
    if args.password:
        print("warning: --password is visible to other local users; prefer --password-env", file=sys.stderr)
        return str(args.password)
    if not sys.stdin.isatty():
        raise BadRequestError("no password: pass --password-env VAR (or run in a terminal to be prompted)")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("repeat password: "):
        raise BadRequestError("the passwords differ")
    return first


def _users_create(args: argparse.Namespace) -> int:
    password = _read_password(args)
    store = ResourceStore(_database_url(args))
    try:
        user = create_user(
            store, email=args.email, password=password, role=args.role,
            fingerprints=args.fingerprint, hasher=PasswordHasher(),
        )
    finally:
        store.close()
    scope = f"{len(user.allowed_fingerprints)} node(s)" if user.allowed_fingerprints else "any node"
    print(f"created {user.role} {user.email} (id {user.id}), may fetch for {scope}")
    return 0


def _users_list(args: argparse.Namespace) -> int:
    store = ResourceStore(_database_url(args))
    try:
        users = store.list_users()
    finally:
        store.close()
    for user in users:
        nodes = ",".join(fp[:12] for fp in user.allowed_fingerprints) if user.allowed_fingerprints else "any"
        print(f"{user.id}\t{user.email}\t{user.role}\tnodes={nodes}\tcreated={user.created_at.isoformat()}")
    if not users:
        print("no users", file=sys.stderr)
    return 0


def _cdn_set(args: argparse.Namespace) -> int:
    try:
        config = CdnConfig(
            endpoint_url=args.endpoint_url,
            bucket=args.bucket,
            region=args.region,
            access_key_id=_from_env(args.access_key_env, "the access key id"),
            secret_access_key=SecretStr(_from_env(args.secret_key_env, "the secret key")),
        )
    except ValidationError as exc:
        raise BadRequestError(f"invalid CDN config: {describe_errors(exc)}") from None
    if args.signing_key is not None:
        signer = SigningKey.load(args.signing_key)
        fields = json.loads(config.plaintext_json())
        signature = {"key": signer.public_b64, "value": b64encode(signer.sign(cdn_message(fields)))}
        config = CdnConfig.model_validate({**fields, "signature": signature})
    settings = ResourceApiSettings.from_env(
        environment=args.environment, database_url=args.database_url, state_dir=args.state_dir
    )
    service = ResourceService(settings)
    try:
        service.check_cdn_endpoint(config)
        service.save_cdn_config(config)
    finally:
        service.store.close()
    print(f"CDN config stored: bucket {config.bucket}, region {config.region}")
    return 0


def _nodes_list(args: argparse.Namespace) -> int:
    store = ResourceStore(_database_url(args))
    try:
        nodes = NodeRegistry(store).list()
    finally:
        store.close()
    for node in nodes:
        print(f"{node.node_id}\t{node.status}\thost={node.hostname or '-'}"
              f"\tfingerprint={node.fingerprint[:16]}"
              f"\tenrolled={node.created_at.isoformat()}")
    if not nodes:
        print("no nodes", file=sys.stderr)
    return 0


def _nodes_set(args: argparse.Namespace) -> int:
    store = ResourceStore(_database_url(args))
    try:
        node = NodeRegistry(store).set_status(args.node_id, args.status)
    finally:
        store.close()
    print(f"node {node.node_id} ({node.hostname or 'no hostname'}): {node.status}")
    return 0
