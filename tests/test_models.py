"""Model families beyond full attention in every layer, served with ``--kv-cache-dtype kitty2``.

Tiny random models (tests/tiny_model.py) run in an in-process vLLM engine (tests/engine.py) on the CPU:

* ``gemma3``: Gemma-3-like, three sliding-window layers then one full-attention layer, head size 64,
  no attention soft-capping;
* ``gemma2``: Gemma-2-like, the two alternating, head size 128, attention logits soft-capped at 50;
* ``gpt-oss``: gpt-oss-like, the two alternating with gpt-oss's 128-token window, learned per-head
  attention sinks in every layer, head size 64, a mixture of experts;
* ``phi3``: Phi-3-like, head size 96 (2 query and 2 KV heads, as Phi-3's multi-head attention), fused
  projections, and a window on every layer that spans MAX_MODEL_LEN, as Phi-3.5-mini's 262144 tokens span
  its 131072: it excludes nothing, so kitty stores every layer (kitty_vllm.patches);
* ``llama-skip-0``: the tiny Llama with ``kv_cache_dtype_skip_layers=["0"]``, vLLM's option that keeps
  the layers it names (by index or ``sliding_window``) in the model's dtype.

With a kitty dtype the full-attention layers are stored in kitty pages, the sliding-window and skipped
layers in the model's dtype (kitty_vllm.block_manager.mixed), except under a window that spans
MAX_MODEL_LEN. Greedy tokens equal the transformers
oracle (kitty_vllm.tools.oracle) that quantizes the same layers the same way and lets the others attend
in full precision; both in float32, with ``exact_prefill`` so vLLM's steps need not match the oracle's.
vLLM's maximum concurrency equals what the layer mix implies: every block padded to one shared page, a
request holding its pages and staging blocks in each kitty layer, its tokens in each skipped layer and
its window's blocks in each sliding-window layer.

With prefix caching on (kitty2 as users get it), the Gemma-3-like model reuses a repeated prompt's
prefix, the sliding-window layers' window included, and decodes what it decodes without the hit.

A Mistral-like model whose every layer has a sliding window shorter than MAX_MODEL_LEN is served as
``auto`` serves it, with a warning that kitty stores nothing.
Hybrid Mamba models are not tested here: vLLM 0.32's CPU build fails in the Mamba mixer's first forward
with ``--kv-cache-dtype auto`` too.
"""

from __future__ import annotations

import pytest
import torch

from engine import prompt_inputs, torch_threads, vllm_engine
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout, stage_layout
from kitty_vllm.reference import reference_attention
from kitty_vllm.tools.assets import token_windows
from kitty_vllm.tools.oracle import kitty_greedy
from tiny_model import build_tiny_model, layer_types

NEW_TOKENS = 24
# Both prompts outlast the windows (64 tokens, gpt-oss's 128); the first completes its first page while
# decoding, the second prefills two pages.
PROMPT_LENS = (120, 300)
WINDOW = 64
GPT_OSS_WINDOW = 128
MAX_MODEL_LEN = 1024
PHI3_WINDOW = 2 * MAX_MODEL_LEN
KV_CACHE_BYTES = 1 << 24
MAX_NUM_BATCHED_TOKENS = 512
# vLLM's CPU attention backend stores a sliding-window layer in blocks of a multiple of 32 tokens.
CPU_KERNEL_BLOCK = 32
FLOAT32_BYTES = 4
# As in tests/test_vllm_e2e.py: every compared greedy choice wins by this much in the oracle's logits,
# well clear of the float32 differences between vLLM and transformers that kitty's rounding can
# amplify. The prompts are essay windows FIRST_WINDOW..; windows and seeds were picked so that kitty2
# changes some greedy token and no choice is a near-tie (test_oracle_choices_are_not_near_ties says so if
# the models or the text change): Gemma 2's tied LM head gives small logit gaps on most seeds.
MIN_GAP = 2e-3
FIRST_WINDOW = 2

