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
