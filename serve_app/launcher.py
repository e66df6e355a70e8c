"""Start the Serve app from Python (the CLI's `deploy` and `app-ui`), the way `serve run` does."""

from __future__ import annotations

import time

from serve_app.config import AppConfig
from serve_app.haproxy_guard import clear_stale_haproxy
from serve_app.platform import apply_serve_env


def run_app(
    config: AppConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True, page: str = "/v1"
) -> str:
    """Deploy the graph on a local (or already running) Ray cluster; returns the base URL."""
    import ray
    from ray import serve

    from serve_app.app import build_from_config

    if not ray.is_initialized():
        apply_serve_env()
        if not _cluster_running():
            clear_stale_haproxy()  # an earlier run killed without a shutdown may hold the ports
        ray.init(address="auto" if _cluster_running() else None, log_to_driver=False)
    url = f"http://{host}:{port}{page}"
    try:  # Ctrl-C while the app starts stops it too, instead of leaving a half-started app behind
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_from_config(config), name="lorafleet", route_prefix="/")
        print(f"[lorafleet] serving {', '.join(_names(config))} at {url}  (Ctrl-C stops)", flush=True)
        print("[lorafleet] Ray's CLI needs its token here: RAY_AUTH_MODE=token serve status", flush=True)
        while blocking:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return url


def _names(config: AppConfig) -> list[str]:
    return [m.served_name for m in config.models] + [a for m in config.models for a in m.lora_modules]


def _cluster_running() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
