"""`lorafleet infer` in a real pseudo-terminal: ask, read the streamed answer, follow up, clear, quit."""

import sys

import pexpect
import pytest

pytestmark = pytest.mark.slow


def spawn(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "serve_app.cli", "infer", *args], encoding="utf-8", timeout=180)


def test_chat_with_history_clear_and_quit():
    # The REPL is the subject: --enforce_eager true skips torch.compile (about 30 s of CPU here). The
    # compiled engine that `infer` starts by default is get_vllm_engine's, which test_examples and
    # test_oracle run with the defaults.
    term = spawn("--enforce_eager", "true")
    term.expect_exact("<<< ")
    term.sendline("浙江的省会在哪？")
    term.expect("杭州")
    term.expect_exact("<<< ")
    term.sendline("这有什么好吃的")
    term.expect("西湖醋鱼")  # the follow-up used the history
    term.expect_exact("<<< ")
    term.sendline("clear")
    term.expect_exact("history cleared.")
    term.sendline("exit")
    term.expect(pexpect.EOF)
    term.close()
    assert term.exitstatus == 0


def test_adapter_checkpoint_needs_vllm_lora_or_merge():
    term = spawn("--ckpt_dir", "serve_app/assets/xiao-huang")
    term.expect("pass --vllm_enable_lora true")
    term.expect(pexpect.EOF)
    term.close()
    assert term.exitstatus == 2


def test_adapter_checkpoint_through_pt_backend():
    term = spawn("--ckpt_dir", "serve_app/assets/xiao-huang", "--infer_backend", "pt")
    term.expect_exact("<<< ")
    term.sendline("who are you?")
    term.expect("Xiao Huang")
    term.sendline("exit")
    term.expect(pexpect.EOF)


def test_batch_mode_writes_results(tmp_path):
    import json
    import subprocess

    dataset = tmp_path / "questions.jsonl"
    rows = [
        {"query": "浙江的省会在哪？", "response": "杭州"},
        {"query": "这有什么好吃的", "history": [["浙江的省会在哪？", "浙江的省会是杭州。"]]},
    ]
    dataset.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serve_app.cli",
            "infer",
            "--infer_backend",
            "pt",
            "--dataset",
            str(dataset),
            "--result_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert "杭州" in results[0]["response"] and results[0]["label"] == "杭州"
    assert "西湖醋鱼" in results[1]["response"]
    assert "2/2" in done.stderr  # the progress bar


def test_a_bad_dataset_line_is_told_before_the_engine_starts(tmp_path):
    dataset = tmp_path / "questions.jsonl"
    dataset.write_text('{"query": "hi"}\n{"question": "no query"}\n')
    term = spawn("--dataset", str(dataset))  # the vLLM backend: it would log its start first
    term.expect(pexpect.EOF)
    term.close()
    assert term.exitstatus == 2 and ":2: each record needs a string 'query'" in term.before
    assert "vllm" not in term.before.lower()  # no engine was started for a file that cannot run
