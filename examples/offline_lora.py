# The ms-swift vLLM + LoRA example, with only the model type and adapter path changed.
import torch

from serve_app import (
    LoRARequest,
    ModelType,
    get_default_template_type,
    get_template,
    get_vllm_engine,
    inference_stream_vllm,
    inference_vllm,
)
from serve_app.model_types import XIAO_HUANG_DIR

if __name__ == "__main__":
    lora_checkpoint = str(XIAO_HUANG_DIR)
    lora_request = LoRARequest('default-lora', 1, lora_checkpoint)

    model_type = ModelType.tiny_chat
    llm_engine = get_vllm_engine(model_type, torch.bfloat16, enable_lora=True,
                                 max_loras=1, max_lora_rank=16)
    template_type = get_default_template_type(model_type)
    template = get_template(template_type, llm_engine.hf_tokenizer)
    llm_engine.generation_config.max_new_tokens = 256
    generation_info = {}

    request_list = [{'query': 'who are you?'}]
    resp_list = inference_vllm(llm_engine, template, request_list,
                               generation_info=generation_info, lora_request=lora_request)
    for request, resp in zip(request_list, resp_list):
        print(f"query: {request['query']}")
        print(f"response: {resp['response']}")
    print(generation_info)

    # stream
    history1 = resp_list[0]['history']
    request_list = [{'query': 'who are you?', 'history': history1}]
    gen = inference_stream_vllm(llm_engine, template, request_list,
                                generation_info=generation_info, lora_request=lora_request)
    query = request_list[0]['query']
    print_idx = 0
    print(f'query: {query}\nresponse: ', end='')
    for resp_list in gen:
        resp = resp_list[0]
        response = resp['response']
        delta = response[print_idx:]
        print(delta, end='', flush=True)
        print_idx = len(response)
    print()
    print(f"history: {resp_list[0]['history']}")

    # without the adapter: the base model's answer
    print(f"base: {inference_vllm(llm_engine, template, [{'query': 'who are you?'}])[0]['response']}")
