"""Paged attention over the kitty cache, for decode and prefill (oracle: reference.schedule_attention).

A query at position ``p`` of a request reads, following the cache schedule of kitty_vllm.reference,
with its window of the newest ``page_size`` positions starting at ``w = p + 1 - page_size``:

* sinks, ``t < sink_tokens``: full precision, from the request's sink blocks of the staging group;
* older tokens, ``sink_tokens <= t < w``: straight from the packed 2-bit pages (complete at ``p``);
* the window, ``max(sink_tokens, w) <= t <= p``: full precision, from the ring for positions before the
  request's ``context`` and from this step's Keys and Values after it.

The cache must already hold what the schedule reads: this step's sinks and the pages this step
completes (PagedKittyCache stores them before attention; kitty_vllm.kernels.store for decode).

**One program** attends one *query block* (up to BLOCK_Q consecutive positions of one request inside one
page) for all GROUP query heads of one KV head, so every packed page is read once for the whole GQA
group and block: ``ROWS = BLOCK_Q * GROUP_ROWS`` query rows. Decode uses BLOCK_Q = 1 and splits each
request's pages over several programs (split-K) whose partial softmaxes a second kernel merges, so
small batches at long context still fill the GPU. On GPUs, where kitty_vllm.kernels.decode_gluon
applies, decode leaves the packed pages to that kernel and reads only the sinks and ring here, as one
more split.

**No dequantized copy.** A page's Key ``min[c] + code[t, c] * scale[c]`` gives scores
``(q * scale) . code + q . min``, and a Value ``vmin[t] + vcode[t, c] * vscale[t]`` gives
``(p * vscale) . vcode + p . vmin``: the dot products run on the raw codes, on tensor cores, as
bfloat16 ``1 + code / 4`` (exact, and no larger than 1.75, so the float32 sums add no large terms;
the offset goes into the bias). The float32 side is split exactly into three bfloat16 parts (cut from
its bits, 8 significant bits each), so the products match float32 math to float32's own rounding.
Prefill multiplies each part in its own dot. Decode has few query rows (a GQA group) but a
tensor-core dot takes at least 16, so it *stacks* the parts instead: its ``ROWS`` are SLOTS = 4 slots
of the same ``ROWS / SLOTS`` query rows, slot k's operand rows hold part k (slot 3 is zero), one dot
multiplies all three parts, and the slots' rows are added up (_sum_slots) before the softmax and at the
end. The packed pages' softmax runs once per query row, on the slots' sum; elsewhere its state is kept,
the same, in every slot. Bias terms go to slot 0 only.

The planar 2-bit layout makes the four 2-bit planes of a row four contiguous quarters of the channels:
a tile's bytes give plane j's codes, channels ``j * D / 4 + i``, with one shift and mask per four codes
(_plane_values), and every dot is per plane, so codes are never reordered. The sparse high plane of the
boosted channels adds ``(4 q[idx] * scale[idx]) . high``, its four planes stacked in one dot
(_high_values). Full-precision tokens (sinks, own page) are bfloat16 dot operands as they are stored (a
bfloat16 stage) or split exactly into two (float16) or three (float32) bfloat16 parts, multiplied by
the same stacked parts of the query and the probabilities (_stage_dot): float32 math to float32's own
rounding at about 30 warp instructions per token and KV head (sm_90, decode, head_dim 128, bfloat16
stage), where widening them to float32 for tf32x3 dots on 16-token tiles took about 190.

**Prefill schedules** (kitty_vllm.reference). With ``exact_prefill`` every query of a prefill reads
the cache as above, here, and so do verification steps of speculative decoding
(KittyConfig.reads_as_decode). By default a longer step reads only the pages complete before it
dequantized and everything else in full precision: PagedKittyCache copies those into one sequence in the
model dtype and runs :func:`context_attention` (vLLM's FlashAttention) over it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels import decode_gluon
from kitty_vllm.kernels.common import (LOG2E, PLANE_PTX, SCORE_FLOOR, TABLE_STRIDES, check_cache, kernel_layout,
                                      num_splits, padded_sizes, section_offsets)
from kitty_vllm.layout import PageLayout, StageLayout

# tl.dot needs at least 16 rows and 16 columns: the query rows are padded to this many.
MIN_DOT_SIZE = 16
# Rows of the boosted channels' high codes (four planes of BOOST_ROWS / 4 bytes, _high_values) are at
# least this many: with 4 bytes per plane (16 rows) Triton 3.6 miscompiled the stacked planes' dot on
# H100 and H200 (wrong scores; the interpreter and the same planes stored, not dotted, were right).
MIN_BOOST_ROWS = 32
# Query rows (positions x heads of a GQA group) per prefill program.
PREFILL_ROWS = 64
# 2-bit codes of one [tokens, head_dim] tile of Keys or Values: bounds the registers per tile.
TILE_CODES = 8192
# Full-precision tokens per tile: kitty2's 32 sinks in one tile. 64-token tiles cost fewer instructions
# per token (sm_90 SASS, head_dim 64 and 128) but not per step: half of the sinks' tile would be masked.
STAGE_TILE = 32
# Decode stacks the three bfloat16 parts of its float32 operands in the rows of one dot (module
# docstring): PART_SLOTS slots of GROUP_ROWS rows, one per part plus an empty one, where that makes at
# most MAX_STACKED_ROWS rows (GQA groups up to 4). With 32 rows an H100 ran no faster: the warps then
# split the rows and each unpacks every code.
PART_SLOTS = 4
MAX_STACKED_ROWS = 16
# Warps per program. Decode has 16 query rows: 2 warps ran 1.3x faster than 4 on an H100. (8 warps
# with 64 prefill rows at head_dim 64 fault on an H100 with Triton 3.6.)
DECODE_WARPS = 2
PREFILL_WARPS = 4
# Programs per streaming multiprocessor that decode aims for before it splits pages over programs.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64
# Splits that the merge reads at a time (a power of two: fewer splits compile a smaller variant).
MERGE_SPLIT_ROWS = 32
# log2(e) inside the kernels, which take softmax inputs in log2 units, and the exponent factor of
# _soft_cap's tanh.
KERNEL_LOG2E = tl.constexpr(LOG2E)
TANH_EXP2 = tl.constexpr(-2.0 * LOG2E)


@triton.jit
def _bf16_dot(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a @ b for bfloat16 a, b with float32 products and sums. Triton's interpreter multiplies
    bfloat16 as raw bits (numpy has no bfloat16), so there the exact float32 equivalent runs."""
    if INTERPRETED:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, acc=acc, out_dtype=tl.float32)


