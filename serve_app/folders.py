"""Folders that appear whole or not at all (exports, conversions, merges)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from serve_app.errors import ConfigError

STALE_PARTIAL_S = 3600  # a partial folder this old belongs to an export that died (a live one writes on)


def check_free(out: Path) -> None:
    """Refuse a non-empty output folder before any work is done."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not empty; choose another --output_dir.", param="output_dir")


@contextlib.contextmanager
def complete_or_nothing(out: Path):
    """A temporary sibling folder to write into, renamed to `out` only when the block completes, so
    an interrupted export leaves no folder that looks complete. Partial folders of exports that were
    killed (no `finally` ran) are swept once they are an hour old."""
    check_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        if time.time() - stale.stat().st_mtime > STALE_PARTIAL_S:
            shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp's 0700 would keep the export from other users of a shared folder
    try:
        yield partial
        with contextlib.suppress(FileNotFoundError):
            out.rmdir()  # an empty folder the user made
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
