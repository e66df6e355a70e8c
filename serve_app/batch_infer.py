"""`lorafleet infer --dataset FILE.jsonl`: answer every record, write `--result_path` JSONL.

Each input line: {"query": ..., "history": [[q, r], ...]?, "system": ...?, "response": ...?}.
Each output line: the record, with the model's answer in "response" and the given one in "label".
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from serve_app.errors import ConfigError

BATCH = 16


def check_request(where: str, item) -> None:
    """ms-swift's request: {"query": str, "history"?: [[query, response], ...], "system"?: str} (a
    dataset's `response`, the label, may ride along; a key given as None is not given). A wrong one
    is named here by `where`, not met later as a KeyError or a prompt of the wrong type."""
    if not isinstance(item, dict) or not isinstance(item.get("query"), str):
        got = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise ValueError(f"{where} needs a 'query' string (got {got}).")
    if unknown := sorted(k for k, v in item.items() if v is not None and k not in REQUEST_KEYS):
        raise ValueError(f"{where} has keys {unknown}; a request takes query, history and system.")
    history = item.get("history") or []
    if not isinstance(history, (list, tuple)) or not all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history
    ):
        raise ValueError(f"{where}: 'history' must be a list of [query, response] string pairs.")
    if item.get("system") is not None and not isinstance(item["system"], str):
        raise ValueError(f"{where}: 'system' must be a string.")


REQUEST_KEYS = {"query", "history", "system", "response"}


def read_records(path: str) -> list[dict]:
    if not Path(path).is_file():
        raise ConfigError(f"dataset '{path}' does not exist; give a JSONL file of {{query, response?}} records.")
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not a JSON object ({e.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("query"), str):
            raise ConfigError(f"{path}:{number}: each record needs a string 'query'.")
        try:
            check_request(f"{path}:{number}", record)  # the rest of the request, before any engine starts
        except ValueError as e:
            raise ConfigError(str(e)) from None
        records.append(record)
    if not records:
        raise ConfigError(f"{path} holds no records.")
    return records


def dataset_from_ckpt(ckpt_dir: str | None) -> str:
    """With --load_dataset_config true: the validation set of CKPT_DIR/sft_args.json (ms-swift), when
    it is a local file; otherwise an error that says why, never a silent switch to the chat."""
    from serve_app.swift_checkpoint import read_sft_args

    if not ckpt_dir:
        raise ConfigError(
            "--load_dataset_config true reads CKPT_DIR/sft_args.json: give --ckpt_dir, or pass --dataset FILE."
        )
    trained = read_sft_args(ckpt_dir)
    if not trained:
        raise ConfigError(
            f"--load_dataset_config true: no sft_args.json in '{ckpt_dir}' (or its parent); pass --dataset FILE."
        )
    named = trained.get("val_dataset") or []
    local = [item for item in named if Path(item).is_file()]
    if named and len(local) == len(named) == 1:
        return local[0]
    if named:
        missing = [item for item in named if item not in local]
        raise ConfigError(
            f"--load_dataset_config true: the validation set {named} of sft_args.json must be one local JSONL file "
            f"(not found here: {missing}); pass --dataset FILE."
        )
    raise ConfigError(
        f"--load_dataset_config true: sft_args.json names no val_dataset; training held out dataset_test_ratio="
        f"{trained.get('dataset_test_ratio')} of {trained.get('dataset')} with its own random split, which lorafleet "
        "does not reproduce; pass --dataset FILE with your validation records."
    )


def default_result_path(dataset: str) -> str:
    return str(Path(dataset).with_name(f"{Path(dataset).stem}-result-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))


def run_batch(session, dataset: str, records: list[dict], result_path: str | None) -> str:
    """Answer `records` (read_records(dataset), read before the engine starts: a bad line is told
    at once) in batches through the session's engine, with a progress bar."""
    from tqdm import tqdm

    from serve_app.offline import inference_vllm

    out_path = result_path or default_result_path(dataset)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as out, tqdm(total=len(records), desc="infer", unit="rec") as bar:
        for start in range(0, len(records), BATCH):
            chunk = records[start : start + BATCH]
            requests = [
                {"query": r["query"], "history": r.get("history") or [], "system": r.get("system", session.system)}
                for r in chunk
            ]
            results = inference_vllm(session.engine, session.template, requests, lora_request=session.adapter)
            for record, result in zip(chunk, results, strict=True):
                row = {**record, "response": result["response"]}
                if "response" in record:
                    row["label"] = record["response"]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(len(chunk))
    print(f"[lorafleet] wrote {len(records)} results to {out_path}")
    return out_path
