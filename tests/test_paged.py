"""PagedKittyCache (the per-layer step the backend runs) against the reference schedule, without vLLM."""

import pytest
import torch

from kitty_vllm import reference
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import stage_layout
from kitty_vllm.paged import MixedBatch, PagedKittyCache, Span, page_table_of_blocks

CONFIG = KittyConfig(page_size=16, value_window=16, sink_tokens=4)
# Both prefill schedules (kitty_vllm.reference): the step's own tokens in full precision, and exact.
SCHEDULES = pytest.mark.parametrize("config", [CONFIG, CONFIG.replace(exact_prefill=True)], ids=["default", "exact"])
HEADS, KV_HEADS, DIM = 4, 2, 64
NUM_BLOCKS = 64


def make_cache(dtype=torch.float32, device="cpu", kernels=None, config=CONFIG, soft_cap=0.0, sinks=None, dim=DIM,
               pages_per_block=1, num_blocks=NUM_BLOCKS):
    """The cache of one layer, its tensors as vLLM views them: [NUM_BLOCKS, H, 1, page_bytes] packed blocks of one
    page, or [NUM_BLOCKS, 1, P, H * page_bytes] of P pages (KittyPackedSpec), and staging blocks as large."""
    layout = stage_layout(config, dim, KV_HEADS, torch.empty((), dtype=dtype).element_size(), pages_per_block)
    shape = ((num_blocks, KV_HEADS, 1, layout.page.page_bytes) if pages_per_block == 1
             else (num_blocks, 1, pages_per_block, KV_HEADS * layout.page.page_bytes))
    packed = torch.zeros(shape, dtype=torch.uint8, device=device)
    stage = torch.zeros(num_blocks, layout.block_bytes, dtype=torch.uint8, device=device)
    return PagedKittyCache.from_raw(config, layout, packed, stage, dtype, kernels, soft_cap, sinks), layout


