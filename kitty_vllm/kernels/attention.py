"""Paged attention over the kitty cache, for decode and prefill (oracle: reference.schedule_attention).

A query at position ``p`` of a request reads, following the cache schedule of kitty_vllm.reference,
with ``full = (p + 1) // page_size`` pages complete at ``p``:

* sinks, ``t < sink_tokens``: full precision, from the request's sink blocks of the staging group;
* complete pages, ``sink_tokens <= t < full * page_size``: straight from the packed 2-bit pages;
* the rest of its own page, ``max(sink_tokens, full * page_size) <= t <= p``: full precision, from the
  ring for positions before the request's ``context`` and from this step's Keys and Values after it.

The cache must already hold what the schedule reads: this step's sinks and the pages this step
completes (PagedKittyCache stores them before attention; kitty_vllm.kernels.store for decode).

**One program** attends one *query block* (up to BLOCK_Q consecutive positions of one request inside one
page) for all GROUP query heads of one KV head, so every packed page is read once for the whole GQA
group and block: ``ROWS = BLOCK_Q * GROUP_ROWS`` query rows. Decode uses BLOCK_Q = 1 and splits each
request's pages over NUM_SPLITS programs (split-K) whose partial softmaxes a second kernel merges, so
small batches at long context still fill the GPU.

**No dequantized copy.** A page's Key ``min[c] + code[t, c] * scale[c]`` gives scores
``(q * scale) . code + q . min``, and a Value ``vmin[t] + vcode[t, c] * vscale[t]`` gives
``(p * vscale) . vcode + p . vmin``: the dot products run on the raw codes, small integers that are
exact in bfloat16, on tensor cores. The float32 side is split into DOT_SPLITS bfloat16 parts (8
mantissa bits each), so with 3 parts the products match float32 math to about 2^-24. The planar 2-bit
layout makes the four 2-bit planes of a row four contiguous quarters of the channels, so a tile's bytes
unpack with four shifts into codes in channel order.
The sparse high plane of the boosted channels adds ``(4 q[idx] * scale[idx]) . high``.
Full-precision tokens (sinks, own page) use IEEE float32 dots.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels.common import check_cache, kernel_layout, section_offsets
from kitty_vllm.layout import StageLayout

LOG2E = 1.4426950408889634
# tl.dot needs at least 16 rows and 16 columns: the query rows are padded to this many.
MIN_DOT_SIZE = 16
# Query rows (positions x heads of a GQA group) per prefill program.
PREFILL_ROWS = 64
# 2-bit codes of one [tokens, head_dim] tile of Keys or Values: bounds the registers per tile.
TILE_CODES = 8192
# bfloat16 parts of the float32 operand of a dot with codes (module docstring).
DOT_SPLITS = 3
# Warps per program. (8 warps with 64 query rows at head_dim 64 fault on an H100 with Triton 3.6.)
NUM_WARPS = 4
# Programs per streaming multiprocessor that decode aims for before it splits pages over programs.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64
# Scores start here instead of -inf, so a tile whose tokens are all masked yields exp2(-inf) = 0, not NaN.
SCORE_FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _bf16_dot(a, b, INTERPRETED: tl.constexpr):
    """a @ b for bfloat16 a, b with float32 products and sums. Triton's interpreter multiplies bfloat16
    as raw bits (numpy has no bfloat16), so there the exact float32 equivalent runs."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def _dot_codes(a, codes, DOT_SPLITS: tl.constexpr, INTERPRETED: tl.constexpr):
    """a float32 [..., M, K] times codes bfloat16 [..., K, N] holding small integers: float32 result.
    a is taken as the sum of DOT_SPLITS bfloat16 parts, each multiplied exactly on tensor cores."""
    part = a.to(tl.bfloat16)
    out = _bf16_dot(part, codes, INTERPRETED)
    for _ in tl.static_range(DOT_SPLITS - 1):
        a = a - part.to(tl.float32)
        part = a.to(tl.bfloat16)
        out += _bf16_dot(part, codes, INTERPRETED)
    return out


