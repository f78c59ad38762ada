"""The start-up warm-up (kitty_vllm.warmup): it runs every kernel path of a step, and on a GPU, after it, no
step of any shape compiles a kernel (what vLLM's JIT monitor would report as a user's request compiling)."""

from __future__ import annotations

import random
from unittest import mock

import pytest
import torch

from kitty_vllm import kernels
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout
from kitty_vllm.paged import MixedBatch
from kitty_vllm.warmup import DECODE_WIDTHS, SCRATCH_BLOCKS, CacheGeometry, WarmupKey, scratch_cache, warm_up

SMALL = KittyConfig(page_size=16, value_window=16, sink_tokens=4)
KITTY2 = KittyConfig.from_preset("kitty2")


def key_of(config: KittyConfig, *, heads: int = 4, kv_heads: int = 2, dim: int = 64, dtype=torch.float32,
           padding: int = 0, pages_per_block: int = 1, soft_cap: bool = False, sinks: bool = False) -> WarmupKey:
    """A layer's WarmupKey, its caches laid out as vLLM binds them, each block ``padding`` bytes larger than its
    pages (a pool shared with other layers)."""
    page_bytes = page_layout(config, dim).page_bytes
    content = pages_per_block * kv_heads * page_bytes
    blocks = torch.zeros(2, content + padding, dtype=torch.uint8)[:, :content]
    packed = (blocks.view(2, 1, pages_per_block, kv_heads * page_bytes) if pages_per_block > 1
              else blocks.view(2, kv_heads, 1, page_bytes))
    stage = blocks.view(2, kv_heads, 1, pages_per_block * page_bytes)
    return WarmupKey(config, heads, kv_heads, dim, dtype, soft_cap, torch.float32 if sinks else None,
                     CacheGeometry.of(packed), CacheGeometry.of(stage))


PATHS = ("store_decode", "quantize_pages", "dequantize_pages", "prefill_attention", "decode_attention")


@pytest.mark.parametrize("key, paths", [
    (key_of(SMALL), {"store_decode", "quantize_pages", "dequantize_pages", "decode_attention"}),
    (key_of(SMALL.replace(exact_prefill=True), padding=48, soft_cap=True),
     {"store_decode", "quantize_pages", "prefill_attention", "decode_attention"}),
    (key_of(SMALL.replace(draft_tokens=3), pages_per_block=2, sinks=True),
     {"store_decode", "quantize_pages", "dequantize_pages", "decode_attention"}),
], ids=["kitty", "exact-prefill-padded-soft-cap", "drafts-blocks-of-pages-sinks"])
def test_warm_up_runs_every_path_of_a_step(key, paths, kernel_device):
    """The warm-up's launches: the page store, packing, the reads of packed pages (dequantized, or through the
    prefill kernel with exact_prefill), and decode attention at every page-table width."""
    calls = {}
    real = {name: getattr(kernels, name) for name in PATHS}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            if name == "decode_attention":
                calls.setdefault("widths", set()).add(args[3].shape[1])
            return real[name](*args, **kwargs)
        return call

    zeros = CacheGeometry.zeros
    blocks = []

    def scratch(geometry, num_blocks, device):
        blocks.append(num_blocks)
        return zeros(geometry, num_blocks, device)

    with mock.patch.multiple(kernels, **{name: counting(name) for name in PATHS}), \
            mock.patch.object(CacheGeometry, "zeros", scratch):
        warm_up(key, kernel_device)
    assert {name for name in PATHS if calls.get(name)} == paths
    assert calls["widths"] >= set(DECODE_WIDTHS)
    # A few blocks whatever the tables' widths: a block as vLLM binds it may hold every layer's page.
    assert blocks == [SCRATCH_BLOCKS, SCRATCH_BLOCKS]


@pytest.mark.cuda
@pytest.mark.parametrize("key", [
    key_of(KITTY2, heads=32, kv_heads=8, dim=128, dtype=torch.bfloat16),
    key_of(KITTY2.replace(draft_tokens=3), heads=16, kv_heads=2, dim=64, dtype=torch.bfloat16),
    key_of(KITTY2.replace(exact_prefill=True), heads=8, kv_heads=8, dim=128, dtype=torch.float16, padding=4096,
           soft_cap=True, sinks=True),
], ids=["kitty2-gqa4-128", "kitty2-drafts-gqa8-64", "exact-prefill-mha-soft-cap-sinks"])
def test_no_compile_after_warm_up(key):
    """After warm_up, steps of random shapes (batch sizes, prompt lengths, chunks, page-table widths, mixed
    batches' gathered rows) on a cache of another size compile nothing."""
    import triton

    warm_up(key, "cuda")
    compiled = []
    previous = triton.knobs.runtime.jit_post_compile_hook

    def hook(**kwargs):
        compiled.append(kwargs.get("repr") or getattr(kwargs.get("fn"), "name", "?"))
        return previous(**kwargs) if previous else None

    triton.knobs.runtime.jit_post_compile_hook = hook
    try:
        random_steps(key, random.Random(0))
    finally:
        triton.knobs.runtime.jit_post_compile_hook = previous
    assert not compiled, "\n".join(compiled)