def rows(layout, seed):
    """Scattered block rows of one request in each group."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(NUM_BLOCKS, generator=g)
    return ids[:20], ids[20:20 + layout.blocks_per_request]


@SCHEDULES
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("chunks", [[70], [3, 13, 16, 1, 1, 36], [1] * 40 + [30]])
def test_chunked_steps_equal_the_reference(chunks, kernels, config, kernel_device):
    """Steps of any chunking (prefill, chunked prefill, decode) attend as the reference schedule does
    for those steps, through the reference or through the quantize and prefill-attention kernels."""
    device = kernel_device if kernels else "cpu"
    cache, layout = make_cache(device=device, kernels=kernels, config=config)
    page_row, stage_row = (r.to(device) for r in rows(layout, 0))
    total = sum(chunks)
    q, k, v = torch.randn(total, HEADS, DIM), torch.randn(total, KV_HEADS, DIM), torch.randn(total, KV_HEADS, DIM)
    start = 0
    for n in chunks:
        span = slice(start, start + n)
        want = reference.reference_attention(q[span], k[:start + n], v[:start + n], config,
                                             query_positions=torch.arange(start, start + n))
        got = cache.step(q[span].to(device), k[span].to(device), v[span].to(device), start, page_row, stage_row,
                         DIM ** -0.5)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_layers_of_their_own_boost_side_by_side_in_each_block(kernels, kernel_device):
    """Per-layer boost ratios (KittyConfig.layer_boost) as vLLM's block-outermost layout binds them: one buffer
    whose blocks hold each layer's page side by side, its pages of its own size (none boosted in layer 1) and its
    staging blocks of the smallest page's tokens in the same bytes, each layer's views strided by the whole
    block. Steps of both layers on the same block rows attend as the reference of each layer's ratio."""
    device = kernel_device if kernels else "cpu"
    config = CONFIG.replace(layer_boost=(0.5, 0.0))
    layouts = [stage_layout(config.for_layer(i), DIM, KV_HEADS, 4) for i in range(2)]
    assert layouts[0].page.num_boost == 32 and layouts[1].page.num_boost == 0
    assert layouts[0].block_bytes == layouts[1].block_bytes == KV_HEADS * layouts[1].page.page_bytes
    block = sum(KV_HEADS * layout.page.page_bytes for layout in layouts)
    buffer = torch.zeros(NUM_BLOCKS * block, dtype=torch.uint8, device=device)
    caches, offset = [], 0
    for i, layout in enumerate(layouts):
        page, stage = layout.page.page_bytes, layout.block_bytes // KV_HEADS
        packed = buffer.as_strided((NUM_BLOCKS, KV_HEADS, 1, page), (block, page, page, 1), offset)
        staged = buffer.as_strided((NUM_BLOCKS, KV_HEADS, 1, stage), (block, stage, stage, 1), offset)
        caches.append(PagedKittyCache.of_layer(config.for_layer(i), DIM, KV_HEADS, packed, staged, torch.float32,
                                               kernels=kernels))
        offset += KV_HEADS * page
    assert [cache.stage_layout for cache in caches] == layouts
    assert caches[0].plan_key == caches[1].plan_key          # one store plan for both layers in a mixed step
    page_row, stage_row = (r.to(device) for r in rows(layouts[0], 0))
    chunks = [3, 13, 16, 1, 1, 36]
    inputs = [(torch.randn(sum(chunks), HEADS, DIM), torch.randn(sum(chunks), KV_HEADS, DIM),
               torch.randn(sum(chunks), KV_HEADS, DIM)) for _ in layouts]
    start = 0
    for n in chunks:
        span = slice(start, start + n)
        for i, (cache, (q, k, v)) in enumerate(zip(caches, inputs)):
            want = reference.reference_attention(q[span], k[:start + n], v[:start + n], config.for_layer(i),
                                                 query_positions=torch.arange(start, start + n))
            got = cache.step(q[span].to(device), k[span].to(device), v[span].to(device), start, page_row, stage_row,
                             DIM ** -0.5)
            torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_blocks_of_several_pages(kernels, kernel_device):
    """Blocks of 3 pages (hybrid models: kitty_vllm.block_manager.mixed.fit_blocks_to_state): the page table
    lists each block's pages (KittyMetadataBuilder.page_table); chunked steps attend as the reference does,
    and every page is packed in its block's slot."""
    device = kernel_device if kernels else "cpu"
    cache, layout = make_cache(device=device, kernels=kernels, pages_per_block=3)
    one_page = stage_layout(CONFIG, DIM, KV_HEADS, 4)
    assert layout.block_bytes == 3 * one_page.block_bytes and layout.blocks_per_request < one_page.blocks_per_request
    blocks, stage_row = rows(layout, 1)
    page_row = page_table_of_blocks(blocks[None, :7], 3, torch.empty(1, 21, dtype=blocks.dtype))[0].to(device)
    assert page_row[:6].tolist() == [int(blocks[0]) * 3, int(blocks[0]) * 3 + 1, int(blocks[0]) * 3 + 2,
                                     int(blocks[1]) * 3, int(blocks[1]) * 3 + 1, int(blocks[1]) * 3 + 2]
    q, k, v = torch.randn(100, HEADS, DIM), torch.randn(100, KV_HEADS, DIM), torch.randn(100, KV_HEADS, DIM)
    start = 0
    for n in (37, 1, 1, 45, 16):
        span = slice(start, start + n)
        want = reference.reference_attention(q[span], k[:start + n], v[:start + n], CONFIG,
                                             query_positions=torch.arange(start, start + n))
        got = cache.step(q[span].to(device), k[span].to(device), v[span].to(device), start, page_row,
                         stage_row.to(device), DIM ** -0.5)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        start += n
    # Pages 0-5 are complete: block blocks[1] holds pages 3, 4, 5, each in its own slot.
    packed = cache.packed.view(NUM_BLOCKS, 3, KV_HEADS, -1).cpu()
    for page in range(6):
        stored = packed[int(blocks[page // 3]), page % 3]
        assert stored.any() and torch.equal(stored, cache.packed[int(page_row[page])].cpu()), page


@SCHEDULES
@pytest.mark.parametrize("dim", [80, 96])
def test_padded_head_sizes_in_every_kind_of_step(dim, config, kernel_device):
    """Head sizes whose planes the kernels pad (kitty_vllm.kernels.common.padded_sizes) through the
    kernels: pages packed by the quantize kernel, the prefill kernel (exact schedule, one-token steps) and
    the dequantize kernel (the default schedule's context), against the reference."""
    cache, layout = make_cache(device=kernel_device, kernels=True, config=config, dim=dim)
    page_row, stage_row = (r.to(kernel_device) for r in rows(layout, 5))
    chunks = [21, 30, 1, 13]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(chunks), h, dim, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    start = 0
    for n in chunks:
        span = slice(start, start + n)
        want = reference.reference_attention(q[span], k[:start + n], v[:start + n], config,
                                             query_positions=torch.arange(start, start + n))
        got = cache.step(q[span].to(kernel_device), k[span].to(kernel_device), v[span].to(kernel_device), start,
                         page_row, stage_row, dim ** -0.5)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        start += n


@SCHEDULES
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_soft_cap_and_sinks_in_every_kind_of_step(kernels, config, kernel_device):
    """Gemma 2's logit soft-cap and gpt-oss's learned sinks (one head's sink outweighs its tokens) in
    prefill steps, a prefill chunk over packed pages and decodes: the prefill kernel (exact schedule,
    verification-sized steps), context_attention (default schedule), and the reference path."""
    device = kernel_device if kernels else "cpu"
    sinks = torch.tensor([-1.0, 0.5, 2.0, 6.0])
    soft_cap = 2.0
    cache, layout = make_cache(device=device, kernels=kernels, config=config, soft_cap=soft_cap,
                               sinks=sinks.to(device))
    page_row, stage_row = (r.to(device) for r in rows(layout, 4))
    chunks = [21, 2, 30, 1, 1]
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(sum(chunks), h, DIM, generator=g) * 2 for h in (HEADS, KV_HEADS, KV_HEADS))
    start = 0
    for n in chunks:
        span = slice(start, start + n)
        want = reference.reference_attention(q[span], k[:start + n], v[:start + n], config,
                                             query_positions=torch.arange(start, start + n), soft_cap=soft_cap,
                                             sinks=sinks)
        got = cache.step(q[span].to(device), k[span].to(device), v[span].to(device), start, page_row, stage_row,
                         DIM ** -0.5)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("dim", [DIM, 96])
def test_store_decode_matches_step(kernel_device, dim):
    """The decode store kernel leaves the cache exactly as per-request steps do (at head size 96 too,
    whose planes the kernel pads: kitty_vllm.kernels.common.padded_sizes)."""
    by_step, layout = make_cache(dim=dim)
    by_decode, _ = make_cache(device=kernel_device, dim=dim)
    requests = [rows(layout, seed) for seed in (1, 2, 3)]
    page_table = torch.stack([r[0] for r in requests])
    stage_table = torch.stack([r[1] for r in requests])
    lengths = [2, 14, 30]   # sinks, then a page filling at 16 and 32
    k = torch.randn(3, 40, KV_HEADS, dim)
    v = torch.randn(3, 40, KV_HEADS, dim)
    for b, n in enumerate(lengths):   # a prefill for each request, through the same step
        for cache, device in ((by_step, "cpu"), (by_decode, kernel_device)):
            cache.step(*(x.to(device) for x in (torch.zeros(n, HEADS, dim), k[b, :n], v[b, :n])), 0,
                       page_table[b].to(device), stage_table[b].to(device), 1.0)
    for t in range(5):
        seq_lens = torch.tensor(lengths) + t + 1
        for b in range(3):
            n = int(seq_lens[b])
            by_step.step(torch.zeros(1, HEADS, dim), k[b, n - 1:n], v[b, n - 1:n], n - 1, page_table[b],
                         stage_table[b], 1.0)
        last = torch.arange(3), seq_lens - 1
        by_decode.store_decode(*(x.to(kernel_device) for x in (k[last], v[last], seq_lens.int(), page_table.int(),
                                                               stage_table.int())))
    assert torch.equal(by_step.packed, by_decode.packed.cpu())
    assert torch.equal(by_step.stage, by_decode.stage.cpu())


@SCHEDULES
@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_one_prefill_for_several_requests(kernels, config, kernel_device):
    """One prefill of several requests, scattered in the batch and in every state (sinks, a page filling,
    pages filling from a ring), attends and stores exactly as one step per request."""
    device = kernel_device if kernels else "cpu"
    batched, layout = make_cache(device=device, kernels=kernels, config=config, num_blocks=4 * NUM_BLOCKS)
    alone, _ = make_cache(device=device, kernels=kernels, config=config, num_blocks=4 * NUM_BLOCKS)
    g = torch.Generator().manual_seed(7)
    page_table = torch.randperm(NUM_BLOCKS, generator=g)[:60].view(3, 20).to(device)
    stage_table = torch.randperm(NUM_BLOCKS, generator=g)[: 3 * layout.blocks_per_request].view(3, -1).to(device)
    contexts, new = [0, 10, 21], [30, 7, 40]
    q, k, v = (torch.randn(3, 80, h, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    for b, context in enumerate(contexts):      # the cached context, one step each
        for cache in (batched, alone):
            cache.step(*(x[b, :context].to(device) for x in (q, k, v)), 0, page_table[b], stage_table[b], 1.0)
    # The batch: request 2's tokens, a token of no span, request 0's, request 1's.
    order = [2, None, 0, 1]
    spans, parts, start = [], [], 0
    for b in order:
        n = 1 if b is None else new[b]
        if b is not None:
            spans.append(Span(b, start, start + n, contexts[b]))
            parts.append([x[b, contexts[b]:contexts[b] + n] for x in (q, k, v)])
        else:
            parts.append([torch.zeros(1, h, DIM) for h in (HEADS, KV_HEADS, KV_HEADS)])
        start += n
    query, key, value = (torch.cat([p[i] for p in parts]).to(device) for i in range(3))
    out = torch.full(query.shape, 7.0, device=device)
    batched.prefill(query, key, value, spans, page_table, stage_table, DIM ** -0.5, out)
    for span in spans:
        b, end = span.row, span.context + span.end - span.first
        want = reference.reference_attention(q[b, span.context:end], k[b, :end], v[b, :end], config,
                                             query_positions=torch.arange(span.context, end))
        torch.testing.assert_close(out[span.first:span.end].cpu(), want, rtol=1e-5, atol=1e-5)
        alone.step(*(x[span.first:span.end] for x in (query, key, value)), span.context, page_table[b],
                   stage_table[b], 1.0)
    gap = new[2]                             # the token of no span is left as it was
    assert torch.equal(out[gap:gap + 1].cpu(), torch.full((1, HEADS, DIM), 7.0))
    assert torch.equal(batched.packed, alone.packed)
    assert torch.equal(batched.stage, alone.stage)


def test_mixed_batch_split():
    """A mixed batch is split once per step: the requests of at most ``decode_tokens`` tokens go to the decode
    path (their rows, tokens and bounds), the rest are spans, whose lengths alone are read on the host; with 0,
    all are spans."""
    # Rows: a 3-token prefill chunk at context 5, a decode at position 9, an empty row, a 2-token verification
    # step, a decode. Only the spans' lengths are exact (a host copy that guesses the others).
    starts, seq_lens = [0, 3, 4, 4, 6, 7], [8, -1, 0, -1, -1]
    batch = MixedBatch.split(starts, torch.tensor(seq_lens), 2, torch.device("cpu"))
    assert batch.decode_rows.tolist() == [1, 3, 4] and batch.decode_tokens.tolist() == [3, 4, 5, 6]
    assert batch.decode_query_start.tolist() == [0, 1, 3, 4] and batch.decode_max_query_len == 2
    assert batch.spans == [Span(0, 0, 3, 5)]
    exact = [8, 10, 0, 20, 200]
    every = MixedBatch.split(starts, torch.tensor(exact), 0, torch.device("cpu"))
    assert every.decode_rows is None
    assert every.spans == [Span(0, 0, 3, 5), Span(1, 3, 4, 9), Span(3, 4, 6, 18), Span(4, 6, 7, 199)]


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_mixed_step_equals_the_reference(kernels, kernel_device):
    """A step of every kind of request at once (a prefill chunk, one-token decodes, a verification step
    completing a page, an empty row, padding), split as the backend splits it: every token attends as the
    reference does at its position, the padding is left alone, and the cache then holds what steps of one
    request each leave."""
    config = CONFIG.replace(draft_tokens=3)
    device = kernel_device if kernels else "cpu"
    batched, layout = make_cache(device=device, kernels=kernels, config=config, num_blocks=4 * NUM_BLOCKS)
    alone, _ = make_cache(device=device, kernels=kernels, config=config, num_blocks=4 * NUM_BLOCKS)
    contexts, lengths = [0, 30, 13, 0, 40], [37, 1, 3, 0, 1]    # request 2 fills page 0 at position 15
    g = torch.Generator().manual_seed(5)
    per_request = 4 + layout.blocks_per_request
    ids = torch.randperm(4 * NUM_BLOCKS, generator=g)[:len(contexts) * per_request].view(len(contexts), per_request).int()
    page_table, stage_table = ids[:, :4].contiguous(), ids[:, 4:].contiguous()
    sequences = [[torch.randn(c + n, h, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS)]
                 for c, n in zip(contexts, lengths, strict=True)]
    page_table, stage_table = page_table.to(device), stage_table.to(device)
    for cache in (batched, alone):
        for r, (context, (q, k, v)) in enumerate(zip(contexts, sequences, strict=True)):
            if context:
                cache.step(*(x[:context].to(device) for x in (q, k, v)), 0, page_table[r], stage_table[r], 1.0)
    padding = 2
    step = [torch.cat([x[c:] for c, x in zip(contexts, part, strict=True)] + [torch.zeros(padding, *part[0].shape[1:])])
            for part in zip(*sequences, strict=True)]
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    seq_lens = torch.tensor([c + n for c, n in zip(contexts, lengths, strict=True)], dtype=torch.int32)
    batch = MixedBatch.split(starts, seq_lens, 1 + config.draft_tokens if kernels else 0, torch.device(device))
    assert (batch.decode_rows is not None) == kernels
    out = torch.full_like(step[0], 7.0).to(device)
    batched.mixed_step(*(x.to(device) for x in step), batch, seq_lens.to(device), page_table, stage_table,
                       DIM ** -0.5, out)
    out = out.cpu()
    for r, (context, n, (q, k, v)) in enumerate(zip(contexts, lengths, sequences, strict=True)):
        if not n:
            continue
        want = reference.reference_attention(q[context:], k, v, config, query_positions=torch.arange(context, context + n))
        first = starts[r]
        torch.testing.assert_close(out[first:first + n], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"request {r}: {m}")
        alone.step(*(x[context:].to(device) for x in (q, k, v)), context, page_table[r], stage_table[r], 1.0)
    assert torch.equal(out[-padding:], torch.full((padding, HEADS, DIM), 7.0))
    assert torch.equal(batched.packed, alone.packed)


def test_a_row_shorter_than_its_step_stores_no_negative_position(kernel_device):
    """vLLM's dummy batches, as CUDA graphs of verification steps are captured, give rows of 1 + k tokens a
    seq_len shorter than that. The decode path stores and attends only their tokens at positions from 0 (the
    step's last seq_len tokens): a negative position would write into the block before the row's table (on a
    GPU, at an illegal address). The other rows attend and are stored as ever."""
    config = CONFIG.replace(draft_tokens=3)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(8, h, DIM, generator=g).to(kernel_device) for h in (HEADS, KV_HEADS, KV_HEADS))
    query_start = torch.tensor([0, 4, 8], dtype=torch.int32, device=kernel_device)
    stored = []
    for seq_lens in ([4, 2], [4, 0]):     # the second row a dummy, or padding
        cache, layout = make_cache(device=kernel_device, kernels=True, config=config)
        ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(0)).int().to(kernel_device)
        tables = ids[:2 * (2 + layout.blocks_per_request)].view(2, -1)
        out = torch.zeros(8, HEADS, DIM, device=kernel_device)
        cache.decode(q, k, v, query_start, torch.tensor(seq_lens, dtype=torch.int32, device=kernel_device), 4,
                     tables[:, :2].contiguous(), tables[:, 2:].contiguous(), DIM ** -0.5, out)
        want = reference.reference_attention(q[:4].cpu(), k[:4].cpu(), v[:4].cpu(), config,
                                             query_positions=torch.arange(4))
        torch.testing.assert_close(out[:4].cpu(), want, rtol=1e-4, atol=1e-5)
        assert torch.equal(out[4:6].cpu(), torch.zeros(2, HEADS, DIM))   # the dummy row's tokens before position 0
        row = tables[0].long()
        stored.append((cache.packed[row[:2]].cpu(), cache.stage[row[2:]].cpu()))
    for dummy, padding in zip(*stored, strict=True):
        assert torch.equal(dummy, padding)


def test_prefill_blocks_cover_every_token_once():
    """Query blocks: each span's tokens exactly once, in order, none crossing a page or longer than a
    block (64 query rows: 16 positions of a 4-head GQA group)."""
    from kitty_vllm.kernels import prefill_blocks

    spans = [(0, 0, 300, 5), (2, 300, 301, 77), (1, 301, 400, 128)]
    blocks = prefill_blocks(spans, 128, 32, 8)
    covered = []
    for row, first, position, count, context in blocks.tolist():
        span = next(s for s in spans if s[0] == row)
        assert (span[1], span[3]) == (first - position + context, context) and 1 <= count <= 16
        assert position // 128 == (position + count - 1) // 128
        covered += range(first, first + count)
    assert covered == list(range(400))


@pytest.mark.cuda
@pytest.mark.parametrize("softmax", [{}, {"soft_cap": 2.0, "sinks": [-1.0, 0.5, 2.0, 6.0]}],
                         ids=["plain", "soft_cap_and_sinks"])
@pytest.mark.parametrize("chunks", [[70], [40, 30], [21, 43, 2, 50]])
def test_bf16_prefill_with_flash_attention(chunks, softmax):
    """On a GPU in bfloat16 a step of several tokens goes through vLLM's FlashAttention over its
    context dequantized to bfloat16 (context_attention; soft-cap as ``softcap``, sinks as ``s_aux`` in
    the model dtype, as vLLM's own backend passes them): the same as the float32 path on the same
    bfloat16 inputs, to bfloat16 rounding."""
    pytest.importorskip("vllm")
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        sinks = torch.tensor(softmax["sinks"], dtype=dtype, device="cuda") if "sinks" in softmax else None
        cache, layout = make_cache(dtype=dtype, device="cuda", kernels=True, soft_cap=softmax.get("soft_cap", 0.0),
                                   sinks=sinks)
        page_row, stage_row = (r.cuda() for r in rows(layout, 0))
        g = torch.Generator().manual_seed(3)
        total = sum(chunks)
        q, k, v = (torch.randn(total, h, DIM, generator=g).to(torch.bfloat16).to(dtype).cuda()
                   for h in (HEADS, KV_HEADS, KV_HEADS))
        outs, start = [], 0
        for n in chunks:
            outs.append(cache.step(q[start:start + n], k[start:start + n], v[start:start + n], start, page_row,
                                   stage_row, DIM ** -0.5))
            start += n
        results[dtype] = torch.cat(outs)
    torch.testing.assert_close(results[torch.bfloat16], results[torch.float32], rtol=2e-2, atol=2e-2)
