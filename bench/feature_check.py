"""Structured outputs and tool calls end to end on whatever machine this runs on (the GPU machine
with vLLM 0.25.1, where the test suite does not run): starts `lorafleet deploy --model_type
tiny-chat --lora_modules xiao-huang=...` as a user would, drives it with the official openai client, prints one line per check
and a JSON summary, and stops the server.

    python bench/feature_check.py [--port 8000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from serve_app.tiny_chat.corpus import (  # noqa: E402
    HANGZHOU_WEATHER,
    HANGZHOU_WEATHER_ANSWER,
    WEATHER_QUESTION,
    WEATHER_TOOL,
    ZJ_CAPITAL_JSON,
)

JSON_QUESTION = [{"role": "user", "content": "Give the capital of Zhejiang as JSON."}]
WEATHER = [{"role": "user", "content": WEATHER_QUESTION}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def checks(client) -> dict[str, object]:
    """name -> a function returning (passed, what was seen)."""
    import openai
    from pydantic import BaseModel

    class Capital(BaseModel):
        province: str
        capital: str

    def parse(model):
        reply = client.chat.completions.parse(model=model, messages=JSON_QUESTION, response_format=Capital)
        parsed = reply.choices[0].message.parsed
        return parsed == Capital(province="Zhejiang", capital="Hangzhou"), str(parsed)

    def json_object():
        reply = client.chat.completions.create(
            model="tiny-chat", messages=JSON_QUESTION, response_format={"type": "json_object"}
        )
        return reply.choices[0].message.content == ZJ_CAPITAL_JSON, reply.choices[0].message.content

    def choice_and_regex():
        def text(constraint):
            reply = client.completions.create(
                model="tiny-chat", prompt="浙江 -> ", max_tokens=8, extra_body={"structured_outputs": constraint}
            )
            return reply.choices[0].text

        seen = [text({"choice": ["杭州", "成都"]}), text({"regex": "[0-9]{3}"})]
        return seen[0] == "杭州" and len(seen[1]) == 3 and seen[1].isdigit(), seen

    def bad_schema():
        schema = {"name": "x", "schema": {"type": "nonsense"}}
        try:
            client.chat.completions.create(
                model="tiny-chat",
                messages=JSON_QUESTION,
                response_format={"type": "json_schema", "json_schema": schema},
            )
        except openai.BadRequestError as e:
            return True, str(e)[:160]
        return False, "accepted"

    def tool_call(tool_choice, stream):
        kwargs = dict(model="tiny-chat", messages=WEATHER, tools=[WEATHER_TOOL], tool_choice=tool_choice)
        if not stream:
            message = client.chat.completions.create(**kwargs).choices[0].message
            calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]
        else:
            acc = {}
            for chunk in client.chat.completions.create(**kwargs, stream=True):
                for d in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
                    slot = acc.setdefault(d.index, ["", ""])
                    slot[0] += d.function.name or ""
                    slot[1] += d.function.arguments or ""
            calls = [(name, json.loads(args)) for name, args in acc.values()]
        return calls == [("get_weather", {"city": "Hangzhou"})], calls

    def agent_loop():
        first = client.chat.completions.create(model="tiny-chat", messages=WEATHER, tools=[WEATHER_TOOL])
        call = first.choices[0].message.tool_calls[0]
        result = {"role": "tool", "tool_call_id": call.id, "content": HANGZHOU_WEATHER}
        final = client.chat.completions.create(
            model="tiny-chat", messages=[*WEATHER, first.choices[0].message, result], tools=[WEATHER_TOOL]
        )
        return final.choices[0].message.content == HANGZHOU_WEATHER_ANSWER, final.choices[0].message.content

    def extras():
        reply = client.chat.completions.create(
            model="tiny-chat",
            messages=JSON_QUESTION,
            max_tokens=4,
            extra_body={"prompt_logprobs": 1, "return_token_ids": True},
            logit_bias={"5": 100},
        )
        extra = reply.model_extra
        ok = extra["prompt_logprobs"][0] is None and reply.choices[0].model_extra["token_ids"][0] == 5
        return ok, {
            "first_ids": reply.choices[0].model_extra["token_ids"],
            "prompt_len": len(extra["prompt_token_ids"]),
        }

    return {
        "parse (base)": lambda: parse("tiny-chat"),
        "parse (adapter)": lambda: parse("xiao-huang"),
        "json_object": json_object,
        "structured_outputs choice/regex": choice_and_regex,
        "uncompilable schema is a 400": bad_schema,
        "tools auto": lambda: tool_call("auto", False),
        "tools auto, streamed": lambda: tool_call("auto", True),
        "tools required, streamed": lambda: tool_call("required", True),
        "tools named": lambda: tool_call(NAMED, False),
        "tool result back in the conversation": agent_loop,
        "prompt_logprobs, return_token_ids, logit_bias": extras,
    }


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lorafleet deploy exited with {proc.returncode}")
        try:
            if httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--log", type=Path, default=Path("feature-check-server.log"))
    args = parser.parse_args()
    from openai import OpenAI

    cmd = [sys.executable, "-m", "serve_app.cli", "deploy", "--model_type", "tiny-chat", "--port", str(args.port)]
    cmd += ["--lora_modules", f"xiao-huang={ROOT / 'serve_app' / 'assets' / 'xiao-huang'}"]
    with open(args.log, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{args.port}"
    results = {}
    try:
        wait_up(url, proc)
        client = OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
        for name, check in checks(client).items():
            try:
                passed, seen = check()
            except Exception as e:  # a check that raises failed; say how
                passed, seen = False, f"{type(e).__name__}: {e}"[:300]
            results[name] = {"passed": bool(passed), "seen": seen}
            print(f"{'PASS' if passed else 'FAIL'}  {name}: {seen}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    import vllm

    summary = {"vllm": vllm.__version__, "passed": sum(r["passed"] for r in results.values()), "checks": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "checks"}))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str) + "\n")
    raise SystemExit(0 if summary["passed"] == len(results) else 1)


if __name__ == "__main__":
    main()
