"""PagedKittyCache (the per-layer step the backend runs) against the reference schedule, without vLLM."""

import pytest
import torch

from kitty_vllm import reference
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import stage_layout
from kitty_vllm.paged import PagedKittyCache

CONFIG = KittyConfig(page_size=16, value_window=16, sink_tokens=4)
HEADS, KV_HEADS, DIM = 4, 2, 64
NUM_BLOCKS = 64


def make_cache(dtype=torch.float32, device="cpu", kernels=None):
    layout = stage_layout(CONFIG, DIM, KV_HEADS, torch.empty((), dtype=dtype).element_size())
    packed = torch.zeros(NUM_BLOCKS, KV_HEADS, layout.page.page_bytes, dtype=torch.uint8, device=device)
    stage = torch.zeros(NUM_BLOCKS, layout.block_bytes, dtype=torch.uint8, device=device)
    return PagedKittyCache.from_raw(CONFIG, layout, packed, stage, dtype, kernels), layout


def rows(layout, seed):
    """Scattered block rows of one request in each group."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(NUM_BLOCKS, generator=g)
    return ids[:20], ids[20:20 + layout.blocks_per_request]


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("chunks", [[70], [3, 13, 16, 1, 1, 36], [1] * 40 + [30]])
def test_chunked_steps_equal_the_reference(chunks, kernels, kernel_device):
    """Steps of any chunking (prefill, chunked prefill, decode) attend as the reference schedule does,
    through the reference or through the quantize and prefill-attention kernels."""
    device = kernel_device if kernels else "cpu"
    cache, layout = make_cache(device=device, kernels=kernels)
    page_row, stage_row = (r.to(device) for r in rows(layout, 0))
    total = sum(chunks)
    q, k, v = torch.randn(total, HEADS, DIM), torch.randn(total, KV_HEADS, DIM), torch.randn(total, KV_HEADS, DIM)
    want = reference.reference_attention(q, k, v, CONFIG, query_positions=torch.arange(total))
    start = 0
    for n in chunks:
        span = slice(start, start + n)
        got = cache.step(q[span].to(device), k[span].to(device), v[span].to(device), start, page_row, stage_row,
                         DIM ** -0.5)
        torch.testing.assert_close(got.cpu(), want[span], rtol=1e-5, atol=1e-5)
        start += n


def test_store_decode_matches_step(kernel_device):
    """The decode store kernel leaves the cache exactly as per-request steps do."""
    by_step, layout = make_cache()
    by_decode, _ = make_cache(device=kernel_device)
    requests = [rows(layout, seed) for seed in (1, 2, 3)]
    page_table = torch.stack([r[0] for r in requests])
    stage_table = torch.stack([r[1] for r in requests])
    lengths = [2, 14, 30]   # sinks, then a page filling at 16 and 32
    k = torch.randn(3, 40, KV_HEADS, DIM)
    v = torch.randn(3, 40, KV_HEADS, DIM)
    for b, n in enumerate(lengths):   # a prefill for each request, through the same step
        for cache, device in ((by_step, "cpu"), (by_decode, kernel_device)):
            cache.step(*(x.to(device) for x in (torch.zeros(n, HEADS, DIM), k[b, :n], v[b, :n])), 0,
                       page_table[b].to(device), stage_table[b].to(device), 1.0)
    for t in range(5):
        seq_lens = torch.tensor(lengths) + t + 1
        for b in range(3):
            n = int(seq_lens[b])
            by_step.step(torch.zeros(1, HEADS, DIM), k[b, n - 1:n], v[b, n - 1:n], n - 1, page_table[b],
                         stage_table[b], 1.0)
        last = torch.arange(3), seq_lens - 1
        by_decode.store_decode(*(x.to(kernel_device) for x in (k[last], v[last], seq_lens.int(), page_table.int(),
                                                               stage_table.int())))
    assert torch.equal(by_step.packed, by_decode.packed.cpu())
    assert torch.equal(by_step.stage, by_decode.stage.cpu())
