"""The tiny test model and the transformers kitty oracle (tests/tiny_model.py, kitty_vllm/tools/oracle.py). CPU only."""

import hashlib

import pytest
import torch

from kitty_vllm.tools.assets import token_windows
from kitty_vllm.config import KittyConfig
from kitty_vllm.tools.oracle import kitty_greedy, kitty_logits, load_model
from tiny_model import build_tiny_model

# Small pages so that a ~60-token prompt crosses several page boundaries; EXACT reads the cache as
# decoding would in every step, SMALL_PAGES (the presets' mode) reads each step's own tokens in full.
SMALL_PAGES = KittyConfig(page_size=16, sink_tokens=4, value_window=16)
EXACT = SMALL_PAGES.replace(exact_prefill=True)
PROMPT_LEN, NEW_TOKENS = 60, 20


@pytest.fixture(scope="module")
def model_dir():
    return build_tiny_model()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Three real-text prompts of PROMPT_LEN tokens: BOS + essay tokens."""
    return [[tokenizer.bos_token_id] + w for w in token_windows(tokenizer, 3, PROMPT_LEN - 1)]


def test_tiny_model_builds_loads_and_is_not_degenerate(model_dir, tokenizer, prompts, tmp_path):
    assert build_tiny_model() == model_dir                     # cached: same directory, not rebuilt
    model = load_model(model_dir, "sdpa")
    config = model.config
    assert (config.head_dim, config.num_key_value_heads, config.num_attention_heads,
            config.num_hidden_layers, config.hidden_size) == (64, 2, 4, 2, 128)
    assert model.dtype == torch.float32 and config.max_position_embeddings == 4096
    assert 900 <= config.vocab_size <= 1100 and len(tokenizer) == config.vocab_size
    text = "Startups are hard."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == config.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) - 1 <= len(text) // 2                      # the BPE really merges

    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=48, min_new_tokens=48,
                             do_sample=False)[0, len(prompt):].tolist()
        assert len(set(out)) >= 24, out
        assert len(set(out[24:])) >= 8, out                    # no collapse into a short cycle

    # Building is deterministic: the same parameters give the same weights and tokenizer elsewhere.
    again = build_tiny_model(tmp_path / "copy")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (again, model_dir)]
        assert digest[0] == digest[1], name


def test_plain_oracle_equals_generate(model_dir, prompts):
    tokens, logits = kitty_greedy(model_dir, prompts, NEW_TOKENS, None, return_logits=True)
    plain = load_model(model_dir, "sdpa")
    for prompt, new, step_logits in zip(prompts, tokens, logits):
        ids = torch.tensor([prompt])
        expected = plain.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False)[0, len(prompt):].tolist()
        assert new == expected
        with torch.no_grad():
            full = plain(torch.tensor([prompt + new])).logits[0]
        reference = full[len(prompt) - 1:len(prompt) - 1 + NEW_TOKENS]
        torch.testing.assert_close(step_logits, reference, atol=1e-4, rtol=0)


def test_kitty_oracle_quantizes_and_is_deterministic(model_dir, prompts):
    tokens, logits = kitty_greedy(model_dir, prompts, NEW_TOKENS, EXACT, return_logits=True)
    _, plain_logits = kitty_greedy(model_dir, prompts, NEW_TOKENS, None, return_logits=True)
    for kitty_step, plain_step in zip(logits, plain_logits):
        assert (kitty_step[0] - plain_step[0]).abs().max() > 1e-2     # quantization is applied
    tokens_again, logits_again = kitty_greedy(model_dir, prompts, NEW_TOKENS, EXACT,
                                              return_logits=True)
    assert tokens_again == tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, logits_again))

    # Before the first page fills, kitty attention is plain attention, bit for bit.
    short = [p[:SMALL_PAGES.page_size - 1] for p in prompts]
    _, kitty_short = kitty_greedy(model_dir, short, 1, EXACT, return_logits=True)
    _, plain_short = kitty_greedy(model_dir, short, 1, None, return_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(kitty_short, plain_short))


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_exact_prefill_and_decode_see_the_same_cache(prompts, chunk_size):
    """With exact_prefill, logits of one prefill == chunked prefill == token-by-token decoding.

    One layer in float64 makes K/V bit-identical across the paths once rounded to the float32 the
    reference quantizes. (With float32 projections, or K/V that come after a quantized layer, the
    paths' K differ by ~1e-6; that can move a float16 min/scale by one ulp or a code across a
    rounding boundary, giving logit differences of 1e-4..1e-1 even though the schedule is the same.)
    """
    one_layer = build_tiny_model(num_layers=1)
    sequence = prompts[0] + prompts[1][1:21]                      # 80 tokens: 5 pages
    whole = kitty_logits(one_layer, sequence, EXACT, dtype=torch.float64)
    chunked = kitty_logits(one_layer, sequence, EXACT, chunk_size=chunk_size, dtype=torch.float64)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)
    # The schedule matters at these positions: plain attention is far away.
    plain = kitty_logits(one_layer, sequence, None, dtype=torch.float64)
    assert (plain[SMALL_PAGES.page_size:] - whole[SMALL_PAGES.page_size:]).abs().max() > 1e-2


def test_default_mode_reads_each_step_in_full_precision(prompts):
    """Without exact_prefill the tokens of one forward call read each other in full precision: one
    prefill of the whole sequence is plain attention, bit for bit. Fed in page-sized steps, a query
    reads the pages before its step quantized and its own page in full precision; under exact_prefill
    it reads its window (the newest value_window tokens) in full precision instead. The two agree on
    the first page and at each page's last query, whose window is its own page. One float64 layer, as
    above, so that each position's logits depend on its own query's attention only.
    """
    one_layer = build_tiny_model(num_layers=1)
    sequence = prompts[0] + prompts[1][1:21]
    page = SMALL_PAGES.page_size
    assert SMALL_PAGES.value_window == page
    whole = kitty_logits(one_layer, sequence, SMALL_PAGES, dtype=torch.float64)
    assert torch.equal(whole, kitty_logits(one_layer, sequence, None, dtype=torch.float64))
    paged = kitty_logits(one_layer, sequence, SMALL_PAGES, chunk_size=page, dtype=torch.float64)
    exact = kitty_logits(one_layer, sequence, EXACT, dtype=torch.float64)
    position = torch.arange(len(sequence))
    same = (position < page) | (position % page == page - 1)
    torch.testing.assert_close(paged[same], exact[same], atol=1e-4, rtol=0)
    assert ((paged - exact)[~same].abs().amax(dim=-1) > 1e-2).all()
