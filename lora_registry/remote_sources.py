"""Adapters in object stores: `s3://bucket/prefix` (and other fsspec URLs, `hf://` where a hub is
reachable) as an adapter's source.

On a cluster a local path registered on one node does not exist on the others. A URL does: the
registry downloads the adapter's files once when it is registered (checks them like a local
adapter and records their checksum), and every engine replica downloads them into its node's cache
(`<state_dir>/adapter-cache/<checksum>/`) before loading, verified against that checksum. A
download goes to a temporary folder renamed into place when complete, so a cache folder is never
half-written. Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...:
fsspec's and botocore's usual variables) and are never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath

from serve_app.errors import InvalidRequestError, LorafleetError, NotFoundError, PermissionDeniedError
from serve_app.platform import replica_logger

logger = replica_logger(__name__)
# What an adapter folder holds that an engine reads (its top-level files; nothing else is fetched)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MAX_ADAPTER_BYTES = 8 * 2**30


class AdapterSourceError(LorafleetError):
    """An object store failed to give an adapter's files (unreachable, or they changed)."""

    status = 502
    type = "adapter_source_error"


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def normalized_url(url: str) -> str:
    """`url` without a trailing slash; refused when it has `..`, `.` or empty segments."""
    protocol, _, rest = url.partition("://")
    parts = rest.rstrip("/").split("/")
    if not protocol or not parts[0] or any(p in ("", ".", "..") for p in parts[1:]):
        raise InvalidRequestError(
            f"adapter URL '{url}' is not a plain PROTOCOL://BUCKET/PREFIX (no '..', '.' or '//').", param="lora_path"
        )
    return f"{protocol}://{'/'.join(parts)}"


def url_allowed(url: str, roots: list[str]) -> bool:
    """Whether `url` lies under one of the URL roots (a root is a prefix of whole segments)."""
    return any(url == r or url.startswith(r + "/") for r in (normalized_url(r) for r in roots if is_url(r)))


def checksum(folder: Path) -> str:
    """sha256 over the adapter files' names, lengths and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(f for f in ADAPTER_FILES if (folder / f).is_file()):
        digest.update(f"{name}\0{(folder / name).stat().st_size}\0".encode())
        with open(folder / name, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class AdapterCache:
    """`<state_dir>/adapter-cache`: one folder per checksum, each complete or absent."""

    # A download in progress lives in a `.partial-*` folder; one this old was left by a process that
    # died mid-download (a node's replica SIGKILLed), as no adapter takes an hour to fetch.
    STALE_PARTIAL_S = 3600

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._sweep_partials()

    def _sweep_partials(self) -> None:
        cutoff = time.time() - self.STALE_PARTIAL_S
        for partial in self.root.glob(".partial-*"):
            with contextlib.suppress(OSError):
                if partial.stat().st_mtime < cutoff:
                    shutil.rmtree(partial, ignore_errors=True)

    def fetch_new(self, url: str) -> tuple[Path, str]:
        """Download `url` (at registration) into the cache: its folder and checksum."""
        staging = self._download(url)
        digest = checksum(staging)
        return self._keep(staging, digest), digest

    def local(self, url: str, expected: str) -> Path:
        """The cached folder of `url` with checksum `expected`, downloaded if this node lacks it."""
        folder = self.root / expected
        if folder.is_dir():
            return folder
        staging = self._download(url)
        if (found := checksum(staging)) != expected:
            shutil.rmtree(staging, ignore_errors=True)
            raise AdapterSourceError(
                f"the adapter files at {url} changed since they were registered (checksum {found[:12]}, "
                f"registered {expected[:12]}); register the adapter again (replace: true)."
            )
        return self._keep(staging, expected)

    def _keep(self, staging: Path, digest: str) -> Path:
        folder = self.root / digest
        try:
            os.rename(staging, folder)  # atomic; another process may have put the same files there first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not folder.is_dir():
                raise
        return folder

    def _download(self, url: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".partial-{uuid.uuid4().hex[:8]}-", dir=self.root))
        try:
            _copy_adapter_files(url, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging


def _copy_adapter_files(url: str, into: Path) -> None:
    fs, root = _filesystem(url)
    fs.invalidate_cache(root)  # fsspec keeps listings for the process's life; the store may have changed
    try:
        listing = {PurePosixPath(p["name"]).name: p for p in fs.ls(root, detail=True) if p.get("type") == "file"}
    except FileNotFoundError:
        listing = {}
    except PermissionError as e:
        raise PermissionDeniedError(f"the object store refused to list {url}: {e}", param="lora_path") from None
    except Exception as e:  # connection refused, bad endpoint, DNS: the store is unreachable
        raise AdapterSourceError(f"cannot reach the object store for {url}: {type(e).__name__}: {e}") from None
    wanted = [name for name in ADAPTER_FILES if name in listing]
    if "adapter_config.json" not in wanted or len(wanted) < 2:
        raise NotFoundError(
            f"no PEFT adapter at {url}: it needs adapter_config.json and adapter_model.safetensors (or .bin); "
            f"found {sorted(listing) or 'nothing'}.",
            param="lora_path",
            code="adapter_not_found",
        )
    if (size := sum(int(listing[n].get("size") or 0) for n in wanted)) > MAX_ADAPTER_BYTES:
        raise InvalidRequestError(f"the adapter at {url} is {size} bytes; at most {MAX_ADAPTER_BYTES}.")
    try:
        for name in wanted:
            fs.get_file(listing[name]["name"], str(into / name))
    except Exception as e:
        raise AdapterSourceError(f"downloading {url} failed: {type(e).__name__}: {e}") from None


def _filesystem(url: str):
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:  # pragma: no cover (fsspec comes with huggingface_hub)
        raise InvalidRequestError("adapter URLs need fsspec: pip install 'lorafleet[s3]'") from None
    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        extra = " pip install 'lorafleet[s3]'" if protocol in ("s3", "s3a") else ""
        raise InvalidRequestError(
            f"adapter URLs with {protocol}:// are not readable here ({e}).{extra}", param="lora_path"
        ) from None
    return url_to_fs(url)
