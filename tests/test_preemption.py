"""Preemption with kitty2: when the KV cache runs out, vLLM preempts requests, frees both their packed
pages and their full-precision staging blocks, recomputes them later (prefix-cache hits bring pages and
sinks back), and the greedy output still equals the oracle's. With ``exact_prefill``: a recomputed
request prefills its decoded tokens again, which must read the cache as their decode steps did."""

from engine import prompt_inputs, vllm_engine
from kitty_vllm.tools.oracle import kitty_greedy
from tiny_model import build_tiny_model

from kitty_vllm.config import KittyConfig

PROMPT_TOKENS, NEW_TOKENS, REQUESTS = 500, 100, 4
# 43 blocks in the pool the two groups share: two requests fit at their prompt length (4 pages and 17
# float32 staging blocks each), but not once both grow past 512 tokens, so one must be preempted.
BLOCKS = 43


def test_preempted_requests_match_the_oracle():
    model = build_tiny_model()
    config = KittyConfig.from_preset("kitty2").replace(exact_prefill=True)
    prompts = [[(11 * r + 3 * i) % 1000 + 3 for i in range(PROMPT_TOKENS)] for r in range(REQUESTS)]
    from vllm import SamplingParams

    with vllm_engine(model, exact_prefill=True, kv_cache_dtype="kitty2", dtype="float32", max_model_len=1024,
                     num_gpu_blocks_override=BLOCKS, disable_log_stats=False) as llm:
        outputs = llm.generate(prompt_inputs(prompts), SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                                      ignore_eos=True), use_tqdm=False)
        preemptions = {m.name: m for m in llm.get_metrics()}["vllm:num_preemptions"].value
    print(f"\n{REQUESTS} requests, {preemptions} preemptions")
    assert preemptions > 0
    assert [list(o.outputs[0].token_ids) for o in outputs] == kitty_greedy(model, prompts, NEW_TOKENS, config)
