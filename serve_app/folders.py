"""Folders that appear whole or not at all (exports, conversions, merges)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from serve_app.errors import ConfigError


@contextlib.contextmanager
def complete_or_nothing(out: Path):
    """A temporary sibling folder to write into, renamed to `out` only when the block completes, so
    an interrupted export leaves no folder that looks complete."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"'{out}' exists and is not empty; choose another --output_dir.", param="output_dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp's 0700 would keep the export from other users of a shared folder
    try:
        yield partial
        with contextlib.suppress(FileNotFoundError):
            out.rmdir()  # an empty folder the user made
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
