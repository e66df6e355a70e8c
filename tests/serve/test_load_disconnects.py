"""256 streaming clients, 20% hanging up mid-stream: the rest complete, nothing is left behind."""

import asyncio
import sys
import time
from pathlib import Path

import psutil
import pytest
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from disconnect_load import run_load  # noqa: E402

pytestmark = pytest.mark.slow


def engine_replica_rss() -> int:
    """Resident memory of the main app's tiny-chat engine replica (found by Ray's process title)."""
    [proc] = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "ServeReplica:main:LLMServer:tiny-chat" in " ".join(p.info["cmdline"] or [])
    ]
    return proc.memory_info().rss


def test_many_streams_with_hangups(main_app):
    handle = serve.get_deployment_handle("LLMServer:tiny-chat", app_name="main")
    # A first round of the same size, so the baseline includes what the allocators keep.
    warm = asyncio.run(run_load(main_app, "tiny-chat", clients=256, leave_share=0.2, seed=1))
    assert not warm.problems, warm.problems[:5]
    baseline = engine_replica_rss()

    outcome = asyncio.run(run_load(main_app, "tiny-chat", clients=256, leave_share=0.2, seed=2))
    assert not outcome.problems, outcome.problems[:5]
    assert outcome.completed + outcome.disconnected == 256
    assert 30 <= outcome.disconnected <= 80  # about 20% hung up, at random points

    deadline = time.monotonic() + 10
    while handle.num_running.remote().result() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handle.num_running.remote().result() == 0
    assert engine_replica_rss() <= baseline * 1.05 + (32 << 20)
