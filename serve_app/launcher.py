"""Start the Serve app from Python (the CLI's `deploy` and `app-ui`), the way `serve run` does."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

from serve_app.config import AppConfig
from serve_app.errors import LorafleetError
from serve_app.haproxy_guard import clear_stale_haproxy
from serve_app.platform import apply_serve_env


def run_app(
    config: AppConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True, page: str = "/v1"
) -> str:
    """Deploy the graph on a local (or already running) Ray cluster; returns the base URL."""
    import ray

    if not ray.is_initialized():
        # Before anything imports ray.serve in this process: Serve reads its settings once, at that
        # import, here too, and the app's handles are made here. Imported first, Serve's defaults
        # stuck to them: every call between deployments went over Ray actor calls instead of gRPC.
        apply_serve_env()
        if not _cluster_running():
            clear_stale_haproxy()  # an earlier run killed without a shutdown may hold the ports
            # A stopping ingress replica waits this long (Serve's default: 30 s) for load balancers
            # in front of the cluster to stop sending it requests. The local cluster's only balancer
            # is its own HAProxy, updated at once: Ctrl-C then takes seconds, not Serve's whole 30 s
            # shutdown timeout. Streams still drain (graceful_shutdown_timeout_s).
            os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
        ray.init(address="auto" if _cluster_running() else None, log_to_driver=False)
    from ray import serve

    from serve_app.app import build_from_config

    url = f"http://{host}:{port}{page}"
    _stop_on_sigterm()
    try:  # Ctrl-C while the app starts stops it too, instead of leaving a half-started app behind
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_from_config(config), name="lorafleet", route_prefix="/")
        print(f"[lorafleet] serving {', '.join(_names(config))} at {url}  (Ctrl-C stops)", flush=True)
        print("[lorafleet] Ray's CLI needs its token here: RAY_AUTH_MODE=token serve status", flush=True)
        while blocking:
            time.sleep(3600)
    except KeyboardInterrupt:
        _ignore_further_stops()
        serve.shutdown()
    except RuntimeError as e:  # Serve says only which deployments failed; the reason is in its status
        reasons = _startup_failures()
        if _cluster_running():  # a cluster of the user's: its other apps keep running
            serve.delete("lorafleet")
        else:
            serve.shutdown()
        if not reasons:
            raise
        raise StartupError(f"the app did not start: {'; '.join(reasons)}") from e
    return url


# "pkg.ConfigError: why" or "ray.exceptions.RayTaskError(ConfigError): why"
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception)(\([\w.]+\))?: (?P<why>.+)")


class StartupError(LorafleetError):
    """A deployment's constructor failed (a bad adapter path, a model that does not load)."""


def _startup_failures() -> list[str]:
    """'Deployment: the reason' for each deployment that failed to start."""
    from ray import serve

    try:
        app = serve.status().applications.get("lorafleet")
    except Exception:  # noqa: BLE001  the status cannot be read: the caller re-raises Serve's error
        return []
    found = []
    for name, deployment in (app.deployments if app else {}).items():
        if deployment.status == "DEPLOY_FAILED" and deployment.message:
            found.append(f"{name}: {_reason(deployment.message)}")
    return found


def _stop_on_sigterm() -> None:
    """`kill`, `docker stop` and Kubernetes stop a process with SIGTERM: stop as Ctrl-C does (Serve
    shut down first), instead of dying in Ray's own handler, which prints a crash report."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _ignore_further_stops() -> None:
    """While Serve shuts down: a second Ctrl-C, or a SIGTERM repeated (a supervisor, `timeout` passing
    on its own), would cut the shutdown short, leaving Serve's controller and HAProxy running and a
    traceback on the console. Say that it is stopping instead."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _stopping)


def _stopping(signum, frame) -> None:
    print("[lorafleet] stopping; Serve is shutting down", flush=True)


def _names(config: AppConfig) -> list[str]:
    return [m.served_name for m in config.models] + [a for m in config.models for a in m.lora_modules]


def _cluster_running() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))


def _reason(message: str) -> str:
    """The last exception line of a traceback, less its class, and what follows it (a pydantic
    error's field lines); else the message's last line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if match := _EXCEPTION_LINE.match(lines[i]):
            rest = [line for line in lines[i + 1 :] if not line.startswith("For further information")]
            return " ".join([match["why"], *rest])
    return lines[-1] if lines else message