@triton.jit
def _codes_by_column(packed, HEAD_DIM: tl.constexpr):
    """uint8 bytes [HEAD_DIM // 4, T] of T packed rows to bfloat16 codes [HEAD_DIM, T] in channel order:
    plane j (bits 2j..2j+1) holds channels j * HEAD_DIM // 4 + i (kitty_vllm.layout). Integers go to
    bfloat16 through float32: Triton's interpreter converts them to bfloat16 as raw bits."""
    shifts = 2 * tl.arange(0, 4)[:, None, None]
    codes = (packed[None, :, :].to(tl.int32) >> shifts) & 3                           # [4, D / 4, T]
    return tl.reshape(codes, (HEAD_DIM, packed.shape[1])).to(tl.float32).to(tl.bfloat16)


@triton.jit
def _codes_by_row(packed, HEAD_DIM: tl.constexpr):
    """uint8 bytes [T, HEAD_DIM // 4] of T packed rows to bfloat16 codes [T, HEAD_DIM] in channel order."""
    shifts = 2 * tl.arange(0, 4)[None, :, None]
    codes = (packed[:, None, :].to(tl.int32) >> shifts) & 3                           # [T, 4, D / 4]
    return tl.reshape(codes, (packed.shape[0], HEAD_DIM)).to(tl.float32).to(tl.bfloat16)


@triton.jit
def _softmax_step(scores, running_max, running_sum):
    """Fold scores [ROWS, T] (log2 units, -inf where masked) into the running softmax. Returns the
    tile's probabilities [ROWS, T], the new max and sum, and the factor that rescales the accumulator."""
    new_max = tl.maximum(running_max, tl.max(scores, axis=1))
    correction = tl.exp2(running_max - new_max)
    probs = tl.exp2(scores - new_max[:, None])
    return probs, new_max, running_sum * correction + tl.sum(probs, axis=1), correction


