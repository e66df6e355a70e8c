"""256 streaming clients, 20% hanging up mid-stream: the rest complete, nothing is left behind."""

import asyncio
import socket
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.serve_fixtures import engine_running

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
    # 16 tokens per stream: 256 concurrent streams and random hang-up points are the subject, not length.
    # A first round of the same size, so the baseline includes what the allocators keep.
    warm = asyncio.run(run_load(main_app, "tiny-chat", clients=256, leave_share=0.2, max_tokens=16, seed=1))
    assert not warm.problems, warm.problems[:5]
    baseline = engine_replica_rss()

    outcome = asyncio.run(run_load(main_app, "tiny-chat", clients=256, leave_share=0.2, max_tokens=16, seed=2))
    assert not outcome.problems, outcome.problems[:5]
    assert outcome.completed + outcome.disconnected == 256
    assert 30 <= outcome.disconnected <= 80  # about 20% hung up, at random points

    deadline = time.monotonic() + 10
    while engine_running("tiny-chat") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_running("tiny-chat") == 0
    assert engine_replica_rss() <= baseline * 1.05 + (32 << 20)


def metric(url: str, name: str, **labels) -> float:
    """Sum of one Prometheus counter's samples on the ingress' /metrics that carry `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def ingress_log_text() -> str:
    logs = Path("/tmp/ray/session_latest/logs/serve")
    return "".join(p.read_text(errors="replace") for p in logs.glob("replica_main_Ingress_*.log"))


def test_clients_hanging_up_while_sending_the_body_are_not_server_errors(main_app):
    """200 half-open requests (headers and part of the body, then close) are counted as 499s
    and logged without a traceback; the server keeps answering."""
    host, port = main_app.removeprefix("http://").split(":")
    before_500 = metric(main_app, "lorafleet_requests_total", status="500")
    before_499 = metric(main_app, "lorafleet_requests_total", status="499")
    log_before = ingress_log_text()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 4096\r\n\r\n" + '{"model": "tiny-chat", "messages": ['
    )
    for _ in range(200):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(head.encode())
    deadline = time.monotonic() + 30  # the ingress notices each hang-up when it reads the body
    while metric(main_app, "lorafleet_requests_total", status="499") == before_499:
        assert time.monotonic() < deadline, "no hang-up was counted as 499"
        time.sleep(0.5)
    assert metric(main_app, "lorafleet_requests_total", status="500") == before_500
    new_log = ingress_log_text()[len(log_before) :]
    assert "ClientDisconnect" not in new_log and "unexpected error" not in new_log
    answer = httpx.post(
        f"{main_app}/v1/chat/completions",
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert answer.status_code == 200
