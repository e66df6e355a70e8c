"""Real Ray Serve + real vLLM on the CPU, reached over HTTP with the official openai client."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from serve_app.config import AppConfig
from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR


def wait_for(predicate, timeout: float) -> bool:
    """Whether `predicate()` came true within `timeout` seconds (polled every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"
API_KEY = "sk-test-key"
ADMIN_KEY = "sk-admin-key"
RAY = str(Path(sys.executable).parent / "ray")
# The apps' state dirs. Under xdist a worker puts its own in the run's folder (the controller set
# LORAFLEET_TEST_RUN before starting it), which the controller removes once the cluster is stopped.
STATE = tempfile.mkdtemp(prefix="lorafleet-test-state-", dir=os.environ.get("LORAFLEET_TEST_RUN"))
# Engine options for tests whose subject is not the compiled model (routing, registry, failures):
# without torch.compile a vLLM engine starts in about 25 s instead of 40 s of CPU here. The main app,
# the offline engine of the oracle tests, the examples and the CLI keep the defaults users get.
FAST_START = {"enforce_eager": True}


def main_config() -> AppConfig:
    return AppConfig.model_validate(
        {
            "models": [
                {
                    "model_type": "tiny-chat",
                    "engine": {"max_model_len": 512, "max_loras": 2},
                    "lora_modules": {"xiao-huang": str(XIAO_HUANG_DIR)},
                    "deployment": {"num_replicas": 1},
                },
                {  # a generation-only model type, on the pt backend (cheap to start)
                    "name": "tiny-base",
                    "model_type": "qwen-7b",
                    "model_id_or_path": str(TINY_CHAT_DIR),
                    "infer_backend": "pt",
                    "engine": {"max_model_len": 512},
                    "deployment": {"num_replicas": 1},
                },
            ],
            "ingress": {"max_body_bytes": 64 * 1024},
            # Both render paths in one app: short chats render in the ingress, longer ones on the Renderer.
            "renderer": {"inline_max_chars": 120},
            "registry": {"state_dir": f"{STATE}/main"},
        }
    )


def guarded_config() -> AppConfig:
    """API keys on (tenant keys too, in its tests), and a queue of one so overload is easy to reach."""
    return AppConfig.model_validate(
        {
            "models": [
                {
                    "name": "guarded",
                    "model_type": "tiny-chat",
                    "infer_backend": "pt",
                    "lora_modules": {"xiao-huang": str(XIAO_HUANG_DIR)},  # a tenant key must not see it
                    "deployment": {"num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1},
                }
            ],
            "ingress": {"api_key": API_KEY, "admin_api_key": ADMIN_KEY},
            "registry": {"state_dir": f"{STATE}/guarded"},
        }
    )


# Ray's background work that no test reads, turned down for the suite: with the main and guarded
# apps idle, the machine was 19% busy (of 2 cores) and 10% with these. Task events and Ray's own
# metrics feed the dashboard and `ray list`; the Serve controller reconciles every 0.5 s instead of
# 0.1 s (state changes show up to 0.4 s later). lorafleet's /metrics is its own (prometheus_client).
QUIET_RAY = {
    # Ray runs its workers (every Serve replica) at niceness 15, so while the other test process
    # runs an offline engine or a CLI at 0, the apps' replicas barely start (an engine replica took
    # 176 s instead of 40 s). Equal shares: the two processes finish closer together.
    "RAY_worker_niceness": "0",
    "RAY_task_events_report_interval_ms": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_metrics_report_interval_ms": "60000",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


def pytest_configure(config):
    """The test run's shared folder: where the pytest processes of one run find their Ray cluster."""
    if not hasattr(config, "workerinput"):  # the controller (or the only process); workers inherit it
        os.environ["LORAFLEET_TEST_RUN"] = tempfile.mkdtemp(prefix="lorafleet-test-run-")
    # `ray start` turns on Ray 2.60's token auth (the token in ~/.ray/auth_token), and a driver reads
    # the mode when Ray is first imported (test modules import it while they are collected).
    os.environ["RAY_AUTH_MODE"] = "token"


def run_dir() -> Path:
    return Path(os.environ["LORAFLEET_TEST_RUN"])


STOPPERS: list[str] = []  # the node ids of the tests that run `ray stop --force`


def pytest_collection_finish(session):
    STOPPERS.extend(item.nodeid for item in session.items if item.get_closest_marker("stops_ray"))


def stopper_done(nodeid: str) -> Path:
    return run_dir() / ("stopper-done-" + hashlib.sha1(nodeid.encode()).hexdigest()[:16])


def pytest_runtest_teardown(item):
    if item.get_closest_marker("stops_ray"):
        stopper_done(item.nodeid).touch()


def shared_cluster() -> str:
    """The run's Ray cluster, started once by whichever process asks first (`ray start --head`, so
    it outlives that process); its GCS address."""
    address = run_dir() / "ray-address"
    deadline = time.monotonic() + 900
    while not all(stopper_done(n).exists() for n in STOPPERS):  # each runs `ray stop --force`
        assert time.monotonic() < deadline, "the tests that stop Ray did not finish"
        time.sleep(1)
    with open(run_dir() / "ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not address.exists():
            from serve_app.platform import apply_serve_env

            apply_serve_env()  # the tests run with the Serve settings users get
            # but for one: an ingress replica that stops waits this long (default 30 s) for external
            # load balancers to stop sending it requests; here HAProxy is on the same node, and every
            # app a test deletes would wait it out.
            os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
            for key, value in QUIET_RAY.items():
                os.environ.setdefault(key, value)
            port = free_port()
            cmd = [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=12"]
            cmd += ["--include-dashboard=false", "--disable-usage-stats"]
            # a token if this machine has none yet (printed, so captured; an existing one is kept)
            subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)
            started = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
            address.write_text(f"127.0.0.1:{port}")
        return address.read_text()


def pytest_unconfigure(config):
    """The controller ends the run's cluster once every process is done with it, and its folder."""
    if hasattr(config, "workerinput"):
        return
    try:
        if (run_dir() / "ray-address").exists():
            stop_shared_cluster((run_dir() / "ray-address").read_text())
    finally:
        shutil.rmtree(run_dir(), ignore_errors=True)
        shutil.rmtree(STATE, ignore_errors=True)  # the controller's own (the only one under -n 0)


def stop_shared_cluster(address: str) -> None:
    import ray
    from ray import serve

    try:
        ray.init(address=address, log_to_driver=False)
        serve.shutdown()  # Serve stops its HAProxy; `ray stop` alone would orphan it
        ray.shutdown()
    finally:  # what is left is Ray's own processes
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=180)


def eventually(call, timeout: float):
    """The first result of `call` that does not raise, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@functools.cache
def _engine_handle(model: str, app: str):
    from ray import serve

    handle = serve.get_deployment_handle(f"LLMServer:{model}", app_name=app)
    # Called from plain test code: the router gets a loop of its own, which Serve's throughput-optimized
    # settings (the ones users run) leave off, expecting callers inside a replica's event loop.
    handle._init(_run_router_in_separate_loop=True)
    return handle


def engine_running(model: str, app: str = "main") -> int:
    """Requests the model's engine replica is running now."""
    return _engine_handle(model, app).num_running.remote().result()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_instance():
    import ray
    from ray import serve

    ray.init(address=shared_cluster(), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield serve
    ray.shutdown()  # this process is done with the cluster; the controller ends it


@pytest.fixture(scope="session")
def main_app(serve_instance):
    from serve_app.app import build_from_config

    serve_instance.run(build_from_config(main_config()), name="main", route_prefix="/")
    return BASE


@pytest.fixture
def client(main_app):
    from openai import OpenAI

    return OpenAI(base_url=f"{main_app}/v1", api_key="EMPTY", max_retries=0)
