"""A hybrid model with kitty2 (issue 28): the tiny Qwen3-Next-like model of tests/tiny_model.py, three Gated
DeltaNet linear-attention layers before one full-attention layer, served by vLLM's CPU build.

vLLM's CPU kernel for the linear attention needs bfloat16, so the model runs in bfloat16 here, and greedy
tokens cannot be compared with the float32 oracle token for token as tests/test_models.py does: vLLM's
``auto`` and transformers' reference already part after a few tokens, in bfloat16, on this random model.
What is compared instead is what each position's prompt log-probability says, teacher-forced over two
900-token essay prompts (seven pages each): kitty2 in vLLM against the oracle that quantizes the same
full-attention layer (kitty_vllm.tools.oracle, ``exact_prefill`` so that every position reads the cache as
a decode would), by no more than ``auto`` in vLLM differs from the oracle without quantization, plus
a margin. That bounds kitty's error on the hybrid by bfloat16's own noise (about 0.05 nats per token): it
rules out a gross error (a wrong page, layer or state), not the quantization's own small effect, which is
below that noise here (the two oracles differ by about 0.02). Token-exact checks of hybrids need float32,
which vLLM's CPU kernel for the linear attention does not run. The linear-attention layers' state is
vLLM's, untouched (MambaSpec); a kitty block holds the pages that cover the state's block, and vLLM's
maximum concurrency counts them (docs/models.md).
"""

from __future__ import annotations

import pytest
import torch

from engine import prompt_inputs, vllm_engine
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout, stage_layout
from kitty_vllm.tools.assets import token_windows
from kitty_vllm.tools.oracle import kitty_logits
from tiny_model import build_tiny_model, layer_types

MODEL = dict(family="qwen3_next", num_layers=4, head_dim=64, num_kv_heads=2, num_heads=4)
PROMPT_TOKENS = 900
NUM_PROMPTS = 2
FIRST_WINDOW = 2
MAX_MODEL_LEN = 1024
KV_CACHE_BYTES = 1 << 26
BF16_BYTES = 2
# How much more than auto's bfloat16 noise kitty2's may be, in mean absolute log-probability.
NOISE_MARGIN = 1.5


@pytest.fixture(scope="module")
def model_dir():
    return build_tiny_model(**MODEL)


@pytest.fixture(scope="module")
def prompts(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = token_windows(tokenizer, FIRST_WINDOW + NUM_PROMPTS, PROMPT_TOKENS)[FIRST_WINDOW:]
    return [[tokenizer.bos_token_id] + window[: PROMPT_TOKENS - 1] for window in windows]


def prompt_logprobs(outputs, prompts) -> torch.Tensor:
    """Each prompt token's log-probability given the tokens before it, all prompts, as vLLM reports them."""
    return torch.tensor([entry[prompt[i + 1]].logprob for output, prompt in zip(outputs, prompts)
                         for i, entry in enumerate(output.prompt_logprobs[1:])])


@pytest.fixture(scope="module")
def served(model_dir, prompts):
    """auto and kitty2 (exact_prefill) in vLLM, bfloat16: prompt log-probabilities, greedy tokens, the
    KV-cache config and vLLM's maximum concurrency."""
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    results = {}
    for dtype in ("auto", "kitty2"):
        with vllm_engine(model_dir, exact_prefill=True, kv_cache_dtype=dtype, dtype="bfloat16",
                         max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False,
                         kv_cache_memory_bytes=KV_CACHE_BYTES) as llm:
            params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
            outputs = llm.generate(prompt_inputs(prompts), params, use_tqdm=False)
            kv_cache_config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
            results[dtype] = {
                "logprobs": prompt_logprobs(outputs, prompts),
                "tokens": [list(o.outputs[0].token_ids) for o in outputs],
                "kv_cache_config": kv_cache_config,
                "concurrency": get_max_concurrency_for_kv_cache_config(llm.llm_engine.vllm_config, kv_cache_config)}
    return results


def oracle_logprobs(model_dir, prompts, config: KittyConfig | None) -> torch.Tensor:
    """The oracle's log-probability of each prompt token (bfloat16 model, float32 attention), teacher-forced."""
    rows = []
    for prompt in prompts:
        logits = kitty_logits(model_dir, prompt, config, dtype=torch.bfloat16).float()[:-1]
        rows.append(torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0])
    return torch.cat(rows)


@pytest.fixture(scope="module")
def oracles(model_dir, prompts):
    """The oracle's prompt log-probabilities with kitty2 (exact_prefill) and with plain attention."""
    return {"kitty2": oracle_logprobs(model_dir, prompts, KittyConfig.from_preset("kitty2").replace(exact_prefill=True)),
            "plain": oracle_logprobs(model_dir, prompts, None)}


def test_kitty2_log_probabilities_are_the_oracles_within_bfloat16_noise(served, oracles):
    kitty, plain = oracles["kitty2"], oracles["plain"]
    kitty_error = float((served["kitty2"]["logprobs"] - kitty).abs().mean())
    auto_error = float((served["auto"]["logprobs"] - plain).abs().mean())
    print(f"\nmean |log p| difference: kitty2 vs its oracle {kitty_error:.4f}, auto vs plain {auto_error:.4f}, "
          f"the two oracles {float((kitty - plain).abs().mean()):.4f}")
    assert kitty_error <= NOISE_MARGIN * auto_error
    assert all(len(tokens) == 8 for tokens in served["kitty2"]["tokens"])


