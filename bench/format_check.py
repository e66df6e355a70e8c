"""The checkpoint formats lorafleet writes, served by this machine's vLLM (0.25.1 on the lent GPU):
the GPTQ int4 / int8 exports of tiny-chat and a Qwen(1) checkpoint converted to Qwen2, each
answering the corpus chats as tiny-chat does (made here, with this machine's transformers).

    python3 bench/format_check.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from serve_app import get_template, get_vllm_engine, inference_vllm
from serve_app.model_types import TINY_CHAT_DIR
from serve_app.quantize import quantize
from serve_app.qwen1_convert import convert
from serve_app.tiny_chat.answers import chat_prompts
from serve_app.tiny_chat.corpus import BASE_CHATS
from tests.qwen1_checkpoint import write_qwen1_checkpoint


def answers(model_dir: str) -> tuple[list[str], float]:
    started = time.perf_counter()
    engine = get_vllm_engine(model_id_or_path=model_dir, max_model_len=512, gpu_memory_utilization=0.3)
    try:
        replies = inference_vllm(engine, get_template("qwen", engine.hf_tokenizer), chat_prompts(BASE_CHATS))
        return [r["response"] for r in replies], time.perf_counter() - started
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # Quantizing here touches CUDA in this process, and vLLM would fork its engine from it.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    work = Path(tempfile.mkdtemp(prefix="format-check-"))
    folders = {
        "int4 (gptq)": quantize(str(TINY_CHAT_DIR), work / "tiny-chat-gptq-int4", 4, "gptq"),
        "int8 (gptq)": quantize(str(TINY_CHAT_DIR), work / "tiny-chat-gptq-int8", 8, "gptq"),
        "qwen(1) -> qwen2": convert(write_qwen1_checkpoint(work / "Qwen-tiny-chat"), work / "Qwen-tiny-chat-qwen2"),
    }
    reference, seconds = answers(str(TINY_CHAT_DIR))
    results = {"bf16 tiny-chat": {"same_answers": len(reference), "of": len(reference), "seconds": round(seconds, 1)}}
    for name, folder in folders.items():
        try:
            got, seconds = answers(str(folder))
            same = sum(a == b for a, b in zip(got, reference, strict=True))
            results[name] = {"same_answers": same, "of": len(reference), "seconds": round(seconds, 1)}
        except Exception as e:  # one format failing must not hide the others' results
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(name, results[name], flush=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
