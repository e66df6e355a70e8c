"""The shipped tiny-chat and xiao-huang are exactly what the in-repo training script produces."""

import subprocess
import sys

import pytest

from serve_app.model_types import ASSETS

SHIPPED = [
    "tiny-chat/model.safetensors",
    "tiny-chat/tokenizer.json",
    "tiny-chat/config.json",
    "tiny-chat/generation_config.json",
    "xiao-huang/adapter_model.safetensors",
    "xiao-huang/adapter_config.json",
]


@pytest.mark.slow
def test_training_reproduces_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, "-m", "serve_app.tiny_chat.train", "--out", str(tmp_path)], check=True, timeout=600)
    for name in SHIPPED:
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
