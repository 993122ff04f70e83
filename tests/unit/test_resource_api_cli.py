"""``sealserve resource-api users ... | cdn set`` (lib/cli/resource_api.py), run in-process."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lib.cli.resource_api import register
from lib.errors import BadRequestError, ConfigurationError, IntegrityError, ValidationFailedError
from lib.resource_api.app import create_app
from lib.resource_api.settings import ResourceApiSettings
from lib.sealed.keywrap import NodeKeyPair, WrappedSecret, b64encode
from lib.sealed.signing import PublisherTrust, SigningKey, node_request_message
from lib.sealed.wire import CdnConfig

FP = "f" * 64


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["resource-api", *argv])
    return int(args.func(args))


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "RESOURCE_MASTER_KEY": os.urandom(32).hex(),
        "RESOURCE_JWT_SECRET": secrets.token_urlsafe(40),
        "RESOURCE_API_ENV": "production",
        "PUB_PASSWORD": "cli-publisher-" + secrets.token_hex(4),
        "S3_ACCESS": "AKIDCLI",
        "S3_SECRET": "s3-secret-" + secrets.token_hex(6),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_users_create_and_list_never_print_the_password(
    db_url: str, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run("users", "create", "--email", "Pub@Example.com", "--password-env", "PUB_PASSWORD",
                "--role", "publisher", "--database-url", db_url) == 0
    assert _run("users", "create", "--email", "node@example.com", "--password", "reader-password-1",
                "--role", "reader", "--fingerprint", FP, "--database-url", db_url) == 0
    assert _run("users", "list", "--database-url", db_url) == 0
    out, err = capsys.readouterr()
    assert "pub@example.com" in out and "publisher" in out and "nodes=" + FP[:12] in out
    assert env["PUB_PASSWORD"] not in out + err and "reader-password-1" not in out
    assert "visible to other local users" in err
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as db:
        hashes = [row[0] for row in db.execute("SELECT password_hash FROM resource_api_users")]
    assert all(h.startswith("scrypt$") and env["PUB_PASSWORD"] not in h for h in hashes)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--password-env", "UNSET_VARIABLE_X"], BadRequestError),
        (["--password", "short"], ValidationFailedError),
        (["--password", "long-enough-pass", "--fingerprint", "XYZ"], ValidationFailedError),
    ],
)
def test_users_create_refuses_bad_input(db_url: str, env: dict[str, str], argv: list[str],
                                        error: type[Exception]) -> None:
    with pytest.raises(error):
        _run("users", "create", "--email", "x@example.com", "--role", "reader",
             "--database-url", db_url, *argv)


def test_duplicate_user_is_refused(db_url: str, env: dict[str, str]) -> None:
    args = ["users", "create", "--email", "dup@example.com", "--password-env", "PUB_PASSWORD",
            "--role", "reader", "--database-url", db_url]
    assert _run(*args) == 0
    with pytest.raises(ValidationFailedError, match="already exists"):
        _run(*args)


def test_cdn_set_is_signed_and_released_only_to_an_approved_node(
    db_url: str, env: dict[str, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _run("users", "create", "--email", "pub@example.com", "--password-env", "PUB_PASSWORD",
         "--role", "publisher", "--database-url", db_url)
    signer = SigningKey.generate()
    signer.save(tmp_path / "signing.key")
    assert _run("cdn", "set", "--endpoint-url", "http://127.0.0.1:9000", "--bucket", "models",
                "--access-key-env", "S3_ACCESS", "--secret-key-env", "S3_SECRET",
                "--signing-key", str(tmp_path / "signing.key"), "--database-url", db_url) == 0
    assert env["S3_SECRET"] not in capsys.readouterr().out
    app = create_app(ResourceApiSettings.from_env(database_url=db_url))
    keypair, node_key = NodeKeyPair.generate(), SigningKey.generate()
    with TestClient(app) as client:
        token = client.post("/login", json={"email": "pub@example.com", "password": env["PUB_PASSWORD"]})
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}

        def release() -> Any:
            nonce = client.post("/nodes/nonce", headers=headers).json()["nonce"]
            message = node_request_message(kind="cdn", folder=None, name=None,
                                           public_key=keypair.public_bytes(), fingerprint=FP,
                                           nonce=nonce, node_id=node_key.id)
            body = {"public_key": keypair.public_key_b64(), "fingerprint": FP, "node_id": node_key.id,
                    "nonce": nonce, "signature": b64encode(node_key.sign(message))}
            return client.post("/cdn", json=body, headers=headers)

        enrolled = client.post("/nodes/enroll", headers=headers,
                               json={"node_key": node_key.public_b64, "fingerprint": FP, "hostname": "gpu-1"})
        assert enrolled.json()["status"] == "pending"
        assert release().status_code == 403, "a pending node receives nothing"
        assert _run("nodes", "list", "--database-url", db_url) == 0
        assert f"{node_key.id}\tpending\thost=gpu-1" in capsys.readouterr().out
        assert _run("nodes", "approve", node_key.id[:12], "--database-url", db_url) == 0
        released = release()
        assert released.status_code == 200, released.text
        wrapped = WrappedSecret.model_validate(released.json()["wrapped_config"])
        assert _run("nodes", "revoke", node_key.id, "--database-url", db_url) == 0
        assert release().status_code == 403, "a revoked node receives nothing"
        with pytest.raises(ValidationFailedError, match="stays revoked"):
            _run("nodes", "approve", node_key.id, "--database-url", db_url)
    config = CdnConfig.from_plaintext_json(keypair.unwrap(wrapped, FP, context="cdn"))
    assert config.endpoint_url == "http://127.0.0.1:9000" and config.access_key_id == "AKIDCLI"
    assert config.secret_access_key.get_secret_value() == env["S3_SECRET"]
    trusted = PublisherTrust([signer.public_b64])
    trusted.check_cdn(json.loads(config.plaintext_json()))
    with pytest.raises(IntegrityError):
        PublisherTrust([SigningKey.generate().public_b64]).check_cdn(json.loads(config.plaintext_json()))


def test_production_refuses_a_plain_http_storage_endpoint_and_serving_plain_http(
    db_url: str, env: dict[str, str]
) -> None:
    with pytest.raises(ValidationFailedError, match="plain HTTP"):
        _run("cdn", "set", "--endpoint-url", "http://s3.internal.example:9000", "--bucket", "b",
             "--access-key-env", "S3_ACCESS", "--secret-key-env", "S3_SECRET", "--database-url", db_url)
    with pytest.raises(ConfigurationError, match=r"refusing plain HTTP on 0\.0\.0\.0"):
        _run("serve", "--host", "0.0.0.0", "--database-url", db_url)  # noqa: S104 - the case under test


def test_cdn_set_without_master_key_refuses(db_url: str, env: dict[str, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESOURCE_MASTER_KEY")
    with pytest.raises(ConfigurationError, match="RESOURCE_MASTER_KEY"):
        _run("cdn", "set", "--bucket", "b", "--access-key-env", "S3_ACCESS", "--secret-key-env", "S3_SECRET",
             "--database-url", db_url)