@triton.jit
def _attend_full_precision(
    query, running_max, running_sum, acc,   # query [ROWS, D] float32 (scaled, log2 units); acc [ROWS, D]
    stage_ptr,          # [num_stage_blocks, 2, tokens_per_block, H, D]
    stage_row_ptr,      # [max_stage_blocks] int32: the request's staging blocks
    new_key_ptr, new_value_ptr,   # this step's Key / Value of the block's first query position, head offset applied
    first, end, context, first_pos, row_first, row_last,   # row_first / row_last [ROWS]: positions each row reads
    first_row, tokens_per_block, head,
    stride_sb, stride_skv, stride_st, stride_sh, stride_nt, stride_nvt,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr,
):
    """Attend to full-precision positions [first, end): position t < context sits at staging slot
    ``t % PAGE_SIZE``, in row ``first_row + slot // tokens_per_block`` at ``slot % tokens_per_block``
    (sinks and the ring both follow this rule with their own first_row and tokens_per_block);
    t >= context is this step's token ``t - first_pos`` after the block's first query."""
    c = tl.arange(0, HEAD_DIM)
    for start in range(first, end, TILE):
        t = start + tl.arange(0, TILE)
        valid = t < end
        staged = valid & (t < context)
        fresh = valid & (t >= context)
        slot = t % PAGE_SIZE
        block = tl.load(stage_row_ptr + first_row + slot // tokens_per_block, mask=staged, other=0)
        row = (block.to(tl.int64) * stride_sb + (slot % tokens_per_block) * stride_st
               + head * stride_sh)                                                        # [T]
        step = (t - first_pos).to(tl.int64)
        stage_ptrs = stage_ptr + row[:, None] + c[None, :]                                # [T, D]
        keys = (tl.load(stage_ptrs, mask=staged[:, None], other=0.0).to(tl.float32)
                + tl.load(new_key_ptr + step[:, None] * stride_nt + c[None, :], mask=fresh[:, None],
                          other=0.0).to(tl.float32))
        values = (tl.load(stage_ptrs + stride_skv, mask=staged[:, None], other=0.0).to(tl.float32)
                  + tl.load(new_value_ptr + step[:, None] * stride_nvt + c[None, :], mask=fresh[:, None],
                            other=0.0).to(tl.float32))
        scores = tl.dot(query, tl.trans(keys), input_precision="ieee")                  # [ROWS, T]
        seen = (t[None, :] >= row_first[:, None]) & (t[None, :] <= row_last[:, None]) & valid[None, :]
        probs, running_max, running_sum, correction = _softmax_step(
            tl.where(seen, scores, float("-inf")), running_max, running_sum)
        acc = acc * correction[:, None] + tl.dot(probs, values, input_precision="ieee")
    return running_max, running_sum, acc


@triton.jit
def _attention_kernel(
    query_ptr,         # [N, Hq, D] float16 / bfloat16 / float32, D contiguous
    new_key_ptr,       # [N, H, D] this step's Keys (read for positions >= the block's context), D contiguous
    new_value_ptr,     # [N, H, D] this step's Values, D contiguous
    packed_ptr,        # [num_blocks, H, PAGE_BYTES] uint8
    stage_ptr,         # [num_stage_blocks, 2, tokens_per_block, H, D] model dtype, D contiguous
    page_table_ptr,    # [R, max_pages] int32: packed block of each page
    stage_table_ptr,   # [R, max_stage_blocks] int32: sink blocks, then ring blocks
    blocks_ptr,        # [num_query_blocks, 5] int32: request, first token, first position, tokens, context (not DECODE)
    seq_lens_ptr,      # [R] int32: DECODE only, request r's query is token r at position seq_lens[r] - 1
    out_ptr,           # [N, Hq, D] D contiguous
    partial_ptr,       # [R, Hq, NUM_SPLITS, D + 2] float32: NUM_SPLITS > 1 only (accumulator, max, sum)
    stride_qt, stride_qh, stride_nt, stride_nh, stride_nvt, stride_nvh,
    stride_pb, stride_ph,
    stride_sb, stride_skv, stride_st, stride_sh,
    stride_page_table, stride_stage_table,
    stride_ot, stride_oh,
    scale_log2,        # softmax scale times log2(e)
    sink_tokens, sink_block_tokens, sink_blocks, ring_tokens_per_block,
    DECODE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, ROWS: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_BOOST: tl.constexpr, BOOST_ROWS: tl.constexpr,
    TILE: tl.constexpr, STAGE_TILE: tl.constexpr, DOT_SPLITS: tl.constexpr, INTERPRETED: tl.constexpr,
    KEY_LOW_OFFSET: tl.constexpr, KEY_HIGH_OFFSET: tl.constexpr, BOOST_INDEX_OFFSET: tl.constexpr,
    KEY_SCALE_OFFSET: tl.constexpr, KEY_MIN_OFFSET: tl.constexpr, VALUE_CODES_OFFSET: tl.constexpr,
    VALUE_SCALE_OFFSET: tl.constexpr, VALUE_MIN_OFFSET: tl.constexpr,
):
    """Grid (query blocks, H, NUM_SPLITS); decode: one query block per request."""
    block_id = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        request = block_id.to(tl.int64)
        context = tl.load(seq_lens_ptr + request)
        first_token = request
        first_pos = context - 1      # -1 for an empty row: it reads nothing and gets zeros
        count = 1
    else:
        desc = blocks_ptr + block_id.to(tl.int64) * 5
        request = tl.load(desc).to(tl.int64)
        first_token = tl.load(desc + 1).to(tl.int64)
        first_pos = tl.load(desc + 2)
        count = tl.load(desc + 3)
        context = tl.load(desc + 4)

    Q: tl.constexpr = HEAD_DIM // 4
    quarter: tl.constexpr = NUM_BOOST // 4
    r = tl.arange(0, ROWS)
    token = r // GROUP_ROWS
    g = r % GROUP_ROWS
    row_valid = (token < count) & (g < GROUP)
    position = first_pos + token                                                         # [ROWS]
    q_head = head * GROUP + g
    full = (position + 1) // PAGE_SIZE                                                   # [ROWS]
    last_pos = first_pos + count - 1
    pages = (last_pos + 1) // PAGE_SIZE

    c = tl.arange(0, HEAD_DIM)
    q_rows = (first_token + token).to(tl.int64) * stride_qt + q_head * stride_qh          # [ROWS]
    query = tl.load(query_ptr + q_rows[:, None] + c[None, :], mask=row_valid[:, None],
                    other=0.0).to(tl.float32) * scale_log2                               # [ROWS, D]
    running_max = tl.full((ROWS,), SCORE_FLOOR, tl.float32)
    running_sum = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)

    stage_row_ptr = stage_table_ptr + request * stride_stage_table
    new_key = new_key_ptr + first_token * stride_nt + head * stride_nh
    new_value = new_value_ptr + first_token * stride_nvt + head * stride_nvh
    if split == 0:
        running_max, running_sum, acc = _attend_full_precision(
            query, running_max, running_sum, acc, stage_ptr, stage_row_ptr, new_key, new_value,
            0, tl.minimum(last_pos + 1, sink_tokens), last_pos + 1, first_pos,
            tl.zeros((ROWS,), tl.int32), position, 0, sink_block_tokens, head,
            stride_sb, stride_skv, stride_st, stride_sh, stride_nt, stride_nvt, PAGE_SIZE, HEAD_DIM, STAGE_TILE)

    per_split = tl.cdiv(pages, NUM_SPLITS)
    t = tl.arange(0, TILE)
    q_lane = tl.arange(0, Q)
    page_row_ptr = page_table_ptr + request * stride_page_table
    for page in range(split * per_split, tl.minimum(split * per_split + per_split, pages)):
        block = tl.load(page_row_ptr + page)
        page_ptr = packed_ptr + block.to(tl.int64) * stride_pb + head.to(tl.int64) * stride_ph
        key_scale = tl.load((page_ptr + KEY_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + c).to(tl.float32)
        key_min = tl.load((page_ptr + KEY_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + c).to(tl.float32)
        scaled_query = query * key_scale[None, :]                                        # [ROWS, D]
        key_bias = tl.sum(query * key_min[None, :], axis=1)                              # [ROWS]
        if NUM_BOOST > 0:
            rank = tl.arange(0, BOOST_ROWS)
            boosted = rank < NUM_BOOST
            index = tl.load(page_ptr + BOOST_INDEX_OFFSET + rank, mask=boosted, other=0).to(tl.int32)
            boost_scale = tl.load((page_ptr + KEY_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + index,
                                  mask=boosted, other=0.0).to(tl.float32)
            boost_query = tl.load(query_ptr + q_rows[:, None] + index[None, :],
                                  mask=row_valid[:, None] & boosted[None, :], other=0.0).to(tl.float32)
            boost_query = boost_query * (scale_log2 * 4.0) * boost_scale[None, :]         # [ROWS, BOOST_ROWS]
        # Page 0 starts with the sinks, read above in full precision: skip their whole tiles here.
        for start in range(tl.maximum(sink_tokens - page * PAGE_SIZE, 0) // TILE * TILE, PAGE_SIZE, TILE):
            tt = start + t
            key_bytes = tl.load(page_ptr + KEY_LOW_OFFSET + tt[None, :] * Q + q_lane[:, None])     # [Q, T]
            scores = _dot_codes(scaled_query, _codes_by_column(key_bytes, HEAD_DIM), DOT_SPLITS, INTERPRETED)
            if NUM_BOOST > 0:
                high = tl.load(page_ptr + KEY_HIGH_OFFSET + tt[None, :] * quarter + (rank % quarter)[:, None],
                               mask=boosted[:, None], other=0)                                # [BOOST_ROWS, T]
                high = ((high.to(tl.int32) >> (2 * (rank // quarter))[:, None]) & 3).to(tl.float32).to(tl.bfloat16)
                scores += _dot_codes(boost_query, high, DOT_SPLITS, INTERPRETED)
            seen = (page * PAGE_SIZE + tt >= sink_tokens)[None, :] & (page < full)[:, None]
            probs, running_max, running_sum, correction = _softmax_step(
                tl.where(seen, scores + key_bias[:, None], float("-inf")), running_max, running_sum)
            value_bytes = tl.load(page_ptr + VALUE_CODES_OFFSET + tt[:, None] * Q + q_lane[None, :])  # [T, Q]
            value_scale = tl.load((page_ptr + VALUE_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + tt).to(tl.float32)
            value_min = tl.load((page_ptr + VALUE_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + tt).to(tl.float32)
            value_bias = tl.sum(probs * value_min[None, :], axis=1)                      # [ROWS]
            acc = (acc * correction[:, None] + value_bias[:, None]
                   + _dot_codes(probs * value_scale[None, :], _codes_by_row(value_bytes, HEAD_DIM), DOT_SPLITS,
                                INTERPRETED))

    if split == NUM_SPLITS - 1:
        own_first = tl.maximum(full * PAGE_SIZE, sink_tokens)                            # [ROWS]
        running_max, running_sum, acc = _attend_full_precision(
            query, running_max, running_sum, acc, stage_ptr, stage_row_ptr, new_key, new_value,
            tl.maximum(sink_tokens, (first_pos + 1) // PAGE_SIZE * PAGE_SIZE), last_pos + 1, context, first_pos,
            own_first, position, sink_blocks, ring_tokens_per_block, head,
            stride_sb, stride_skv, stride_st, stride_sh, stride_nt, stride_nvt, PAGE_SIZE, HEAD_DIM, STAGE_TILE)

    if NUM_SPLITS == 1:
        # An empty row (e.g. batch padding) gets zeros rather than 0 / 0.
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        out_rows = (first_token + token).to(tl.int64) * stride_ot + q_head * stride_oh
        tl.store(out_ptr + out_rows[:, None] + c[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None])
    else:
        num_q_heads = tl.num_programs(1) * GROUP
        base = ((request * num_q_heads + q_head) * NUM_SPLITS + split) * (HEAD_DIM + 2)   # [ROWS]
        tl.store(partial_ptr + base[:, None] + c[None, :], acc, mask=row_valid[:, None])
        tl.store(partial_ptr + base + HEAD_DIM, running_max, mask=row_valid)
        tl.store(partial_ptr + base + HEAD_DIM + 1, running_sum, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,       # [B, Hq, NUM_SPLITS, D + 2] float32: accumulator, running max, running sum
    out_ptr,           # [B, Hq, D] D contiguous
    stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, SPLIT_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Merge the split-K partial softmaxes of one (request, query head): grid (B, Hq)."""
    request = tl.program_id(0).to(tl.int64)
    q_head = tl.program_id(1)
    s = tl.arange(0, SPLIT_ROWS)
    valid = s < NUM_SPLITS
    c = tl.arange(0, HEAD_DIM)
    base = ((request * tl.num_programs(1) + q_head) * NUM_SPLITS + s) * (HEAD_DIM + 2)
    split_max = tl.load(partial_ptr + base + HEAD_DIM, mask=valid, other=SCORE_FLOOR)
    split_sum = tl.load(partial_ptr + base + HEAD_DIM + 1, mask=valid, other=0.0)
    acc = tl.load(partial_ptr + base[:, None] + c[None, :], mask=valid[:, None], other=0.0)   # [S, D]
    weight = tl.exp2(split_max - tl.max(split_max, axis=0))
    total = tl.sum(weight * split_sum, axis=0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + request * stride_ot + q_head * stride_oh + c, out.to(out_ptr.dtype.element_ty))


def _num_splits(num_requests: int, num_kv_heads: int, max_pages: int, device: torch.device) -> int:
    """Programs per request and KV head for decode: enough to give every streaming multiprocessor
    PROGRAMS_PER_SM programs. Depends only on shapes, never on sequence lengths, so one CUDA graph
    serves every batch of its size."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = triton.cdiv(PROGRAMS_PER_SM * processors, max(1, num_requests * num_kv_heads))
    return max(1, min(wanted, max_pages, MAX_SPLITS))


def _check(query, new_key, new_value, packed, stage, page_table, stage_table, config, stage_layout, out):
    """Shape checks shared by the launchers. Returns the page layout."""
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}")
    num_tokens, num_heads, head_dim = query.shape
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
    for name, tensor in (("new_key", new_key), ("new_value", new_value)):
        if tensor is not None and (tuple(tensor.shape) != (num_tokens, num_kv_heads, head_dim)
                                   or tensor.dtype != query.dtype):
            raise ValueError(f"{name} must be [{num_tokens}, {num_kv_heads}, {head_dim}] in {query.dtype}, "
                             f"got {tensor.dtype} {tuple(tensor.shape)}")
    for name, table in (("page_table", page_table), ("stage_table", stage_table)):
        if table.dtype != torch.int32 or table.dim() != 2 or table.stride(1) != 1:
            raise ValueError(f"{name} must be int32 [num_requests, max_blocks] with contiguous rows, got "
                             f"{table.dtype} {tuple(table.shape)}")
    if out is not None and tuple(out.shape) != tuple(query.shape):
        raise ValueError(f"out must be {list(query.shape)}, got {list(out.shape)}")
    for name, tensor in (("query", query), ("stage", stage), ("out", out), ("new_key", new_key),
                         ("new_value", new_value)):
        if tensor is not None and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim")
    return layout


def _launch(query, new_key, new_value, packed, stage, page_table, stage_table, blocks, seq_lens, out,
            partial, config, stage_layout, layout, scale, grid, decode, num_splits, group_rows, rows):
    head_dim = query.shape[-1]
    num_kv_heads = packed.shape[1]
    group = query.shape[1] // num_kv_heads
    new_key = query if new_key is None else new_key        # not read: every position is in the cache
    new_value = query if new_value is None else new_value
    _attention_kernel[grid](
        query, new_key, new_value, packed, stage, page_table, stage_table, blocks, seq_lens, out, partial,
        query.stride(0), query.stride(1), new_key.stride(0), new_key.stride(1),
        new_value.stride(0), new_value.stride(1),
        packed.stride(0), packed.stride(1),
        stage.stride(0), stage.stride(1), stage.stride(2), stage.stride(3),
        page_table.stride(0), stage_table.stride(0),
        out.stride(0), out.stride(1),
        scale * LOG2E,
        config.sink_tokens, stage_layout.block_tokens, stage_layout.sink_blocks, stage_layout.tokens_per_block,
        DECODE=decode, NUM_SPLITS=num_splits, GROUP=group, GROUP_ROWS=group_rows, ROWS=rows,
        PAGE_SIZE=layout.page_size, HEAD_DIM=head_dim, NUM_BOOST=layout.num_boost,
        BOOST_ROWS=max(MIN_DOT_SIZE, layout.num_boost),
        TILE=max(MIN_DOT_SIZE, min(layout.page_size, TILE_CODES // head_dim)),
        STAGE_TILE=max(MIN_DOT_SIZE, min(layout.page_size, TILE_CODES // 4 // head_dim)),
        DOT_SPLITS=DOT_SPLITS, INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1", **section_offsets(layout),
        num_warps=NUM_WARPS,
    )


def decode_attention(query: torch.Tensor, packed: torch.Tensor, stage: torch.Tensor,
                     page_table: torch.Tensor, stage_table: torch.Tensor, seq_lens: torch.Tensor,
                     config: KittyConfig, stage_layout: StageLayout, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each request's newest token over its kitty cache (module docstring).

    query [B, Hq, D] (float16, bfloat16 or float32) at position ``seq_lens[b] - 1``, already stored
    (kitty_vllm.kernels.store); packed uint8 [num_blocks, H, page_bytes]; stage [num_stage_blocks, 2
    (K, V), tokens_per_block, H, D] in the query's dtype (``PagedKittyCache.stage``); page_table int32
    [B, max_pages] (at least ``seq_lens[b] // page_size`` valid entries per row); stage_table int32
    [B, max_stage_blocks] (at least ``stage_layout.blocks_needed(seq_lens[b])``); seq_lens int32 [B]
    (0: an empty row, e.g. padding). Hq is a multiple of H. Returns ``out`` [B, Hq, D], allocated in the
    query's dtype if not given. No host synchronization: CUDA graphs can capture it.
    """
    layout = _check(query, None, None, packed, stage, page_table, stage_table, config, stage_layout, out)
    num_requests, num_heads, head_dim = query.shape
    if page_table.shape[0] != num_requests or stage_table.shape[0] != num_requests:
        raise ValueError(f"page_table and stage_table need {num_requests} rows, got {page_table.shape[0]} "
                         f"and {stage_table.shape[0]}")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (num_requests,) or seq_lens.stride(0) != 1:
        raise ValueError(f"seq_lens must be contiguous int32 [{num_requests}], got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    out = torch.empty_like(query) if out is None else out
    if num_requests == 0:
        return out
    num_kv_heads = packed.shape[1]
    group_rows = triton.next_power_of_2(num_heads // num_kv_heads)
    splits = _num_splits(num_requests, num_kv_heads, max(1, page_table.shape[1]), query.device)
    partial = (torch.empty(num_requests, num_heads, splits, head_dim + 2, dtype=torch.float32,
                           device=query.device) if splits > 1 else out)
    _launch(query, None, None, packed, stage, page_table, stage_table, seq_lens, seq_lens, out, partial,
            config, stage_layout, layout, scale, (num_requests, num_kv_heads, splits), True, splits,
            group_rows, max(MIN_DOT_SIZE, group_rows))
    if splits > 1:
        _merge_splits_kernel[(num_requests, num_heads)](
            partial, out, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, SPLIT_ROWS=triton.next_power_of_2(splits), HEAD_DIM=head_dim)
    return out


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: torch.Tensor,
                      stage: torch.Tensor, page_table: torch.Tensor, stage_table: torch.Tensor,
                      query_start_loc: list[int], context_lens: list[int], config: KittyConfig,
                      stage_layout: StageLayout, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of this step's tokens of several requests over their kitty cache (module docstring).

    Request r's tokens are ``query_start_loc[r]:query_start_loc[r + 1]`` of query [N, Hq, D] and of
    key/value [N, H, D], at positions from ``context_lens[r]`` on. The cache must hold this step's sinks
    and the pages this step completes; the ring must hold positions ``[context_lens[r] // page_size *
    page_size, context_lens[r])`` (PagedKittyCache orders its store so). Tables as in
    :func:`decode_attention`, one row per request. Returns ``out`` [N, Hq, D].
    """
    layout = _check(query, key, value, packed, stage, page_table, stage_table, config, stage_layout, out)
    num_heads = query.shape[1]
    num_kv_heads = packed.shape[1]
    group_rows = triton.next_power_of_2(num_heads // num_kv_heads)
    block_q = max(1, PREFILL_ROWS // group_rows)
    page = layout.page_size
    blocks = []
    for request, context in enumerate(context_lens):
        first, end = query_start_loc[request], query_start_loc[request + 1]
        position = context
        while position < context + end - first:
            count = min(block_q, (position // page + 1) * page - position, context + end - first - position)
            blocks.append((request, first + position - context, position, count, context))
            position += count
    out = torch.empty_like(query) if out is None else out
    if not blocks:
        return out
    table = torch.tensor(blocks, dtype=torch.int32).to(query.device, non_blocking=True)
    _launch(query, key, value, packed, stage, page_table, stage_table, table, table, out, out,
            config, stage_layout, layout, scale, (len(blocks), num_kv_heads, 1), False, 1,
            group_rows, max(MIN_DOT_SIZE, block_q * group_rows))
    return out
