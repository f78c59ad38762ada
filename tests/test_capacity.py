"""vLLM's own "Maximum concurrency" line is honest for kitty2: at head size 128 and 4,096 tokens per
request it is >= 4.5x that of bf16 in the same memory, and that many requests of that length run at
once with no preemption."""

import math

import pytest
from engine import vllm_engine
from tiny_model import build_tiny_model

MAX_MODEL_LEN = 4096
OUTPUT_TOKENS = 24
# KV-cache memory for 2.5 bf16 requests of MAX_MODEL_LEN: 2 layers x 2 KV heads x 128 x 2 (K, V) x 2 B.
BF16_REQUEST_BYTES = MAX_MODEL_LEN * 2 * 2 * 128 * 2 * 2
KV_CACHE_BYTES = int(2.5 * BF16_REQUEST_BYTES)


@pytest.fixture(scope="module")
def model_dir():
    return build_tiny_model(head_dim=128)


def max_concurrency(llm) -> float:
    """The figure vLLM logs as "Maximum concurrency for N tokens per request", from the same function."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    core = llm.llm_engine.engine_core.engine_core
    return get_max_concurrency_for_kv_cache_config(llm.llm_engine.vllm_config, core.scheduler.kv_cache_config)


def engine(model_dir, kv_cache_dtype):
    return vllm_engine(model_dir, kv_cache_dtype=kv_cache_dtype, dtype="bfloat16", max_model_len=MAX_MODEL_LEN,
                       kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_seqs=32, enable_prefix_caching=False,
                       max_num_batched_tokens=8192, disable_log_stats=False)


def test_kitty2_concurrency_is_honest(model_dir):
    with engine(model_dir, "auto") as llm:
        bf16 = max_concurrency(llm)
    with engine(model_dir, "kitty2") as llm:
        kitty = max_concurrency(llm)
        print(f"\nmaximum concurrency at {MAX_MODEL_LEN} tokens: bf16 {bf16:.2f}x, kitty2 {kitty:.2f}x "
              f"({kitty / bf16:.2f}x bf16)")
        assert kitty >= 4.5 * bf16

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        count = math.floor(kitty)
        params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
        for i in range(count):
            prompt = [(7 * i + j) % 1000 + 3 for j in range(MAX_MODEL_LEN - OUTPUT_TOKENS)]
            llm.llm_engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        most_running, finished = 0, []
        while llm.llm_engine.has_unfinished_requests():
            finished += [o for o in llm.llm_engine.step() if o.finished]
            most_running = max(most_running, len(scheduler.running))
        assert sorted(len(o.outputs[0].token_ids) for o in finished) == [OUTPUT_TOKENS] * count
        preemptions = {m.name: m for m in llm.get_metrics()}["vllm:num_preemptions"].value
        print(f"{count} requests of {MAX_MODEL_LEN} tokens: {most_running} running at once, "
              f"{preemptions} preemptions")
        assert most_running == count
        assert preemptions == 0
