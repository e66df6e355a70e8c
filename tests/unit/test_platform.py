import os

import pytest

from serve_app.platform import cpu_thread_binding, prepare_vllm_env


def test_thread_binding_splits_cores_between_workers():
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3]) == "0-1|2-3"
    assert cpu_thread_binding(1, [0, 1]) == "0-1"


def test_thread_binding_needs_a_core_per_worker():
    with pytest.raises(ValueError, match="needs at least that many CPU cores"):
        cpu_thread_binding(4, [0, 1])


def test_binding_set_for_tp2_does_not_leak_into_tp1(monkeypatch):
    monkeypatch.setenv("LORAFLEET_DEVICE", "cpu")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    prepare_vllm_env(2)
    assert "|" in os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    prepare_vllm_env(1)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def test_user_binding_is_kept(monkeypatch):
    monkeypatch.setenv("LORAFLEET_DEVICE", "cpu")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    prepare_vllm_env(1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_socket_folders_of_dead_engine_processes_are_removed_at_the_next_start(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from serve_app import platform

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"lorafleet-vllm-rpc-{gone.stdout.strip()}-abc"
    living = tmp_path / f"lorafleet-vllm-rpc-{os.getpid()}-def"
    other = tmp_path / "lorafleet-vllm-rpc-notapid-x"
    for folder in (orphan, living, other):
        folder.mkdir()
    with platform.private_rpc_dir() as folder:
        assert os.environ["VLLM_RPC_BASE_PATH"] == folder and os.path.basename(folder).split("-")[3] == str(os.getpid())
    assert "VLLM_RPC_BASE_PATH" not in os.environ  # set only while an engine starts
    assert not orphan.exists() and living.exists() and other.exists()


# `lorafleet deploy` up to the moment it starts Ray, in a fresh process without Serve's settings
# (the HAProxy clean-up skipped: the suite's cluster may be running one).
_DEPLOY_UNTIL_RAY_STARTS = """
import ray
import serve_app.launcher
from serve_app import cli

def started(*args, **kwargs):
    from ray.serve._private import constants
    print("gRPC between deployments:", constants.RAY_SERVE_USE_GRPC_BY_DEFAULT)
    raise SystemExit(0)

ray.init = started
serve_app.launcher.clear_stale_haproxy = lambda: None
cli.main(["deploy", "--model_type", "tiny-chat"])
"""


def test_deploy_sets_serve_settings_before_serve_reads_them():
    """Serve reads its settings when ray.serve is first imported, also in the process that builds the
    app, whose handles keep them: imported before they were set, every call between deployments went
    over Ray actor calls instead of gRPC."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _DEPLOY_UNTIL_RAY_STARTS], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert "gRPC between deployments: True" in out.stdout, out.stdout + out.stderr
