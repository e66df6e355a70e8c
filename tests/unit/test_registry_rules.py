"""The registry's rules without Ray: persistence, ids, validation, path policy (real files), on both
databases: a SQLite file and a real PostgreSQL server (tests/postgres_server.py)."""

import asyncio
import json
import logging
import os
import sys
import threading

import pytest

from lora_registry import database
from lora_registry.adapter_store import AdapterStore
from lora_registry.key_store import KeySpec, hash_key
from lora_registry.path_policy import PathPolicy
from lora_registry.registry import BaseModelSpec, LoraRegistry, StartupAdapter
from serve_app.engines.lora_targets import VLLM_LORA_MODULES
from serve_app.errors import ConfigError, ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from serve_app.model_types import TINY_CHAT_DIR, XIAO_HUANG_DIR
from tests.adapter_factory import make_adapter, make_foreign_adapter
from tests.postgres_server import fresh_database

BASE = BaseModelSpec("tiny-chat", json.loads((TINY_CHAT_DIR / "config.json").read_text()), True, 16, VLLM_LORA_MODULES)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "root": root,
        "a": make_adapter(root / "a", seed=1),
        "b": make_adapter(root / "b", seed=2),
        "rank32": make_adapter(root / "rank32", rank=32),
        "foreign": make_foreign_adapter(root / "foreign"),
        "embed": make_adapter(root / "embed", targets=("q_proj", "embed_tokens")),
    }


DATABASE_URL: str | None = None  # this test's database (None: the SQLite file in the state dir)


@pytest.fixture(autouse=True, params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    global DATABASE_URL
    server = request.getfixturevalue("postgres_server") if request.param == "postgresql" else None
    DATABASE_URL = fresh_database(server, str(tmp_path)) if server else None
    yield DATABASE_URL
    DATABASE_URL = None


def registry(tmp_path, adapters, **startup):
    return LoraRegistry(str(tmp_path / "state"), [BASE], [str(adapters["root"])], startup, DATABASE_URL)


def test_register_persists_and_survives_a_restart(tmp_path, adapters):
    reg = registry(tmp_path, adapters)
    record = run(reg.register("a", str(adapters["a"])))
    assert record.base_model == "tiny-chat" and record.rank == 4 and record.version == 1
    again = registry(tmp_path, adapters)
    assert run(again.state()).adapters["a"].adapter_id == record.adapter_id


def test_a_later_state_supersedes_an_earlier_one_and_a_restart_supersedes_all(tmp_path, adapters):
    reg = registry(tmp_path, adapters)
    before = run(reg.state())
    run(reg.register("a", str(adapters["a"])))
    after = run(reg.state())
    assert after.supersedes(before) and after.supersedes(after) and not before.supersedes(after)
    restarted = run(registry(tmp_path, adapters).state())  # a new run: its change counter starts again
    assert restarted.supersedes(after) and "a" in restarted.adapters


def test_replace_gets_a_new_id_and_version(tmp_path, adapters):
    reg = registry(tmp_path, adapters)
    first = run(reg.register("a", str(adapters["a"])))
    with pytest.raises(ConflictError, match="replace=true"):
        run(reg.register("a", str(adapters["b"])))
    second = run(reg.register("a", str(adapters["b"]), replace=True))
    assert second.adapter_id > first.adapter_id and second.version == 2
    run(reg.unregister("a"))
    third = run(reg.register("a", str(adapters["a"])))
    assert third.adapter_id > second.adapter_id  # ids are never reused


def test_replace_keeps_the_residency_flags_it_does_not_set(tmp_path, adapters):
    """New weights under a name keep its pinned/preload unless the registration sets them: a tenant
    (who may not set them) replacing its adapter does not clear what the admin set."""
    reg = registry(tmp_path, adapters)
    run(reg.register("a", str(adapters["a"]), pinned=True, preload=True))
    kept = run(reg.register("a", str(adapters["b"]), replace=True))
    assert (kept.pinned, kept.preload, kept.version) == (True, True, 2)
    cleared = run(reg.register("a", str(adapters["a"]), replace=True, pinned=False))
    assert (cleared.pinned, cleared.preload) == (False, True)
    assert (run(reg.register("b", str(adapters["b"]))).pinned, reg.records["b"].preload) == (False, False)


def test_startup_adapters_keep_their_id_across_restarts(tmp_path, adapters):
    startup = {"xiao-huang": StartupAdapter("tiny-chat", str(XIAO_HUANG_DIR))}
    first = run(registry(tmp_path, adapters, **startup).state()).adapters["xiao-huang"]
    second = run(registry(tmp_path, adapters, **startup).state()).adapters["xiao-huang"]
    assert first.adapter_id == second.adapter_id


@pytest.mark.parametrize(
    "name,key,error,match",
    [
        ("tiny-chat", "a", ConflictError, "base model name"),
        ("bad name!", "a", InvalidRequestError, "not valid"),
        ("big", "rank32", ConfigError, "rank 32 .* max_lora_rank=16"),
        ("foreign", "foreign", ConfigError, "trained for another base model"),
        ("embed", "embed", ConfigError, r"targets \['embed_tokens'\]"),
    ],
)
def test_validation_failures_name_the_problem(tmp_path, adapters, name, key, error, match):
    with pytest.raises(error, match=match):
        run(registry(tmp_path, adapters).register(name, str(adapters[key])))


def test_force_skips_the_base_model_check_but_not_the_rank(tmp_path, adapters):
    reg = registry(tmp_path, adapters)
    assert run(reg.register("foreign", str(adapters["foreign"]), force=True)).name == "foreign"


def test_missing_peft_files(tmp_path, adapters):
    empty = adapters["root"] / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match="adapter_config.json is missing"):
        run(registry(tmp_path, adapters).register("x", str(empty)))


