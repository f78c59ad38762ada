"""Determinism of greedy kitty2 output, and kitty's own counters (kitty_vllm.metrics).

Ten prompts (shorter than, at and past page boundaries, two sharing a two-page prefix) run twice in an
engine with prefix caching off and twice in one with it on, in float32 on the tiny model. kitty2 runs
as users get it, one request at a time in page-sized steps: then a prefix-cache hit, which stops one
page short of the cached pages (kitty_vllm.block_manager), is followed by the steps a miss takes there,
which read the same cache:

* the same requests give the same tokens and the same logprobs, bit for bit, run after run;
* prefix caching changes nothing: with it on, the first run shares the common prefix between the two
  requests and the second run reads every prompt's packed pages and sinks from the cache, and both
  give the tokens and logprobs of the engine without caching;
* kitty's page counter counts exactly the pages packed: every full page of the stored tokens without
  caching, only the pages past the prefix-cache hits with it; and no staging block is held afterwards.
"""

from dataclasses import dataclass

import pytest

from engine import prompt_inputs, vllm_engine
from tiny_model import build_tiny_model

from kitty_vllm.metrics import kv_stats

PAGE = 128
PROMPT_LENGTHS = (1, 31, 100, 127, 128, 129, 300, 520)
SHARED_PREFIX, SHARED_SUFFIX = 2 * PAGE, 44
NEW_TOKENS = 40
ENGINE_ARGS = dict(kv_cache_dtype="kitty2", dtype="float32", max_model_len=1024, max_num_seqs=1,
                   max_num_batched_tokens=PAGE)


def tokens(seed: int, length: int) -> list[int]:
    return [(7 * seed + 13 * i + i * i) % 1000 + 3 for i in range(length)]


PROMPTS = ([tokens(seed, length) for seed, length in enumerate(PROMPT_LENGTHS)]
           + [tokens(99, SHARED_PREFIX) + tokens(100 + k, SHARED_SUFFIX) for k in range(2)])


@dataclass
class Run:
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    pages_packed: int
    staging_blocks_held: int


def generate(llm) -> Run:
    from vllm import SamplingParams

    stats = kv_stats(llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool)
    before = stats.pages_packed
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = [o.outputs[0] for o in llm.generate(prompt_inputs(PROMPTS), params, use_tqdm=False)]
    return Run([list(o.token_ids) for o in outputs],
               [[lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)] for o in outputs],
               stats.pages_packed - before, stats.staging_blocks_held)


@pytest.fixture(scope="module")
def runs() -> dict[tuple[bool, int], Run]:
    """(prefix caching, run number) -> what the batch gave."""
    model = build_tiny_model()
    results = {}
    for caching in (False, True):
        with vllm_engine(model, enable_prefix_caching=caching, **ENGINE_ARGS) as llm:
            for number in (1, 2):
                results[caching, number] = generate(llm)
    return results


def stored_pages(prompt: list[int]) -> int:
    """Full pages of the tokens a request stores: its prompt and every output token but the last."""
    return (len(prompt) + NEW_TOKENS - 1) // PAGE


def test_same_batch_gives_the_same_output(runs):
    first, second = runs[False, 1], runs[False, 2]
    assert second.token_ids == first.token_ids
    assert second.logprobs == first.logprobs


def test_prefix_caching_does_not_change_the_output(runs):
    for number in (1, 2):
        assert runs[True, number].token_ids == runs[False, 1].token_ids
        assert runs[True, number].logprobs == runs[False, 1].logprobs


def test_page_counter_counts_the_pages_packed(runs):
    for number in (1, 2):
        assert runs[False, number].pages_packed == sum(map(stored_pages, PROMPTS))
    # A hit stops one page short of the cached full pages, which exclude the page holding the prompt's
    # last token (vLLM always computes that token). The first run hits the shared prefix's first page.
    cached_pages = [max((len(p) - 1) // PAGE - 1, 0) for p in PROMPTS]
    assert runs[True, 1].pages_packed == sum(map(stored_pages, PROMPTS)) - 1
    assert runs[True, 2].pages_packed == sum(map(stored_pages, PROMPTS)) - sum(cached_pages)
    assert all(run.staging_blocks_held == 0 for run in runs.values())
