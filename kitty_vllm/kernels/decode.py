"""Paged decode attention over the kitty cache: one new token per request (oracle:
reference.schedule_attention at query position n - 1).

The query at position ``n - 1`` of a request of ``n`` tokens reads, following the cache schedule of
kitty_vllm.reference:

* sinks, ``t < sink_tokens``: full precision, from the request's sink blocks of the staging group;
* complete pages, ``sink_tokens <= t < (n // P) * P``: dequantized from the packed pages (page 0 holds
  the sink positions too; they are skipped there);
* the unfinished page, ``max(sink_tokens, (n // P) * P) <= t < n``: full precision, from the ring.

The new token's Key and Value are stored before the kernel runs (in the sinks, the packed page that it
completed, or the ring), so every segment ends at ``n``.

This first version runs one program per (request, KV head) through the whole sequence; the split-K
version for long contexts comes later. All math is float32: full-precision tokens are widened, Keys
and Values are dequantized as ``min + code * scale`` in float32, and the dot products run in IEEE
float32 (not TF32), so the kernel matches the float32 reference to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels.common import (boost_channel_ranks, check_cache, kernel_layout, section_offsets,
                                       unpack_2bit)
from kitty_vllm.layout import StageLayout

LOG2E = 1.4426950408889634
# tl.dot needs at least 16 rows and 16 columns; the GQA group is padded to this many query rows.
MIN_DOT_SIZE = 16
# float32 elements of one [tokens, head_dim] tile of Keys or Values: bounds the registers per tile
# (measured on an H100: larger tiles spill, and head_dim 256 needs 8 warps not to).
TILE_ELEMENTS = 2048
# Scores start here instead of -inf, so a tile whose tokens are all masked yields exp2(-inf) = 0, not NaN.
SCORE_FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _online_softmax_step(scores, values, running_max, running_sum, acc):
    """Fold one tile into the running softmax: scores [G, T] (log2 units, -inf where masked), values
    [T, D] float32; running_max / running_sum [G], acc [G, D]."""
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    correction = tl.exp2(running_max - new_max)
    probs = tl.exp2(scores - new_max[:, None])
    running_sum = running_sum * correction + tl.sum(probs, axis=1)
    acc = acc * correction[:, None] + tl.dot(probs, values, input_precision="ieee")
    return new_max, running_sum, acc


@triton.jit
def _attend_stage(
    query, running_max, running_sum, acc,
    stage_ptr,         # [num_stage_blocks, 2, tokens_per_block, H, D] model dtype, D contiguous
    stage_row_ptr,     # [max_stage_blocks] int32: the request's staging blocks
    first, end, first_row, tokens_per_block, head,
    stride_sb, stride_skv, stride_st, stride_sh,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
):
    """Attend to full-precision positions [first, end) of the staging row: position t sits at slot
    ``t % PAGE_SIZE``, in row ``first_row + slot // tokens_per_block`` at ``slot % tokens_per_block``.
    Sinks (t < sink_tokens < PAGE_SIZE) and the ring both follow this rule with their own first_row
    and tokens_per_block."""
    c = tl.arange(0, HEAD_DIM)
    for start in range(first, end, TILE):
        t = start + tl.arange(0, TILE)
        valid = t < end
        slot = t % PAGE_SIZE
        block = tl.load(stage_row_ptr + first_row + slot // tokens_per_block, mask=valid, other=0)
        row = (block.to(tl.int64) * stride_sb + (slot % tokens_per_block) * stride_st
               + head * stride_sh)                                                        # [T]
        ptrs = stage_ptr + row[:, None] + c[None, :]
        keys = tl.load(ptrs, mask=valid[:, None], other=0.0).to(tl.float32)              # [T, D]
        values = tl.load(ptrs + stride_skv, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(query, tl.trans(keys), input_precision="ieee")                  # [G, T]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        running_max, running_sum, acc = _online_softmax_step(scores, values, running_max, running_sum, acc)
    return running_max, running_sum, acc


@triton.jit
def _decode_attention_kernel(
    query_ptr,         # [B, Hq, D] float16 / bfloat16 / float32, D contiguous
    packed_ptr,        # [num_blocks, H, PAGE_BYTES] uint8
    stage_ptr,         # [num_stage_blocks, 2, tokens_per_block, H, D] query dtype, D contiguous
    page_table_ptr,    # [B, max_pages] int32: packed block of each page
    stage_table_ptr,   # [B, max_stage_blocks] int32: sink blocks, then ring blocks
    seq_lens_ptr,      # [B] int32: tokens of each request, this step's included
    out_ptr,           # [B, Hq, D] D contiguous
    stride_qb, stride_qh,
    stride_pb, stride_ph,
    stride_sb, stride_skv, stride_st, stride_sh,
    stride_page_table, stride_stage_table,
    stride_ob, stride_oh,
    scale_log2,        # softmax scale times log2(e)
    sink_tokens, sink_block_tokens, sink_blocks, ring_tokens_per_block,
    GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_BOOST: tl.constexpr, TILE: tl.constexpr,
    KEY_LOW_OFFSET: tl.constexpr, KEY_HIGH_OFFSET: tl.constexpr, BOOST_INDEX_OFFSET: tl.constexpr,
    KEY_SCALE_OFFSET: tl.constexpr, KEY_MIN_OFFSET: tl.constexpr, VALUE_CODES_OFFSET: tl.constexpr,
    VALUE_SCALE_OFFSET: tl.constexpr, VALUE_MIN_OFFSET: tl.constexpr,
):
    """One program attends the GROUP query heads of one KV head of one request: grid (B, H). It walks
    the sinks, then the complete pages (tile by tile), then the ring, with one online softmax."""
    request = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + request)
    full_pages = seq_len // PAGE_SIZE

    g = tl.arange(0, GROUP_ROWS)
    c = tl.arange(0, HEAD_DIM)
    q_head = head * GROUP + g
    in_group = g < GROUP
    query = tl.load(query_ptr + request * stride_qb + q_head[:, None] * stride_qh + c[None, :],
                    mask=in_group[:, None], other=0.0).to(tl.float32) * scale_log2        # [G, D]
    running_max = tl.full((GROUP_ROWS,), SCORE_FLOOR, tl.float32)
    running_sum = tl.zeros((GROUP_ROWS,), tl.float32)
    acc = tl.zeros((GROUP_ROWS, HEAD_DIM), tl.float32)

    stage_row_ptr = stage_table_ptr + request * stride_stage_table
    running_max, running_sum, acc = _attend_stage(
        query, running_max, running_sum, acc, stage_ptr, stage_row_ptr,
        0, tl.minimum(seq_len, sink_tokens), 0, sink_block_tokens, head,
        stride_sb, stride_skv, stride_st, stride_sh, PAGE_SIZE, HEAD_DIM, TILE)

    for page in range(0, full_pages):
        block = tl.load(page_table_ptr + request * stride_page_table + page)
        page_ptr = packed_ptr + block.to(tl.int64) * stride_pb + head.to(tl.int64) * stride_ph
        key_scale = tl.load((page_ptr + KEY_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + c).to(tl.float32)
        key_min = tl.load((page_ptr + KEY_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + c).to(tl.float32)
        if NUM_BOOST > 0:
            boosted, rank = boost_channel_ranks(page_ptr + BOOST_INDEX_OFFSET, c, NUM_BOOST)
        # Page 0 starts with the sinks, read above in full precision: skip their whole tiles here.
        first_tile = tl.maximum(sink_tokens - page * PAGE_SIZE, 0) // TILE * TILE
        for start in range(first_tile, PAGE_SIZE, TILE):
            t = start + tl.arange(0, TILE)
            every = t[:, None] >= 0
            codes = unpack_2bit(page_ptr + KEY_LOW_OFFSET, t, c, every, HEAD_DIM)
            if NUM_BOOST > 0:
                codes += unpack_2bit(page_ptr + KEY_HIGH_OFFSET, t, rank, every & boosted[None, :],
                                     NUM_BOOST) << 2
            keys = key_min[None, :] + codes.to(tl.float32) * key_scale[None, :]          # [T, D]
            v_codes = unpack_2bit(page_ptr + VALUE_CODES_OFFSET, t, c, every, HEAD_DIM)
            v_scale = tl.load((page_ptr + VALUE_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + t)
            v_min = tl.load((page_ptr + VALUE_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + t)
            values = v_min.to(tl.float32)[:, None] + v_codes.to(tl.float32) * v_scale.to(tl.float32)[:, None]
            scores = tl.dot(query, tl.trans(keys), input_precision="ieee")               # [G, T]
            scores = tl.where((page * PAGE_SIZE + t >= sink_tokens)[None, :], scores, float("-inf"))
            running_max, running_sum, acc = _online_softmax_step(scores, values, running_max,
                                                                 running_sum, acc)

    running_max, running_sum, acc = _attend_stage(
        query, running_max, running_sum, acc, stage_ptr, stage_row_ptr,
        tl.maximum(sink_tokens, full_pages * PAGE_SIZE), seq_len, sink_blocks, ring_tokens_per_block, head,
        stride_sb, stride_skv, stride_st, stride_sh, PAGE_SIZE, HEAD_DIM, TILE)

    # An empty request (seq_len 0, e.g. batch padding) gets zeros rather than 0 / 0.
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(out_ptr + request * stride_ob + q_head[:, None] * stride_oh + c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])


def decode_attention(query: torch.Tensor, packed: torch.Tensor, stage: torch.Tensor,
                     page_table: torch.Tensor, stage_table: torch.Tensor, seq_lens: torch.Tensor,
                     config: KittyConfig, stage_layout: StageLayout, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each request's newest token over its kitty cache (module docstring).

    query [B, Hq, D] (float16, bfloat16 or float32) at position ``seq_lens[b] - 1``; packed uint8
    [num_blocks, H, page_bytes]; stage [num_stage_blocks, 2 (K, V), tokens_per_block, H, D] in the
    query's dtype (``PagedKittyCache.stage``, a strided view); page_table int32 [B, max_pages] (at least
    ``seq_lens[b] // page_size`` valid entries per row); stage_table int32 [B, max_stage_blocks] (at
    least ``stage_layout.blocks_needed(seq_lens[b])``); seq_lens int32 [B], this step's token included
    and already stored. Hq is a multiple of H. Returns ``out`` [B, Hq, D]: allocated in the query's
    dtype if not given; pass a float32 ``out`` to keep the float32 result.
    """
    if query.dim() != 3:
        raise ValueError(f"query must be [num_requests, num_heads, head_dim], got {tuple(query.shape)}")
    num_requests, num_heads, head_dim = query.shape
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    layout = kernel_layout(config, head_dim)
    check_cache(packed, layout)
    num_kv_heads = packed.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if stage_layout.page != layout or stage_layout.num_kv_heads != num_kv_heads:
        raise ValueError(f"stage_layout is for page_size {stage_layout.page.page_size}, head_dim "
                         f"{stage_layout.page.head_dim}, {stage_layout.num_kv_heads} KV heads; the cache "
                         f"has page_size {layout.page_size}, head_dim {head_dim}, {num_kv_heads} KV heads")
    stage_shape = (2, stage_layout.tokens_per_block, num_kv_heads, head_dim)
    if stage.dim() != 5 or tuple(stage.shape[1:]) != stage_shape or stage.dtype != query.dtype:
        raise ValueError(f"expected stage [num_stage_blocks, {', '.join(map(str, stage_shape))}] in "
                         f"{query.dtype}, got {stage.dtype} {tuple(stage.shape)}")
    for name, table in (("page_table", page_table), ("stage_table", stage_table)):
        if table.dtype != torch.int32 or table.dim() != 2 or table.shape[0] != num_requests:
            raise ValueError(f"{name} must be int32 [{num_requests}, max_blocks], got {table.dtype} "
                             f"{tuple(table.shape)}")
        if table.stride(1) != 1:
            raise ValueError(f"{name} rows must be contiguous")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (num_requests,) or seq_lens.stride(0) != 1:
        raise ValueError(f"seq_lens must be contiguous int32 [{num_requests}], got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    if out is None:
        out = torch.empty_like(query)
    elif tuple(out.shape) != tuple(query.shape):
        raise ValueError(f"out must be {list(query.shape)}, got {list(out.shape)}")
    for name, tensor in (("query", query), ("stage", stage), ("out", out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim")

    group = num_heads // num_kv_heads
    tile = max(MIN_DOT_SIZE, min(layout.page_size, TILE_ELEMENTS // head_dim))
    if num_requests:
        _decode_attention_kernel[(num_requests, num_kv_heads)](
            query, packed, stage, page_table, stage_table, seq_lens, out,
            query.stride(0), query.stride(1),
            packed.stride(0), packed.stride(1),
            stage.stride(0), stage.stride(1), stage.stride(2), stage.stride(3),
            page_table.stride(0), stage_table.stride(0),
            out.stride(0), out.stride(1),
            scale * LOG2E,
            config.sink_tokens, stage_layout.block_tokens, stage_layout.sink_blocks,
            stage_layout.tokens_per_block,
            GROUP=group, GROUP_ROWS=max(MIN_DOT_SIZE, triton.next_power_of_2(group)),
            PAGE_SIZE=layout.page_size, HEAD_DIM=head_dim, NUM_BOOST=layout.num_boost, TILE=tile,
            **section_offsets(layout), num_warps=8 if head_dim >= 128 else 4,
        )
    return out
