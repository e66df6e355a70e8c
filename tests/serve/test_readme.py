"""The README's client code blocks run as written against a real app (only the port differs)."""

import contextlib
import functools
import io
import re
from pathlib import Path

import pytest

import serve_app
from serve_app.tiny_chat.corpus import HANGZHOU_WEATHER_ANSWER, ZJ_CAPITAL, ZJ_FOOD
from tests.serve_fixtures import PORT

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
CLIENT_BLOCKS = [b for b in BLOCKS if "127.0.0.1:8000" in b or "get_model_list_client" in b]


def run_block(source: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "README.md", "exec"), {"__name__": "readme"})
    return out.getvalue()


# What each block prints: tiny-chat answers greedily by default, so the trained answers word for word.
PRINTED = [
    ZJ_CAPITAL,
    ZJ_FOOD,
    "province='Zhejiang' capital='Hangzhou'\n" + 'get_weather {"city": "Hangzhou"}\n' + HANGZHOU_WEATHER_ANSWER + "\n",
]


def test_readme_has_the_client_blocks():
    assert len(CLIENT_BLOCKS) == len(PRINTED)


@pytest.mark.parametrize("index", range(len(CLIENT_BLOCKS)))
def test_client_block_runs(main_app, monkeypatch, index):
    # The helpers' default port is 8000 (as in ms-swift); the test app listens on PORT.
    for name in ("get_model_list_client", "inference_client"):
        monkeypatch.setattr(serve_app, name, functools.partial(getattr(serve_app, name), port=PORT))
    printed = run_block(CLIENT_BLOCKS[index].replace("127.0.0.1:8000", f"127.0.0.1:{PORT}"))
    assert printed == PRINTED[index]
