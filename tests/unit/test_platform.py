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
