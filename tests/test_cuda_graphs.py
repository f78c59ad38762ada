"""kitty2 under vLLM's default GPU settings (torch.compile, full CUDA graphs for decode-only batches and
piecewise graphs around attention for mixed ones): the engine starts and generates what the eager
engine generates."""

import pytest
from engine import prompt_inputs, vllm_engine
from tiny_model import build_eagle_head, build_tiny_model

PROMPTS = [list(range(3, 303)), list(range(500, 540))]


def greedy(model=None, **engine_kwargs):
    """(token ids of each prompt, the CUDA-graph mode vLLM settled on)."""
    from vllm import SamplingParams

    with vllm_engine(model or build_tiny_model(), kv_cache_dtype="kitty2", dtype="float32", max_model_len=1024,
                     **engine_kwargs) as llm:
        outputs = llm.generate(prompt_inputs(PROMPTS), SamplingParams(temperature=0, max_tokens=24,
                                                                      ignore_eos=True), use_tqdm=False)
        mode = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode
    return [list(o.outputs[0].token_ids) for o in outputs], mode


@pytest.mark.cuda
def test_default_gpu_settings_match_eager():
    from vllm.config import CUDAGraphMode

    graphed, mode = greedy(enforce_eager=False)
    assert mode.decode_mode() == CUDAGraphMode.FULL, mode
    assert graphed == greedy(enforce_eager=True)[0]


@pytest.mark.cuda
def test_verification_steps_in_full_graphs(tmp_path):
    """With an EAGLE head drafting 3 tokens, vLLM captures uniform batches of verification steps (4 query
    tokens per request) in full graphs (KittyMetadataBuilder.get_cudagraph_support), and the graphed engine
    generates what the eager one generates, with speculation and without."""
    from vllm.config import CUDAGraphMode

    model = build_tiny_model()
    speculative = {"method": "eagle", "model": str(build_eagle_head(model, tmp_path / "eagle")),
                   "num_speculative_tokens": 3}
    graphed, mode = greedy(model, enforce_eager=False, speculative_config=speculative)
    assert mode.decode_mode() == CUDAGraphMode.FULL, mode
    assert graphed == greedy(model, enforce_eager=True, speculative_config=speculative)[0]
    assert graphed == greedy(model, enforce_eager=True)[0]
