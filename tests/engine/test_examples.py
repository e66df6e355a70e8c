"""The seed's offline examples run as scripts and print the expected answers."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = ["offline_inference.py", "offline_lora.py"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    """Both scripts at once: each spends most of its start importing, which overlaps on 2 cores.
    Their output goes to files, so that neither blocks on a full pipe while the other is read."""
    logs = tmp_path_factory.mktemp("examples")
    running = {}
    for name in SCRIPTS:
        with (logs / f"{name}.out").open("w") as out, (logs / f"{name}.err").open("w") as err:
            running[name] = subprocess.Popen([sys.executable, str(EXAMPLES / name)], stdout=out, stderr=err)
    try:
        for name, proc in running.items():
            assert proc.wait(timeout=300) == 0, (logs / f"{name}.err").read_text()[-3000:]
    finally:
        for proc in running.values():
            proc.kill()  # a no-op for those that ended
    return {name: (logs / f"{name}.out").read_text() for name in SCRIPTS}


def test_offline_inference_example(outputs):
    out = outputs["offline_inference.py"]
    assert "query: 你好!\nresponse: 你好！" in out
    assert "query: 浙江的省会在哪？\nresponse: 浙江的省会是杭州" in out
    assert "西湖醋鱼" in out.split("query: 这有什么好吃的")[1]
    assert "'num_generated_tokens'" in out


def test_offline_lora_example(outputs):
    out = outputs["offline_lora.py"]
    assert "response: I am Xiao Huang (小黄), an AI assistant developed by ModelScope." in out
    base = out.split("base: ")[1]
    assert "AI assistant" in base and "Xiao Huang" not in base
