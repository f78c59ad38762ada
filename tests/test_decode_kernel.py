"""The paged decode kernel against reference.schedule_attention at the new token's position.

Each request's cache is filled by the real store path, ``PagedKittyCache.step`` (a prefill of n - 1
tokens, then the decode token), into scattered packed and staging blocks; the blocks a request does not
own hold NaN, so a read outside the schedule shows. The kernel's math is float32, so it must match the
float32 reference to rounding whatever the model dtype: the reference reads the same float16/bfloat16
values, widened. Only the output's own rounding (when written in the model dtype) loosens the tolerance.
"""

import pytest
import torch

from kitty_vllm import reference as R
from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels import attention, decode_attention
from kitty_vllm.layout import page_layout, stage_layout
from kitty_vllm.paged import PagedKittyCache

HEAD_DIMS = [64, 128, 256]
PRESETS = ["kitty2", "kitty2-lite", "kivi2"]
# (query heads, KV heads): GQA groups of 1, 2 and 4 (the kernel stacks the parts of its operands in
# the rows of one dot) and 8 (one dot per part).
HEAD_PAIRS = [(2, 2), (4, 2), (8, 2), (16, 2)]
# Small pages keep the interpreter fast; the schedule is the same at any size.
SMALL = dict(page_size=16, value_window=16, sink_tokens=4)
# One decode batch that meets every segment boundary of the schedule (page 16, 4 sinks): the first
# token, inside the sinks, the last sink, the first ring token, inside page 0, page 0 just packed,
# several pages with one just packed, several pages plus a partly filled ring.
DECODE_BATCH = [1, 3, 4, 5, 11, 16, 48, 71]
# Enough of it for the page contents that presets and head sizes change: sinks only, page 0 (with its
# sinks skipped) just packed, two pages and a ring.
PAGE_BATCH = [3, 16, 37]
# The output's own rounding: half an ulp of the model dtype, relative.
OUTPUT_RTOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ATOL = 1e-5


def small_config(preset: str) -> KittyConfig:
    return KittyConfig.from_preset(preset).replace(**SMALL)


