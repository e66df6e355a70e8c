"""Shared, expensive fixtures: engines start once per session (2 CPU cores)."""

from __future__ import annotations

import pytest

from serve_app.platform import apply_serve_env
from tests.adapter_factory import make_adapter

# Before collection imports any module that imports ray.serve: Serve reads its settings once, at that
# import, and the apps the test processes build keep them (gRPC between deployments among them), as the
# apps `lorafleet deploy` and scripts/run.sh build for users do.
apply_serve_env()

pytest_plugins = [
    "tests.serve_fixtures",
    "tests.postgres_server",
    "tests.s3_server",
]  # Serve apps of tests/serve and tests/browser; PostgreSQL; an S3-compatible server


# Under `-n 2` (scripts/test.sh) the suite runs in two processes that share one Ray cluster and one
# Serve instance (tests/serve_fixtures.py). Three groups of tests, each run in order by one process:
# - "apps": the tests that run `ray stop --force` (first: no shared cluster may exist yet), then the modules
#   that deploy apps of their own (their own names and routes) and test_haproxy_guard (it starts and
#   ends HAProxy processes that a `lorafleet deploy` would judge as stale copies of its own);
# - "engines": offline engines, the CLI and unit tests, which never touch Ray;
# - "main": everything on the session's main app, whose tests count its requests and wait for its
#   engine to go idle, so no other process may send it work meanwhile; and test_adapter_admission
#   and test_failures, whose apps are their own but which balance the two processes. (Summed
#   durations, 2026-12-01, Intel Xeon: apps 720 s, engines + main 647 s with the ms-swift checkpoint
#   tests, 59 s, in "apps"; they are back in "engines", where CLI subprocesses without Ray belong.)
# The first two start together; "main" follows "engines" in that process. Most Ray tests wait on
# replicas starting and on timers; the other process uses the core meanwhile.
# The first prefix that a test's node id starts with gives its group.
GROUPS = (
    ("tests/serve/test_adapter_admission.py", "main"),
    ("tests/serve/test_failures.py", "main"),
    ("tests/cli/test_restart_after_kill.py", "apps"),
    ("tests/cluster/", "apps"),
    ("tests/serve/test_guarded_app.py", "apps"),
    ("tests/serve/test_lora_registry.py", "apps"),
    ("tests/serve/test_adapter_homes.py", "apps"),
    ("tests/serve/test_zero_downtime.py", "apps"),
    ("tests/unit/test_haproxy_guard.py", "apps"),
    ("tests/serve/", "main"),
    ("tests/browser/", "main"),
)


def group_of(nodeid: str) -> str:
    return next((group for prefix, group in GROUPS if nodeid.startswith(prefix)), "engines")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # groups are handed out in collection order (below)
    return ByGroup(config, log)


RANK = {"apps": 0, "engines": 1, "main": 2}


def pytest_collection_modifyitems(items):
    """Group by group, and the test that runs `ray stop --force` first of all."""
    items.sort(key=lambda item: (RANK[group_of(item.nodeid)], item.get_closest_marker("stops_ray") is None))
    for item in items:
        needs_ray = item.get_closest_marker("stops_ray") is not None or "serve_instance" in item.fixturenames
        if needs_ray and group_of(item.nodeid) == "engines":
            raise pytest.UsageError(f"{item.nodeid} needs Ray: add its module to GROUPS (tests/conftest.py)")


@pytest.fixture(scope="session")
def vllm_engine():
    from serve_app import ModelType, get_vllm_engine

    engine = get_vllm_engine(ModelType.tiny_chat, enable_lora=True, max_lora_rank=16)  # max_loras: auto
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def pt_engine():
    from serve_app import ModelType, get_pt_engine

    engine = get_pt_engine(ModelType.tiny_chat)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def random_adapter(tmp_path_factory):
    """A second adapter for tiny-chat that answers differently from base and xiao-huang."""
    return make_adapter(tmp_path_factory.mktemp("adapters") / "random-a", rank=4, seed=7)
