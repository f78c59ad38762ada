"""Greedy decoding through real vLLM with a kitty KV cache equals the transformers oracle, token for token.

The tiny random Llama (tests/tiny_model.py: 2 layers, head_dim 64, 2 KV heads) runs in an in-process
vLLM engine (tests/engine.py) with ``--kv-cache-dtype kitty2`` (and kitty2-lite, kivi2); the oracle
(kitty_vllm/tools/oracle.py ``kitty_greedy``) runs the same weights in transformers with every attention layer
reading the cache through kitty_vllm.reference, under the same cache schedule. Both are float32 and
greedy, so any difference in quantization, packing, page bookkeeping, the staging ring, prefix-cache
reuse or chunked prefill shows up as a different token.

Most engines run with ``exact_prefill`` (kitty_vllm.config), where every query reads the cache as
decoding would, so vLLM's 512-token steps and chunks need not match the oracle's steps (one prefill,
then one token at a time). Two engines run kitty2 as users get it, where a step's tokens read each
other in full precision, one request at a time, against the oracle fed the same steps: one in STEP-token
prefill steps, one with prefix caching (exact_prefill turns prefix-cache hits off).

Prompts are real essay text (the tiny model's tokenizer) of 40, 120, 300 and 740 tokens (BOS
first): one never completes a page (40 + 32 < 128), two complete a page while decoding (120 + 32 > 128,
740 + 32 > 768), and two prefill across several pages. Each engine is started once per module and
shut down before the next one starts.
"""

from __future__ import annotations

import time

import pytest
import torch

from engine import prompt_inputs, torch_threads, vllm_engine
from kitty_vllm.tools.assets import token_windows
from kitty_vllm.boost_profile import LayerBoostProfile
from kitty_vllm.config import ADDITIONAL_CONFIG_KEY, KittyConfig
from kitty_vllm.tools.oracle import kitty_greedy
from tiny_model import build_tiny_model

