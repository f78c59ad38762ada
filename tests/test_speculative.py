"""Speculative decoding with a kitty2 cache (issue 29, the CPU part): drafts that verification rejects
must leave no trace in the cache, so greedy output with speculation equals greedy output without it.

A verification step stores k + 1 tokens of a request (its newest token and k drafts) and packs every
page they fill, before anyone knows which drafts the model accepts; vLLM then rolls the request back
to the first rejected position, and later steps store other tokens there. kitty's full-precision
window lives in a ring per request (position ``p`` in slot ``p % ring_slots``, kitty_vllm.layout.StageLayout).
With only ``page_size`` slots, a draft stored at position ``q`` would overwrite the full-precision copy
of position ``q - page_size``; if ``q`` is rejected, that copy is gone while it is still needed: the
next queries read position ``q - page_size`` in their window, and if the drafts crossed a page
boundary, the page they filled must be packed again from the ring once its real last token comes.
So under speculation of k tokens the ring holds ``page_size + k`` slots (KittyConfig.ring_slots,
set by the engine from ``--speculative-config``), and these tests check that nothing a rejected draft
wrote is ever read.

The tests:

* n-gram speculation as users run it (vLLM's ``ngram`` method, in a child process: see ``ngram``),
  four requests of 110 to 700 prompt tokens and 256 out: drafts are proposed, accepted and rejected,
  and the output equals kitty2's without speculation and the oracle's;
* a scripted proposer (``ScriptedProposer``, vLLM's ``custom_class`` method, in this process) that
  drafts each request's known continuation with a wrong token at chosen positions around every page
  boundary: the rejections happen where planned, the output equals the run without speculation and
  the oracle, kitty:pages_packed counts each page once per request, and no request holds more staging
  blocks than vLLM's capacity count allows;
* an EAGLE head (vLLM's ``eagle`` method; a head built from the tiny model's last layer, see
  ``build_eagle_head``), whose draft layer keeps its KV cache in the model's dtype beside kitty's
  pages: the output equals kitty2's without speculation;
* the cache alone (PagedKittyCache, small pages): after verification steps whose drafts are rejected
  at and across page boundaries, every step attends as the reference schedule does and the packed
  pages equal those of a cache that never saw a draft, through the reference (the CPU path) and
  through the kernels (the GPU path; Triton's interpreter here).

Why the output with speculation must equal the output without it, token for token: a verification
step's k + 1 queries read the cache exactly as k + 1 one-token decodes would (KittyConfig.reads_as_decode,
in both schedules: kitty2 as users get it, and with ``exact_prefill``), and every prompt is prefilled in
one step in every run (PREFILL_BUDGET), as the transformers oracle does (kitty_vllm.tools.oracle, then
one token per step). Every engine test runs in both schedules.

The engines run the tiny float32 Llama (tests/tiny_model.py). vLLM's and transformers' float32 Llama
differ in rounding, and so do steps of one and of several tokens; MIN_GAP (as in test_vllm_e2e.py)
keeps every compared greedy choice clear of that: the prompts were chosen (window, repeated unit) so
that the oracle's smallest top-2 logit gap over all its choices is 1.25x MIN_GAP (default schedule)
and 1.8x (exact_prefill) or more; near-ties are common in the tiny random model, so most choices fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from engine import prompt_inputs, torch_threads, vllm_engine
from kitty_vllm import reference
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import stage_layout
from kitty_vllm.paged import PagedKittyCache
from tiny_model import build_eagle_head, build_tiny_model

PAGE = 128
MAX_MODEL_LEN = 1024
# Tokens per engine step: all prompts prefill in the first step, in every run (a chunk boundary that
# moved with the drafts' share of the budget would change what the default schedule's prompts read).
PREFILL_BUDGET = 2048
NEW_TOKENS = 256
# Prompts: BOS, then the first tokens (a unit) of an essay window of WINDOW tokens, repeated (so that
# n-gram drafts are often proposed) up to the length. (length, window, unit length): prefills of 1 to 6
# pages; with NEW_TOKENS out, each request decodes across 2 or 3 page boundaries. Every (window, unit)
# keeps the oracle's greedy choices clear of near-ties (module docstring).
PROMPTS = [(110, 6, 40), (300, 7, 40), (520, 13, 40), (700, 0, 24)]
WINDOW = 120
# Prompts are told apart by their first tokens (ScriptedProposer).
KEY_TOKENS = 8
MIN_GAP = 2e-3
# n-gram speculation as a user would set it, with short n-grams so that the repeated text gives
# drafts at most steps.
NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
SCRIPTED_K = 5
EAGLE_K = 3
# Where ScriptedProposer drafts a wrong token w, relative to each page's last position L = 128 j + 127
# in a request's output, per prompt. Its verification step stores w - 1 (accepted), then w and the
# K - 1 drafts after it (all rejected):
#   0: w = L, the draft that fills the page: the page is packed with it, and the 4 drafts after it land
#      in the ring slots of the page's first tokens, which packing the page again reads;
#  -2: the page is packed with 3 rejected drafts, and 2 more land past it;
#   1: the page is filled by the step's first (accepted) token and packed right; the 5 rejected drafts
#      land in the ring slots of its first tokens, which the next steps' windows read;
#   3: as 1, two positions later.
WRONG_OFFSETS = [0, -2, 1, 3]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir():
    return build_tiny_model()


@pytest.fixture(scope="module", params=[False, True], ids=["default", "exact_prefill"])
def exact(request):
    """The cache schedule every engine and the oracle of a test run with: kitty2 as users get it, and
    with exact_prefill (module docstring)."""
    return request.param


def kitty2_engine(model_dir, exact: bool, **kwargs):
    """A kitty2 float32 engine that prefills every prompt in one step (as the oracle does)."""
    return vllm_engine(model_dir, exact_prefill=exact, kv_cache_dtype="kitty2", dtype="float32",
                       max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=PREFILL_BUDGET, **kwargs)


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    from kitty_vllm.tools.assets import token_windows

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = token_windows(tokenizer, max(w for _, w, _ in PROMPTS) + 1, WINDOW)
    built = [[tokenizer.bos_token_id] + (windows[w][:unit] * (n // unit + 1))[: n - 1] for n, w, unit in PROMPTS]
    assert len({tuple(p[:KEY_TOKENS]) for p in built}) == len(built)
    return built


@pytest.fixture(scope="module")
def oracle(model_dir, prompts, exact):
    """The transformers oracle's greedy tokens (each prompt in one step, then one token per step), and
    the smallest top-1/top-2 logit gap among its choices."""
    from kitty_vllm.tools.oracle import kitty_greedy

    start = time.perf_counter()
    config = KittyConfig.from_preset("kitty2").replace(exact_prefill=exact)
    tokens, logits = kitty_greedy(model_dir, prompts, NEW_TOKENS, config, return_logits=True)
    gap = min(float((top[:, 0] - top[:, 1]).min()) for top in (torch.topk(l, 2, dim=-1).values for l in logits))
    print(f"\n[oracle] {time.perf_counter() - start:.1f} s, smallest top-2 logit gap {gap:.4f}")
    return tokens, gap


def greedy(max_tokens: int = NEW_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def kv_stats_of(llm):
    from kitty_vllm.metrics import kv_stats

    return kv_stats(llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool)


def expected_pages(prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> int:
    """Pages a request packs once: those its stored tokens fill (the last output token is never stored)."""
    return sum((len(p) + new_tokens - 1) // PAGE for p in prompts)


@pytest.fixture(scope="module")
def plain(model_dir, prompts, exact):
    """kitty2 without speculation, all prompts in one batch: the tokens, and the pages the scheduler
    counted as packed."""
    with kitty2_engine(model_dir, exact) as llm:
        outputs = llm.generate(prompt_inputs(prompts), greedy(), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs], kv_stats_of(llm).pages_packed


# ------------------------------------------------------------------------------------ n-gram drafts

def ngram_engine_run(model_dir: Path, prompts: list[list[int]], exact: bool, out_file: Path) -> None:
    """Generate with vLLM's n-gram proposer and write the tokens and the spec-decoding counters to
    ``out_file`` as JSON. Runs in a child process (see ``ngram``)."""
    with torch_threads(1), kitty2_engine(model_dir, exact, disable_log_stats=False, speculative_config=NGRAM) as llm:
        outputs = llm.generate(prompt_inputs(prompts), greedy(), use_tqdm=False)
        counters = {m.name: m.value for m in llm.get_metrics()
                    if m.name.startswith("vllm:spec_decode_") and hasattr(m, "value")}
    out_file.write_text(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                                    "counters": counters}))


@pytest.fixture(scope="module")
def ngram(model_dir, prompts, exact):
    """The n-gram run, in a child process with an in-process engine. Why a child: vLLM 0.32's n-gram
    proposer imports numba, and once numba (llvmlite) is loaded, every later in-process engine of the
    same process fails to start (vLLM's CPU Triton dispatcher scans every module and trips on
    llvmlite's ``ffi.lib``), which would break every engine test after this file. NUMBA_NUM_THREADS=1:
    the proposer restores numba's thread count after each call, which resets the shared OpenMP
    runtime's, and two threads make the CPU runs several times slower."""
    with tempfile.TemporaryDirectory(prefix="kitty-ngram-") as tmp:
        out_file, prompts_file = Path(tmp) / "out.json", Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, str(model_dir), str(prompts_file), str(int(exact)),
                                str(out_file)],
                               env=env, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=900)
        print(f"\n[ngram] child process: {time.perf_counter() - start:.1f} s")
        assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-5000:]
        result = json.loads(out_file.read_text())
    return result["tokens"], result["counters"]


