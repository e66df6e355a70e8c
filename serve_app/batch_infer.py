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


def read_records(path: str) -> list[dict]:
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
        records.append(record)
    if not records:
        raise ConfigError(f"{path} holds no records.")
    return records


def dataset_from_ckpt(ckpt_dir: str | None) -> str | None:
    """With --load_dataset_config true: the validation set named in CKPT_DIR/sft_args.json (ms-swift)."""
    args_file = Path(ckpt_dir or "", "sft_args.json")
    if not ckpt_dir or not args_file.is_file():
        return None
    args = json.loads(args_file.read_text())
    for key in ("val_dataset", "dataset"):
        for item in args.get(key) or []:
            if Path(item).is_file():
                return item
    return None


def default_result_path(dataset: str) -> str:
    return str(Path(dataset).with_name(f"{Path(dataset).stem}-result-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))


def run_batch(session, dataset: str, result_path: str | None) -> str:
    """Answer all records in batches through the session's engine, with a progress bar."""
    from tqdm import tqdm

    from serve_app.offline import inference_vllm

    records = read_records(dataset)
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
