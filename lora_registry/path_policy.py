"""Which adapter paths may be read: only folders inside the allowed roots.

Checked on the path's text and on its real location before any file in it is opened:
no `..` components, and after resolving symlinks the folder must still lie inside a root.
Object-store URLs (remote_sources.py) must lie under a URL root, segment by segment.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_registry.remote_sources import is_url, normalized_url, url_allowed
from serve_app.errors import InvalidRequestError, PermissionDeniedError


class PathPolicy:
    def __init__(self, roots: list[str]):
        # each once, in order (a startup adapter's folder is often also given as a root)
        self.roots = list(dict.fromkeys(Path(os.path.realpath(r)) for r in roots if not is_url(r)))
        self.url_roots = list(dict.fromkeys(normalized_url(r) for r in roots if is_url(r)))

    def check(self, path: str, tenant: str | None = None) -> str:
        """The real path of `path` (or the normalized URL) if it may be read; PermissionDeniedError
        names the roots otherwise. For a tenant the roots are each root's `<tenant>` folder."""
        if not path or "\x00" in path:
            raise InvalidRequestError("the adapter path must be non-empty, without NUL characters.", param="lora_path")
        if path.startswith("file:"):
            raise InvalidRequestError(
                f"adapter path '{path}' is a file: URL; give the folder as a plain absolute path.", param="lora_path"
            )
        if tenant is not None:
            own = PathPolicy([str(Path(r) / tenant) for r in self.roots] + [f"{u}/{tenant}" for u in self.url_roots])
            try:
                return own.check(path)
            except PermissionDeniedError as e:  # (the roots flag is the operator's, not the tenant's, to change)
                if e.code != "path_not_allowed":
                    raise
                folders = [str(r) for r in own.roots] + own.url_roots
                raise PermissionDeniedError(
                    f"adapter path '{path}' is not inside this tenant's folders {folders}; put the adapter there.",
                    param="lora_path",
                    code=e.code,
                ) from None
        if is_url(path):
            url = normalized_url(path)
            if not url_allowed(url, self.url_roots):
                raise PermissionDeniedError(
                    f"adapter URL '{url}' is outside the allowed URL roots {self.url_roots or '[] (none configured)'}; "
                    "add its prefix to registry.allowed_roots (flag --adapter_roots).",
                    param="lora_path",
                    code="path_not_allowed",
                )
            return url
        if ".." in Path(path).parts:
            raise PermissionDeniedError(
                f"adapter path '{path}' contains '..'; give a path inside {self._roots_text()}.", param="lora_path"
            )
        if not Path(path).is_absolute():
            raise InvalidRequestError(f"adapter path '{path}' must be absolute.", param="lora_path")
        real = Path(os.path.realpath(path))  # resolves symlinks without opening any file
        if not any(real == root or root in real.parents for root in self.roots):
            raise PermissionDeniedError(
                f"adapter path '{path}' is outside the allowed roots {self._roots_text()}; "
                "add its folder with --adapter_roots (config: registry.allowed_roots).",
                param="lora_path",
                code="path_not_allowed",
            )
        return str(real)

    def _roots_text(self) -> str:
        return "[" + ", ".join(str(r) for r in self.roots) + "]" if self.roots else "[] (none configured)"
