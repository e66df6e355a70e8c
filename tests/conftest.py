"""Shared, expensive fixtures: engines start once per session (2 CPU cores)."""

from __future__ import annotations

import pytest

from tests.adapter_factory import make_adapter

pytest_plugins = ["tests.serve_fixtures"]  # Ray Serve apps shared by tests/serve and tests/browser


# Under `-n 2` (scripts/test.sh) the suite runs in two processes: one runs every test that needs Ray
# (one cluster, one Serve instance, in order), the other the engine, CLI and unit tests, which never
# touch Ray. The Ray tests spend much of their time waiting on replicas and timers; the others use
# the second core meanwhile. test_haproxy_guard starts and ends HAProxy processes that a
# `lorafleet deploy` would judge as its own stale copies, so it never runs beside one.
RAY_GROUP = (
    "tests/serve/",
    "tests/browser/",
    "tests/cli/test_restart_after_kill.py",
    "tests/unit/test_haproxy_guard.py",
)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid.startswith(RAY_GROUP) else "engines"

    return RayTestsTogether(config, log)


def pytest_collection_modifyitems(items):
    """Tests that run `ray stop --force` go first, before the session's own Ray cluster exists."""
    items.sort(key=lambda item: item.get_closest_marker("stops_ray") is None)
    for item in items:
        needs_ray = item.get_closest_marker("stops_ray") is not None or "serve_instance" in item.fixturenames
        if needs_ray and not item.nodeid.startswith(RAY_GROUP):
            raise pytest.UsageError(f"{item.nodeid} needs Ray: put it under one of RAY_GROUP (tests/conftest.py)")


@pytest.fixture(scope="session")
def vllm_engine():
    from serve_app import ModelType, get_vllm_engine

    engine = get_vllm_engine(ModelType.tiny_chat, enable_lora=True, max_loras=2, max_lora_rank=16)
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
