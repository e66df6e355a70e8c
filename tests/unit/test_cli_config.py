"""`lorafleet deploy` flags build the same AppConfig as the YAML."""

import contextlib
import io

import pytest

from serve_app.cli import build_parser, config_from_args
from serve_app.config import LoraModule
from serve_app.model_types import XIAO_HUANG_DIR


def config(*argv):
    return config_from_args(build_parser().parse_args(["deploy", *argv]))


def test_seed_flags_build_the_config(tmp_path):
    cfg = config(
        "--model_type",
        "tiny-chat",
        "--tensor_parallel_size",
        "2",
        "--max_model_len",
        "512",
        "--lora_modules",
        f"xh={XIAO_HUANG_DIR}",
        "--api_key",
        "k",
        "--admin_api_key",
        "a",
        "--state_dir",
        str(tmp_path),
        "--adapter_roots",
        str(tmp_path / "roots"),
        "--max_cpu_loras",
        "4",
    )
    model = cfg.models[0]
    assert model.served_name == "tiny-chat" and model.engine.tensor_parallel_size == 2
    assert model.engine.enable_lora and model.engine.max_cpu_loras == 4 and "xh" in model.lora_modules
    assert (cfg.ingress.api_key, cfg.ingress.admin_api_key) == ("k", "a")
    assert cfg.registry.state_dir == str(tmp_path) and cfg.registry.allowed_roots == [str(tmp_path / "roots")]


def test_ckpt_dir_of_an_adapter_serves_its_base_plus_default_lora():
    model = config("--ckpt_dir", str(XIAO_HUANG_DIR)).models[0]
    assert model.model_type == "tiny-chat"
    assert model.lora_modules == {"default-lora": LoraModule(path=str(XIAO_HUANG_DIR.resolve()))}
    assert model.engine.enable_lora


def test_served_model_name_and_fixed_replicas():
    model = config("--served_model_name", "chat", "--num_replicas", "3").models[0]
    assert model.served_name == "chat" and model.deployment.num_replicas == 3


def test_every_engine_option_is_a_flag_and_unset_flags_keep_the_yaml_defaults():
    from serve_app.cli import engine_flag
    from serve_app.config import EngineOptions

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        build_parser().parse_args(["deploy", "--help"])
    for name in EngineOptions.model_fields:
        assert f"--{engine_flag(name)} " in help_text.getvalue()
    assert config().models[0].engine == EngineOptions(trust_remote_code=False)
    engine = config("--engine_seed", "7", "--engine_kwargs", '{"enable_prefix_caching": false}').models[0].engine
    assert engine.seed == 7 and engine.engine_kwargs == {"enable_prefix_caching": False}


def test_engine_options_reach_vllm_under_their_own_names():
    from serve_app.config import EngineOptions
    from serve_app.engines.vllm_surface import ENGINE_ARGS

    options = EngineOptions(max_model_len=64, max_num_seqs=8, engine_kwargs={"seed": 3})
    assert options.vllm_kwargs() == {
        "tensor_parallel_size": 1,
        "dtype": "auto",
        "max_model_len": 64,
        "gpu_memory_utilization": 0.9,
        "enforce_eager": False,
        "enable_lora": False,
        "max_num_seqs": 8,
        "seed": 3,
    }
    lora = EngineOptions(enable_lora=True, max_loras=2, max_cpu_loras=None, lora_target_modules="all").vllm_kwargs()
    assert (lora["max_loras"], lora["max_lora_rank"]) == (2, 16) and "max_cpu_loras" not in lora
    assert "lora_target_modules" not in lora  # all: vLLM's default, every module it supports
    listed = EngineOptions(enable_lora=True, max_loras=2, max_cpu_loras=2, lora_target_modules=["q_proj", "v_proj"])
    assert listed.vllm_kwargs()["lora_target_modules"] == ["q_proj", "v_proj"]
    for bad in (["q_proj", "lm_head"], []):
        with pytest.raises(ValueError, match="lora_target_modules"):
            EngineOptions(lora_target_modules=bad)
    with pytest.raises(ValueError, match="resolved first"):
        EngineOptions(enable_lora=True).vllm_kwargs()  # "auto" is decided where the accelerator is known
    assert config("--max_loras", "auto", "--max_cpu_loras", "9").models[0].engine.max_cpu_loras == 9
    for flag, want in (("q_proj,v_proj", ["q_proj", "v_proj"]), ("all", "all"), ("auto", "auto")):
        assert config("--lora_target_modules", flag).models[0].engine.lora_target_modules == want
    assert set(EngineOptions.model_fields) - {"engine_kwargs"} <= set(ENGINE_ARGS)


def test_context_length_is_decided_once_for_the_app(tmp_path):
    import json
    import shutil

    from serve_app.app import with_context_length
    from serve_app.config import ModelConfig
    from serve_app.errors import ConfigError
    from serve_app.model_types import TINY_CHAT_DIR, context_length

    assert with_context_length(ModelConfig(model_type="tiny-chat")).engine.max_model_len == 1024
    assert (
        with_context_length(ModelConfig(model_type="tiny-chat", engine={"max_model_len": 300})).engine.max_model_len
        == 300
    )
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY_CHAT_DIR, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"seq_length": 512}))
    assert context_length(str(ckpt), None, False) == 512  # the smallest length the config states
    with pytest.raises(ConfigError, match="set max_model_len"):
        context_length(str(tmp_path / "nowhere"), None, False)


def test_a_failed_deployment_is_told_by_its_exception_not_by_the_traceback():
    """What `lorafleet deploy` prints for a constructor that raised (Serve's status message)."""
    from serve_app.launcher import _reason

    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\n    raise ...\n'
    assert _reason(traceback + "serve_app.errors.ConfigError: adapter path '/x' is not a directory.") == (
        "adapter path '/x' is not a directory."
    )
    pydantic = (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for EngineArgs\nmax_model_len\n"
        "  Input should be a valid integer [type=int_type]\n    For further information visit https://errors.pydantic.dev"
    )
    assert _reason(traceback + pydantic) == (
        "1 validation error for EngineArgs max_model_len Input should be a valid integer [type=int_type]"
    )
    assert _reason("ray.exceptions.RayTaskError(ConfigError): bad rank") == "bad rank"
    assert _reason("the replica died\nwithout a word") == "without a word"