def random_steps(key: WarmupKey, rng: random.Random) -> None:
    """Prefills and decodes of random shapes through PagedKittyCache, as the backend runs them."""
    config, page = key.config, key.config.page_size
    rows, width = 40, 300
    blocks_per_request = key.stage_layout.blocks_per_request
    cache = scratch_cache(key, "cuda", rows * width + 7, rows * blocks_per_request + 3)
    page_table = torch.randperm(rows * width, device="cuda").view(rows, width).int()
    stage_table = torch.randperm(rows * blocks_per_request, device="cuda").view(rows, -1).int()
    scale = key.head_dim ** -0.5

    def tokens(n):
        q = torch.randn(n, key.num_heads, key.head_dim, dtype=key.dtype, device="cuda")
        k, v = torch.randn(2, n, key.num_kv_heads, key.head_dim, dtype=key.dtype, device="cuda")
        return q, k, v, torch.empty_like(q)

    for _ in range(12):
        # A mixed batch (prefill chunks, one-token decodes, verification steps), split as the backend splits it.
        chosen = rng.sample(range(rows), rng.randint(1, 8))
        lengths = [rng.choice([1, 1 + config.draft_tokens, rng.randint(2, 5 * page), rng.randint(2, 40 * page)])
                   for _ in chosen]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        seq_lens = torch.zeros(rows, dtype=torch.int32)
        for row, n in zip(chosen, lengths):
            seq_lens[row] = n + rng.choice([0, rng.randint(0, 100 * page)])
        seq_lens = seq_lens[chosen]
        batch = MixedBatch.split(starts, seq_lens, 1 + config.draft_tokens, torch.device("cuda"))
        query, new_key, new_value, out = tokens(starts[-1])
        cache.mixed_step(query, new_key, new_value, batch, seq_lens.cuda(), page_table[chosen], stage_table[chosen],
                         scale, out)
        # A decode-only batch, and one of verification steps.
        batch = rng.choice([1, 3, 17, 64, 255])
        requests = torch.randint(0, rows, (batch,), device="cuda")
        q, k, v, out = tokens(batch * (1 + config.draft_tokens))
        seq_lens = torch.randint(1, (width - 1) * page, (batch,), dtype=torch.int32, device="cuda")
        cache.decode(q, k, v, torch.arange(batch + 1, dtype=torch.int32, device="cuda"), seq_lens, 1,
                     page_table[requests], stage_table[requests], scale, out)
        if config.draft_tokens:
            starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * (1 + config.draft_tokens)
            cache.decode(q, k, v, starts, seq_lens + config.draft_tokens, 1 + config.draft_tokens,
                         page_table[requests], stage_table[requests], scale, out)


def test_every_layer_of_an_engine_has_the_key_of_its_caches(kernel_device):
    """In a vLLM engine, kitty's layers share one WarmupKey, taken from the caches vLLM bound to them, and the
    warm-up runs over a scratch cache of that geometry."""
    from engine import vllm_engine
    from tiny_model import build_tiny_model

    from kitty_vllm.backend import KittyAttentionImpl

    with vllm_engine(build_tiny_model(), kv_cache_dtype="kitty2", dtype="float32", max_model_len=512) as llm:
        context = llm.llm_engine.vllm_config.compilation_config.static_forward_context
        layers = [layer for layer in context.values() if isinstance(getattr(layer, "impl", None), KittyAttentionImpl)]
        keys = {WarmupKey.of_layer(layer) for layer in layers}
        assert len(layers) == 2 and len(keys) == 1
        (key,) = keys
        assert key.packed == CacheGeometry.of(layers[0].kv_cache)
        assert key.stage == CacheGeometry.of(layers[0].kitty_stage.kv_cache)
        assert key.config == KittyConfig.from_preset("kitty2") and key.dtype == torch.float32
    warm_up(key, kernel_device)
