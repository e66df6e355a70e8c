"""`lorafleet deploy` flags build the same AppConfig as the YAML."""

from serve_app.cli import build_parser, config_from_args
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
    assert model.lora_modules == {"default-lora": str(XIAO_HUANG_DIR.resolve())}
    assert model.engine.enable_lora


def test_served_model_name_and_fixed_replicas():
    model = config("--served_model_name", "chat", "--num_replicas", "3").models[0]
    assert model.served_name == "chat" and model.deployment.num_replicas == 3