def test_linear_attention_untouched_and_full_attention_in_kitty_pages(served):
    from vllm.v1.kv_cache_interface import MambaSpec

    from kitty_vllm.block_manager import KittyPackedSpec, KittyStageSpec

    types = layer_types(MODEL["family"], MODEL["num_layers"])
    layers: dict[type, list[int]] = {}
    for group in served["kitty2"]["kv_cache_config"].kv_cache_groups:
        layers.setdefault(type(group.kv_cache_spec), []).extend(int(n.split(".")[2]) for n in group.layer_names)
    full = [i for i, kind in enumerate(types) if kind == "full_attention"]
    linear = [i for i, kind in enumerate(types) if kind == "linear_attention"]
    assert {kind: sorted(found) for kind, found in layers.items()} == {
        MambaSpec: linear, KittyPackedSpec: full, KittyStageSpec: full}
    auto_state = [g.kv_cache_spec for g in served["auto"]["kv_cache_config"].kv_cache_groups
                  if isinstance(g.kv_cache_spec, MambaSpec)]
    kitty_state = [g.kv_cache_spec for g in served["kitty2"]["kv_cache_config"].kv_cache_groups
                   if isinstance(g.kv_cache_spec, MambaSpec)]
    assert [(s.shapes, s.dtypes) for s in kitty_state] == [(s.shapes, s.dtypes) for s in auto_state]


def test_kitty_blocks_hold_the_pages_that_cover_the_state_page(served):
    """Every block of the pool has one size: a kitty block of the fewest whole pages that cover a linear-
    attention layer's state (kitty_vllm.block_manager.mixed.fit_blocks_to_state), the state padded to it. A
    request of MAX_MODEL_LEN tokens holds one state block per linear-attention layer and, in the
    full-attention layer, its packed blocks and its staging blocks, and vLLM's maximum concurrency says so."""
    from vllm.v1.kv_cache_interface import MambaSpec

    from kitty_vllm.block_manager import KittyPackedSpec

    config = served["kitty2"]["kv_cache_config"]
    specs = [group.kv_cache_spec for group in config.kv_cache_groups]
    packed = next(spec for spec in specs if isinstance(spec, KittyPackedSpec))
    state = next(spec for spec in specs if isinstance(spec, MambaSpec))
    kitty = KittyConfig.from_preset("kitty2")
    page = MODEL["num_kv_heads"] * page_layout(kitty, MODEL["head_dim"]).page_bytes
    pages = packed.pages_per_block
    assert 1 < pages and state.real_page_size_bytes <= pages * page
    assert {spec.page_size_bytes for spec in specs} == {pages * page}
    assert packed.block_size == pages * kitty.page_size
    linear = layer_types(MODEL["family"], MODEL["num_layers"]).count("linear_attention")
    full = MODEL["num_layers"] - linear
    staging = stage_layout(kitty, MODEL["head_dim"], MODEL["num_kv_heads"], BF16_BYTES, pages)
    blocks_per_request = linear + full * (-(-MAX_MODEL_LEN // packed.block_size) + staging.blocks_needed(MAX_MODEL_LEN))
    print(f"\n{pages} pages per kitty block ({pages * page} bytes; state {state.real_page_size_bytes}), "
          f"{blocks_per_request} blocks per request; vLLM's maximum concurrency: kitty2 "
          f"{served['kitty2']['concurrency']:.2f}, auto {served['auto']['concurrency']:.2f}")
    assert served["kitty2"]["concurrency"] == pytest.approx(config.num_blocks / blocks_per_request)


def test_served_with_vllms_default_prefix_caching(model_dir, prompts):
    """Prefix caching on, as vLLM defaults: kitty turns it off for the hybrid model, with a warning, and the
    model is served (vLLM would refuse the mix of aligned Mamba state and kitty pages at start)."""
    from vllm import SamplingParams

    with vllm_engine(model_dir, kv_cache_dtype="kitty2", dtype="bfloat16", max_model_len=MAX_MODEL_LEN) as llm:
        assert not llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        outputs = llm.generate(prompt_inputs(prompts[:1]), SamplingParams(temperature=0.0, max_tokens=4),
                               use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 4


def test_under_vllm_serve(model_dir, prompts, served, oracles, tmp_path):
    """``vllm serve`` (engine and worker processes) with kitty2 as users start it, prefix caching left to
    vLLM's default (kitty turns it off): its prompt log-probabilities match the oracle as the LLM's do."""
    from server import VllmServer

    exact = KittyConfig.from_preset("kitty2").replace(exact_prefill=True).to_yaml(tmp_path / "kitty2-exact.yaml")
    args = ["--kv-cache-dtype", "kitty2", "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN),
            "--enforce-eager", "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    server = VllmServer(model_dir, args, tmp_path / "serve.log", env={"KITTY_CONFIG": str(exact),
                                                                       "VLLM_CPU_KVCACHE_SPACE": None})
    try:
        server.wait_healthy(300)
        logprobs = []
        for prompt in prompts:
            entries = server.post("/v1/completions", {"model": str(model_dir), "prompt": prompt, "max_tokens": 1,
                                                      "temperature": 0, "prompt_logprobs": 0},
                                  timeout=120)["choices"][0]["prompt_logprobs"][1:]
            logprobs += [entry[str(token)]["logprob"] for entry, token in zip(entries, prompt[1:])]
        assert "prefix caching is off for Qwen3NextForCausalLM" in server.log()
    finally:
        server.stop()
    error = float((torch.tensor(logprobs) - oracles["kitty2"]).abs().mean())
    auto_error = float((served["auto"]["logprobs"] - oracles["plain"]).abs().mean())
    assert error <= NOISE_MARGIN * auto_error
