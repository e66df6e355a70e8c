"""The seed's offline examples, and the README's offline block, run as scripts and print the
expected answers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.tiny_chat.corpus import ZJ_CAPITAL, ZJ_FOOD

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
README_OFFLINE = [b for b in README_BLOCKS if "get_vllm_engine(" in b]
SCRIPTS = {
    "offline_inference.py": (ROOT / "examples" / "offline_inference.py").read_text(encoding="utf-8"),
    "offline_lora.py": (ROOT / "examples" / "offline_lora.py").read_text(encoding="utf-8"),
    "readme_offline.py": README_OFFLINE[0] if README_OFFLINE else "raise SystemExit('no offline block in README')",
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    """The scripts at once: each spends most of its start importing, which overlaps on 2 cores.
    Their output goes to files, so that none blocks on a full pipe while another is read."""
    logs = tmp_path_factory.mktemp("examples")
    running = {}
    for name, source in SCRIPTS.items():
        (logs / name).write_text(source, encoding="utf-8")
        with (logs / f"{name}.out").open("w") as out, (logs / f"{name}.err").open("w") as err:
            running[name] = subprocess.Popen([sys.executable, str(logs / name)], stdout=out, stderr=err, cwd=ROOT)
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


def test_readme_has_one_offline_block():
    assert len(README_OFFLINE) == 1


def test_readme_offline_block_prints_what_its_comments_say(outputs):
    # The block's comments: "浙江的省会是杭州。" and "杭州有很多好吃的，比如西湖醋鱼、东坡肉…"
    # (vLLM's own log lines may share stdout)
    assert f"\n{ZJ_CAPITAL}\n{ZJ_FOOD}\n" in "\n" + outputs["readme_offline.py"]
