"""Quantize-and-pack full pages into the paged kitty cache (oracle: reference.quantize_page)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels.common import (BOOST_POLICY_IDS, check_cache, kernel_layout, pack_2bit, padded_sizes,
                                       section_offsets)
from kitty_vllm import reference

KEY_LEVELS = tl.constexpr(reference.KEY_LEVELS)
BOOST_LEVELS = tl.constexpr(reference.BOOST_LEVELS)
VALUE_LEVELS = tl.constexpr(reference.VALUE_LEVELS)
RANDOM_POLICY_MULTIPLIER = tl.constexpr(reference.RANDOM_POLICY_MULTIPLIER)


@triton.jit
def _codes(x, minimum, scale, levels):
    """Shared rounding rule (reference.quantize): float32 x, float16-rounded minimum/scale."""
    mn = minimum.to(tl.float32)
    sc = scale.to(tl.float32)
    q = tl.floor(tl.math.div_rn(x - mn, tl.where(sc > 0, sc, 1.0)) + 0.5)
    q = tl.where(sc > 0, q, 0.0)
    return tl.minimum(tl.maximum(q, 0.0), levels).to(tl.int32)


@triton.jit
def _boost_scores(x, valid, channel, mx, mn, BOOST_POLICY: tl.constexpr):
    """float64 [D] scores of reference.boost_scores (float64 so that both agree on the order); mx and mn
    [D]: each channel's max and min over the valid rows."""
    if BOOST_POLICY == 0:
        score = tl.sum(tl.where(valid[:, None], tl.abs(x), 0.0).to(tl.float64), axis=0)
    elif BOOST_POLICY == 3:
        score = mx.to(tl.float64) - mn.to(tl.float64)
    elif BOOST_POLICY == 1:
        xd = x.to(tl.float64)
        count = tl.sum(valid.to(tl.float64), axis=0)
        mean = tl.sum(tl.where(valid[:, None], xd, 0.0), axis=0) / count
        dev = xd - mean[None, :]
        score = tl.sum(tl.where(valid[:, None], dev * dev, 0.0), axis=0)
    else:
        hashed = ((channel + 1).to(tl.int64) * RANDOM_POLICY_MULTIPLIER) & 0xFFFFFFFF
        score = hashed.to(tl.float64)
    return score


@triton.jit
def _top_columns(score, column, NUM_BOOST: tl.constexpr):
    """bool [N]: the NUM_BOOST columns of highest score [N], ties to the lower column: the first NUM_BOOST of
    a stable descending sort (reference.select_boost_channels; NaN first, as torch sorts it). Each column's
    rank counts the columns ahead of it, all pairs compared at once: one reduction, where NUM_BOOST argmax
    passes in a row made the page's packing wait on as many cross-warp reductions."""
    score = tl.where(score != score, float("inf"), score)
    other, own = score[None, :], score[:, None]
    ahead = (other > own) | ((other == own) & (column[None, :] < column[:, None]))     # [N, N]: column j ahead of i
    return tl.sum(ahead.to(tl.int32), axis=1) < NUM_BOOST


