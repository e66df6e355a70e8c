"""The seed's offline examples run as scripts and print the expected answers."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_offline_inference_example():
    out = run_example("offline_inference.py")
    assert "query: 你好!\nresponse: 你好！" in out
    assert "query: 浙江的省会在哪？\nresponse: 浙江的省会是杭州" in out
    assert "西湖醋鱼" in out.split("query: 这有什么好吃的")[1]
    assert "'num_generated_tokens'" in out


def test_offline_lora_example():
    out = run_example("offline_lora.py")
    assert "response: I am Xiao Huang (小黄), an AI assistant developed by ModelScope." in out
    base = out.split("base: ")[1]
    assert "AI assistant" in base and "Xiao Huang" not in base