NEW_TOKENS = 32
PROMPT_LENS = (40, 120, 300, 740)
PAGE = 128
# The follow-up requests: one shares this many leading tokens with the 740-token prompt, whose whole
# pages, 3 pages = 384 tokens (sinks included), are cached; one repeats it, 5 pages cached (its last token
# is recomputed). A prefix-cache hit takes all but the last cached page (kitty_vllm.block_manager).
# They run in default mode in HIT_STEP-token steps, one at a time, so the hits (256, 512) start steps
# of the oracle's 128-token chunking. The first one's 620 tokens + 32 complete page 4 while decoding.
SHARED_PREFIX = 450
FOLLOW_UP_TAIL = 170
HIT_STEP = 128
EXPECTED_HITS = [SHARED_PREFIX // PAGE * PAGE - PAGE,          # 256
                 (PROMPT_LENS[3] - 1) // PAGE * PAGE - PAGE]   # 512
MAX_MODEL_LEN = 1024
# Prompts come from essay windows FIRST_WINDOW.. (of 740 tokens). Earlier windows give greedy
# continuations with near-ties (top-2 logit gaps down to 2e-5). Kitty's rounding is discontinuous: vLLM's
# and transformers' float32 Llama agree to about 5e-6 in log-probabilities with plain attention, and
# their layer-0 Keys and Values are bitwise equal, but layer-1 Keys differ by up to 4e-6, enough to
# flip an fp16 key_min or value_scale here and there, and then log-probabilities differ by up to
# 3e-4 (1e-6 relative weight noise moved one by 0.2 in the oracle). MIN_GAP keeps every compared
# choice well clear of that; test_oracle_choices_are_not_near_ties says so if the tiny model or the
# text ever changes.
FIRST_WINDOW = 2
MIN_GAP = 2e-3
# The default mode's engine: the 300- and 740-token prompts, alone, prefilled in 80-token steps, so
# pages complete inside steps (at 127 in 80..159) and steps start inside pages.
ALONE = [2, 3]
STEP = 80
# The value_rotation engine: the 120- and 300-token prompts (pages complete while decoding and before);
# under the rotation the 740-token one decodes a near-tie (top-2 gap 7e-4) at its 24th token.
ROTATED = [1, 2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir():
    return build_tiny_model()


@pytest.fixture(scope="module")
def prompts(model_dir):
    """``batch``: BOS + essay text of PROMPT_LENS tokens, each from its own window (no shared
    prefixes); ``long``: the 740-token one; ``follow_up``: a prompt sharing SHARED_PREFIX tokens with
    it, and an exact repeat of it; ``alone`` and ``rotated``: the ALONE and ROTATED prompts of the batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    count = FIRST_WINDOW + len(PROMPT_LENS) + 1
    windows = token_windows(tokenizer, count, max(PROMPT_LENS))[FIRST_WINDOW:]
    batch = [[tokenizer.bos_token_id] + windows[i][: n - 1] for i, n in enumerate(PROMPT_LENS)]
    follow_up = [batch[3][:SHARED_PREFIX] + windows[-1][:FOLLOW_UP_TAIL], list(batch[3])]
    assert [len(p) for p in batch] == list(PROMPT_LENS)
    return {"batch": batch, "long": [batch[3]], "follow_up": follow_up, "alone": [batch[i] for i in ALONE],
            "rotated": [batch[i] for i in ROTATED]}


class Oracle:
    """The oracle's greedy tokens for ``prompts[which]`` under a preset (None: plain attention) with
    ``fields`` replaced, and the smallest top-1/top-2 logit gap among the choices it made; each computed
    once. ``step=None``: the preset with exact_prefill, each prompt prefilled in one step; ``step=k``: the
    preset as it is, each prompt prefilled in k-token steps."""

    def __init__(self, model_dir, prompts):
        self.model_dir, self.prompts, self.results = model_dir, prompts, {}

    def _run(self, preset: str | None, which: str, step: int | None, fields: dict):
        key = (preset, which, step, tuple(sorted(fields.items())))
        if key not in self.results:
            config = None if preset is None else KittyConfig.from_preset(preset).replace(**fields)
            if config is not None and step is None:
                config = config.replace(exact_prefill=True)
            start = time.perf_counter()
            tokens, logits = kitty_greedy(self.model_dir, self.prompts[which], NEW_TOKENS, config,
                                          chunk_size=step, return_logits=True)
            gap = min(float(top[:, 0].sub(top[:, 1]).min())
                      for top in (torch.topk(chosen, 2, dim=-1).values for chosen in logits))
            self.results[key] = tokens, gap
            print(f"\n[oracle] {preset or 'plain'} {fields or ''} {which} "
                  f"{f'{step}-token steps' if step else 'exact_prefill'}: "
                  f"{time.perf_counter() - start:.1f} s, smallest top-2 logit gap {gap:.4f}")
        return self.results[key]

    def __call__(self, preset: str | None, which: str = "batch", step: int | None = None,
                 **fields) -> list[list[int]]:
        return self._run(preset, which, step, fields)[0]

    def gap(self, preset: str | None, which: str = "batch", step: int | None = None, **fields) -> float:
        return self._run(preset, which, step, fields)[1]


@pytest.fixture(scope="module")
def oracle(model_dir, prompts):
    return Oracle(model_dir, prompts)


def generate(llm, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens (exactly NEW_TOKENS each: EOS does not stop) and prefix-cache hits per prompt."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompt_inputs(prompts), params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], [o.num_cached_tokens for o in outputs]


def run_engine(model_dir, prompt_sets: list[list[list[int]]], exact_prefill: bool = True, **engine_kwargs):
    """Start one engine, run each prompt set as its own ``generate`` call (in order), shut it down."""
    with vllm_engine(model_dir, exact_prefill, dtype="float32", max_model_len=MAX_MODEL_LEN,
                     **engine_kwargs) as llm:
        return [generate(llm, p) for p in prompt_sets]


# Engines: one per fixture, each run once per module; all but kitty2_prefix_caching and the last with
# exact_prefill.

@pytest.fixture(scope="module")
def kitty2_prefix_caching(model_dir, prompts):
    """kitty2 as users get it, prefix caching on, one request at a time in HIT_STEP-token steps: the
    740-token prompt, then the follow-ups (which hit its pages)."""
    return run_engine(model_dir, [prompts["long"], prompts["follow_up"]], exact_prefill=False,
                      kv_cache_dtype="kitty2", enable_prefix_caching=True, max_num_batched_tokens=HIT_STEP,
                      max_num_seqs=1)


@pytest.fixture(scope="module")
def kitty2_no_prefix_caching(model_dir, prompts):
    return run_engine(model_dir, [prompts["batch"], prompts["follow_up"]], kv_cache_dtype="kitty2",
                      enable_prefix_caching=False)


CHUNKED = [3, 1, 0]   # the 740-, 120- and 40-token prompts


@pytest.fixture(scope="module")
def kitty2_chunked(model_dir, prompts):
    """kitty2 with 64-token steps and at most 2 running requests: the 740-token prompt is prefilled in
    12 chunks, and the next prompt's chunks share steps with its decode tokens, so they end mid-page."""
    return run_engine(model_dir, [[prompts["batch"][i] for i in CHUNKED]], kv_cache_dtype="kitty2",
                      max_num_batched_tokens=64, max_num_seqs=2)


@pytest.fixture(scope="module")
def kitty2_lite(model_dir, prompts):
    return run_engine(model_dir, [prompts["batch"]], kv_cache_dtype="kitty2-lite")


@pytest.fixture(scope="module")
def kivi2(model_dir, prompts):
    """kivi2 without prefix caching and with 96-token steps: prefill chunks end at 96, 192, ... (not page
    boundaries), for the first request of the step."""
    return run_engine(model_dir, [prompts["batch"]], kv_cache_dtype="kivi2", enable_prefix_caching=False,
                      max_num_batched_tokens=96, max_num_seqs=4)


@pytest.fixture(scope="module")
def kitty2_default(model_dir, prompts):
    """kitty2 as users get it (exact_prefill off), one request at a time and no prefix caching, so
    each prompt is prefilled in STEP-token steps (the last one shorter), then decoded."""
    return run_engine(model_dir, [prompts["alone"]], exact_prefill=False,
                      kv_cache_dtype="kitty2", enable_prefix_caching=False, max_num_batched_tokens=STEP,
                      max_num_seqs=1)


@pytest.fixture(scope="module")
def kitty2_hadamard(model_dir, prompts):
    """kitty2 with its Values stored through the Hadamard rotation (KittyConfig.value_rotation), set as a
    user sets one field: ``--additional-config '{"kitty": {"value_rotation": "hadamard"}}'``."""
    return run_engine(model_dir, [prompts["rotated"]], kv_cache_dtype="kitty2",
                      additional_config={ADDITIONAL_CONFIG_KEY: {"value_rotation": "hadamard"}})


# Per-layer boost ratios for the tiny model's 2 layers, averaging kitty2's 25%: layer 0's Keys boost half
# of their channels, layer 1's none (pages without a sparse plane), so layer 0's pages are the larger.
LAYER_BOOST = (0.5, 0.0)


@pytest.fixture(scope="module")
def kitty2_layer_boost(model_dir, prompts, tmp_path_factory):
    """kitty2 with per-layer boost ratios (KittyConfig.layer_boost) from a profile file, as a user points to
    one: ``--additional-config '{"kitty": {"layer_boost": "PROFILE.yaml"}}'``."""
    profile = LayerBoostProfile("tiny", 0.25, LAYER_BOOST, {}).to_yaml(tmp_path_factory.mktemp("boost") / "tiny.yaml")
    return run_engine(model_dir, [prompts["rotated"]], kv_cache_dtype="kitty2",
                      additional_config={ADDITIONAL_CONFIG_KEY: {"layer_boost": str(profile)}})


# Tests.

def test_oracle_quantization_changes_greedy_output(oracle):
    """The comparison below cannot pass by ignoring quantization: kitty2 changes some prompt's greedy
    tokens; the 40-token prompt never completes a page, so it sees no quantization at all."""
    kitty2, plain = oracle("kitty2"), oracle(None)
    assert kitty2[0] == plain[0]
    assert any(k != p for k, p in zip(kitty2[1:], plain[1:])), "kitty2 gives plain attention's tokens"


def test_oracle_choices_are_not_near_ties(oracle):
    """Every greedy choice compared below wins by at least MIN_GAP in the oracle's logits, so a
    mismatch means a difference in the cache, not float32 rounding deciding a tie."""
    gaps = {(preset, which): oracle.gap(preset, which)
            for preset, which in [("kitty2", "batch"), ("kitty2", "follow_up"), ("kitty2-lite", "batch"),
                                  ("kivi2", "batch")]}
    for which, step in [("alone", STEP), ("long", HIT_STEP), ("follow_up", HIT_STEP)]:
        gaps["kitty2", which, step] = oracle.gap("kitty2", which, step)
    gaps["kitty2", "rotated"] = oracle.gap("kitty2", "rotated", value_rotation="hadamard")
    gaps["kitty2", "layer-boost"] = oracle.gap("kitty2", "rotated", layer_boost=LAYER_BOOST)
    assert min(gaps.values()) >= MIN_GAP, gaps


def test_oracle_default_mode_differs_from_exact_prefill(oracle):
    """The default mode's comparison below cannot pass by ignoring it: prefilled in STEP-token steps
    whose tokens read each other in full precision, both prompts decode other tokens than under
    exact_prefill (they part at the first token, whose logits move by 0.25 and 1.0)."""
    default, exact = oracle("kitty2", "alone", STEP), oracle("kitty2")
    assert all(d != exact[i] for d, i in zip(default, ALONE, strict=True))


def test_kitty2_prefix_caching_first_request_matches_oracle(kitty2_prefix_caching, oracle):
    (tokens, hits), _ = kitty2_prefix_caching
    assert hits == [0]
    assert tokens == oracle("kitty2", "long", HIT_STEP)


def test_kitty2_prefix_cache_hit_matches_oracle(kitty2_prefix_caching, oracle):
    """A request reusing the 740-token prompt's first 2 packed pages and sinks, and a repeat reusing 4,
    decode what the oracle decodes from scratch in the same steps."""
    _, (tokens, hits) = kitty2_prefix_caching
    assert hits == EXPECTED_HITS
    assert tokens == oracle("kitty2", "follow_up", HIT_STEP)


def test_kitty2_without_prefix_caching_matches_oracle(kitty2_no_prefix_caching, oracle):
    (tokens, hits), (follow_tokens, follow_hits) = kitty2_no_prefix_caching
    assert hits == [0] * len(PROMPT_LENS) and follow_hits == [0, 0]
    assert tokens == oracle("kitty2")
    assert follow_tokens == oracle("kitty2", "follow_up")


def test_kitty2_chunked_prefill_matches_oracle(kitty2_chunked, oracle):
    [(tokens, _)] = kitty2_chunked
    assert tokens == [oracle("kitty2")[i] for i in CHUNKED]


def test_kitty2_lite_matches_oracle(kitty2_lite, oracle):
    [(tokens, _)] = kitty2_lite
    assert tokens == oracle("kitty2-lite")
    assert tokens != oracle(None)


def test_kivi2_matches_oracle(kivi2, oracle):
    [(tokens, _)] = kivi2
    assert tokens == oracle("kivi2")
    assert tokens != oracle(None)


def test_kitty2_default_prefill_steps_match_oracle(kitty2_default, oracle):
    [(tokens, hits)] = kitty2_default
    assert hits == [0] * len(ALONE)
    assert tokens == oracle("kitty2", "alone", STEP)


def test_kitty2_value_rotation_matches_oracle(kitty2_hadamard, oracle):
    """With value_rotation, vLLM's Values go into pages and ring rotated and its attention output comes
    back through the rotation (the backend), as the oracle's reference_attention does."""
    [(tokens, _)] = kitty2_hadamard
    assert tokens == oracle("kitty2", "rotated", value_rotation="hadamard")
    assert tokens != [oracle("kitty2")[i] for i in ROTATED], "the rotation changes no token: nothing is compared"


def test_kitty2_layer_boost_matches_oracle(kitty2_layer_boost, oracle):
    """With per-layer boost ratios each layer quantizes its Keys with its own ratio, in pages of its own size
    that vLLM packs side by side in each block (its BLHNC layout): vLLM's greedy tokens are the oracle's,
    whose layers read the reference with the same ratios, and the ratios change them."""
    [(tokens, _)] = kitty2_layer_boost
    assert tokens == oracle("kitty2", "rotated", layer_boost=LAYER_BOOST)
    assert tokens != oracle("kitty2", "rotated")
