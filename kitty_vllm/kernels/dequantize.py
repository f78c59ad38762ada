"""Dequantize packed pages into rows of full-precision Keys and Values (oracle: reference.dequantize_pages),
for attention that reads a request's context in the model dtype (kitty_vllm.paged)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels.common import check_cache, kernel_layout, padded_sizes, section_offsets


@triton.jit
def _dequantize_page_kernel(
    cache_ptr,         # [num_blocks, H, PAGE_BYTES] uint8
    block_ptr,         # [num_pages] int32: the cache block of each page
    row_ptr,           # [num_pages] int64: the row of keys / values that gets each page's first token
    key_ptr,           # [L, H, D] float16 / bfloat16 / float32, D contiguous
    value_ptr,         # [L, H, D] same dtype, D contiguous
    stride_cb, stride_ch, stride_kt, stride_kh, stride_vt, stride_vh,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_BOOST: tl.constexpr,
    PADDED_DIM: tl.constexpr, PADDED_BOOST: tl.constexpr,
    KEY_LOW_OFFSET: tl.constexpr, KEY_HIGH_OFFSET: tl.constexpr, BOOST_INDEX_OFFSET: tl.constexpr,
    KEY_SCALE_OFFSET: tl.constexpr, KEY_MIN_OFFSET: tl.constexpr, VALUE_CODES_OFFSET: tl.constexpr,
    VALUE_SCALE_OFFSET: tl.constexpr, VALUE_MIN_OFFSET: tl.constexpr,
):
    """Grid (num_pages, H): one page of one KV head, ``min + code * scale`` in float32 (the reference's
    math), stored in the output dtype. Channel ``j * D / 4 + i`` is 2-bit plane j of byte i (planar
    layout); boosted rank ``j * K / 4 + b`` is plane j of high byte b, for channel boost_index[rank]. Bytes
    and ranks run over power-of-two ranges (common.padded_sizes), masked past the true ones."""
    page = tl.program_id(0)
    head = tl.program_id(1)
    page_ptr = cache_ptr + tl.load(block_ptr + page).to(tl.int64) * stride_cb + head * stride_ch
    rows = tl.load(row_ptr + page) + tl.arange(0, PAGE_SIZE).to(tl.int64)                    # [P]
    Q: tl.constexpr = HEAD_DIM // 4
    t = tl.arange(0, PAGE_SIZE)
    i = tl.arange(0, PADDED_DIM // 4)
    real = i < Q
    key_bytes = tl.load(page_ptr + KEY_LOW_OFFSET + t[:, None] * Q + i[None, :], mask=real[None, :],
                        other=0).to(tl.int32)                                                # [P, PADDED_DIM / 4]
    value_bytes = tl.load(page_ptr + VALUE_CODES_OFFSET + t[:, None] * Q + i[None, :], mask=real[None, :],
                          other=0).to(tl.int32)
    value_scale = tl.load((page_ptr + VALUE_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
    value_min = tl.load((page_ptr + VALUE_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
    key_scale_ptr = (page_ptr + KEY_SCALE_OFFSET).to(tl.pointer_type(tl.float16))
    key_min_ptr = (page_ptr + KEY_MIN_OFFSET).to(tl.pointer_type(tl.float16))
    for j in tl.static_range(4):
        channel = j * Q + i                                                                 # [PADDED_DIM / 4]
        code = (key_bytes >> (2 * j)) & 3
        if NUM_BOOST > 0:
            rank = tl.arange(0, PADDED_BOOST)
            index = tl.load(page_ptr + BOOST_INDEX_OFFSET + rank, mask=rank < NUM_BOOST, other=0).to(tl.int32)
            index = tl.where(rank < NUM_BOOST, index, -1)                                   # padded ranks: no channel
            match = (index[None, :] == channel[:, None]) & real[:, None]                    # [PADDED_DIM / 4, K]
            boosted = tl.max(match.to(tl.int32), axis=1) > 0
            channel_rank = tl.sum(tl.where(match, rank[None, :], 0), axis=1)                # [Q]
            high_byte = tl.load(page_ptr + KEY_HIGH_OFFSET + t[:, None] * (NUM_BOOST // 4)
                                + (channel_rank % (NUM_BOOST // 4))[None, :]).to(tl.int32)   # [P, PADDED_DIM / 4]
            high = (high_byte >> (2 * (channel_rank // (NUM_BOOST // 4)))[None, :]) & 3
            code = code + tl.where(boosted[None, :], high << 2, 0)
        key_scale = tl.load(key_scale_ptr + channel, mask=real, other=0.0).to(tl.float32)
        key_min = tl.load(key_min_ptr + channel, mask=real, other=0.0).to(tl.float32)
        keys = key_min[None, :] + code.to(tl.float32) * key_scale[None, :]
        tl.store(key_ptr + rows[:, None] * stride_kt + head * stride_kh + channel[None, :],
                 keys.to(key_ptr.dtype.element_ty), mask=real[None, :])
        values = value_min[:, None] + ((value_bytes >> (2 * j)) & 3).to(tl.float32) * value_scale[:, None]
        tl.store(value_ptr + rows[:, None] * stride_vt + head * stride_vh + channel[None, :],
                 values.to(value_ptr.dtype.element_ty), mask=real[None, :])


def dequantize_pages(cache: torch.Tensor, block_ids: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, config: KittyConfig) -> None:
    """Dequantize packed pages into rows of Keys and Values (reference.dequantize_pages).

    cache: uint8 [num_blocks, H, page_bytes]; block_ids: int32 [num_pages], the block of each page;
    rows: int64 [num_pages]; keys, values: [L, H, D] (float16, bfloat16 or float32, head_dim contiguous),
    written in place: rows ``rows[i] .. rows[i] + page_size - 1`` get page i (a sink row gets what the
    page's codes give: the caller writes the sinks over it).
    """
    head_dim = keys.shape[-1]
    layout = kernel_layout(config, head_dim)
    check_cache(cache, layout)
    num_pages = block_ids.shape[0]
    if keys.dim() != 3 or values.shape != keys.shape or keys.shape[1] != cache.shape[1]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must be [rows, "
                         f"{cache.shape[1]}, head_dim]")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("keys and values need a contiguous head_dim")
    if block_ids.dtype != torch.int32 or rows.dtype != torch.int64 or rows.shape != (num_pages,):
        raise ValueError(f"block_ids must be int32 and rows int64, both [num_pages], got {block_ids.dtype} "
                         f"{tuple(block_ids.shape)} and {rows.dtype} {tuple(rows.shape)}")
    if num_pages == 0:
        return
    _dequantize_page_kernel[(num_pages, cache.shape[1])](
        cache, block_ids, rows, keys, values,
        cache.stride(0), cache.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        PAGE_SIZE=layout.page_size, HEAD_DIM=head_dim, NUM_BOOST=layout.num_boost, **padded_sizes(layout),
        **section_offsets(layout),
        num_warps=4,
    )
