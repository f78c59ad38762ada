"""A prefix-cache hit on pages that another request packs in the same engine step.

vLLM publishes a block for prefix-cache hits when it schedules it, so request B, scheduled in the
step where request A's prefill completes the shared prefix, hits pages that A packs in that very
step. The backend must store every request before any attends; otherwise B reads a block whose
page is not written yet (found by the H100 soak: a prefix request's first token flipped).

The schedule of F (8 tokens, 2 out), A and B (the same 512-token prefix, then 40 different tokens),
with a 256-token budget: step 1 prefills F and A[:248], step 2 F's last token and A[248:503], step 3
B (a 512-token hit, in F's freed batch slot, so before A) and A[503:], which completes A's fourth page.
B's first token is compared with B run without a hit (another cache_salt) beside its own F, so that
its prefix is computed in the same steps as A's. It still prefills B[503:] in a step that a hit
does not, so the engine runs kitty2 with ``exact_prefill``, where the steps do not change what a
query reads.
"""

from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from engine import torch_threads, vllm_engine
from kitty_vllm.assets import smollm2_path, token_windows

PREFIX = 512          # four 128-token pages
# Both runs compute the prefix's Keys and Values in the same batches, but its last 9 tokens beside
# different ones (A's or B's suffix): float32 noise there, which 2-bit rounding may amplify, is all
# that may move B's first-token logprobs (on an AVX-512 CPU they are equal, bit for bit). Reading the
# unwritten page flipped the top token (1.2 nats).
LOGPROB_TOLERANCE = 0.1


def first_token(output) -> dict[int, float]:
    return {token: lp.logprob for token, lp in output.outputs[0].logprobs[0].items()}


def run_steps(engine, prompts: dict[str, list[int]], salt: str) -> dict:
    """Add the requests in order (F: 2 tokens out, the others 1 with logprobs) and step the engine
    until all finish; their outputs by name."""
    for name, prompt in prompts.items():
        params = (SamplingParams(max_tokens=2, temperature=0, ignore_eos=True) if name == "F"
                  else SamplingParams(max_tokens=1, temperature=0, logprobs=5))
        engine.add_request(name + salt, TokensPrompt(prompt_token_ids=prompt, cache_salt=salt), params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id.removesuffix(salt), o) for o in engine.step() if o.finished)
    return outputs


def test_a_hit_on_pages_packed_in_the_same_step_reads_them_packed():
    model = smollm2_path()
    windows = token_windows(AutoTokenizer.from_pretrained(str(model)), 4, 600)
    prefix = windows[0][:PREFIX]
    a, b, f = prefix + windows[1][:40], prefix + windows[2][:40], windows[3][:8]
    with torch_threads(1), vllm_engine(model, exact_prefill=True, dtype="float32", kv_cache_dtype="kitty2",
                                       max_model_len=1024, max_num_batched_tokens=256,
                                       enable_prefix_caching=True) as llm:
        alone = run_steps(llm.llm_engine, {"F": f, "B": b}, "alone")["B"]
        outputs = run_steps(llm.llm_engine, {"F": f, "A": a, "B": b}, "step")
    assert alone.num_cached_tokens == 0
    assert outputs["B"].num_cached_tokens == PREFIX      # B did hit the pages A packed in its step
    hit, alone = first_token(outputs["B"]), first_token(alone)
    assert hit.keys() == alone.keys()                    # the same top tokens
    assert max(abs(hit[t] - alone[t]) for t in alone) < LOGPROB_TOLERANCE
