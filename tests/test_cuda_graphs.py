"""kitty2 under vLLM's default GPU settings (torch.compile and CUDA graphs requested): the engine starts
and generates what the eager engine generates. The kitty backend declares no CUDA-graph support yet, so
vLLM runs attention eagerly around the compiled model."""

import pytest
from engine import prompt_inputs, vllm_engine
from tiny_model import build_tiny_model

PROMPTS = [list(range(3, 303)), list(range(500, 540))]


def greedy(**engine_kwargs) -> list[list[int]]:
    from vllm import SamplingParams

    with vllm_engine(build_tiny_model(), kv_cache_dtype="kitty2", dtype="float32", max_model_len=1024,
                     **engine_kwargs) as llm:
        outputs = llm.generate(prompt_inputs(PROMPTS), SamplingParams(temperature=0, max_tokens=24,
                                                                      ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.cuda
def test_default_gpu_settings_match_eager():
    assert greedy(enforce_eager=False) == greedy(enforce_eager=True)