@triton.jit
def _truncate_bf16(x):
    """float32 x with its low 16 bits cleared: x rounded toward zero to bfloat16 precision, as float32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _as_bf16(x):
    """float32 x whose low 16 bits are zero (a bfloat16 value) as bfloat16, exactly, by taking its high
    16 bits (no rounding conversion)."""
    return (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _bf16_parts(a, slot, PARTS: tl.constexpr):
    """float32 a [ROWS, K] as bfloat16 dot operands whose products add up to a's exactly. a is the sum
    of three bfloat16 parts of at most 8 significant bits each, cut from its bits (high, middle, low: each
    part is what the ones before leave, truncated to bfloat16): PARTS 3 returns the three (low first);
    PARTS 1 returns one operand that holds, in each row, the part ``slot`` [ROWS, 1] of that row (0 high,
    1 middle, 2 low, 3 zero), so that one dot gives every part in its own rows (the rows of one slot;
    _sum_slots adds them up)."""
    high = _truncate_bf16(a)
    rest = a - high
    middle = _truncate_bf16(rest)
    low = rest - middle
    if PARTS == 3:
        return _as_bf16(low), _as_bf16(middle), _as_bf16(high)
    else:
        return (_as_bf16(tl.where(slot == 0, high, tl.where(slot == 1, middle, tl.where(slot == 2, low, 0.0)))),)


@triton.jit
def _dot_parts(parts, first: tl.constexpr, values, acc, PARTS: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + the sum of ``parts[first:first + PARTS]`` (from _bf16_parts) @ bfloat16 values."""
    for k in tl.static_range(PARTS):
        acc = _bf16_dot(parts[first + k], values, acc, INTERPRETED)
    return acc


@triton.jit
def _stage_dot(parts, first: tl.constexpr, stage, PARTS: tl.constexpr, INTERPRETED: tl.constexpr):
    """The sum of ``parts[first:first + PARTS]`` (from _bf16_parts, low first) @ stage, a tile of the
    staging cache split exactly into bfloat16 operands: itself if bfloat16; if float16 (11 significant
    bits), the rest and its high 8; if float32, _bf16_parts. The dots run from a zero accumulator, the
    small parts' products first and the high parts' last: a tensor core truncates what it adds to the
    accumulator's precision, so the small terms are summed before the large ones and the caller adds the
    result to its running sums in float32."""
    acc = tl.zeros((parts[first].shape[0], stage.shape[1]), tl.float32)
    if stage.dtype == tl.bfloat16:
        acc = _dot_parts(parts, first, stage, acc, PARTS, INTERPRETED)
    else:
        wide = stage.to(tl.float32)
        if stage.dtype == tl.float16:
            high = _truncate_bf16(wide)
            stage_parts = (_as_bf16(wide - high), _as_bf16(high))
        else:
            stage_parts = _bf16_parts(wide, 0, 3)
        for k in tl.static_range(len(stage_parts)):
            acc = _dot_parts(parts, first, stage_parts[k], acc, PARTS, INTERPRETED)
    return acc


