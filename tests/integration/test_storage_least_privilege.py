"""Least privilege for storage, against moto enforcing IAM (a real S3-compatible process).

The bucket is set up as docs/security-sealed.md says: the nodes' credential (the one the resource
API releases) may only read objects; the publishers' own credential may write under their folder
and may not delete. A sealed model is published with the publisher's credential and fetched by a
node with the released one; then each credential tries what it must not do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from pydantic import SecretStr

from devservers.resource_api import ResourceApiServer, start_resource_api_server
from devservers.s3 import S3Server, start_s3_server
from lib.retry import RetryPolicy
from lib.sealed.cdn import CdnClient
from lib.sealed.fetch import SealedFetcher, SealedRef
from lib.sealed.fingerprint import node_fingerprint
from lib.sealed.publish import publish_model
from lib.sealed.resource_client import ResourceClient
from lib.sealed.signing import SigningKey
from lib.sealed.wire import CdnConfig

BUCKET = "sealed-models"
FOLDER = "models"
PUBLISHER = ("publisher@example.com", "least-privilege-publisher-pw")
READER = ("reader@example.com", "least-privilege-reader-pw")
RETRY = RetryPolicy(attempts=2, base_delay=0.05)
# The two policies of docs/security-sealed.md ("Least privilege for storage").
NODE_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": f"arn:aws:s3:::{BUCKET}/*"}]}
PUBLISHER_POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Resource": f"arn:aws:s3:::{BUCKET}/{FOLDER}/*",
     "Action": ["s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]},
    {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
     "Resource": f"arn:aws:s3:::{BUCKET}"}]}
# Requests moto serves before it enforces IAM: the administrator's setup below, no more.
SETUP_ACTIONS = 7


@dataclass
class Bucket:
    s3: S3Server
    api: ResourceApiServer
    node: CdnConfig
    publisher: CdnConfig


def _config(s3: S3Server, key: dict[str, str]) -> CdnConfig:
    return CdnConfig(endpoint_url=s3.direct_endpoint_url, bucket=BUCKET, region="us-east-1",
                     access_key_id=key["AccessKeyId"], secret_access_key=SecretStr(key["SecretAccessKey"]))


def _boto(config: CdnConfig) -> Any:
    return boto3.client("s3", endpoint_url=config.endpoint_url, region_name=config.region,
                        aws_access_key_id=config.access_key_id,
                        aws_secret_access_key=config.secret_access_key.get_secret_value())


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    # Straight to moto (not the counting proxy): a SigV4 signature covers the Host header.
    s3 = start_s3_server(extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)})
    api = None
    try:
        admin = {"endpoint_url": s3.direct_endpoint_url, "region_name": "us-east-1",
                 "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        iam = boto3.client("iam", **admin)
        keys = {}
        for user, policy in (("node", NODE_POLICY), ("publisher", PUBLISHER_POLICY)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="sealed", PolicyDocument=json.dumps(policy))
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)  # the administrator makes it once
        api = start_resource_api_server(tmp_path_factory.mktemp("resource-api"))
        api.create_user(*PUBLISHER, role="publisher")
        api.create_user(*READER, role="reader")
        api.set_cdn(_config(s3, keys["node"]))  # what the resource API releases: read-only
        yield Bucket(s3, api, _config(s3, keys["node"]), _config(s3, keys["publisher"]))
    finally:
        if api is not None:
            api.stop()
        s3.stop()


class PublisherStore:
    """The publisher's side of the bucket with its own credential (``BigPartStore``).

    moto answers a HEAD of an object 403 whatever the policy when it enforces IAM, so the size
    check reads the first byte's ``Content-Range`` (allowed by ``s3:GetObject``) instead."""

    bucket = BUCKET

    def __init__(self, config: CdnConfig) -> None:
        self._cdn = CdnClient(config, retry_policy=RETRY)
        self._s3 = _boto(config)

    def ensure_bucket(self) -> None:
        pass  # made by the administrator: a publisher cannot create buckets

    def upload_file(self, path: Path, key: str) -> None:
        self._cdn.upload_file(path, key)

    def object_size(self, key: str) -> int:
        answer = self._s3.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-0")
        return int(answer["ContentRange"].rsplit("/", 1)[1])


def _denied(call: Any) -> bool:
    try:
        call()
    except botocore.exceptions.ClientError as exc:
        return exc.response["Error"]["Code"] in ("AccessDenied", "403")
    return False


def test_nodes_read_with_the_released_credential_and_can_neither_write_nor_delete(
    bucket: Bucket, tmp_path: Path
) -> None:
    plaintext = os.urandom(300_000)
    source = tmp_path / "model.bin"
    source.write_bytes(plaintext)
    publisher = ResourceClient(bucket.api.url, *PUBLISHER, retry=RETRY)
    published = publish_model(source, name="model.bin", folder=FOLDER, kind="image-classification",
                              resources=publisher, cdn=PublisherStore(bucket.publisher), small_size_kb=16,
                              segment_size=65536)
    # A node: the released credential is enough to fetch and verify the model.
    node_key = SigningKey.generate()
    bucket.api.approve_node(READER, node_key, node_fingerprint())
    reader = ResourceClient(bucket.api.url, *READER, retry=RETRY, node_key=node_key)
    released: list[CdnConfig] = []

    def cdn_factory(config: CdnConfig) -> CdnClient:
        released.append(config)
        return CdnClient(config, retry_policy=RETRY)

    fetcher = SealedFetcher(reader, fingerprint=node_fingerprint(), cdn_factory=cdn_factory)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    outcome = fetcher.fetch(SealedRef(FOLDER, "model.bin", published.id), cache)
    assert outcome.path.read_bytes() == plaintext
    [node_config] = released
    assert node_config.access_key_id == bucket.node.access_key_id != bucket.publisher.access_key_id
    # ... and nothing more: it cannot overwrite or delete a big part, nor write a new one.
    node = _boto(node_config)
    assert _denied(lambda: node.put_object(Bucket=BUCKET, Key=published.big_key, Body=b"evil"))
    assert _denied(lambda: node.delete_object(Bucket=BUCKET, Key=published.big_key))
    assert _denied(lambda: node.put_object(Bucket=BUCKET, Key=f"{FOLDER}/new.big", Body=b"x"))
    # The publisher's own credential writes its folder but deletes nothing, and nothing elsewhere.
    writer = _boto(bucket.publisher)
    assert _denied(lambda: writer.delete_object(Bucket=BUCKET, Key=published.big_key))
    assert _denied(lambda: writer.put_object(Bucket=BUCKET, Key="other-folder/x.big", Body=b"x"))
    assert _boto(bucket.publisher).get_object(Bucket=BUCKET, Key=published.big_key)["ContentLength"] == (
        published.sealed_size - published.small_size
    )