def _config(**changes):
    def change(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))

    return change


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _cut_weights(folder):
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage,match",
    [
        (_write("adapter_config.json", b"{not json"), "is not valid JSON"),
        (_write("adapter_config.json", b"[]"), "not a JSON object"),
        (_config(r="8"), "r = '8'"),
        (_config(r=8), r"r = 8 but its weights have rank \[4\]"),
        (_config(target_modules=None), "target_modules = None"),
        (_config(lora_alpha="16"), "lora_alpha = '16'"),
        (_config(bias="all"), "trains biases"),
        (_cut_weights, "cut short"),
        (_write("adapter_model.safetensors", b"\x01\x02"), "not a readable safetensors file"),
    ],
)
def test_broken_adapter_files_are_refused_at_registration(tmp_path, adapters, damage, match):
    """What the engine would fail on at every request is refused, by name, when registered."""
    import shutil

    broken = shutil.copytree(adapters["a"], adapters["root"] / f"broken-{tmp_path.name}")
    damage(broken)
    with pytest.raises(ConfigError, match=match) as refused:
        run(registry(tmp_path, adapters).register("broken", str(broken)))
    assert refused.value.param == "lora_path"


@pytest.mark.parametrize(
    "change, rank, targets",
    [
        ({"rank_pattern": {"v_proj": 16}}, 16, ("q_proj", "v_proj")),  # vLLM's rank: the largest
        ({"target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj"]}, 4, ()),  # MoE experts only
        ({"target_modules": ".*(q_proj|v_proj)$"}, 4, (".*(q_proj|v_proj)$",)),  # PEFT's regular expression
        ({"lora_alpha": 8.5}, 4, ("q_proj", "v_proj")),
    ],
)
def test_real_peft_variants_pass_the_file_checks(tmp_path, adapters, change, rank, targets):
    import shutil

    from lora_registry.adapter_files import inspect_adapter

    variant = shutil.copytree(adapters["a"], tmp_path / "variant")
    _config(**change)(variant)
    info = inspect_adapter(variant)
    assert (info.rank, info.target_modules) == (rank, targets)


def test_unregister_unknown_is_404(tmp_path, adapters):
    with pytest.raises(NotFoundError):
        run(registry(tmp_path, adapters).unregister("nope"))