def test_oracle_choices_are_not_near_ties_and_plain_kitty2_matches(oracle, plain):
    """Every greedy choice compared below wins by at least MIN_GAP in the oracle's logits (a mismatch
    then means a different cache, not rounding deciding a tie), and without speculation vLLM gives
    the oracle's tokens (the baseline the speculative runs must equal)."""
    tokens, gap = oracle
    assert gap >= MIN_GAP
    assert plain[0] == tokens


def test_ngram_drafts_are_proposed_accepted_and_rejected(ngram):
    """The n-gram run exercises verification: drafts were proposed, some accepted, many rejected
    (vLLM's spec-decoding counters)."""
    _, counters = ngram
    drafted = counters["vllm:spec_decode_num_draft_tokens"]
    accepted = counters["vllm:spec_decode_num_accepted_tokens"]
    print(f"\n[ngram] {counters['vllm:spec_decode_num_drafts']} verification steps, {drafted} drafts, "
          f"{accepted} accepted")
    assert counters["vllm:spec_decode_num_drafts"] >= 50
    assert accepted >= 30
    assert drafted - accepted >= 100


def assert_same_tokens(tokens: list[list[int]], expected: list[list[int]]) -> None:
    for i, (got, want) in enumerate(zip(tokens, expected, strict=True)):
        first = next((t for t, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert got == want, f"prompt {i} ({len(want)} tokens out): first difference at output token {first}"


def test_ngram_speculation_equals_no_speculation(ngram, plain, oracle):
    """Greedy decoding with n-gram speculation gives, token for token, what kitty2 gives without it
    and what the oracle gives (module docstring: why this is exact)."""
    tokens, _ = ngram
    assert_same_tokens(tokens, plain[0])
    assert tokens == oracle[0]


# ------------------------------------------------------------------------------------- EAGLE drafts

@pytest.fixture(scope="module")
def eagle(model_dir, prompts, exact, tmp_path_factory):
    """kitty2 with an EAGLE head drafting EAGLE_K tokens: the tokens, vLLM's spec-decoding counters, and
    the kv_cache_dtype the engine gave the draft layers."""
    head = build_eagle_head(model_dir, tmp_path_factory.mktemp("eagle"))
    speculative = {"method": "eagle", "model": str(head), "num_speculative_tokens": EAGLE_K}
    with kitty2_engine(model_dir, exact, disable_log_stats=False, speculative_config=speculative) as llm:
        outputs = llm.generate(prompt_inputs(prompts), greedy(), use_tqdm=False)
        counters = {m.name: m.value for m in llm.get_metrics()
                    if m.name.startswith("vllm:spec_decode_") and hasattr(m, "value")}
        draft_dtype = llm.llm_engine.vllm_config.speculative_config.kv_cache_dtype
    return [list(o.outputs[0].token_ids) for o in outputs], counters, draft_dtype


def test_eagle_speculation_equals_no_speculation(eagle, plain):
    """An EAGLE head (draft layers with a KV cache of their own, kept in the model's dtype beside
    kitty's pages) drafts; verification rejects nearly all of its drafts (the head is no real EAGLE head),
    and the output equals kitty2's without speculation, token for token."""
    tokens, counters, draft_dtype = eagle
    drafted, accepted = counters["vllm:spec_decode_num_draft_tokens"], counters["vllm:spec_decode_num_accepted_tokens"]
    print(f"\n[eagle] {counters['vllm:spec_decode_num_drafts']} verification steps, {drafted} drafts, "
          f"{accepted} accepted")
    assert draft_dtype == "auto"
    assert drafted - accepted >= 100
    assert_same_tokens(tokens, plain[0])


# ---------------------------------------------------------------------------------- scripted drafts

@dataclass(frozen=True)
class Verification:
    """One verification step ScriptedProposer set up: the length of its request's sequence (prompt and
    output), its first position (the request's newest token), its last drafted position, and the
    wrong draft (None: all right)."""

    length: int
    first: int
    last: int
    wrong: int | None


class ScriptedProposer:
    """A vLLM proposer (``speculative_config`` method ``custom_class``, loaded by this module's name)
    that drafts a request's known greedy continuation, with a wrong token at chosen positions.

    ``script`` maps a prompt's first KEY_TOKENS tokens to its full greedy sequence (prompt and output,
    from the run without speculation) and the positions to draft wrong. Every wrong position ``w`` is
    the first draft of a verification step: drafts before it stop at ``w - 2``, so that the model's
    own token lands at ``w - 1`` and the next step is ``w - 1`` (the request's newest token), then
    ``w`` (wrong) and the K - 1 right tokens after it, all rejected. Drafts never go past the
    sequence's last stored position. A request whose tokens leave the script (a cache difference) is
    recorded in ``diverged`` and gets no more drafts.
    """

    script: ClassVar[dict[tuple[int, ...], tuple[list[int], frozenset[int]]]] = {}
    verifications: ClassVar[list[Verification]] = []
    diverged: ClassVar[list[tuple[int, int]]] = []

    def __init__(self, vllm_config) -> None:
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.vocab = vllm_config.model_config.get_vocab_size()

    def load_model(self, *args, **kwargs) -> None:
        pass

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        drafts = []
        for i, sampled in enumerate(sampled_token_ids):
            drafts.append([])
            if not len(sampled):                  # a prefill chunk that ends inside the prompt
                continue
            n = int(num_tokens_no_spec[i])       # the request's tokens; the newest is at position n - 1
            sequence, wrong = self.script[tuple(int(t) for t in token_ids_cpu[i, :KEY_TOKENS])]
            if [int(t) for t in token_ids_cpu[i, :n]] != sequence[:n]:
                if not any(length == len(sequence) for length, _ in self.diverged):
                    self.diverged.append((len(sequence), n - 1))   # (sequence length, newest position)
                continue
            stop = min(n + self.k, len(sequence) - 1)
            w = min((p for p in wrong if p >= n), default=None)
            if w is not None and w > n:
                stop = min(stop, w - 1)
            positions = range(n, stop)
            drafts[-1] = [(sequence[p] + 1) % self.vocab if p == w else sequence[p] for p in positions]
            if positions:
                self.verifications.append(Verification(len(sequence), n - 1, positions[-1], w if w == n else None))
        return drafts


def last_of_page(position: int) -> int:
    return position // PAGE * PAGE + PAGE - 1


@pytest.fixture(scope="module")
def scripted(model_dir, prompts, plain, exact):
    """kitty2 with ScriptedProposer drafting SCRIPTED_K tokens, stepped by hand: the
    tokens; the pages counted as packed; and, after every step, the most staging blocks one request
    held, and the most that vLLM's capacity count allows one request."""
    ScriptedProposer.script.clear()
    ScriptedProposer.verifications.clear()
    ScriptedProposer.diverged.clear()
    for prompt, output, offset in zip(prompts, plain[0], WRONG_OFFSETS, strict=True):
        sequence = prompt + output
        # Drafts cover positions len(prompt) + 1 .. len(sequence) - 2 (the last one is never stored).
        ends = (j * PAGE + PAGE - 1 + offset for j in range(len(sequence) // PAGE + 1))
        ScriptedProposer.script[tuple(prompt[:KEY_TOKENS])] = sequence, frozenset(
            w for w in ends if len(prompt) < w < len(sequence) - 1)
    from vllm.inputs import TokensPrompt

    from kitty_vllm.block_manager.manager import KittyStageManager

    speculative = {"method": "custom_class", "model": f"{__name__}.ScriptedProposer",
                   "num_speculative_tokens": SCRIPTED_K}
    with kitty2_engine(model_dir, exact, speculative_config=speculative) as llm:
        engine = llm.llm_engine
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), greedy())
        scheduler = engine.engine_core.engine_core.scheduler
        [stage] = [m for m in scheduler.kv_cache_manager.coordinator.single_type_managers
                   if isinstance(m, KittyStageManager)]
        spec = stage.kv_cache_spec
        capacity = spec.max_memory_usage_bytes(engine.vllm_config) // spec.page_size_bytes
        outputs, most_held = {}, 0
        while engine.has_unfinished_requests():
            outputs.update((o.request_id, o) for o in engine.step() if o.finished)
            most_held = max([most_held, *(len(b) for b in stage.req_to_blocks.values())])
        tokens = [list(outputs[str(i)].outputs[0].token_ids) for i in range(len(prompts))]
        return tokens, kv_stats_of(llm).pages_packed, most_held, capacity, kv_stats_of(llm).staging_blocks_held


def test_scripted_drafts_are_rejected_at_page_boundaries(scripted):
    """Each request's first scripted rejection happens as WRONG_OFFSETS describes: one step stores the
    token before the wrong draft, the wrong draft and the SCRIPTED_K - 1 drafts after it, all rejected.
    (No draft is rejected before it, so nothing can have changed the request's tokens yet.)"""
    verifications = ScriptedProposer.verifications
    for (sequence, wrong), offset in zip(ScriptedProposer.script.values(), WRONG_OFFSETS, strict=True):
        w = min(wrong)
        assert (w - offset) % PAGE == PAGE - 1
        first = next(v for v in verifications if v.length == len(sequence) and v.wrong is not None)
        assert first == Verification(len(sequence), w - 1, w + SCRIPTED_K - 1, w)
    print(f"\n[scripted] {len(verifications)} verification steps, "
          f"{sum(v.wrong is not None for v in verifications)} with a wrong draft")


def test_scripted_rejections_at_page_boundaries_equal_no_speculation(scripted, plain, oracle):
    """With drafts rejected at and around every page boundary, the greedy output still equals the
    run without speculation and the oracle, and no request left its script (a cache difference
    changes a greedy token soon after it)."""
    tokens = scripted[0]
    assert ScriptedProposer.diverged == []
    assert tokens == plain[0]
    assert tokens == oracle[0]
    rejected = sorted((v.length, v.wrong) for v in ScriptedProposer.verifications if v.wrong is not None)
    assert rejected == sorted((len(s), w) for s, wrong in ScriptedProposer.script.values() for w in wrong)


def test_each_page_is_counted_packed_once_per_request(scripted, plain, prompts):
    """kitty:pages_packed counts each page of a request once, however often verification packs it.

    The scheduler counts a page in the step that first schedules its last position, drafts included
    (KittyPackedManager); a page packed with a rejected draft is packed again by the worker when its
    real last token comes, but it is the same page of the same request, and counting it again would
    make the counter depend on how many drafts were rejected. So the count with speculation equals the
    count without it: the pages that each request's stored tokens fill (ScriptedProposer never drafts
    past a request's last stored position)."""
    assert plain[1] == expected_pages(prompts)
    assert scripted[1] == expected_pages(prompts)


def test_staging_blocks_stay_within_the_capacity_count(scripted):
    """Speculation takes no staging block that vLLM's capacity count (its "Maximum concurrency" line,
    from KittyStageSpec.max_memory_usage_bytes) leaves out: the scheduler asks for slots for the
    drafts too (``num_tokens`` includes them), and after every step each request holds at most what
    the count allows for one request. Every block is released at the end."""
    _, _, most_held, capacity, held_at_end = scripted
    assert 0 < most_held <= capacity
    assert held_at_end == 0


# ---------------------------------------------------------------------------------- the cache alone

# Small pages keep the cache-level test fast; the schedule is the same at any size.
SMALL = KittyConfig(page_size=16, value_window=16, sink_tokens=4)
HEADS, KV_HEADS, DIM = 4, 2, 64
K = 4
# Steps of one request: (tokens, accepted). The first token of a step is the request's newest (always
# accepted); the others are up to K drafts, those past ``accepted`` wrong. Positions (page 16): 0-13
# prefill; 14-18 with 15-18 rejected: page 0 is packed with its last token rejected, and 16-18 land in
# the ring slots of 0-2, which packing page 0 again reads; 15-19 accepted (page 0 packed again); 20-24
# with 22-24 rejected, then one-token decodes at 22-24, whose windows reach back to 7-8 (ring slots of
# 23-24); 25-29; 30-32 with 32 (page 2's first) rejected after 31 filled page 1; 32; 33-37 with 36-37
# rejected; decodes 36-39; 40-44; 45-48 with 46-48 rejected (page 2 packed with two of them); decodes
# to 49.
STEPS = [(14, 14), (5, 1), (5, 5), (5, 2), (1, 1), (1, 1), (1, 1), (5, 5), (3, 2), (1, 1), (5, 3),
         (1, 1), (1, 1), (1, 1), (1, 1), (5, 5), (4, 1), (1, 1), (1, 1), (1, 1), (1, 1)]


def small_cache(config: KittyConfig, kernels: bool,
                device: str) -> tuple[PagedKittyCache, torch.Tensor, torch.Tensor]:
    """A cache for one request and its block rows (page row, staging row), float32."""
    layout = stage_layout(config, DIM, KV_HEADS, 4)
    blocks = 16 + layout.blocks_per_request
    packed = torch.zeros(blocks, KV_HEADS, layout.page.page_bytes, dtype=torch.uint8, device=device)
    stage = torch.zeros(blocks, layout.block_bytes, dtype=torch.uint8, device=device)
    cache = PagedKittyCache.from_raw(config, layout, packed, stage, torch.float32, kernels)
    ids = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).to(device)
    return cache, ids[:16], ids[16:]


def run_step(cache: PagedKittyCache, q, k, v, context: int, page_row, stage_row) -> torch.Tensor:
    """One step as the backend runs it: with the kernels (as on a GPU), a step of at most 1 + K tokens (a
    decode or a verification step) through the decode path (PagedKittyCache.decode), else through
    PagedKittyCache's step."""
    if cache.kernels and q.shape[0] <= 1 + K:
        out = torch.empty_like(q)
        query_start = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        seq_lens = torch.tensor([context + q.shape[0]], dtype=torch.int32, device=q.device)
        cache.decode(q, k, v, query_start, seq_lens, q.shape[0], page_row[None].int(), stage_row[None].int(),
                     DIM ** -0.5, out)
        return out
    return cache.step(q, k, v, context, page_row, stage_row, DIM ** -0.5)


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact_prefill"])
def test_rejected_drafts_leave_no_trace_in_the_cache(exact, kernels, kernel_device):
    """Verification steps with rejected drafts at and across page boundaries, then more steps: every
    step attends exactly as the reference schedule does over the accepted tokens and the step's own
    (drafts included), and the packed pages end up byte for byte those of a cache that never saw a
    draft. Both schedules; the CPU path (the reference) and the kernels the GPU runs (Triton's
    interpreter here)."""
    config = SMALL.replace(exact_prefill=exact, draft_tokens=K)   # as the engine sets it for K drafts
    device = kernel_device if kernels else "cpu"
    total = sum(accepted for _, accepted in STEPS)
    g = torch.Generator().manual_seed(1)
    q, key, value = (torch.randn(total + K, h, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    wrong_key, wrong_value = (torch.randn(total + K, KV_HEADS, DIM, generator=g) for _ in range(2))
    cache, page_row, stage_row = small_cache(config, kernels, device)
    context = 0
    for step, (tokens, accepted) in enumerate(STEPS):
        span = slice(context, context + tokens)
        k, v = key[span].clone(), value[span].clone()
        k[accepted:], v[accepted:] = wrong_key[span][accepted:], wrong_value[span][accepted:]
        want = reference.reference_attention(q[span], torch.cat([key[:context], k]), torch.cat([value[:context], v]),
                                             config, query_positions=torch.arange(context, context + tokens))
        got = run_step(cache, *(x.to(device) for x in (q[span], k, v)), context, page_row, stage_row)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"step {step} (positions {span.start}-{span.stop - 1}): {m}")
        context += accepted
    clean, clean_pages, clean_stage = small_cache(config, False, "cpu")
    clean.step(q[:context], key[:context], value[:context], 0, clean_pages, clean_stage, DIM ** -0.5)
    full_pages = context // config.page_size
    assert torch.equal(cache.packed[page_row[:full_pages]].cpu(), clean.packed[clean_pages[:full_pages]])


def _ngram_child(argv: list[str]) -> None:
    model_dir, prompts_file, exact, out_file = argv
    ngram_engine_run(Path(model_dir), json.loads(Path(prompts_file).read_text()), exact == "1", Path(out_file))


if __name__ == "__main__":
    _ngram_child(sys.argv[1:])


def test_a_batch_of_verification_steps_through_the_decode_path(kernel_device):
    """The decode path of a batch (PagedKittyCache.decode, as the backend runs a decode-only batch on a
    GPU): requests of 1 to K + 1 tokens each, one of them completing a page with a draft and one
    empty, then padding tokens; every token attends as the reference does at its position, and the
    padding is left alone."""
    config = SMALL.replace(draft_tokens=K)
    layout = stage_layout(config, DIM, KV_HEADS, 4)
    contexts, lengths = [30, 13, 0, 40, 9], [3, 5, 0, 1, 2]    # request 1 fills page 0 at position 15
    rows = len(contexts)
    blocks = rows * (4 + layout.blocks_per_request)
    packed = torch.zeros(blocks, KV_HEADS, layout.page.page_bytes, dtype=torch.uint8, device=kernel_device)
    stage = torch.zeros(blocks, layout.block_bytes, dtype=torch.uint8, device=kernel_device)
    cache = PagedKittyCache.from_raw(config, layout, packed, stage, torch.float32, kernels=True)
    ids = torch.randperm(blocks, generator=torch.Generator().manual_seed(2)).view(rows, -1).to(kernel_device)
    page_table, stage_table = ids[:, :4].int().contiguous(), ids[:, 4:].int().contiguous()
    g = torch.Generator().manual_seed(3)
    sequences = [[torch.randn(c + n, h, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS)]
                 for c, n in zip(contexts, lengths, strict=True)]
    for r, (context, (q, key, value)) in enumerate(zip(contexts, sequences, strict=True)):
        if context:
            cache.step(*(x[:context].to(kernel_device) for x in (q, key, value)), 0, page_table[r], stage_table[r],
                       DIM ** -0.5)
    padding = 2
    step = [torch.cat([x[c:] for (c, x) in zip(contexts, part, strict=True)] + [torch.zeros(padding, *part[0].shape[1:])])
            for part in zip(*sequences, strict=True)]
    query_start = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([c + n if n else 0 for c, n in zip(contexts, lengths, strict=True)], dtype=torch.int32)
    out = torch.full_like(step[0], 7.0).to(kernel_device)
    cache.decode(*(x.to(kernel_device) for x in step), query_start.to(kernel_device), seq_lens.to(kernel_device),
                 max(lengths), page_table, stage_table, DIM ** -0.5, out)
    out = out.cpu()
    for r, (context, n, (q, key, value)) in enumerate(zip(contexts, lengths, sequences, strict=True)):
        want = reference.reference_attention(q[context:], key, value, config,
                                             query_positions=torch.arange(context, context + n))
        first = int(query_start[r])
        torch.testing.assert_close(out[first:first + n], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"request {r}: {m}")
    assert torch.all(out[-padding:] == 0) or torch.all(out[-padding:] == 7.0)


@pytest.mark.parametrize("draft_tokens", [0, 3])
def test_graph_support_covers_verification_steps(draft_tokens):
    """vLLM captures in full graphs the uniform batches the builder declares: single-token decodes, and with
    drafts (KittyConfig.draft_tokens, set from the speculative config) uniform verification steps too."""
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionCGSupport

    from kitty_vllm.backend import KittyMetadataBuilder

    config = KittyConfig.from_preset("kitty2").replace(draft_tokens=draft_tokens)
    vllm_config = SimpleNamespace(cache_config=SimpleNamespace(cache_dtype="kitty2"),
                                  additional_config={"kitty": asdict(config)})
    support = KittyMetadataBuilder.get_cudagraph_support(vllm_config, None)
    assert support == (AttentionCGSupport.UNIFORM_BATCH if draft_tokens
                       else AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)
