"""A prefix-cache hit on pages that another request packs in the same engine step.

vLLM publishes a block for prefix-cache hits when it schedules it, so request B, scheduled in the
step where request A's prefill completes the shared prefix, hits pages that A packs in that very
step. The backend must store every request before any attends; otherwise B reads a block whose
page is not written yet (found by the H100 soak: a prefix request's first token flipped).

The schedule of F (8 tokens, 2 out), A and B (the same 512-token prefix, then 40 different tokens),
with a 256-token budget: step 1 prefills F and A[:248], step 2 F's last token and A[248:503], step 3
B (a 512-token hit, in F's freed batch slot, so before A) and A[503:], which completes A's fourth page.
"""

from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from engine import torch_threads, vllm_engine
from kitty_vllm.assets import smollm2_path, token_windows

PREFIX = 512          # four 128-token pages
# B's first-token logprobs may move by the float32 noise of a different chunking, which 2-bit
# rounding amplifies to a few 1e-2 nats; reading the unwritten page flipped the top token (1.2 nats).
LOGPROB_TOLERANCE = 0.1


def first_token(output) -> dict[int, float]:
    return {token: lp.logprob for token, lp in output.outputs[0].logprobs[0].items()}


def test_a_hit_on_pages_packed_in_the_same_step_reads_them_packed():
    model = smollm2_path()
    windows = token_windows(AutoTokenizer.from_pretrained(str(model)), 4, 600)
    prefix = windows[0][:PREFIX]
    a, b, f = prefix + windows[1][:40], prefix + windows[2][:40], windows[3][:8]
    greedy = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    with torch_threads(1), vllm_engine(model, dtype="float32", kv_cache_dtype="kitty2", max_model_len=1024,
                                       max_num_batched_tokens=256, enable_prefix_caching=True) as llm:
        alone = first_token(llm.generate([TokensPrompt(prompt_token_ids=b, cache_salt="alone")], greedy,
                                         use_tqdm=False)[0])
        engine = llm.llm_engine
        engine.add_request("F", TokensPrompt(prompt_token_ids=f, cache_salt="step"),
                           SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        engine.add_request("A", TokensPrompt(prompt_token_ids=a, cache_salt="step"), greedy)
        engine.add_request("B", TokensPrompt(prompt_token_ids=b, cache_salt="step"), greedy)
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    hit = first_token(outputs["B"])
    assert outputs["B"].num_cached_tokens == PREFIX      # B did hit the pages A packed in its step
    assert hit.keys() == alone.keys()                    # the same top tokens
    assert max(abs(hit[t] - alone[t]) for t in alone) < LOGPROB_TOLERANCE
