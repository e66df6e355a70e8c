"""Shared, expensive fixtures: engines start once per session (2 CPU cores)."""

from __future__ import annotations

import pytest

from tests.adapter_factory import make_adapter

pytest_plugins = ["tests.serve_fixtures"]  # Ray Serve apps shared by tests/serve and tests/browser


def pytest_collection_modifyitems(items):
    """Tests that run `ray stop --force` go first, before the session's own Ray cluster exists."""
    items.sort(key=lambda item: item.get_closest_marker("stops_ray") is None)


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
