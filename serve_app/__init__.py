"""lorafleet: one OpenAI-compatible endpoint for LLMs and many LoRA adapters.

The names below are the ms-swift-compatible offline API and client helpers. They are imported
lazily so that `import serve_app` stays cheap (Ray workers and the CLI import it often).
"""

from importlib import import_module

_EXPORTS = {
    "ModelType": "serve_app.model_types",
    "get_default_template_type": "serve_app.model_types",
    "TemplateType": "serve_app.template",
    "get_template": "serve_app.template",
    "GenerationConfig": "serve_app.offline",
    "get_vllm_engine": "serve_app.offline",
    "get_pt_engine": "serve_app.offline",
    "inference_vllm": "serve_app.offline",
    "inference_stream_vllm": "serve_app.offline",
    "LoRARequest": "vllm.lora.request",
    "XRequestConfig": "serve_app.client",
    "get_model_list_client": "serve_app.client",
    "inference_client": "serve_app.client",
    "inference_client_async": "serve_app.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serve_app' has no attribute '{name}'")
    return getattr(import_module(_EXPORTS[name]), name)
