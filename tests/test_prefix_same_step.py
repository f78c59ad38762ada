"""A prefix-cache hit on pages that another request packs in the same engine step.

vLLM publishes a block for prefix-cache hits when it schedules it, so request B, scheduled in the
step where request A's prefill completes the shared prefix, hits pages that A packs in that very
step. The backend must store every request before any attends; otherwise B reads a block whose
page is not written yet (found by the H100 soak: a prefix request's first token flipped).

The schedule of F (8 tokens, 1 out), A and B (the same 512-token prefix, then 40 different tokens),
with a 384-token budget: step 1 prefills F and A[:376]; step 2 A[376:], which packs A's third and
fourth pages, and B in F's freed batch slot, so before A. B's hit stops one page short of the
four cached pages (kitty_vllm.block_manager): 384 tokens, so it includes the third page, packed in
that step; B computes its other 168 tokens in the same step. B's first token is compared with B's
repeat, which hits the same 384 tokens once every page is written and computes the same 168 tokens
in one step: the two read the same cache.
"""

from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from engine import torch_threads, vllm_engine
from kitty_vllm.tools.assets import smollm2_path, token_windows
from kitty_vllm.metrics import kv_stats

PREFIX, PAGE = 512, 128
# B's first step computes its 168 tokens beside A's last 176 in one run and alone in the other:
# float32 noise from the different batches, which 2-bit rounding may amplify, is all that may move
# its first-token logprobs. Reading the unwritten page flipped the top token (1.2 nats).
LOGPROB_TOLERANCE = 0.1


def first_token(output) -> dict[int, float]:
    return {token: lp.logprob for token, lp in output.outputs[0].logprobs[0].items()}


def run_steps(engine, prompts: dict[str, list[int]]) -> tuple[dict, list[int]]:
    """Add the requests in order (one token out each, with logprobs) and step the engine until all
    finish: their outputs by name, and the pages packed after each step."""
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    for name, prompt in prompts.items():
        engine.add_request(name, TokensPrompt(prompt_token_ids=prompt), params)
    stats = kv_stats(engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool)
    outputs, packed = {}, []
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
        packed.append(stats.pages_packed)
    return outputs, packed


def test_a_hit_on_pages_packed_in_the_same_step_reads_them_packed():
    model = smollm2_path()
    windows = token_windows(AutoTokenizer.from_pretrained(str(model)), 4, 600)
    prefix = windows[0][:PREFIX]
    a, b, f = prefix + windows[1][:40], prefix + windows[2][:40], windows[3][:8]
    with torch_threads(1), vllm_engine(model, dtype="float32", kv_cache_dtype="kitty2", max_model_len=1024,
                                       max_num_batched_tokens=384, enable_prefix_caching=True) as llm:
        outputs, packed = run_steps(llm.llm_engine, {"F": f, "A": a, "B": b})
        repeat = run_steps(llm.llm_engine, {"B again": b})[0]["B again"]
    assert len(packed) == 2 and packed[0] == 2           # step 1 packed A's first two pages only
    assert outputs["B"].num_cached_tokens == repeat.num_cached_tokens == PREFIX - PAGE
    hit, repeat = first_token(outputs["B"]), first_token(repeat)
    assert hit.keys() == repeat.keys()                   # the same top tokens
    assert max(abs(hit[t] - repeat[t]) for t in repeat) < LOGPROB_TOLERANCE