# The models, and the layers each keeps in the model's dtype through kv_cache_dtype_skip_layers (by
# index, as vLLM documents it; sliding-window layers are skipped by kitty itself).
CASES = {
    "gemma3": (dict(family="gemma3", num_layers=4, head_dim=64, sliding_window=WINDOW, seed=0), []),
    "gemma2": (dict(family="gemma2", num_layers=4, head_dim=128, sliding_window=WINDOW, seed=2,
                    attn_logit_softcapping=50.0), []),
    "gpt-oss": (dict(family="gpt_oss", num_layers=2, head_dim=64, sliding_window=GPT_OSS_WINDOW, seed=0), []),
    "phi3": (dict(family="phi3", num_layers=2, head_dim=96, num_heads=2, hidden=192, sliding_window=PHI3_WINDOW,
                  seed=0), []),
    "llama-skip-0": (dict(family="llama", num_layers=2, head_dim=64, seed=1), ["0"]),
}
KV_HEADS = 2    # build_tiny_model's default
# The prefix-caching test: a prompt of 4 whole pages and part of a fifth, far past the window, then the
# same prompt with PREFIX_SUFFIX more tokens, prefilled in PREFIX_STEP-token steps.
PREFIX_PROMPT = 600
PREFIX_SUFFIX = 100
PREFIX_STEP = 384
PAGE = 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(case):
    return build_tiny_model(**CASES[case][0])


def skipped_layers(case: str) -> list[int]:
    return [int(layer) for layer in CASES[case][1]]


def essay_prompts(model_dir) -> list[list[int]]:
    """BOS + essay text of PROMPT_LENS tokens, each from its own window."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = token_windows(tokenizer, FIRST_WINDOW + len(PROMPT_LENS), max(PROMPT_LENS))[FIRST_WINDOW:]
    return [[tokenizer.bos_token_id] + window[: n - 1] for window, n in zip(windows, PROMPT_LENS)]


@pytest.fixture(scope="module")
def prompts(model_dir):
    return essay_prompts(model_dir)


def smallest_gap(logits: list[torch.Tensor]) -> float:
    """The smallest top-1/top-2 logit gap of the oracle's greedy choices."""
    return min(float(top[:, 0].sub(top[:, 1]).min()) for top in (torch.topk(step, 2, dim=-1).values for step in logits))


def exact(preset: str) -> KittyConfig:
    return KittyConfig.from_preset(preset).replace(exact_prefill=True)


@pytest.fixture(scope="module")
def oracle(model_dir, prompts, case):
    """The oracle's greedy tokens under kitty2 (exact_prefill) and under plain attention, and the smallest
    top-1/top-2 logit gap of kitty2's choices."""
    tokens, logits = kitty_greedy(model_dir, prompts, NEW_TOKENS, exact("kitty2"), return_logits=True,
                                  plain_layers=skipped_layers(case), max_model_len=MAX_MODEL_LEN)
    return {"kitty2": tokens, "plain": kitty_greedy(model_dir, prompts, NEW_TOKENS, None), "gap": smallest_gap(logits)}


@pytest.fixture(scope="module")
def served(model_dir, prompts, case):
    """kitty2 (exact_prefill) in vLLM: greedy tokens, the KV-cache config and vLLM's maximum concurrency."""
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    with vllm_engine(model_dir, exact_prefill=True, kv_cache_dtype="kitty2", dtype="float32",
                     max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=KV_CACHE_BYTES,
                     max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS, kv_cache_dtype_skip_layers=CASES[case][1]) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outputs = llm.generate(prompt_inputs(prompts), params, use_tqdm=False)
        kv_cache_config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
        concurrency = get_max_concurrency_for_kv_cache_config(llm.llm_engine.vllm_config, kv_cache_config)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "kv_cache_config": kv_cache_config,
            "concurrency": concurrency}


