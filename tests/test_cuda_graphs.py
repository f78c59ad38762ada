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


KITTY_KERNELS = ("_attention_kernel", "_merge_splits_kernel", "_store_decode_kernel", "_quantize_page_kernel",
                 "_dequantize_page_kernel", "page_decode_kernel")


@pytest.mark.cuda
def test_no_kitty_kernel_compiles_after_start_up():
    """vLLM's JIT monitor, active once start-up ends, sees no kitty kernel compile while prompts of several
    lengths prefill in chunks beside decodes: kitty_vllm.warmup compiled them all at start-up."""
    from unittest import mock

    from vllm import SamplingParams
    from vllm.utils import jit_monitor

    prompts = [list(range(3, 3 + n)) for n in (40, 300, 700, 129, 1000)]
    # Events from the requests only: the monitor stays active once an engine of the process has started, so
    # it also reports what a later engine compiles while it starts.
    with vllm_engine(build_tiny_model(), kv_cache_dtype="kitty2", dtype="bfloat16", max_model_len=2048,
                     enforce_eager=False, max_num_batched_tokens=256) as llm, \
            mock.patch.object(jit_monitor, "_handle_jit_event", wraps=jit_monitor._handle_jit_event) as events:
        assert jit_monitor.is_active()
        llm.generate(prompt_inputs(prompts), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                     use_tqdm=False)
    compiled = [call.kwargs.get("fn_name", "") for call in events.call_args_list]
    assert not [name for name in compiled if any(kernel in name for kernel in KITTY_KERNELS)], compiled
