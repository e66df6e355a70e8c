"""bench/bgmv_probe.py's kernels give torch's answer (Triton's interpreter on the CPU; on the GPU the
probe checks again before it times them), also for tokens without an adapter and one slice."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK = """
import torch
from bench.bgmv_probe import Bgmv, check
torch.manual_seed(0)
assert check(Bgmv(512, [256, 64, 64], 8, 4, torch.tensor([0, -1, 3, 2, -1]), "cpu")) < 1e-4
assert check(Bgmv(512, [512], 16, 4, torch.tensor([1, 1, 2]), "cpu")) < 1e-4
case = Bgmv(512, [256, 64, 64], 8, 4, torch.tensor([-1, -1]), "cpu")
check(case)
assert case.out.abs().max().item() == 0  # no adapter, nothing added
print("ok")
"""


def test_bgmv_kernels_equal_torch():
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