def test_oracle_quantization_changes_greedy_output(oracle):
    """The comparison below cannot pass by ignoring kitty's quantization of the full-attention layers."""
    assert oracle["kitty2"] != oracle["plain"]


def test_oracle_choices_are_not_near_ties(oracle):
    assert oracle["gap"] >= MIN_GAP


def test_gpt_oss_oracle_sinks_change_greedy_output(monkeypatch):
    """The gpt-oss comparison cannot pass by ignoring the learned sinks in kitty's layers: without them
    there (the sliding-window layers keep theirs) the oracle's greedy output changes."""
    from kitty_vllm.tools import oracle as oracle_module

    model_dir = build_tiny_model(**CASES["gpt-oss"][0])
    prompts = essay_prompts(model_dir)
    with_sinks = kitty_greedy(model_dir, prompts, NEW_TOKENS, exact("kitty2"))
    monkeypatch.setattr(oracle_module, "reference_attention",
                        lambda *args, sinks=None, **kwargs: reference_attention(*args, **kwargs))
    assert kitty_greedy(model_dir, prompts, NEW_TOKENS, exact("kitty2")) != with_sinks


def test_kitty2_matches_oracle(served, oracle):
    assert served["tokens"] == oracle["kitty2"]


def layer_mix(case: str) -> dict[str, list[int]]:
    """The layers in kitty pages and those in the model's dtype (sliding-window, skipped full-attention)."""
    params, skipped = CASES[case][0], skipped_layers(case)
    types = layer_types(params["family"], params["num_layers"])
    if params.get("sliding_window", 0) >= MAX_MODEL_LEN:
        types = ["full_attention"] * len(types)     # a window that excludes nothing (kitty_vllm.patches)
    return {"kitty": [i for i, t in enumerate(types) if t == "full_attention" and i not in skipped],
            "sliding": [i for i, t in enumerate(types) if t == "sliding_attention"],
            "skipped": skipped}