def test_listen_returns_on_change(tmp_path, adapters):
    reg = registry(tmp_path, adapters)

    async def scenario():
        version = (await reg.state()).version
        waiter = asyncio.create_task(reg.listen(version, timeout_s=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await reg.register("a", str(adapters["a"]))
        state = await asyncio.wait_for(waiter, 1)
        assert "a" in state.adapters and state.version != version

    run(scenario())


def test_path_policy_refuses_dotdot_outside_and_symlink_escapes(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "ok").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, root / "escape")
    policy = PathPolicy([str(root)])
    assert policy.check(str(root / "ok")) == str((root / "ok").resolve())
    for path, match in [
        (str(root / ".." / "outside"), "contains '..'"),
        (str(outside), "outside the allowed roots"),
        (str(root / "escape"), "outside the allowed roots"),
    ]:
        with pytest.raises(PermissionDeniedError, match=match):
            policy.check(path)
    with pytest.raises(InvalidRequestError, match="absolute"):
        policy.check("relative/path")
    # a root given twice (a startup adapter's folder that is also an allowed root) is named once
    with pytest.raises(PermissionDeniedError) as refused:
        PathPolicy([str(root), str(root / "ok" / ".."), str(root)]).check(str(outside))
    assert refused.value.message.count(str(root)) == 1


_WATCH: list = []


def _audit(event, args):
    if _WATCH and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _WATCH[0].append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # sees every file open in this process, whatever API opens it


def test_refused_paths_are_never_read(tmp_path, adapters):
    reg = registry(tmp_path, adapters)  # XIAO_HUANG_DIR is a valid adapter, but outside these roots
    opened: list = []
    _WATCH.append(opened)
    try:
        with pytest.raises(PermissionDeniedError):
            run(reg.register("x", str(XIAO_HUANG_DIR)))
    finally:
        _WATCH.clear()
    assert not [p for p in opened if str(XIAO_HUANG_DIR) in p]


def test_store_integrity(tmp_path, database_url):
    store = AdapterStore(database=database.Database.for_state_dir(database_url, tmp_path))
    store.put("a", "/x", "tiny-chat", 4, ("q_proj",))
    assert store.integrity_ok() and list(store.all()) == ["a"]


def test_tenant_keys_are_stored_hashed_revoked_and_survive_a_restart(tmp_path, adapters):
    reg = registry(tmp_path, adapters)
    record, secret = run(reg.create_key(KeySpec("acme-1", tenant="acme", models=("tiny-chat",), can_register=True)))
    assert secret.startswith("lf-") and len(secret) > 40 and record.key_hint == secret[:8] + "..."
    state = run(reg.state())
    assert state.keys == {hash_key(secret): record} and record.adapter_prefix == "acme:"
    assert secret not in repr(record) and secret not in str(record.to_dict())
    with pytest.raises(ConflictError):  # a name is taken for good
        run(reg.create_key(KeySpec("acme-1")))
    db = reg.store.db  # what the database holds: the hash, never the secret
    assert secret not in str(db.run(lambda: db.query("SELECT * FROM api_keys")))

    again = registry(tmp_path, adapters)  # a restarted registry replica reloads the keys
    assert run(again.state()).keys == state.keys
    revoked = run(again.revoke_key("acme-1"))
    assert revoked.revoked_at is not None and run(again.state()).keys == {}
    assert [k.name for k in run(registry(tmp_path, adapters).list_keys())] == ["acme-1"]
    assert run(registry(tmp_path, adapters).state()).keys == {}
    with pytest.raises(ConflictError):
        run(again.create_key(KeySpec("acme-1")))
    with pytest.raises(NotFoundError):
        run(again.revoke_key("nobody"))


@pytest.mark.parametrize(
    "spec,param",
    [
        (KeySpec("bad name"), "name"),
        (KeySpec("acme", tenant="a:b"), "tenant"),  # ':' separates a tenant from its adapters' names
        (KeySpec("a:b"), "name"),  # (its tenant is its name)
        (KeySpec("acme", requests_per_minute=0), "requests_per_minute"),
    ],
)
def test_bad_key_specs_name_the_field(tmp_path, adapters, spec, param):
    with pytest.raises(InvalidRequestError) as error:
        run(registry(tmp_path, adapters).create_key(spec))
    assert error.value.param == param


def test_a_slow_read_holds_up_no_other_change(tmp_path, adapters, monkeypatch):
    """Files are read (an object store's downloaded) before the registry's lock: while one adapter's
    read is stuck, another is removed, and the stuck one still lands afterwards."""
    reg = registry(tmp_path, adapters)
    run(reg.register("a", str(adapters["a"])))
    read, reading, release = reg._read_adapter, threading.Event(), threading.Event()

    def stuck_read(path, tenant):
        if path == str(adapters["b"]):
            reading.set()
            release.wait(30)  # until the other change is done (30 s if that change waits for this one)
        return read(path, tenant)

    monkeypatch.setattr(reg, "_read_adapter", stuck_read)

    async def both():
        stuck = asyncio.create_task(reg.register("b", str(adapters["b"])))
        assert await asyncio.to_thread(reading.wait, 30)
        await reg.unregister("a")
        removed_first = not stuck.done()
        release.set()
        return removed_first, await stuck

    removed_first, record = run(both())
    assert removed_first and record.name == "b"
    assert sorted(run(reg.state()).adapters) == ["b"]


def test_auto_lora_modules_come_from_the_startup_adapters_and_later_ones_must_fit(tmp_path, adapters):
    import dataclasses

    auto = dataclasses.replace(BASE, lora_target_modules="auto")

    def start(startup, base=auto):
        roots = [str(adapters["root"]), str(XIAO_HUANG_DIR.parent)]
        return LoraRegistry(str(tmp_path / "state"), [base], roots, startup, DATABASE_URL)

    reg = start({"qv": StartupAdapter("tiny-chat", str(adapters["a"]))})
    assert run(reg.state()).engine_modules == {"tiny-chat": ("q_proj", "v_proj")}
    run(reg.register("b", str(adapters["b"])))  # q_proj and v_proj too: fits
    with pytest.raises(ConfigError, match=r"LoRA weights on \['down_proj', 'gate_proj'.*lora_target_modules"):
        run(reg.register("xh", str(XIAO_HUANG_DIR)))  # every linear module: vLLM would drop most of it
    assert "xh" not in run(reg.state()).adapters
    again = start({"qv": StartupAdapter("tiny-chat", str(adapters["a"]))})  # a restart decides alike
    assert run(again.state()).engine_modules == {"tiny-chat": ("q_proj", "v_proj")}


def test_auto_without_adapters_takes_any_and_a_listed_set_refuses_at_start(tmp_path, adapters):
    import dataclasses

    bare = LoraRegistry(
        str(tmp_path / "bare"),
        [dataclasses.replace(BASE, lora_target_modules="auto")],
        [str(XIAO_HUANG_DIR.parent)],
        {},
        DATABASE_URL,
    )
    assert run(bare.state()).engine_modules == {"tiny-chat": None}  # None: every module
    run(bare.register("xh", str(XIAO_HUANG_DIR)))
    listed = dataclasses.replace(BASE, lora_target_modules=["qkv_proj"])
    with pytest.raises(ConfigError, match=r"apply LoRA only to \['k_proj', 'q_proj', 'v_proj'\]"):
        LoraRegistry(
            str(tmp_path / "listed"),
            [listed],
            [],
            {"xh": StartupAdapter("tiny-chat", str(XIAO_HUANG_DIR))},
            DATABASE_URL,
        )


def test_adapters_kept_from_a_run_with_lora_are_not_served_by_one_without(tmp_path, adapters, caplog, monkeypatch):
    """A restart on the same state without LoRA (or under another model name) keeps the records
    but neither lists nor routes them (a request would reach an engine that cannot load them);
    the log names them. A restart with LoRA serves them again."""
    monkeypatch.setattr(logging.getLogger("ray.serve"), "propagate", True)  # importing Serve turns it off
    reg = registry(tmp_path, adapters)
    run(reg.register("kept", str(adapters["a"])))
    no_lora = BaseModelSpec(BASE.name, BASE.config, False, 16, VLLM_LORA_MODULES)
    for bases in ([no_lora], [BaseModelSpec("other", BASE.config, True, 16, VLLM_LORA_MODULES)]):
        caplog.clear()
        reg = LoraRegistry(str(tmp_path / "state"), bases, [str(adapters["root"])], {}, DATABASE_URL)
        state = run(reg.state())
        assert "kept" not in state.adapters and state.unserved == {"kept": "tiny-chat"} and "kept" in reg.records
        assert "kept (tiny-chat)" in caplog.text and reg._unserved(reg._servable()) == {"kept": "tiny-chat"}
        assert [p.to_dict()["served"] for p in run(reg.describe())] == [False]
    reg = registry(tmp_path, adapters)
    assert run(reg.state()).adapters["kept"].path == str(adapters["a"])


def test_registering_on_a_model_without_lora_names_the_setting(tmp_path, adapters):
    """The error names base_model only when the caller sent it; it tells how to turn LoRA on."""
    no_lora = BaseModelSpec(BASE.name, BASE.config, False, 16, VLLM_LORA_MODULES)
    reg = LoraRegistry(str(tmp_path / "state"), [no_lora], [str(adapters["root"])], {}, DATABASE_URL)
    for base_model, param in ((None, None), ("tiny-chat", "base_model")):
        with pytest.raises(InvalidRequestError, match="served without LoRA; set engine.enable_lora") as refused:
            run(reg.register("x", str(adapters["a"]), base_model))
        assert (refused.value.param, refused.value.code) == (param, "lora_not_enabled")
    assert reg.records == {}
