"""Adapters from an object store (lora_registry/remote_sources.py) against a real S3-compatible
server on loopback (tests/s3_server.py), without Ray."""

import asyncio
import json
import shutil

import pytest

from lora_registry.registry import BaseModelSpec, LoraRegistry
from lora_registry.remote_sources import AdapterCache, AdapterSourceError, checksum
from serve_app.engines.lora_targets import VLLM_LORA_MODULES
from serve_app.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR
from tests.s3_server import upload_folder

BASE = BaseModelSpec("tiny-chat", json.loads((TINY_CHAT_DIR / "config.json").read_text()), True, 16, VLLM_LORA_MODULES)


@pytest.fixture(scope="module")
def store(s3_bucket, tmp_path_factory):
    client, bucket = s3_bucket
    url = upload_folder(client, bucket, XIAO_HUANG_DIR, "unit/xiao-huang")
    client.put_object(Bucket=bucket, Key="unit/broken/adapter_config.json", Body=b"{}")  # no weights
    return client, bucket, url


def registry(tmp_path, roots):
    return LoraRegistry(str(tmp_path / "state"), [BASE], roots, {})


def test_registered_from_s3_with_its_checksum(tmp_path, store):
    _, bucket, url = store
    reg = registry(tmp_path, [f"s3://{bucket}/unit"])
    record = asyncio.run(reg.register("xh-s3", url + "/"))
    assert record.path == url and record.rank == 8
    assert record.checksum == checksum(XIAO_HUANG_DIR)  # the same bytes as the shipped folder
    cached = tmp_path / "state" / "adapter-cache" / record.checksum
    assert sorted(p.name for p in cached.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in cached.parent.iterdir()] == [record.checksum]  # no partial download left


@pytest.mark.parametrize(
    "path,error,match",
    [
        ("s3://{bucket}/unit/missing", NotFoundError, "no PEFT adapter at"),
        ("s3://{bucket}/unit/broken", NotFoundError, r"found \['adapter_config.json'\]"),
        ("s3://{bucket}/elsewhere/xiao-huang", PermissionDeniedError, "outside the allowed URL roots"),
        ("s3://{bucket}/unit/../secret", InvalidRequestError, "no '..'"),
        ("s3://{bucket}/unitx/xiao-huang", PermissionDeniedError, "outside"),  # a root is whole segments
        ("gcsx://{bucket}/unit/xiao-huang", PermissionDeniedError, "outside"),
    ],
)
def test_bad_sources_are_clear_4xx_and_leave_nothing(tmp_path, store, path, error, match):
    _, bucket, _ = store
    reg = registry(tmp_path, [f"s3://{bucket}/unit"])
    with pytest.raises(error, match=match):
        asyncio.run(reg.register("bad", path.format(bucket=bucket)))
    assert asyncio.run(reg.state()).adapters == {}
    cache = tmp_path / "state" / "adapter-cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_an_unknown_protocol_is_refused_by_name(tmp_path):
    reg = registry(tmp_path, ["nosuchfs://bucket"])
    with pytest.raises(InvalidRequestError, match="nosuchfs:// are not readable"):
        asyncio.run(reg.register("bad", "nosuchfs://bucket/a"))


def test_a_replica_downloads_verified_files_and_refuses_changed_ones(tmp_path, store):
    client, bucket, url = store
    expected = checksum(XIAO_HUANG_DIR)
    cache = AdapterCache(tmp_path / "node-2")
    folder = cache.local(url, expected)
    assert checksum(folder) == expected and folder.name == expected
    assert cache.local(url, expected) == folder  # cached: no second download

    changed = upload_folder(client, bucket, XIAO_HUANG_DIR, "unit/changed")
    client.put_object(Bucket=bucket, Key="unit/changed/adapter_config.json", Body=b'{"r": 8}')
    with pytest.raises(AdapterSourceError, match="changed since they were registered") as error:
        AdapterCache(tmp_path / "node-3").local(changed, expected)
    assert error.value.status == 502
    assert list((tmp_path / "node-3").iterdir()) == []  # nothing half-written that looks complete
    shutil.rmtree(folder)


def test_downloads_left_by_a_dead_process_are_swept_and_live_ones_kept(tmp_path):
    import os
    import time

    root = tmp_path / "adapter-cache"
    stale, live = root / ".partial-dead", root / ".partial-live"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    hours_ago = time.time() - 2 * AdapterCache.STALE_PARTIAL_S
    os.utime(stale, (hours_ago, hours_ago))
    AdapterCache(root)  # as an engine replica starts
    assert not stale.exists() and live.is_dir()
