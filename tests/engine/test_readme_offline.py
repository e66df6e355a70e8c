"""The README's offline Python block runs as written and prints what its comments say.

It runs on the session's engine: `get_vllm_engine(model_type)` with its defaults is what
examples/offline_inference.py starts (tests/engine/test_examples.py), so a third engine here would
prove nothing more."""

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest

import serve_app
from serve_app.tiny_chat.corpus import ZJ_CAPITAL, ZJ_FOOD

pytestmark = pytest.mark.slow
README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
OFFLINE_BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if "get_vllm_engine(" in b]


def test_readme_has_one_offline_block():
    assert len(OFFLINE_BLOCKS) == 1


def test_readme_offline_block_prints_what_its_comments_say(vllm_engine, monkeypatch):
    calls = []

    def session_engine(*args, **kwargs):
        calls.append((args, kwargs))
        return vllm_engine

    monkeypatch.setattr(serve_app, "get_vllm_engine", session_engine)
    config = dataclasses.replace(vllm_engine.generation_config)  # the block sets max_new_tokens
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(OFFLINE_BLOCKS[0], "README.md", "exec"), {"__name__": "__main__"})
    finally:
        vllm_engine.generation_config = config
    assert calls == [(("tiny-chat",), {})]
    # the block's comments: "浙江的省会是杭州。" and "杭州有很多好吃的，比如西湖醋鱼、东坡肉…"
    assert out.getvalue() == f"{ZJ_CAPITAL}\n{ZJ_FOOD}\n"
