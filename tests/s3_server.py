"""A real S3-compatible server on loopback (moto's server mode) for the tests of adapters in object stores.

Started once per test run by the pytest controller, before any worker or Ray cluster starts: the
engine replicas and the registry read the endpoint and credentials from the environment, as they
would on a cluster (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), and Ray's processes inherit it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

BUCKET = "lorafleet-test-adapters"
_server: subprocess.Popen | None = None


def pytest_configure(config):
    global _server
    if hasattr(config, "workerinput") or "AWS_ENDPOINT_URL" in os.environ:
        return  # a worker (it inherits the controller's server), or an endpoint given from outside
    from tests.serve_fixtures import free_port

    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    _server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="lorafleet-test",
        AWS_SECRET_ACCESS_KEY=f"test-secret-{secrets.token_hex(8)}",  # the logs must never show it
        AWS_DEFAULT_REGION="us-east-1",
    )


def pytest_unconfigure(config):
    if _server is not None:
        _server.terminate()
        _server.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_bucket():
    """A boto3 client of the test server, and its bucket (created once)."""
    import boto3

    client = boto3.client("s3")
    deadline = time.monotonic() + 30
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return client, BUCKET


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> str:
    """Every file of `folder` under `prefix`; returns its s3:// URL."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"