def test_each_layer_in_kitty_pages_or_the_model_dtype(served, case):
    """Full-attention layers in kitty pages (packed and staging groups); sliding-window and skipped layers
    in float32, in vLLM's own specs (sliding-window layers in kitty's subclass, for prefix caching)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from kitty_vllm.block_manager import KittyPackedSpec, KittySlidingWindowSpec, KittyStageSpec

    mix = layer_mix(case)
    layers: dict[type, list[int]] = {}
    for group in served["kv_cache_config"].kv_cache_groups:
        spec = group.kv_cache_spec
        layers.setdefault(type(spec), []).extend(int(name.split(".")[2]) for name in group.layer_names)
        if type(spec) in (KittySlidingWindowSpec, FullAttentionSpec):
            assert spec.dtype == torch.float32
    assert {kind: sorted(found) for kind, found in layers.items()} == {
        kind: found for kind, found in {KittyPackedSpec: mix["kitty"], KittyStageSpec: mix["kitty"],
                                        KittySlidingWindowSpec: mix["sliding"],
                                        FullAttentionSpec: mix["skipped"]}.items()
        if found}


def test_maximum_concurrency_is_what_the_layer_mix_implies(served, case):
    """With layers in the model's dtype, every block is padded to one shared page: the larger of a kitty page
    and a CPU_KERNEL_BLOCK-token float32 block (on the CPU, also the page that makes a request smallest);
    with none (phi3), a block is a kitty page. A request of MAX_MODEL_LEN
    tokens holds its pages and staging blocks in each kitty layer, its tokens in each skipped layer, and
    in each sliding-window layer the blocks of its window plus one step's tokens (vLLM's admission
    bound), one more for a window that starts inside a block."""
    params, mix = CASES[case][0], layer_mix(case)
    config, head_dim = KittyConfig.from_preset("kitty2"), params["head_dim"]
    token_bytes = 2 * KV_HEADS * head_dim * FLOAT32_BYTES
    kitty_page = KV_HEADS * page_layout(config, head_dim).page_bytes
    model_dtype_layers = bool(mix["sliding"] or mix["skipped"])
    page = max(kitty_page, CPU_KERNEL_BLOCK * token_bytes) if model_dtype_layers else kitty_page
    blocks = {"kitty": -(-MAX_MODEL_LEN // config.page_size),
              "staging": stage_layout(config, head_dim, KV_HEADS, FLOAT32_BYTES).blocks_needed(MAX_MODEL_LEN)}
    if model_dtype_layers:
        block_tokens = page // token_bytes // CPU_KERNEL_BLOCK * CPU_KERNEL_BLOCK
        window_tokens = min(params.get("sliding_window", WINDOW) - 1 + MAX_NUM_BATCHED_TOKENS, MAX_MODEL_LEN)
        blocks.update(sliding=-(-window_tokens // block_tokens) + 1, skipped=-(-MAX_MODEL_LEN // block_tokens))
    counts = {"kitty": len(mix["kitty"]), "staging": len(mix["kitty"]), "sliding": len(mix["sliding"]),
              "skipped": len(mix["skipped"])}
    # vLLM groups the layers of each kind into groups of the smallest kind's count here, one pool tensor
    # per group member: a block of the pool is one page in each of those tensors.
    group_size = min(count for count in counts.values() if count)
    blocks_per_request = sum(-(-count // group_size) * blocks[kind] for kind, count in counts.items() if count)
    num_blocks = KV_CACHE_BYTES // (page * group_size)
    print(f"\n{case}: page {page} B, {num_blocks} blocks, {blocks_per_request} per request of "
          f"{MAX_MODEL_LEN} tokens, vLLM's maximum concurrency {served['concurrency']:.2f}")
    assert served["kv_cache_config"].num_blocks == num_blocks
    assert served["concurrency"] == pytest.approx(num_blocks / blocks_per_request)


def test_gemma3_under_vllm_serve_matches_oracle(tmp_path):
    """``vllm serve`` (engine and worker processes) of the Gemma-3-like model, kitty2 as users get it:
    each prompt is prefilled in one step (it fits in --max-num-batched-tokens, one request at a time),
    its tokens reading each other in full precision, as the oracle's one-step prefill does."""
    from server import VllmServer

    model_dir = build_tiny_model(**CASES["gemma3"][0])
    prompts = essay_prompts(model_dir)
    expected, logits = kitty_greedy(model_dir, prompts, NEW_TOKENS, KittyConfig.from_preset("kitty2"),
                                    return_logits=True)
    assert smallest_gap(logits) >= MIN_GAP
    args = ["--kv-cache-dtype", "kitty2", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--max-num-seqs", "1", "--enforce-eager",
            "--no-enable-prefix-caching", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    server = VllmServer(model_dir, args, tmp_path / "serve.log", env={"KITTY_CONFIG": None,
                                                                       "VLLM_CPU_KVCACHE_SPACE": None})
    try:
        server.wait_healthy(300)
        served = [server.post("/v1/completions", {"model": str(model_dir), "prompt": prompt, "max_tokens": NEW_TOKENS,
                                                  "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                              timeout=120)["choices"][0]["token_ids"] for prompt in prompts]
        assert "stores 1 of 4 attention layers in kitty pages and 3 in the model's dtype" in server.log()
    finally:
        server.stop()
    assert served == expected


def test_gemma3_reuses_a_repeated_prompts_prefix():
    """kitty2 as users get it, prefix caching on: a PREFIX_PROMPT-token prompt, the same prompt again, then
    the prompt and PREFIX_SUFFIX more tokens, one at a time. The first request leaves 4 whole pages of
    its prompt cached (and the prompt less its last token, which a repeat recomputes for its logits, spans
    them); a kitty hit takes all but the last cached page (the window of newest tokens must be computed by
    the request itself: kitty_vllm.block_manager.manager), so both later requests reuse 3 pages, 384
    tokens, with their sinks and the sliding-window layers' WINDOW-token window before token 384, which
    KittySlidingWindowManager keeps for such a hit. In PREFIX_STEP-token steps every hit starts a step
    where a run without it starts one too, so the greedy tokens equal the run without prefix caching and
    the oracle prefilling in the same steps."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    model_dir = build_tiny_model(**CASES["gemma3"][0])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    window = token_windows(tokenizer, FIRST_WINDOW + 1, PREFIX_PROMPT + PREFIX_SUFFIX)[FIRST_WINDOW]
    prompt = [tokenizer.bos_token_id] + window[:PREFIX_PROMPT - 1]
    longer = prompt + window[PREFIX_PROMPT - 1:PREFIX_PROMPT - 1 + PREFIX_SUFFIX]
    (first, extended), logits = kitty_greedy(model_dir, [prompt, longer], NEW_TOKENS, KittyConfig.from_preset("kitty2"),
                                             chunk_size=PREFIX_STEP, return_logits=True)
    assert smallest_gap(logits) >= MIN_GAP
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    runs = {}
    for prefix_caching in (True, False):
        with vllm_engine(model_dir, kv_cache_dtype="kitty2", dtype="float32", max_model_len=MAX_MODEL_LEN,
                         kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_batched_tokens=PREFIX_STEP,
                         enable_prefix_caching=prefix_caching) as llm:
            outputs = [llm.generate(prompt_inputs([p]), params, use_tqdm=False)[0] for p in (prompt, prompt, longer)]
        runs[prefix_caching] = ([list(o.outputs[0].token_ids) for o in outputs], [o.num_cached_tokens for o in outputs])
    hit = (PREFIX_PROMPT - 1) // PAGE * PAGE - PAGE
    assert runs[True][1] == [0, hit, hit] and hit == 384
    assert runs[False][1] == [0, 0, 0]
    assert runs[True][0] == runs[False][0] == [first, first, extended]


def test_sliding_window_on_every_layer_is_served_as_auto_serves_it(monkeypatch):
    """Mistral-like, a window shorter than MAX_MODEL_LEN on every layer: every layer stays in the model's
    dtype, so kitty2 serves it as ``auto`` does, token for token and with the same capacity, and a
    warning says that kitty stores nothing."""
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    from kitty_vllm.block_manager import mixed

    model_dir = build_tiny_model(family="mistral", sliding_window=WINDOW)
    warnings = []
    # vLLM configures logging when an engine starts, which drops handlers added to kitty's loggers.
    monkeypatch.setattr(mixed.logger, "warning", lambda message, *args: warnings.append(message % args))
    runs = {}
    for dtype in ("auto", "kitty2"):
        with vllm_engine(model_dir, kv_cache_dtype=dtype, dtype="float32", max_model_len=MAX_MODEL_LEN,
                         kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS) as llm:
            params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
            outputs = llm.generate(prompt_inputs(essay_prompts(model_dir)), params, use_tqdm=False)
            kv_cache_config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
            runs[dtype] = ([list(o.outputs[0].token_ids) for o in outputs],
                           get_max_concurrency_for_kv_cache_config(llm.llm_engine.vllm_config, kv_cache_config))
    assert runs["kitty2"] == runs["auto"]
    [warning] = warnings
    assert warning.startswith("--kv-cache-dtype kitty2 stores none of this model's 2 attention layers in kitty "
                              "pages (2 sliding-window layers")
    assert f"caps --max-model-len at the window ({WINDOW} tokens)" in warning


def test_docs_models_table_is_current():
    """docs/models.md shows the table kitty_vllm.tools.capacity computes."""
    from pathlib import Path

    from kitty_vllm.tools.capacity import table

    assert table() in (Path(__file__).parents[1] / "docs" / "models.md").read_text()