@triton.jit
def padded_channels(PADDED_DIM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The channel of each padded column ``j * PADDED_DIM / 4 + i`` (common.padded_sizes), [PADDED_DIM],
    and whether it is one (``i < HEAD_DIM / 4``)."""
    column = tl.arange(0, PADDED_DIM)
    i = column % (PADDED_DIM // 4)
    return column // (PADDED_DIM // 4) * (HEAD_DIM // 4) + i, i < HEAD_DIM // 4


@triton.jit
def pack_page(
    x, y,              # float32 [PAGE_SIZE, PADDED_DIM]: the page's Keys (after RoPE) and Values, channels at
                       # their padded columns (padded_channels), 0 in the others
    first_pos,         # sequence position of the page's first token
    page_ptr,          # uint8 [PAGE_BYTES]: the page of one KV head in the packed cache
    sink_tokens,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_BOOST: tl.constexpr,
    PADDED_DIM: tl.constexpr, PADDED_BOOST: tl.constexpr, BOOST_POLICY: tl.constexpr,
    KEY_LOW_OFFSET: tl.constexpr, KEY_HIGH_OFFSET: tl.constexpr, BOOST_INDEX_OFFSET: tl.constexpr,
    KEY_SCALE_OFFSET: tl.constexpr, KEY_MIN_OFFSET: tl.constexpr, VALUE_CODES_OFFSET: tl.constexpr,
    VALUE_SCALE_OFFSET: tl.constexpr, VALUE_MIN_OFFSET: tl.constexpr,
):
    """Quantize one page of one KV head and write every section of it (reference.quantize_page). Padded
    columns are quantized too, but never boosted, never in a Value's range and never stored: packing the
    padded columns' codes plane by plane (pack_2bit) puts each real channel's code in its true byte."""
    t = tl.arange(0, PAGE_SIZE)
    c, real = padded_channels(PADDED_DIM, HEAD_DIM)
    column = tl.arange(0, PADDED_DIM)
    Q: tl.constexpr = HEAD_DIM // 4
    byte = tl.arange(0, PADDED_DIM // 4)
    # Keys: per channel over the page's non-sink tokens, top-NUM_BOOST channels on 4 bits.
    valid = first_pos + t >= sink_tokens
    mx = tl.max(tl.where(valid[:, None], x, float("-inf")), axis=0)
    mn = tl.min(tl.where(valid[:, None], x, float("inf")), axis=0)
    boosted = c < 0
    if NUM_BOOST > 0:
        # Padded columns never win; the real ones keep channel order, so ties still go to the lower channel.
        boosted = _top_columns(tl.where(real, _boost_scores(x, valid, c, mx, mn, BOOST_POLICY), float("-inf")), column,
                               NUM_BOOST)
    levels = tl.where(boosted, BOOST_LEVELS, KEY_LEVELS).to(tl.float32)
    scale = ((mx - mn) / levels).to(tl.float16)
    minimum = mn.to(tl.float16)
    codes = _codes(x, minimum[None, :], scale[None, :], levels[None, :])
    tl.store((page_ptr + KEY_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + c, scale, mask=real)
    tl.store((page_ptr + KEY_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + c, minimum, mask=real)
    tl.store(page_ptr + KEY_LOW_OFFSET + t[:, None] * Q + byte[None, :],
             pack_2bit(codes & 3, PAGE_SIZE, PADDED_DIM), mask=(byte < Q)[None, :])
    if NUM_BOOST > 0:
        # Boosted channels in ascending order: channel c goes to rank (boosted channels before c). The
        # high codes are planar over the ranks, padded as the channels are: padded rank column
        # j * PADDED_BOOST / 4 + b holds rank j * NUM_BOOST / 4 + b.
        rank = tl.cumsum(boosted.to(tl.int32), axis=0) - 1
        K: tl.constexpr = NUM_BOOST // 4
        r = tl.arange(0, PADDED_BOOST)
        b = r % (PADDED_BOOST // 4)
        real_rank = b < K
        true_rank = r // (PADDED_BOOST // 4) * K + b
        picked = boosted[None, :] & (rank[None, :] == true_rank[:, None]) & real_rank[:, None]
        index = tl.sum(tl.where(picked, column[None, :], 0), axis=1)                     # padded columns
        channel = tl.sum(tl.where(picked, c[None, :], 0), axis=1)
        tl.store(page_ptr + BOOST_INDEX_OFFSET + true_rank, channel.to(tl.uint8), mask=real_rank)
        high = tl.gather(codes >> 2, tl.broadcast_to(index[None, :], (PAGE_SIZE, PADDED_BOOST)), axis=1)
        hq = tl.arange(0, PADDED_BOOST // 4)
        tl.store(page_ptr + KEY_HIGH_OFFSET + t[:, None] * K + hq[None, :],
                 pack_2bit(high, PAGE_SIZE, PADDED_BOOST), mask=(hq < K)[None, :])

    # Values: per token over head_dim.
    v_max = tl.max(tl.where(real[None, :], y, float("-inf")), axis=1)
    v_min = tl.min(tl.where(real[None, :], y, float("inf")), axis=1)
    v_scale = ((v_max - v_min) / VALUE_LEVELS).to(tl.float16)
    v_min = v_min.to(tl.float16)
    v_codes = _codes(y, v_min[:, None], v_scale[:, None], VALUE_LEVELS)
    tl.store(page_ptr + VALUE_CODES_OFFSET + t[:, None] * Q + byte[None, :],
             pack_2bit(v_codes, PAGE_SIZE, PADDED_DIM), mask=(byte < Q)[None, :])
    tl.store((page_ptr + VALUE_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + t, v_scale)
    tl.store((page_ptr + VALUE_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + t, v_min)


@triton.jit
def _quantize_page_kernel(
    keys_ptr,          # [num_pages, P, H, D] float16 / bfloat16 / float32, D contiguous
    values_ptr,        # [num_pages, P, H, D] same dtype, D contiguous
    first_pos_ptr,     # [num_pages] int32: sequence position of each page's first token
    block_ids_ptr,     # [num_pages] int32: cache block that receives each page
    cache_ptr,         # [num_blocks, H, PAGE_BYTES] uint8
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_cb, stride_ch,
    sink_tokens,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_BOOST: tl.constexpr,
    PADDED_DIM: tl.constexpr, PADDED_BOOST: tl.constexpr, BOOST_POLICY: tl.constexpr,
    KEY_LOW_OFFSET: tl.constexpr, KEY_HIGH_OFFSET: tl.constexpr, BOOST_INDEX_OFFSET: tl.constexpr,
    KEY_SCALE_OFFSET: tl.constexpr, KEY_MIN_OFFSET: tl.constexpr, VALUE_CODES_OFFSET: tl.constexpr,
    VALUE_SCALE_OFFSET: tl.constexpr, VALUE_MIN_OFFSET: tl.constexpr,
):
    """One program quantizes one page of one KV head: grid (num_pages, H)."""
    page = tl.program_id(0)
    head = tl.program_id(1)
    t = tl.arange(0, PAGE_SIZE)
    c, real = padded_channels(PADDED_DIM, HEAD_DIM)
    page_ptr = (cache_ptr + tl.load(block_ids_ptr + page).to(tl.int64) * stride_cb
                + head.to(tl.int64) * stride_ch)
    x = tl.load(keys_ptr + page.to(tl.int64) * stride_kp + head * stride_kh
                + t[:, None] * stride_kt + c[None, :], mask=real[None, :], other=0.0).to(tl.float32)
    y = tl.load(values_ptr + page.to(tl.int64) * stride_vp + head * stride_vh
                + t[:, None] * stride_vt + c[None, :], mask=real[None, :], other=0.0).to(tl.float32)
    pack_page(x, y, tl.load(first_pos_ptr + page), page_ptr, sink_tokens,
              PAGE_SIZE, HEAD_DIM, NUM_BOOST, PADDED_DIM, PADDED_BOOST, BOOST_POLICY,
              KEY_LOW_OFFSET, KEY_HIGH_OFFSET, BOOST_INDEX_OFFSET, KEY_SCALE_OFFSET, KEY_MIN_OFFSET,
              VALUE_CODES_OFFSET, VALUE_SCALE_OFFSET, VALUE_MIN_OFFSET)


def quantize_pages(keys: torch.Tensor, values: torch.Tensor, first_positions: torch.Tensor,
                   block_ids: torch.Tensor, cache: torch.Tensor, config: KittyConfig) -> None:
    """Quantize full pages and write them into the paged cache.

    keys, values: [num_pages, P, H, D] (float16, bfloat16 or float32; head_dim contiguous), the
        full-precision Keys (after RoPE) and Values of each page.
    first_positions: int32 [num_pages], the sequence position of each page's first token (rows below
        ``config.sink_tokens`` are sinks and stay out of the statistics).
    block_ids: int32 [num_pages], the cache block each page is written to.
    cache: uint8 [num_blocks, H, page_bytes], written in place.
    """
    num_pages, page_size, num_heads, head_dim = keys.shape
    layout = kernel_layout(config, head_dim)
    check_cache(cache, layout)
    if values.shape != keys.shape or page_size != layout.page_size or cache.shape[1] != num_heads:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be "
                         f"[num_pages, {layout.page_size}, {cache.shape[1]}, {head_dim}]")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("keys and values need a contiguous head_dim")
    for name, t in (("first_positions", first_positions), ("block_ids", block_ids)):
        if t.dtype != torch.int32 or t.shape != (num_pages,):
            raise ValueError(f"{name} must be int32 [{num_pages}], got {t.dtype} {tuple(t.shape)}")
    if num_pages == 0:
        return
    _quantize_page_kernel[(num_pages, num_heads)](
        keys, values, first_positions, block_ids, cache,
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        cache.stride(0), cache.stride(1),
        config.sink_tokens,
        PAGE_SIZE=page_size, HEAD_DIM=head_dim, NUM_BOOST=layout.num_boost, **padded_sizes(layout),
        BOOST_POLICY=BOOST_POLICY_IDS[config.boost_policy],
        **section_offsets(layout), num_warps=8,
    )