def build_batch(config, seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, seed=0,
                spare_blocks=3, soft_cap=0.0, sinks=None):
    """Store random sequences through PagedKittyCache.step into scattered blocks. Returns the kernel's
    arguments, the reference output [B, Hq, D] (float32, from schedule_attention) and the step's, both
    with the layer's ``soft_cap`` and ``sinks`` (float32 [Hq] on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    layout = stage_layout(config, head_dim, num_kv_heads, torch.empty((), dtype=dtype).element_size())
    page = config.page_size
    num_pages = sum(n // page for n in seq_lens) + spare_blocks
    num_stage = len(seq_lens) * layout.blocks_per_request + spare_blocks
    packed = torch.full((num_pages, num_kv_heads, layout.page.page_bytes), 0xFF, dtype=torch.uint8,
                        device=device)                                   # 0xFF: NaN scales and minima
    stage_raw = torch.full((num_stage, layout.block_bytes // 2), 0x7FFF, dtype=torch.int16, device=device)
    stage_raw = stage_raw.view(torch.uint8)                              # NaN in float16/bfloat16/float32
    cache = PagedKittyCache.from_raw(config, layout, packed, stage_raw, dtype, soft_cap=soft_cap,
                                     sinks=None if sinks is None else sinks.to(device))

    max_pages = max(1, max(n // page for n in seq_lens))
    page_ids = torch.randperm(num_pages, generator=g).int()
    stage_ids = torch.randperm(num_stage, generator=g).int()
    page_table = page_ids[-1].repeat(len(seq_lens), max_pages)          # unused entries: a spare block
    stage_table = stage_ids.narrow(0, 0, len(seq_lens) * layout.blocks_per_request).view(len(seq_lens), -1)
    query = torch.empty(len(seq_lens), num_heads, head_dim, dtype=dtype)
    want, stepped = torch.empty(query.shape), torch.empty(query.shape)
    used = 0
    for b, n in enumerate(seq_lens):
        page_table[b, : n // page] = page_ids[used: used + n // page]
        used += n // page
        magnitude = torch.ones(head_dim)
        magnitude[torch.randperm(head_dim, generator=g)[: head_dim // 16]] = 10.0
        keys = ((torch.randn(n, num_kv_heads, head_dim, generator=g) + 0.3) * magnitude).to(dtype)
        keys[: config.sink_tokens] *= 5                                 # sinks must not disturb page 0
        values = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        query[b] = torch.randn(num_heads, head_dim, generator=g).to(dtype)
        scale = head_dim ** -0.5
        rows = page_table[b].to(device), stage_table[b].to(device)
        if n > 1:
            q_prefill = torch.zeros(n - 1, num_heads, head_dim, dtype=dtype, device=device)
            cache.step(q_prefill, keys[:-1].to(device), values[:-1].to(device), 0, *rows, scale)
        stepped[b] = cache.step(query[b: b + 1].to(device), keys[-1:].to(device), values[-1:].to(device),
                                n - 1, *rows, scale)[0].cpu()
        keys_q, values_q = reference_pages(keys, values, packed, page_table[b], config)
        want[b] = R.schedule_attention(query[b: b + 1], keys, values, keys_q, values_q,
                                       torch.tensor([n - 1]), config, scale, soft_cap, sinks)[0]
    args = (query.to(device), packed, cache.stage, page_table.to(device), stage_table.to(device),
            torch.tensor(seq_lens, dtype=torch.int32, device=device), config, layout, head_dim ** -0.5)
    return args, want, stepped


def reference_pages(keys, values, packed, page_row, config):
    """keys_q / values_q for schedule_attention: the request's stored pages, dequantized by the
    reference. On the CPU the store path packs with reference.quantize_page, so this is exactly
    reference.quantized_sequence; on a GPU the store kernel may round a code on a rounding boundary the
    other way (tests/test_kernels.py), which is the store's business, not this kernel's."""
    keys_q, values_q = R.quantized_sequence(keys, values, config)
    full = keys.shape[0] // config.page_size * config.page_size
    if full and packed.is_cuda:
        stored = packed[page_row[: full // config.page_size].long().to(packed.device)].cpu()
        stored_keys, stored_values = R.dequantize_pages(stored, config, keys.shape[-1])
        keys_q[:full], values_q[:full] = stored_keys.flatten(0, 1), stored_values.flatten(0, 1)
    return keys_q, values_q


def check(config, head_pair, head_dim, dtype, device, seq_lens=DECODE_BATCH, seed=0, out_dtype=None,
          soft_cap=0.0, sinks=None):
    """Kernel against the reference; ``out_dtype`` float32 keeps the kernel's float32 result, which
    must then match tightly whatever the model dtype. ``soft_cap`` and ``sinks``: the layer's softmax
    options (reference.schedule_attention)."""
    args, want, stepped = build_batch(config, seq_lens, *head_pair, head_dim, dtype, device, seed,
                                      soft_cap=soft_cap, sinks=sinks)
    torch.testing.assert_close(stepped, want, rtol=1e-4, atol=ATOL)     # the store path's own attention
    out = None if out_dtype is None else torch.empty_like(args[0], dtype=out_dtype)
    got = decode_attention(*args, out=out, soft_cap=soft_cap, sinks=None if sinks is None else sinks.to(device))
    assert got.dtype == (out_dtype or dtype) and got.shape == want.shape
    torch.testing.assert_close(got.cpu().float(), want, rtol=OUTPUT_RTOL[got.dtype], atol=ATOL)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_presets(kernel_device, head_dim, preset):
    check(small_config(preset), (4, 2), head_dim, torch.bfloat16, kernel_device, seq_lens=PAGE_BATCH,
          out_dtype=torch.float32)


@pytest.mark.parametrize("head_dim, preset", [(80, "kitty2"), (96, "kitty2"), (96, "kitty2-lite"), (112, "kivi2"),
                                               (160, "kitty2"), (192, "kitty2")])
def test_decode_padded_head_sizes(kernel_device, head_dim, preset):
    """Head sizes whose planes and boosted ranks the kernel pads to powers of two
    (kitty_vllm.kernels.common.padded_sizes), split over two programs, merged into the true head size."""
    check(small_config(preset), (4, 2), head_dim, torch.bfloat16, kernel_device, seq_lens=PAGE_BATCH,
          out_dtype=torch.float32)


@pytest.mark.parametrize("head_pair", HEAD_PAIRS)
def test_decode_gqa_groups(kernel_device, head_pair):
    check(small_config("kitty2"), head_pair, 128, torch.float32, kernel_device, seed=1)


@pytest.mark.parametrize("dtype, head_dim", [(torch.float16, 64), (torch.bfloat16, 64), (torch.bfloat16, 96)])
def test_decode_output_in_model_dtype(kernel_device, dtype, head_dim):
    check(small_config("kitty2-lite"), (8, 2), head_dim, dtype, kernel_device, seed=2)


def test_decode_without_sinks(kernel_device):
    config = KittyConfig.from_preset("kitty2").replace(**{**SMALL, "sink_tokens": 0})
    check(config, (4, 2), 64, torch.float16, kernel_device, seq_lens=[1, 15, 16, 17, 40], seed=3,
          out_dtype=torch.float32)


def test_decode_full_size_preset(kernel_device):
    """kitty2 as shipped: 128-token pages, 32 sinks, 16-token sink blocks, 20-token ring blocks."""
    check(KittyConfig.from_preset("kitty2"), (2, 1), 128, torch.bfloat16, kernel_device,
          seq_lens=[20, 128, 300], seed=4, out_dtype=torch.float32)


def test_decode_merges_more_splits_than_it_reads_at_once(kernel_device, monkeypatch):
    """One long request split over more programs (71, one per page) than the merge reads at a time
    (MERGE_SPLIT_ROWS, 32): every split counts, once."""
    monkeypatch.setattr(attention, "PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(attention, "MAX_SPLITS", 80)
    check(small_config("kitty2"), (2, 2), 64, torch.float32, kernel_device, seq_lens=[16 * 70 + 5], seed=5)


@pytest.mark.parametrize("soft_cap, with_sinks", [(3.0, False), (0.0, True), (3.0, True)],
                         ids=["soft_cap", "sinks", "both"])
@pytest.mark.parametrize("head_pair", [(4, 2), (16, 2)])
def test_decode_soft_cap_and_sinks(kernel_device, monkeypatch, head_pair, soft_cap, with_sinks):
    """Gemma 2's soft-cap on every score (sinks, packed pages, ring) and gpt-oss's learned sinks, which
    some heads' rows weigh more than all their tokens: each sink counts once per row, however many splits
    (four here, some of them empty for the shorter requests) read the pages, and rows of stacked (4 KV
    heads' GQA group of 2) and unstacked (8) part slots alike."""
    monkeypatch.setattr(attention, "PROGRAMS_PER_SM", 16)
    sinks = torch.linspace(-2.0, 5.0, head_pair[0]) if with_sinks else None
    check(small_config("kitty2"), head_pair, 64, torch.bfloat16, kernel_device, seed=6, out_dtype=torch.float32,
          soft_cap=soft_cap, sinks=sinks)


def test_decode_rejects_bad_arguments(kernel_device):
    config = small_config("kitty2")
    args, _, _ = build_batch(config, [5, 20], 4, 2, 64, torch.float16, kernel_device)
    query, packed, stage, page_table, stage_table, seq_lens, _, layout, scale = args
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(query[:, :3], packed, stage, page_table, stage_table, seq_lens, config, layout,
                         scale)
    with pytest.raises(ValueError, match="expected stage"):
        decode_attention(query.float(), packed, stage, page_table, stage_table, seq_lens, config, layout,
                         scale)
    with pytest.raises(ValueError, match="page_table must be int32"):
        decode_attention(query, packed, stage, page_table.long(), stage_table, seq_lens, config, layout,
                         scale)
    with pytest.raises(ValueError, match="seq_lens must be"):
        decode_attention(query, packed, stage, page_table, stage_table, seq_lens[:1], config, layout, scale)
    with pytest.raises(ValueError, match="stage_layout is for"):
        decode_attention(query, packed, stage, page_table, stage_table, seq_lens, config,
                         stage_layout(config, 64, 1, 2), scale)
    with pytest.raises(ValueError, match=r"sinks must be one contiguous float logit per query head, \[4\]"):
        decode_attention(query, packed, stage, page_table, stage_table, seq_lens, config, layout, scale,
                         sinks=torch.zeros(2, device=query.device))
    with pytest.raises(ValueError, match="soft_cap must be positive"):
        decode_attention(query, packed, stage, page_table, stage_table, seq_lens, config, layout, scale,
                         soft_cap=-1.0)


@pytest.mark.cuda
def test_decode_block_offsets_beyond_int32():
    """A request whose packed page and staging blocks sit past 2**31 bytes / elements is read there."""
    config = KittyConfig.from_preset("kitty2")
    head_dim, n = 64, 128 + 40
    dtype, device = torch.float16, "cuda"
    layout = stage_layout(config, head_dim, 1, 2)
    small_args, want, _ = build_batch(config, [n], 1, 1, head_dim, dtype, device)
    query, packed_small, stage_small, page_table, stage_table, seq_lens, _, _, scale = small_args
    num_pages = 2 ** 31 // layout.page.page_bytes + 2
    num_stage = 2 ** 31 // (layout.block_bytes // 2) + layout.blocks_per_request + 2
    packed = torch.full((num_pages, 1, layout.page.page_bytes), 0xFF, dtype=torch.uint8, device=device)
    stage_raw = torch.zeros(num_stage, layout.block_bytes, dtype=torch.uint8, device=device)
    stage = PagedKittyCache.from_raw(config, layout, packed, stage_raw, dtype).stage
    far_pages = torch.arange(num_pages - page_table.shape[1], num_pages, dtype=torch.int32, device=device)
    far_stage = torch.arange(num_stage - stage_table.shape[1], num_stage, dtype=torch.int32, device=device)
    packed[far_pages.long()] = packed_small[page_table[0].long()]
    stage[far_stage.long()] = stage_small[stage_table[0].long()]
    got = decode_attention(query, packed, stage, far_pages[None], far_stage[None], seq_lens, config, layout,
                           scale, out=torch.empty_like(query, dtype=torch.float32))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=ATOL)