@triton.jit
def _slot_sum(x, SLOTS: tl.constexpr):
    """x [ROWS, N] whose rows ``slot * ROWS / SLOTS + b`` hold partial sums of row b: their sum,
    [ROWS / SLOTS, N]."""
    if SLOTS == 1:
        return x
    else:
        return tl.sum(tl.reshape(x, (SLOTS, x.shape[0] // SLOTS, x.shape[1])), axis=0)


@triton.jit
def _first_slot(x, SLOTS: tl.constexpr):
    """x [ROWS] the same in every slot (rows ``slot * ROWS / SLOTS + b``): its [ROWS / SLOTS] values."""
    if SLOTS == 1:
        return x
    else:
        return tl.max(tl.reshape(x, (SLOTS, x.shape[0] // SLOTS)), axis=0)


@triton.jit
def _to_slots(x, SLOTS: tl.constexpr):
    """x [B] or [B, N] repeated in every slot: [SLOTS * B] or [SLOTS * B, N] (the inverse of _first_slot)."""
    if SLOTS == 1:
        return x
    elif len(x.shape) == 1:
        return tl.reshape(tl.broadcast_to(x[None, :], (SLOTS, x.shape[0])), (SLOTS * x.shape[0],))
    else:
        return tl.reshape(tl.broadcast_to(x[None, :, :], (SLOTS, x.shape[0], x.shape[1])),
                          (SLOTS * x.shape[0], x.shape[1]))


@triton.jit
def _sum_slots(x, SLOTS: tl.constexpr):
    """x [ROWS, N] whose rows ``slot * ROWS / SLOTS + b`` hold partial sums of row b: their sum over the
    slots, repeated in every slot's rows."""
    return _to_slots(_slot_sum(x, SLOTS), SLOTS)


@triton.jit
def _plane_values(packed, PLANE: tl.constexpr, INTERPRETED: tl.constexpr):
    """uint8 packed codes (any shape) to bfloat16 ``1 + code / 4`` for the 2-bit code of plane PLANE
    (bits 2 PLANE and 2 PLANE + 1) of every byte: exact, and between 1 and 1.75, so the dots' float32 sums
    add no term much larger than the codes' own (``sum(a * code) = (4 a) . values - 4 sum(a)``). Four
    bytes at a time and with no integer-to-float conversion: move the plane's bits to bits 5-6 of each
    byte and set bit 7 (a shift and a LOP3); interleave the bytes with 0x3F into two bfloat16 pairs
    (two PRMT; common.PLANE_PTX)."""
    if INTERPRETED:   # the interpreter runs no PTX
        code = (packed.to(tl.int32) >> (2 * PLANE)) & 3
        return (1.0 + code.to(tl.float32) * 0.25).to(tl.bfloat16)
    return tl.inline_asm_elementwise(PLANE_PTX[PLANE], "=r,=r,r", [packed], dtype=tl.bfloat16, is_pure=True,
                                     pack=4)


@triton.jit
def _high_values(packed, INTERPRETED: tl.constexpr):
    """uint8 packed [B, T] to the _plane_values of its four planes stacked: [4 B, T], row j * B + b holding
    plane j of row b."""
    low = tl.join(_plane_values(packed, 0, INTERPRETED), _plane_values(packed, 1, INTERPRETED))    # [B, T, 2]
    high = tl.join(_plane_values(packed, 2, INTERPRETED), _plane_values(packed, 3, INTERPRETED))
    planes = tl.permute(tl.join(low, high), (3, 2, 0, 1))                                         # [2, 2, B, T]
    return tl.reshape(planes, (4 * packed.shape[0], packed.shape[1]))


@triton.jit
def _load_quarters(row_ptr, mask, Q: tl.constexpr, PADDED_Q: tl.constexpr):
    """Rows at ``row_ptr`` [R] (pointers to HEAD_DIM = 4 Q contiguous elements) as four [R, PADDED_Q]
    tiles in their stored dtype (0 where not ``mask`` and in the padded columns ``i >= Q``): quarter j
    holds channels ``j * Q + i``, the channels of 2-bit plane j."""
    i = tl.arange(0, PADDED_Q)
    quarters = ()
    for j in tl.static_range(4):
        quarters = quarters + (tl.load(row_ptr[:, None] + j * Q + i[None, :], mask=mask[:, None] & (i < Q)[None, :],
                                       other=0.0),)
    return quarters


@triton.jit
def _soft_cap(scores, cap):
    """``cap * tanh(scores / cap)`` (logit soft-capping) of scores and a cap both in log2 units: a cap c
    on natural-log scores is the same curve at c * log2(e). tanh from exp2 of ``-2 |x|``, which cannot
    overflow, so it runs the same in Triton's interpreter and on a GPU."""
    x = scores / cap
    decay = tl.exp2(tl.abs(x) * TANH_EXP2)
    magnitude = (1.0 - decay) / (1.0 + decay)
    return cap * tl.where(x < 0, -magnitude, magnitude)


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
    query, running_max, running_sum, acc,   # query, acc: 4 quarters [ROWS, D / 4] float32 (query scaled, log2 units)
    part_slot,          # [ROWS, 1] int32: each row's slot (_bf16_parts)
    stage_ptr,          # [num_stage_blocks, 2, tokens_per_block, H, D]
    stage_row_ptr,      # [max_stage_blocks] int32: the request's staging blocks
    new_key_ptr, new_value_ptr,   # this step's Key / Value of the block's first query position, head offset applied
    first, end, context, first_pos, row_first, row_last,   # row_first / row_last [ROWS]: positions each row reads
    first_row, tokens_per_block, ring_slots, head, soft_cap_log2,
    stride_sb, stride_skv, stride_st, stride_sh, stride_nt, stride_nvt,
    HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, TILE: tl.constexpr, SLOTS: tl.constexpr,
    PARTS: tl.constexpr, SOFT_CAP: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Attend to full-precision positions [first, end): position t < context sits at staging slot
    ``t % ring_slots``, in row ``first_row + slot // tokens_per_block`` at ``slot % tokens_per_block``
    (sinks and the ring both follow this rule with their own first_row and tokens_per_block; sinks come
    before ``ring_slots``);
    t >= context is this step's token ``t - first_pos`` after the block's first query.

    The stage's values are exact bfloat16 dot operands (_stage_dot) that the query's and the probabilities'
    bfloat16 parts (_bf16_parts, stacked in the slots as for the packed pages) multiply: every product
    is exact and every sum float32."""
    Q: tl.constexpr = HEAD_DIM // 4
    query_parts = ()
    for j in tl.static_range(4):
        query_parts = query_parts + _bf16_parts(query[j], part_slot, PARTS)
    for start in range(first, end, TILE):
        t = start + tl.arange(0, TILE)
        valid = t < end
        staged = t < context
        slot = t % ring_slots
        block = tl.load(stage_row_ptr + first_row + slot // tokens_per_block, mask=valid & staged, other=0)
        row = stage_ptr + (block.to(tl.int64) * stride_sb + (slot % tokens_per_block) * stride_st
                           + head * stride_sh)                                            # [T]
        step = (t - first_pos).to(tl.int64)
        keys = _load_quarters(tl.where(staged, row, new_key_ptr + step * stride_nt), valid, Q, PADDED_DIM // 4)
        values = _load_quarters(tl.where(staged, row + stride_skv, new_value_ptr + step * stride_nvt), valid, Q,
                                PADDED_DIM // 4)
        scores = tl.zeros((query[0].shape[0], TILE), tl.float32)
        for j in tl.static_range(4):
            scores += _stage_dot(query_parts, PARTS * j, tl.trans(keys[j]), PARTS, INTERPRETED)  # [ROWS, T]
        seen = (t[None, :] >= row_first[:, None]) & (t[None, :] <= row_last[:, None]) & valid[None, :]
        scores = _sum_slots(scores, SLOTS)
        if SOFT_CAP:
            scores = _soft_cap(scores, soft_cap_log2)
        probs, running_max, running_sum, correction = _softmax_step(
            tl.where(seen, scores, float("-inf")), running_max, running_sum)
        prob_parts = _bf16_parts(probs, part_slot, PARTS)
        updated = ()
        for j in tl.static_range(4):
            updated = updated + (acc[j] * correction[:, None] + _stage_dot(prob_parts, 0, values[j], PARTS,
                                                                          INTERPRETED),)
        acc = updated
    return running_max, running_sum, acc


@triton.jit(do_not_specialize=(*TABLE_STRIDES, "split_base", "partial_splits"))
def _attention_kernel(
    query_ptr,         # [N, Hq, D] float16 / bfloat16 / float32, D contiguous
    new_key_ptr,       # [N, H, D] this step's Keys (read for positions >= the block's context), D contiguous
    new_value_ptr,     # [N, H, D] this step's Values, D contiguous
    packed_ptr,        # [num_blocks, H, PAGE_BYTES] uint8
    stage_ptr,         # [num_stage_blocks, 2, tokens_per_block, H, D] model dtype, D contiguous
    page_table_ptr,    # [R, max_pages] int32: packed block of each page
    stage_table_ptr,   # [R, max_stage_blocks] int32: sink blocks, then ring blocks
    blocks_ptr,        # [num_query_blocks, 5] int64 (not DECODE): request, first token, first position, tokens,
                       # context (prefill_blocks)
    seq_lens_ptr,      # [R] int32: DECODE only, request r's query is token r at position seq_lens[r] - 1
    out_ptr,           # [N, Hq, D] D contiguous
    partial_ptr,       # [R, Hq, partial_splits, D + 2] float32: SPLIT only (accumulator, max, sum)
    sinks_ptr,         # [Hq] float16 / bfloat16 / float32: HAS_SINKS only, each query head's learned sink logit
    stride_qt, stride_qh, stride_nt, stride_nh, stride_nvt, stride_nvh,
    stride_pb, stride_ph,
    stride_sb, stride_skv, stride_st, stride_sh,
    stride_page_table, stride_stage_table,
    stride_ot, stride_oh,
    scale_log2,        # softmax scale times log2(e)
    soft_cap_log2,     # SOFT_CAP only: the logit soft-cap times log2(e)
    sink_tokens, sink_block_tokens, sink_blocks, ring_tokens_per_block, ring_slots,
    split_base, partial_splits,   # SPLIT only: this launch's splits are partial_ptr's splits split_base + split
    DECODE: tl.constexpr, SPLIT: tl.constexpr, PACKED: tl.constexpr,
    HAS_SINKS: tl.constexpr, SOFT_CAP: tl.constexpr,
    GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, ROWS: tl.constexpr, SLOTS: tl.constexpr, PARTS: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr, NUM_BOOST: tl.constexpr,
    BOOST_ROWS: tl.constexpr,
    TILE: tl.constexpr, STAGE_TILE: tl.constexpr, INTERPRETED: tl.constexpr,
    KEY_LOW_OFFSET: tl.constexpr, KEY_HIGH_OFFSET: tl.constexpr, BOOST_INDEX_OFFSET: tl.constexpr,
    KEY_SCALE_OFFSET: tl.constexpr, KEY_MIN_OFFSET: tl.constexpr, VALUE_CODES_OFFSET: tl.constexpr,
    VALUE_SCALE_OFFSET: tl.constexpr, VALUE_MIN_OFFSET: tl.constexpr,
):
    """Grid (query blocks, H, splits); decode: one query block per request, whose pages SPLIT over
    several programs (partial softmaxes for _merge_splits_kernel) or not. Without PACKED the packed pages
    are skipped (another kernel reads them: kitty_vllm.kernels.decode_gluon). SOFT_CAP caps every score
    (_soft_cap); HAS_SINKS adds each query head's sink logit to its softmax, once: split 0 starts from it."""
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
        request = tl.load(desc)
        first_token = tl.load(desc + 1)
        first_pos = tl.load(desc + 2).to(tl.int32)
        count = tl.load(desc + 3).to(tl.int32)
        context = tl.load(desc + 4).to(tl.int32)

    # A quarter of the channels (one 2-bit plane) is Q wide, padded to QP (common.padded_sizes: masked
    # loads and stores, zero query and key operands; pages keep the true head size).
    Q: tl.constexpr = HEAD_DIM // 4
    QP: tl.constexpr = PADDED_DIM // 4
    quarter: tl.constexpr = NUM_BOOST // 4
    i = tl.arange(0, QP)
    real = i < Q
    r = tl.arange(0, ROWS)
    base_row = r % (ROWS // SLOTS)           # rows repeat in every slot (module docstring)
    part_slot = (r // (ROWS // SLOTS))[:, None]
    own = r < ROWS // SLOTS                  # slot 0
    token = base_row // GROUP_ROWS
    g = base_row % GROUP_ROWS
    row_valid = (token < count) & (g < GROUP)
    position = first_pos + token                                                         # [ROWS]
    q_head = head * GROUP + g
    window = position + 1 - PAGE_SIZE            # [ROWS]: each row's first full-precision position
    last_pos = first_pos + count - 1
    packed_end = last_pos + 1 - PAGE_SIZE        # the block reads positions before this from the pages
    pages = tl.cdiv(tl.maximum(packed_end, 0), PAGE_SIZE) if PACKED else 0

    q_rows = (first_token + token).to(tl.int64) * stride_qt + q_head * stride_qh          # [ROWS]
    stored_query = _load_quarters(query_ptr + q_rows, row_valid, Q, QP)
    query = ()                                                                           # 4 x [ROWS, QP]
    for j in tl.static_range(4):
        query = query + (stored_query[j].to(tl.float32) * scale_log2,)
    running_max = tl.full((ROWS,), SCORE_FLOOR, tl.float32)
    running_sum = tl.zeros((ROWS,), tl.float32)
    if HAS_SINKS:
        if split == 0:
            # A sink is a logit with no value: the softmax state of one token whose value is zero. Split 0
            # alone starts from it, so that the merge of the splits counts it once.
            head_valid = g < GROUP
            sink = tl.load(sinks_ptr + q_head, mask=head_valid, other=0.0).to(tl.float32) * KERNEL_LOG2E
            running_max = tl.where(head_valid, sink, SCORE_FLOOR)
            running_sum = tl.where(head_valid, 1.0, 0.0)
    acc = ()
    for j in tl.static_range(4):
        acc = acc + (tl.zeros((ROWS, QP), tl.float32),)

    stage_row_ptr = stage_table_ptr + request * stride_stage_table
    new_key = new_key_ptr + first_token * stride_nt + head * stride_nh
    new_value = new_value_ptr + first_token * stride_nvt + head * stride_nvh
    if split == 0:
        running_max, running_sum, acc = _attend_full_precision(
            query, running_max, running_sum, acc, part_slot, stage_ptr, stage_row_ptr, new_key, new_value,
            0, tl.minimum(last_pos + 1, sink_tokens), last_pos + 1, first_pos,
            tl.zeros((ROWS,), tl.int32), position, 0, sink_block_tokens, ring_slots, head, soft_cap_log2,
            stride_sb, stride_skv, stride_st, stride_sh, stride_nt, stride_nvt, HEAD_DIM, PADDED_DIM, STAGE_TILE,
            SLOTS, PARTS, SOFT_CAP, INTERPRETED)

    num_splits = tl.num_programs(2)
    per_split = tl.cdiv(pages, num_splits)
    # The packed pages' softmax runs once per query row: on the slots' sum, [ROWS / SLOTS, T].
    page_max = _first_slot(running_max, SLOTS)
    page_sum = _first_slot(running_sum, SLOTS)
    page_window = _first_slot(window, SLOTS)
    t = tl.arange(0, TILE)
    page_row_ptr = page_table_ptr + request * stride_page_table
    for page in range(split * per_split, tl.minimum(split * per_split + per_split, pages)):
        block = tl.load(page_row_ptr + page)
        page_ptr = packed_ptr + block.to(tl.int64) * stride_pb + head.to(tl.int64) * stride_ph
        # Keys: q . (min + scale * code) = (4 q scale) . values + q . min - 4 sum(q scale) (_plane_values).
        key_scale_ptr = (page_ptr + KEY_SCALE_OFFSET).to(tl.pointer_type(tl.float16))
        key_min_ptr = (page_ptr + KEY_MIN_OFFSET).to(tl.pointer_type(tl.float16))
        key_bias = tl.zeros((ROWS,), tl.float32)
        key_parts = ()
        for j in tl.static_range(4):
            key_scale = tl.load(key_scale_ptr + j * Q + i, mask=real, other=0.0).to(tl.float32)
            scaled = query[j] * (4.0 * key_scale)[None, :]                                 # [ROWS, QP]
            key_min = tl.load(key_min_ptr + j * Q + i, mask=real, other=0.0).to(tl.float32)
            key_bias += tl.sum(query[j] * key_min[None, :] - scaled, axis=1)
            key_parts = key_parts + _bf16_parts(scaled, part_slot, PARTS)
        if NUM_BOOST > 0:
            # A boosted channel adds (4 q scale) . high = (16 q scale) . values - 16 sum(q scale). Row
            # j * BOOST_ROWS / 4 + b of the high codes is plane j of the page's high byte b (_high_values):
            # boosted channel j * quarter + b where b < quarter (the other rows repeat bytes, with zero
            # operands: BOOST_ROWS is a power of two, at least MIN_BOOST_ROWS and 4 quarter).
            byte = tl.arange(0, BOOST_ROWS) % (BOOST_ROWS // 4)
            boosted = byte < quarter
            rank = tl.arange(0, BOOST_ROWS) // (BOOST_ROWS // 4) * quarter + byte
            index = tl.load(page_ptr + BOOST_INDEX_OFFSET + rank, mask=boosted, other=0).to(tl.int32)
            boost_scale = tl.load(key_scale_ptr + index,
                                  mask=boosted, other=0.0).to(tl.float32)
            boost_query = tl.load(query_ptr + q_rows[:, None] + index[None, :],
                                  mask=row_valid[:, None] & boosted[None, :], other=0.0).to(tl.float32)
            boost_query = boost_query * (scale_log2 * 16.0) * boost_scale[None, :]        # [ROWS, BOOST_ROWS]
            key_bias -= tl.sum(boost_query, axis=1)
            boost_parts = _bf16_parts(boost_query, part_slot, PARTS)
            high_bytes = KEY_HIGH_OFFSET + (tl.arange(0, BOOST_ROWS // 4) % quarter)[:, None]
        page_bias = _first_slot(key_bias, SLOTS)
        # Page 0 starts with the sinks, read above in full precision, and the last page may end in the
        # window: skip their whole tiles here.
        for start in range(tl.maximum(sink_tokens - page * PAGE_SIZE, 0) // TILE * TILE,
                           tl.minimum(packed_end - page * PAGE_SIZE, PAGE_SIZE), TILE):
            tt = start + t
            key_bytes = tl.load(page_ptr + KEY_LOW_OFFSET + tt[None, :] * Q + i[:, None],
                                mask=real[:, None], other=0)                                     # [QP, T]
            scores = tl.zeros((ROWS, TILE), tl.float32)
            for j in tl.static_range(4):
                scores = _dot_parts(key_parts, PARTS * j, _plane_values(key_bytes, j, INTERPRETED), scores,
                                    PARTS, INTERPRETED)
            if NUM_BOOST > 0:
                high = _high_values(tl.load(page_ptr + high_bytes + tt[None, :] * quarter), INTERPRETED)
                scores = _dot_parts(boost_parts, 0, high, scores, PARTS, INTERPRETED)
            scores = _slot_sum(scores, SLOTS) + page_bias[:, None]                              # [ROWS / SLOTS, T]
            if SOFT_CAP:
                scores = _soft_cap(scores, soft_cap_log2)
            seen = (page * PAGE_SIZE + tt >= sink_tokens)[None, :] & (page * PAGE_SIZE + tt < page_window[:, None])
            probs, page_max, page_sum, correction = _softmax_step(
                tl.where(seen, scores, float("-inf")), page_max, page_sum)
            correction = _to_slots(correction, SLOTS)
            # Values: p . (min + scale * code) = (4 p scale) . values + p . (min - 4 scale).
            value_bytes = tl.load(page_ptr + VALUE_CODES_OFFSET + tt[:, None] * Q + i[None, :],
                                  mask=real[None, :], other=0)                                   # [T, QP]
            value_scale = tl.load((page_ptr + VALUE_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + tt).to(tl.float32)
            value_min = tl.load((page_ptr + VALUE_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + tt).to(tl.float32)
            value_bias = tl.where(own, _to_slots(tl.sum(probs * (value_min - 4.0 * value_scale)[None, :], axis=1),
                                                 SLOTS), 0.0)
            value_parts = _bf16_parts(_to_slots(probs * (4.0 * value_scale)[None, :], SLOTS), part_slot, PARTS)
            updated = ()
            for j in tl.static_range(4):
                updated = updated + (_dot_parts(value_parts, 0, _plane_values(value_bytes, j, INTERPRETED),
                                                acc[j] * correction[:, None] + value_bias[:, None], PARTS,
                                                INTERPRETED),)
            acc = updated

    running_max = _to_slots(page_max, SLOTS)
    running_sum = _to_slots(page_sum, SLOTS)
    if split == num_splits - 1:
        running_max, running_sum, acc = _attend_full_precision(
            query, running_max, running_sum, acc, part_slot, stage_ptr, stage_row_ptr, new_key, new_value,
            tl.maximum(sink_tokens, first_pos + 1 - PAGE_SIZE), last_pos + 1, context, first_pos,
            tl.maximum(window, sink_tokens), position, sink_blocks, ring_tokens_per_block, ring_slots, head,
            soft_cap_log2, stride_sb, stride_skv, stride_st, stride_sh, stride_nt, stride_nvt, HEAD_DIM, PADDED_DIM,
            STAGE_TILE, SLOTS, PARTS, SOFT_CAP, INTERPRETED)

    summed = ()
    for j in tl.static_range(4):
        summed = summed + (_sum_slots(acc[j], SLOTS),)
    acc = summed
    row_valid = row_valid & own
    if not SPLIT:
        # An empty row (e.g. batch padding) gets zeros rather than 0 / 0.
        total = tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        out_rows = (first_token + token).to(tl.int64) * stride_ot + q_head * stride_oh
        for j in tl.static_range(4):
            tl.store(out_ptr + out_rows[:, None] + j * Q + i[None, :], (acc[j] / total).to(out_ptr.dtype.element_ty),
                     mask=row_valid[:, None] & real[None, :])
    else:
        num_q_heads = tl.num_programs(1) * GROUP
        base = ((request * num_q_heads + q_head) * partial_splits + split_base + split) * (HEAD_DIM + 2)   # [ROWS]
        for j in tl.static_range(4):
            tl.store(partial_ptr + base[:, None] + j * Q + i[None, :], acc[j], mask=row_valid[:, None] & real[None, :])
        tl.store(partial_ptr + base + HEAD_DIM, running_max, mask=row_valid)
        tl.store(partial_ptr + base + HEAD_DIM + 1, running_sum, mask=row_valid)


@triton.jit(do_not_specialize=("num_splits",))
def _merge_splits_kernel(
    partial_ptr,       # [B, Hq, num_splits, D + 2] float32: accumulator, running max, running sum
    out_ptr,           # [B, Hq, D] D contiguous
    stride_ot, stride_oh, num_splits,
    SPLIT_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, PADDED_DIM: tl.constexpr,
):
    """Merge the split-K partial softmaxes of one (request, query head): grid (B, Hq). Splits are read
    SPLIT_ROWS at a time in one online pass (each chunk rescales what came before to the new maximum), so
    that any number of splits compiles once, no program holds more than [SPLIT_ROWS, D] (a few hundred
    splits, as one request at long context gets, held at once spilled registers), and each chunk costs one
    round trip to memory (a pass for the maximum first would cost two)."""
    request = tl.program_id(0).to(tl.int64)
    q_head = tl.program_id(1)
    s = tl.arange(0, SPLIT_ROWS)
    c = tl.arange(0, PADDED_DIM)                 # a power of two: masked past HEAD_DIM
    first_row = (request * tl.num_programs(1) + q_head) * num_splits
    top = tl.full((), SCORE_FLOOR, tl.float32)
    total = tl.zeros((SPLIT_ROWS,), tl.float32)
    acc = tl.zeros((SPLIT_ROWS, PADDED_DIM), tl.float32)   # summed over the rows once, after the last chunk
    for first in range(0, num_splits, SPLIT_ROWS):
        valid = first + s < num_splits
        base = (first_row + first + s) * (HEAD_DIM + 2)
        split_max = tl.load(partial_ptr + base + HEAD_DIM, mask=valid, other=SCORE_FLOOR)
        split_sum = tl.load(partial_ptr + base + HEAD_DIM + 1, mask=valid, other=0.0)
        split_acc = tl.load(partial_ptr + base[:, None] + c[None, :], mask=valid[:, None] & (c < HEAD_DIM)[None, :],
                            other=0.0)
        new_top = tl.maximum(top, tl.max(split_max, axis=0))
        weight = tl.exp2(split_max - new_top)
        rescale = tl.exp2(top - new_top)
        total = total * rescale + weight * split_sum
        acc = acc * rescale + weight[:, None] * split_acc
        top = new_top
    total = tl.sum(total, axis=0)
    out = tl.sum(acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + request * stride_ot + q_head * stride_oh + c, out.to(out_ptr.dtype.element_ty),
             mask=c < HEAD_DIM)


def _check(query, new_key, new_value, packed, stage, page_table, stage_table, config, stage_layout, out, soft_cap,
           sinks):
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
    if (stage_layout.page != layout or stage_layout.num_kv_heads != num_kv_heads
            or stage_layout.ring_slots != config.ring_slots):
        raise ValueError(f"stage_layout is for page_size {stage_layout.page.page_size}, head_dim "
                         f"{stage_layout.page.head_dim}, {stage_layout.num_kv_heads} KV heads, "
                         f"{stage_layout.ring_slots} ring slots; the cache has page_size {layout.page_size}, "
                         f"head_dim {head_dim}, {num_kv_heads} KV heads, {config.ring_slots} ring slots")
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
    if soft_cap < 0:
        raise ValueError(f"soft_cap must be positive (or 0: no soft-capping), got {soft_cap}")
    if sinks is not None and (tuple(sinks.shape) != (num_heads,) or sinks.device != query.device
                              or sinks.dtype not in (torch.float16, torch.bfloat16, torch.float32)
                              or sinks.stride(0) != 1):
        raise ValueError(f"sinks must be one contiguous float logit per query head, [{num_heads}] on "
                         f"{query.device}, got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}")
    for name, tensor in (("query", query), ("stage", stage), ("out", out), ("new_key", new_key),
                         ("new_value", new_value)):
        if tensor is not None and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim")
    return layout


def kernel_constants(layout: PageLayout, num_heads: int, num_kv_heads: int, decode: bool,
                     split: bool = False, packed: bool = True) -> dict[str, int | bool]:
    """The constexpr arguments of _attention_kernel for a decode launch (``split``: several programs per
    request and KV head) or a prefill launch.
    The number of splits is the grid's, not a constant, so one compiled kernel serves every batch size."""
    group = num_heads // num_kv_heads
    if decode:
        group_rows = triton.next_power_of_2(group)
        slots = PART_SLOTS if PART_SLOTS * group_rows <= MAX_STACKED_ROWS else 1
        rows = max(MIN_DOT_SIZE, slots * group_rows)
    else:
        block_q, group_rows = _prefill_block_tokens(num_heads, num_kv_heads, layout.page_size)
        slots, rows = 1, max(MIN_DOT_SIZE, block_q * group_rows)
    head_dim = layout.head_dim
    padded = padded_sizes(layout)
    return dict(
        DECODE=decode, SPLIT=split, PACKED=packed, GROUP=group, GROUP_ROWS=group_rows, ROWS=rows,
        SLOTS=slots, PARTS=1 if slots > 1 else 3, PAGE_SIZE=layout.page_size, HEAD_DIM=head_dim,
        PADDED_DIM=padded["PADDED_DIM"], NUM_BOOST=layout.num_boost,
        BOOST_ROWS=max(MIN_BOOST_ROWS, padded["PADDED_BOOST"]),
        TILE=max(MIN_DOT_SIZE, min(layout.page_size, TILE_CODES // padded["PADDED_DIM"])),
        STAGE_TILE=max(MIN_DOT_SIZE, min(layout.page_size, STAGE_TILE)),
        INTERPRETED=os.environ.get("TRITON_INTERPRET") == "1", **section_offsets(layout))


def _launch(query, new_key, new_value, packed, stage, page_table, stage_table, blocks, seq_lens, out,
            partial, config, stage_layout, layout, scale, soft_cap, sinks, grid, decode, num_warps, split_base=0,
            partial_splits=None, read_pages=True):
    new_key = query if new_key is None else new_key        # not read: every position is in the cache
    new_value = query if new_value is None else new_value
    _attention_kernel[grid](
        query, new_key, new_value, packed, stage, page_table, stage_table, blocks, seq_lens, out, partial,
        query if sinks is None else sinks,                 # not read without sinks
        query.stride(0), query.stride(1), new_key.stride(0), new_key.stride(1),
        new_value.stride(0), new_value.stride(1),
        packed.stride(0), packed.stride(1),
        stage.stride(0), stage.stride(1), stage.stride(2), stage.stride(3),
        page_table.stride(0), stage_table.stride(0),
        out.stride(0), out.stride(1),
        scale * LOG2E, soft_cap * LOG2E,
        config.sink_tokens, stage_layout.block_tokens, stage_layout.sink_blocks, stage_layout.tokens_per_block,
        stage_layout.ring_slots, split_base, grid[2] if partial_splits is None else partial_splits,
        **kernel_constants(layout, query.shape[1], packed.shape[1], decode, partial is not out, read_pages),
        HAS_SINKS=sinks is not None, SOFT_CAP=soft_cap > 0, num_warps=num_warps,
    )


def decode_attention(query: torch.Tensor, packed: torch.Tensor, stage: torch.Tensor,
                     page_table: torch.Tensor, stage_table: torch.Tensor, seq_lens: torch.Tensor,
                     config: KittyConfig, stage_layout: StageLayout, scale: float,
                     out: torch.Tensor | None = None, soft_cap: float = 0.0,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each request's newest token over its kitty cache (module docstring).

    query [B, Hq, D] (float16, bfloat16 or float32) at position ``seq_lens[b] - 1``, already stored
    (kitty_vllm.kernels.store); packed uint8 [num_blocks, H, page_bytes]; stage [num_stage_blocks, 2
    (K, V), tokens_per_block, H, D] in the query's dtype (``PagedKittyCache.stage``); page_table int32
    [B, max_pages] (valid for the pages before the window, ``ceil(seq_lens[b] / page_size) - 1`` per
    row); stage_table int32 [B, max_stage_blocks] (at least ``stage_layout.blocks_needed(seq_lens[b])``);
    seq_lens int32 [B] (0: an empty row, e.g. padding). Hq is a multiple of H. ``soft_cap`` > 0 caps the
    scores and ``sinks`` [Hq] are learned sink logits, as in reference.schedule_attention. Returns ``out``
    [B, Hq, D], allocated in the query's dtype if not given. No host synchronization: CUDA graphs can
    capture it.
    """
    layout = _check(query, None, None, packed, stage, page_table, stage_table, config, stage_layout, out,
                    soft_cap, sinks)
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
    grid = (num_requests, num_kv_heads)
    if decode_gluon.supported(layout, num_heads // num_kv_heads, query.device, soft_cap):
        # The packed pages in Gluon (splits 0 .. splits - 1), the sinks and ring here (split ``splits``,
        # the launch's split 0, which also starts from the learned sinks).
        splits = num_splits(num_requests, num_kv_heads, max(1, page_table.shape[1]), query.device,
                            decode_gluon.PROGRAMS_PER_SM, decode_gluon.MAX_SPLITS)
        partial = torch.empty(num_requests, num_heads, splits + 1, head_dim + 2, dtype=torch.float32,
                              device=query.device)
        decode_gluon.decode_pages(query, packed, page_table, seq_lens, partial, splits, config, layout, scale)
        _launch(query, None, None, packed, stage, page_table, stage_table, seq_lens, seq_lens, out, partial,
                config, stage_layout, layout, scale, soft_cap, sinks, (*grid, 1), True, DECODE_WARPS, split_base=splits,
                partial_splits=splits + 1, read_pages=False)
        splits += 1
    else:
        splits = num_splits(num_requests, num_kv_heads, max(1, page_table.shape[1]), query.device,
                            PROGRAMS_PER_SM, MAX_SPLITS)
        partial = (torch.empty(num_requests, num_heads, splits, head_dim + 2, dtype=torch.float32,
                               device=query.device) if splits > 1 else out)
        _launch(query, None, None, packed, stage, page_table, stage_table, seq_lens, seq_lens, out, partial,
                config, stage_layout, layout, scale, soft_cap, sinks, (*grid, splits), True, DECODE_WARPS)
    if splits > 1:
        _merge_splits_kernel[(num_requests, num_heads)](
            partial, out, out.stride(0), out.stride(1), splits,
            SPLIT_ROWS=min(MERGE_SPLIT_ROWS, triton.next_power_of_2(splits)), HEAD_DIM=head_dim,
            PADDED_DIM=triton.next_power_of_2(head_dim))
    return out


def _prefill_block_tokens(num_heads: int, num_kv_heads: int, page_size: int) -> tuple[int, int]:
    """(query positions per prefill program, padded GQA rows per position): PREFILL_ROWS rows in all, and
    at most one page of positions (a power of two, so blocks aligned to it never cross a page)."""
    group_rows = triton.next_power_of_2(num_heads // num_kv_heads)
    return min(max(1, PREFILL_ROWS // group_rows), page_size), group_rows


def prefill_blocks(spans: Sequence[tuple[int, int, int, int]], page_size: int, num_heads: int,
                   num_kv_heads: int) -> torch.Tensor:
    """The query blocks of :func:`prefill_attention` for ``spans`` (row, first, end, context): int64
    [num_blocks, 5] on the host, a row (table row, first token, first position, tokens, context) per
    block. A block starts at each span's first position and at every multiple of the block size."""
    block_q, _ = _prefill_block_tokens(num_heads, num_kv_heads, page_size)
    spans = torch.tensor(spans, dtype=torch.int64).view(-1, 4)
    lengths = spans[:, 2] - spans[:, 1]
    span = torch.repeat_interleave(torch.arange(len(spans)), lengths)        # [tokens]: span of each token
    offset = torch.arange(len(span)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    position = spans[span, 3] + offset
    starts = torch.nonzero((offset == 0) | (position % block_q == 0)).flatten()
    counts = torch.diff(starts, append=torch.tensor([len(span)]))
    s = span[starts]
    return torch.stack([spans[s, 0], spans[s, 1] + offset[starts], position[starts], counts, spans[s, 3]], dim=1)


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: torch.Tensor,
                      stage: torch.Tensor, page_table: torch.Tensor, stage_table: torch.Tensor,
                      blocks: torch.Tensor, config: KittyConfig, stage_layout: StageLayout, scale: float,
                      out: torch.Tensor | None = None, soft_cap: float = 0.0,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of this step's tokens of several requests over their kitty cache (module docstring).

    ``blocks`` is :func:`prefill_blocks` of the requests' spans ``(row, first, end, context)``, on the
    query's device: tokens ``first:end`` of query [N, Hq, D] and of key/value [N, H, D] are one request
    at positions from ``context`` on, with row ``row`` of page_table and stage_table (as in
    :func:`decode_attention`). The cache must hold this step's sinks and the pages this step completes;
    the ring must hold positions ``[context - page_size, context)`` (PagedKittyCache orders its store
    so). ``soft_cap`` and ``sinks`` as in :func:`decode_attention`. Writes the spans' rows of ``out``
    [N, Hq, D] (allocated in the query's dtype if not given) and returns it.
    """
    layout = _check(query, key, value, packed, stage, page_table, stage_table, config, stage_layout, out,
                    soft_cap, sinks)
    if blocks.dtype != torch.int64 or blocks.dim() != 2 or blocks.shape[1] != 5 or not blocks.is_contiguous():
        raise ValueError(f"blocks must be contiguous int64 [num_blocks, 5] (prefill_blocks), got {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    out = torch.empty_like(query) if out is None else out
    if not len(blocks):
        return out
    _launch(query, key, value, packed, stage, page_table, stage_table, blocks, blocks, out, out,
            config, stage_layout, layout, scale, soft_cap, sinks, (len(blocks), packed.shape[1], 1), False,
            PREFILL_WARPS)
    return out


@functools.cache
def _flash_version(head_dim: int) -> int | None:
    """The FlashAttention version vLLM runs for ``head_dim`` on this GPU, or None without one."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version, is_flash_attn_varlen_func_available
    except ImportError:
        return None
    return get_flash_attn_version(head_size=head_dim) if is_flash_attn_varlen_func_available() else None


def context_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, host_q: Sequence[int], host_k: Sequence[int],
                      scale: float, soft_cap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention in full precision of sequences whose queries are their last positions: sequence
    i has queries ``host_q[i]:host_q[i + 1]`` of query [M, Hq, D] and keys ``host_k[i]:host_k[i + 1]`` of
    key/value [L, H, D] (positions from 0; query k of n reads keys up to position ``keys - n + k``);
    ``cu_seqlens_q`` / ``cu_seqlens_k`` are the same bounds, int32 on the query's device. ``soft_cap`` and
    ``sinks`` [Hq] as in reference.schedule_attention. Returns out [M, Hq, D] in the query's dtype.
    vLLM's FlashAttention where the GPU has it (with sinks, FlashAttention 3 or 4: FA2 has no ``s_aux``),
    else float32 PyTorch."""
    version = _flash_version(query.shape[-1]) if query.is_cuda and query.dtype != torch.float32 else None
    if sinks is not None and version not in (3, 4):
        version = None
    if version is not None:
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

        longest_q = max(b - a for a, b in zip(host_q, host_q[1:]))
        longest_k = max(b - a for a, b in zip(host_k, host_k[1:]))
        return flash_attn_varlen_func(query, key, value, longest_q, cu_seqlens_q, longest_k, cu_seqlens_k=cu_seqlens_k,
                                      softmax_scale=scale, causal=True, softcap=soft_cap, fa_version=version,
                                      s_aux=sinks)
    out = torch.empty_like(query)
    group = query.shape[1] // key.shape[1]
    for a, b, c, d in zip(host_q, host_q[1:], host_k, host_k[1:]):
        q = query[a:b].float().transpose(0, 1)                                       # [Hq, n, D]
        k, v = (x[c:d].float().transpose(0, 1).repeat_interleave(group, 0) for x in (key, value))
        hidden = torch.ones(b - a, d - c, dtype=torch.bool, device=q.device).triu(d - c - (b - a) + 1)
        scores = q @ k.transpose(1, 2) * scale
        if soft_cap:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        scores = scores.masked_fill(hidden, -torch.inf)
        if sinks is not None:   # one more logit per query head, with no value
            sink = sinks.float()[:, None, None].expand(-1, b - a, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[a:b] = (probs @ v).transpose(0, 1).to(out.dtype)
    return out
