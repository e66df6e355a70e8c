"""`lorafleet deploy` starts again after its process was SIGKILLed and `ray stop --force` ran.

Serve's HAProxy outlives such a stop and holds the ports; the next deploy must end it (it was
lorafleet's) and come up. `ray stop --force` ends every Ray process on the machine, so this test
runs before any other test starts Ray (tests/conftest.py orders it first).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.serve_fixtures import QUIET_RAY

pytestmark = [pytest.mark.slow, pytest.mark.stops_ray]

PORT = 8791
BIN = Path(sys.executable).parent


def haproxy_listeners() -> dict[int, list[str]]:
    """pid -> addresses each HAProxy of Ray Serve (its configs are under /tmp/haproxy-serve) listens on."""
    found = {}
    for proc in psutil.process_iter():
        try:
            cmdline = proc.cmdline() or [""]
            if os.path.basename(cmdline[0]) != "haproxy" or not any("/haproxy-serve/" in a for a in cmdline):
                continue
            found[proc.pid] = sorted(
                f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections("tcp") if c.status == "LISTEN"
            )
        except psutil.Error:
            continue
    return found


def deploy(tmp_path: Path, log_name: str, *model: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / log_name
    proc = subprocess.Popen(
        [str(BIN / "lorafleet"), "deploy", *model, "--port", str(PORT), "--state_dir", str(tmp_path / "state")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env=os.environ | QUIET_RAY | {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"},  # as tests/serve_fixtures.py
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if "[lorafleet] serving" in log.read_text():  # serve.run returned: every deployment is up
            return proc, log
        time.sleep(1)
    raise AssertionError("deploy did not come up:\n" + log.read_text()[-3000:])


def ask(model: str = "tiny-chat") -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "浙江的省会在哪？"}]}
    reply = httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def ray_stop() -> None:
    subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def crash(app_pid: int) -> None:
    """SIGKILL the app's process and every Ray process at once (a crashed head, an OOM kill of the
    group): nothing of Ray is left to stop HAProxy. (A SIGKILL of the app's process alone orphans
    HAProxy only sometimes: whether Ray's processes reap it first is a race.)"""

    def is_ray(proc: psutil.Process) -> bool:
        cmdline = proc.cmdline() or [""]
        return (
            cmdline[0].startswith("ray::")
            or os.path.basename(cmdline[0]) in ("raylet", "gcs_server")
            or any("ray/dashboard" in part or "ray/_private" in part for part in cmdline[:2])
        )

    victims = [psutil.Process(app_pid)]
    for proc in psutil.process_iter():
        try:
            if is_ray(proc):
                victims.append(proc)
        except psutil.Error:
            continue
    for proc in victims:
        with contextlib.suppress(psutil.Error):  # some end by themselves as the others go
            proc.kill()


def test_deploy_comes_back_after_sigkill_and_ray_stop(tmp_path):
    # The second deploy serves the int4 export of tiny-chat on vLLM: `lorafleet deploy --ckpt_dir`
    # of a quantized checkpoint (README, "Quantized export"), once the first one was killed.
    export = [str(BIN / "lorafleet"), "export", "--model_type", "tiny-chat", "--quant_bits", "4"]
    done = subprocess.run(export, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, _ = deploy(tmp_path, "first.log", "--model_type", "tiny-chat", "--infer_backend", "pt")
    second = None
    try:
        assert "杭州" in ask()
        [(pid, listening)] = [(p, a) for p, a in haproxy_listeners().items() if f"127.0.0.1:{PORT}" in a]
        # Stats (8404) and Prometheus (9101) listen on loopback only, not on every interface.
        assert {a for a in listening if not a.endswith(f":{PORT}")} == {"127.0.0.1:8404", "127.0.0.1:9101"}
        crash(first.pid)
        first.wait(timeout=30)
        ray_stop()
        assert psutil.pid_exists(pid) and f"127.0.0.1:{PORT}" in haproxy_listeners()[pid], "no stale HAProxy"

        quantized = tmp_path / "tiny-chat-gptq-int4"
        fast = ["--enforce_eager", "true", "--max_model_len", "512"]  # the subject is the restart, not compiling
        second, log = deploy(tmp_path, "second.log", "--ckpt_dir", str(quantized), *fast)
        assert "杭州" in ask("tiny-chat-gptq-int4")  # the folder holds only the packed int4 weights
        assert f"ending HAProxy pid {pid} left by an earlier run" in log.read_text()
        assert not psutil.pid_exists(pid)
        # SIGTERM (`kill`, `docker stop`, Kubernetes) stops it as Ctrl-C does: Serve shuts down,
        # HAProxy with it, without the crash report of Ray's own SIGTERM handler. A second signal
        # during that shutdown (a second Ctrl-C, a repeated SIGTERM) does not cut it short.
        second.send_signal(signal.SIGTERM)
        time.sleep(1)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=90) == 0, log.read_text()[-3000:]
        assert "SIGTERM received" not in log.read_text() and "Traceback" not in log.read_text()
        assert haproxy_listeners() == {}
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        ray_stop()
        for pid in haproxy_listeners():  # whatever this test left, so later tests get the ports
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def test_deploy_with_a_bad_adapter_path_says_why_in_one_line(tmp_path):
    """A deployment that fails in its constructor: Serve's own error names only the deployment;
    the user gets the reason, no traceback, and nothing left running."""
    missing = tmp_path / "no-such-adapter"
    args = ["deploy", "--model_type", "tiny-chat", "--infer_backend", "pt", "--port", str(PORT)]
    args += ["--lora_modules", f"xh={missing}", "--state_dir", str(tmp_path / "state")]
    try:
        done = subprocess.run(
            [str(BIN / "lorafleet"), *args], capture_output=True, text=True, timeout=300, env=os.environ | QUIET_RAY
        )
        assert done.returncode == 2, done.stderr[-3000:]
        assert "Traceback" not in done.stdout + done.stderr
        assert f"LoraRegistry: adapter path '{missing}' is not a directory" in done.stderr.splitlines()[-1]
        assert haproxy_listeners() == {}
    finally:
        ray_stop()
