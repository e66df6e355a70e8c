"""bench/side_by_side.py's --lora-workloads: what each spec means, how many adapters a run registers,
and which adapters a Zipf workload draws how often."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from side_by_side import Workload, lora_draws, workloads  # noqa: E402


def test_specs_and_the_main_workload_first():
    args = argparse.Namespace(loras=64, lora_zipf=0.0, lora_concurrency=64, lora_workloads=["32", "z256", "64@32"])
    assert workloads(args) == [
        Workload(64, 0.0, 64),
        Workload(32, 0.0, 64),
        Workload(256, 1.0, 64),
        Workload(64, 0.0, 32),
    ]
    assert Workload(256, 1.0, 32).label == "Zipf (s = 1.0) over 256 @ 32 streams"
    for bad in ("x64", "z0", "64@0", "64@x"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            Workload.parse(bad, 64)


def test_zipf_draws_favour_the_first_adapters():
    names = [f"lora-{i}" for i in range(8)]
    assert lora_draws(names, 0.0) == names
    draws = lora_draws(names, 1.0)
    assert [draws.count(n) for n in names] == [8, 4, 3, 2, 2, 1, 1, 1]
