"""The backend's GPU paths, on the CPU: a vLLM engine whose kitty layers run the Triton kernels (in Triton's
interpreter) instead of the reference, as they do on a GPU. Decode-only batches go through
PagedKittyCache.decode whole, mixed batches are split into the requests read as decodes (one token, or a
verification step of speculative decoding) and spans, and the spans' lengths come from vLLM's host copy. The
greedy tokens must equal the reference path's, token for token."""

import pytest
from engine import prompt_inputs, torch_threads, vllm_engine
from tiny_model import build_eagle_head, build_tiny_model

from kitty_vllm.paged import PagedKittyCache

# A prompt that decodes across its first page boundary (with EAGLE drafting 3 tokens: verification steps),
# and one that prefills in chunks beside them (128 tokens a step: the steps after the first are mixed).
PROMPTS = [list(range(5, 125)), [3 + (7 * i) % 500 for i in range(250)]]
NEW_TOKENS = 16


def greedy(model, draft, kernels: bool) -> tuple[list[list[int]], list[tuple[str, int]]]:
    """The greedy tokens, and with the kernels the decode-path calls of the first layer's steps: ("decode",
    most tokens of a request) for a decode-only batch, ("mixed", most tokens of a request read as decodes) for
    a mixed one."""
    from vllm import SamplingParams

    speculative = {"method": "eagle", "model": str(draft), "num_speculative_tokens": 3}
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        if kernels:
            of_layer, decode, mixed_step = (PagedKittyCache.of_layer.__func__, PagedKittyCache.decode,
                                            PagedKittyCache.mixed_step)
            mp.setattr(PagedKittyCache, "of_layer",
                       classmethod(lambda cls, *args, **kwargs: of_layer(cls, *args, **{**kwargs, "kernels": True})))

            def record_decode(self, *args):
                calls.append(("decode", args[5]))
                return decode(self, *args)

            def record_mixed(self, query, key, value, batch, *args):
                calls.append(("mixed", batch.decode_max_query_len))
                mp.setattr(PagedKittyCache, "decode", decode)        # its decode rows are not a decode-only batch
                try:
                    return mixed_step(self, query, key, value, batch, *args)
                finally:
                    mp.setattr(PagedKittyCache, "decode", record_decode)

            mp.setattr(PagedKittyCache, "decode", record_decode)
            mp.setattr(PagedKittyCache, "mixed_step", record_mixed)
        with torch_threads(1), vllm_engine(model, kv_cache_dtype="kitty2", dtype="float32", max_model_len=512,
                                           max_num_batched_tokens=128, speculative_config=speculative) as llm:
            outputs = llm.generate(prompt_inputs(PROMPTS), SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                                                          ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], calls


def test_kernel_paths_equal_the_reference_path(tmp_path):
    model = build_tiny_model()
    draft = build_eagle_head(model, tmp_path / "eagle")
    tokens, calls = greedy(model, draft, kernels=True)
    assert ("mixed", 4) in calls and ("decode", 4) in calls     # verification steps, beside spans and alone
    assert tokens == greedy(model, draft, kernels=False)[0]
