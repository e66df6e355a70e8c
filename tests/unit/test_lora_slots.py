"""`max_loras: auto` / `max_cpu_loras: auto` (serve_app/engines/lora_slots.py)."""

import json
import sqlite3

from lora_registry.adapter_store import AdapterStore
from serve_app.config import EngineOptions
from serve_app.engines import lora_slots, lora_targets
from serve_app.model_types import TINY_CHAT_DIR

# Qwen2.5-7B's shape
QWEN_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
}
GIB = 2**30


def test_a_slot_holds_a_and_b_of_every_lora_module_of_every_layer():
    # per layer: q 3584+3584, k and v 3584+512 each, o 3584+3584, gate and up 3584+18944 each, down 18944+3584
    per_layer = 7168 + 2 * 4096 + 7168 + 3 * 22528
    assert lora_slots.slot_bytes(QWEN_7B, max_rank=16) == 16 * per_layer * 28 * 2  # about 81 MB in bf16


def test_auto_gives_one_slot_per_registered_adapter_within_memory_and_bounds():
    one = lora_slots.slot_bytes(QWEN_7B, 16)
    h200 = int(141 * GIB * 0.9)
    assert lora_slots.decide("auto", "auto", 0, one, h200, 64 * GIB).engine == lora_slots.MIN_SLOTS
    assert lora_slots.decide("auto", "auto", 32, one, h200, 64 * GIB).engine == 32
    assert lora_slots.decide("auto", "auto", 500, one, h200, 64 * GIB).engine == lora_slots.MAX_SLOTS
    small = lora_slots.decide("auto", "auto", 32, one, 24 * GIB, 64 * GIB)  # 5% of 24 GiB holds 15 slots
    assert small.engine == int(24 * GIB * lora_slots.LORA_MEMORY_SHARE // one) == 15
    assert small.host == int(64 * GIB * lora_slots.HOST_MEMORY_SHARE // one) == 85
    assert lora_slots.decide("auto", 2, 32, one, h200, GIB).engine == 2  # vLLM: max_cpu_loras >= max_loras
    assert lora_slots.decide(3, None, 32, one, h200, GIB) == lora_slots.LoraSlots(3, 3, one)  # numbers win


def test_resolved_options_go_to_vllm_as_numbers():
    options = lora_targets.with_modules(EngineOptions(enable_lora=True), ("q_proj", "v_proj"))
    hf = json.loads((TINY_CHAT_DIR / "config.json").read_text())
    resolved, slots = lora_slots.resolve(options, str(TINY_CHAT_DIR), 6, hf)
    kwargs = resolved.vllm_kwargs()
    assert (kwargs["max_loras"], kwargs["max_cpu_loras"]) == (slots.engine, slots.host) == (6, slots.host)
    assert slots.host >= slots.engine
    assert kwargs["lora_target_modules"] == ["q_proj", "v_proj"]


def test_a_state_dir_of_before_pinned_and_preload_gets_their_columns(tmp_path):
    db = sqlite3.connect(tmp_path / "registry.sqlite")
    db.executescript(
        "CREATE TABLE adapters (name TEXT PRIMARY KEY, adapter_id INTEGER NOT NULL UNIQUE, path TEXT NOT NULL,"
        " base_model TEXT NOT NULL, rank INTEGER NOT NULL, target_modules TEXT NOT NULL, version INTEGER NOT NULL,"
        " created_at REAL NOT NULL);"
        "INSERT INTO adapters VALUES ('old', 1, '/a', 'tiny-chat', 8, '[\"q_proj\"]', 1, 0.0);"
    )
    db.commit()
    db.close()
    store = AdapterStore(tmp_path / "registry.sqlite")
    old = store.all()["old"]
    assert (old.pinned, old.preload, old.target_modules) == (False, False, ("q_proj",))
    new = store.put("new", "/b", "tiny-chat", 8, ("q_proj",), pinned=True, preload=True)
    assert AdapterStore(tmp_path / "registry.sqlite").all()["new"] == new


def test_lora_modules_decided_from_the_adapters():
    qv, every = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert lora_targets.decide("auto", [qv, ("q_proj",)]) == qv
    assert lora_targets.decide("auto", [qv, every]) == tuple(sorted(every))
    assert lora_targets.decide("auto", []) is None  # no adapter known: every module
    assert lora_targets.decide("all", [qv]) is None
    assert lora_targets.decide(["qkv_proj"], []) == ("k_proj", "q_proj", "v_proj")  # packed names stand for parts
    assert lora_targets.missing(every, qv) == ["down_proj", "gate_proj", "k_proj", "o_proj", "up_proj"]
    assert lora_targets.missing(("gate_up_proj",), None) == []
    options = lora_targets.with_modules(EngineOptions(enable_lora=True, max_loras=2, max_cpu_loras=2), None)
    assert options.lora_target_modules == "all" and "lora_target_modules" not in options.vllm_kwargs()
