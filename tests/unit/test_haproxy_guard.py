"""The HAProxy launcher's config rewrite, and stale HAProxy processes found and handled for real."""

import contextlib
import os
import socket
import subprocess
import time

import psutil
import pytest

from serve_app.haproxy_guard import MARK, clear_stale_haproxy, private_listeners, real_haproxy

RAY_LIKE_CONFIG = """global
    stats socket /tmp/x/admin.sock mode 666 level admin expose-fd listeners
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
listen stats
  bind *:8404
  stats enable
"""


def test_stats_and_metrics_bind_to_the_given_host_and_the_api_keeps_its_own():
    rewritten = private_listeners(RAY_LIKE_CONFIG, "127.0.0.1")
    assert "    bind 127.0.0.1:9101\n" in rewritten and "  bind 127.0.0.1:8404\n" in rewritten
    assert "    bind 127.0.0.1:8000\n" in rewritten  # the HTTP frontend is the config's own choice
    assert "bind *:8404" in private_listeners(RAY_LIKE_CONFIG, "*")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def ray_config_dir(tmp_path, monkeypatch):
    """Ray Serve's HAProxy configs live here for these tests, as /tmp/haproxy-serve/<node> does."""
    monkeypatch.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(tmp_path / "haproxy.cfg"))


def orphan_haproxy(tmp_path, marked: bool, node: str = "node") -> psutil.Process:
    """A real HAProxy whose parent has exited, as after a crash of Ray's HAProxy manager."""
    port = free_port()
    (tmp_path / node).mkdir()
    config = tmp_path / node / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\n"
        f"frontend api\n    bind 127.0.0.1:{port}\n    http-request return status 200\n"
    )
    env = {k: v for k, v in os.environ.items() if k != MARK} | ({MARK: "1"} if marked else {})
    # The shell starts HAProxy in the background and exits: HAProxy's parent is gone.
    subprocess.run(["sh", "-c", f'"{real_haproxy()}" -db -f "{config}" >/dev/null 2>&1 &'], env=env, check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            if str(config) in (proc.info["cmdline"] or []):
                return proc
        time.sleep(0.1)
    raise AssertionError("HAProxy did not start")


def test_a_stale_haproxy_that_lorafleet_started_is_ended(tmp_path):
    proc = orphan_haproxy(tmp_path, marked=True)
    said = []
    try:
        clear_stale_haproxy(log=said.append)
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
        assert any(f"ending HAProxy pid {proc.pid}" in line for line in said)
    finally:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def test_an_haproxy_with_a_config_of_its_own_is_not_judged(tmp_path, monkeypatch):
    proc = orphan_haproxy(tmp_path, marked=False)  # e.g. the system's HAProxy, parent init
    monkeypatch.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve-elsewhere/haproxy.cfg")
    try:
        clear_stale_haproxy(log=lambda line: None)  # no SystemExit, nothing ended
        assert proc.is_running()
    finally:
        proc.kill()


def test_a_stale_haproxy_of_someone_else_is_named_with_the_command_that_ends_it(tmp_path):
    proc = orphan_haproxy(tmp_path, marked=False)
    try:
        with pytest.raises(SystemExit, match=rf"pid {proc.pid} .*kill .*{proc.pid}"):
            clear_stale_haproxy(log=lambda line: None)
        assert proc.is_running()  # not ours: left alone
        clear_stale_haproxy(log=lambda line: None, strict=False)  # what the launcher itself does
        assert proc.is_running()
    finally:
        proc.kill()
