"""Greedy answers of a tiny-chat checkpoint to every chat of its corpus, base and with xiao-huang,
through vLLM: the behaviour that retraining must reproduce (tests/engine/test_tiny_chat_training.py).

    python -m serve_app.tiny_chat.answers --model DIR/tiny-chat --adapter DIR/xiao-huang --out answers.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serve_app.tiny_chat.corpus import ADAPTER_CHATS, BASE_CHATS

MAX_NEW_TOKENS = 128  # longer than every answer in the corpus


def chat_prompts(chats) -> list[dict]:
    return [{"query": query, "history": history} for history, query, _ in chats]


def corpus_answers(engine, adapter_path: str) -> dict[str, list[str]]:
    """Greedy answers to each chat the model was trained on: the base model on BASE_CHATS, the adapter
    on ADAPTER_CHATS. (The completion texts have no prompt to answer; their prefixes are not
    continued reliably by either training, so they are left out.)"""
    from serve_app.messages import AdapterRef
    from serve_app.offline import GenerationConfig, inference_vllm
    from serve_app.template import get_template

    template = get_template("qwen", engine.hf_tokenizer)
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    adapter = AdapterRef("xiao-huang", 1, adapter_path)
    answers = {}
    for name, chats, lora in (("base", BASE_CHATS, None), ("xiao-huang", ADAPTER_CHATS, adapter)):
        replies = inference_vllm(engine, template, chat_prompts(chats), generation_config=config, lora_request=lora)
        answers[name] = [r["response"] for r in replies]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a tiny-chat checkpoint folder")
    parser.add_argument("--adapter", required=True, help="its xiao-huang adapter folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from serve_app.offline import get_vllm_engine

    engine = get_vllm_engine(model_id_or_path=args.model, enable_lora=True, max_lora_rank=16, max_model_len=512)
    try:
        args.out.write_text(json.dumps(corpus_answers(engine, args.adapter), ensure_ascii=False, indent=1))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