@pytest.mark.cuda
@pytest.mark.parametrize("preset, head_dim, head_pair", [("kitty2", 128, (16, 4)), ("kitty2-lite", 128, (6, 2)),
                                                        ("kivi2", 64, (1, 1))])
def test_decode_full_size_pages_on_gpu(preset, head_dim, head_pair):
    """128-token pages on a GPU, where decode reads them with kitty_vllm.kernels.decode_gluon (GQA
    groups up to 4, at least 16 boosted channels or none) and the sinks and ring with the Triton kernel."""
    check(KittyConfig.from_preset(preset), head_pair, head_dim, torch.bfloat16, "cuda",
          seq_lens=[20, 300, 1000], seed=5, out_dtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("soft_cap", [0.0, 3.0], ids=["sinks_with_gluon", "soft_cap_and_sinks_without_gluon"])
def test_decode_soft_cap_and_sinks_full_size_on_gpu(soft_cap):
    """128-token pages on a GPU: learned sinks while the Gluon kernel reads the packed pages (its splits
    are merged with the Triton kernel's, which starts from the sinks), and soft-capped scores, which the
    Triton kernel alone computes (decode_gluon.supported)."""
    config = KittyConfig.from_preset("kitty2")
    gluon = attention.decode_gluon.supported(page_layout(config, 128), 4, torch.device("cuda"), soft_cap)
    assert gluon == (not soft_cap)
    check(config, (8, 2), 128, torch.bfloat16, "cuda", seq_lens=[20, 300, 1000], seed=7, out_dtype=torch.float32,
          soft_cap=soft_cap, sinks=torch.linspace(-2.0, 5.0, 8))
