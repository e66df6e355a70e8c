"""serve_config.yaml, the GPU example and the KubeRay manifest parse, validate and agree."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_config_loads_through_ray_serve_schema_and_ours(path):
    schema = (
        ServeDeploySchema.model_validate(load(path))
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(load(path))
    )
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    AppConfig.model_validate(app.args)


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_plain_serve_run_talks_grpc_between_deployments(path):
    """Serve reads RAY_SERVE_THROUGHPUT_OPTIMIZED (gRPC between deployments) in each process; the
    app's runtime_env gives it to the app's own processes under a plain `serve run` (without it every
    call between deployments went over Ray actor calls: 16 CPU streams 1,426-1,538 against
    1,669-1,716 tok/s, docs/benchmarks.md)."""
    from serve_app.platform import SERVE_ENV

    env_vars = load(path)["applications"][0]["runtime_env"]["env_vars"]
    assert env_vars["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == SERVE_ENV["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_the_cpu_config_lets_waiting_openmp_threads_sleep():
    """The engine replicas of `serve run serve_config.yaml` get what `lorafleet deploy` gives its
    cluster on the CPU (CPU_ENV): OpenMP reads it when a process loads it, so only a process's
    environment at its start can carry it."""
    from serve_app.platform import CPU_ENV, has_nvidia_gpu, serve_env

    env_vars = load("serve_config.yaml")["applications"][0]["runtime_env"]["env_vars"]
    assert env_vars["OMP_WAIT_POLICY"] == CPU_ENV["OMP_WAIT_POLICY"] == "PASSIVE"
    assert serve_env().get("OMP_WAIT_POLICY") == (None if has_nvidia_gpu() else "PASSIVE")


def test_default_config_serves_tiny_chat_and_xiao_huang():
    config = AppConfig.model_validate(load("serve_config.yaml")["applications"][0]["args"])
    model = config.models[0]
    assert model.served_name == "tiny-chat" and "xiao-huang" in model.lora_modules
    assert Path(model.lora_modules["xiao-huang"].path).is_dir()


def test_gpu_example_is_tp4_and_autoscales_1_to_4():
    model = AppConfig.model_validate(load("serve_config.gpu.yaml")["applications"][0]["args"]).models[0]
    assert model.engine.tensor_parallel_size == 4
    assert (model.deployment.autoscaling.min_replicas, model.deployment.autoscaling.max_replicas) == (1, 4)


def test_kuberay_manifest_carries_the_gpu_example():
    manifest = load("deploy/kuberay/rayservice.yaml")
    assert manifest["kind"] == "RayService"
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == load("serve_config.gpu.yaml")


def test_deployment_options_derive_from_tensor_parallel_size(monkeypatch):
    from deployments.llm_server import LLMServer

    monkeypatch.setenv("LORAFLEET_DEVICE", "gpu")
    model = AppConfig.model_validate(load("serve_config.gpu.yaml")["applications"][0]["args"]).models[0]
    options = LLMServer.get_deployment_options(model)
    assert options["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 4}
    assert "placement_group_bundles" not in options
    assert options["autoscaling_config"]["target_ongoing_requests"] == 64
    monkeypatch.setenv("LORAFLEET_DEVICE", "cpu")
    assert LLMServer.get_deployment_options(model)["placement_group_bundles"] == [{"CPU": 1.0}] * 4


def test_custom_resources_place_engine_and_registry_replicas(monkeypatch):
    """On the CPU the engine replica's actor runs in its first placement bundle, so the custom
    resources that place it (tests/cluster/test_node_loss.py) must be in that bundle."""
    from deployments.llm_server import LLMServer
    from lora_registry.registry import LoraRegistry

    on_a_slot = {"resources": {"lf_slot": 1}}
    config = AppConfig.model_validate(
        {
            "models": [
                {
                    "model_type": "tiny-chat",
                    "engine": {"tensor_parallel_size": 2},
                    "deployment": {"ray_actor_options": on_a_slot},
                }
            ],
            "registry": {"ray_actor_options": on_a_slot},
        }
    )
    monkeypatch.setenv("LORAFLEET_DEVICE", "cpu")
    options = LLMServer.get_deployment_options(config.models[0])
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "lf_slot": 1}, {"CPU": 1.0}]
    assert options["ray_actor_options"] == on_a_slot
    registry = LoraRegistry.get_deployment_options(config.registry.ray_actor_options)
    assert registry["ray_actor_options"] == {"num_cpus": 0, "resources": {"lf_slot": 1}}


@pytest.mark.parametrize(
    "args,match",
    [
        ({"models": [{"model_type": "tiny-chat", "enginee": {}}]}, "enginee"),
        ({"models": [{"model_type": "tiny-chatt"}]}, "Did you mean 'tiny-chat'"),
        ({"models": []}, "at least 1"),
        (
            {"models": [{"model_type": "tiny-chat", "deployment": {"num_replicas": 2, "autoscaling": {}}}]},
            "either num_replicas or autoscaling",
        ),
        (
            {
                "models": [
                    {"model_type": "tiny-chat", "deployment": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}
                ]
            },
            "min_replicas",
        ),
        ({"models": [{"model_type": "tiny-chat", "lora_modules": {"tiny-chat": "/x"}}]}, "unique"),
        ({"models": [{"model_type": "tiny-chat", "engine": {"max_loras": -1}}]}, "max_loras"),
        ({"models": [{"model_type": "tiny-chat", "engine": {"max_cpu_loras": "many"}}]}, "max_cpu_loras"),
        ({"models": [{"model_type": "tiny-chat", "lora_modules": {"a": {"path": "/x", "pin": True}}}]}, "pin"),
    ],
)
def test_bad_config_is_rejected_with_a_named_problem(args, match):
    with pytest.raises((ValidationError, ValueError), match=match):
        AppConfig.model_validate(args)


def test_stream_carrying_replicas_drain_their_streams_by_default():
    from deployments.ingress import Ingress
    from deployments.llm_server import LLMServer
    from deployments.renderer import Renderer
    from serve_app.config import STREAM_DRAIN_S

    config = AppConfig.model_validate({"models": [{"model_type": "tiny-chat", "lora_modules": {"s3": "s3://b/a"}}]})
    assert config.models[0].lora_modules["s3"].path == "s3://b/a"  # a URL stays a URL
    assert LLMServer.get_deployment_options(config.models[0])["graceful_shutdown_timeout_s"] == STREAM_DRAIN_S
    assert Ingress.get_deployment_options(config)["graceful_shutdown_timeout_s"] == STREAM_DRAIN_S
    assert "graceful_shutdown_timeout_s" not in Renderer.get_deployment_options(config)  # Serve's 20 s
    tuned = {"models": [{"model_type": "tiny-chat", "deployment": {"graceful_shutdown_timeout_s": 30}}]}
    assert (
        LLMServer.get_deployment_options(AppConfig.model_validate(tuned).models[0])["graceful_shutdown_timeout_s"] == 30
    )
