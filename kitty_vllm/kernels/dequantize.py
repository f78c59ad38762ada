"""Dequantize pages of the paged kitty cache (oracle: reference.dequantize_pages)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels.common import (boost_channel_ranks, check_cache, kernel_layout, section_offsets,
                                       unpack_2bit)


@triton.jit
def _dequantize_page_kernel(
    cache_ptr,         # [num_blocks, H, PAGE_BYTES] uint8
    block_ids_ptr,     # [num_pages] int32: cache block of each page
    keys_ptr,          # [num_pages, P, H, D] output
    values_ptr,        # [num_pages, P, H, D] output
    stride_cb, stride_ch,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_BOOST: tl.constexpr,
    KEY_LOW_OFFSET: tl.constexpr, KEY_HIGH_OFFSET: tl.constexpr, BOOST_INDEX_OFFSET: tl.constexpr,
    KEY_SCALE_OFFSET: tl.constexpr, KEY_MIN_OFFSET: tl.constexpr, VALUE_CODES_OFFSET: tl.constexpr,
    VALUE_SCALE_OFFSET: tl.constexpr, VALUE_MIN_OFFSET: tl.constexpr,
):
    """One program dequantizes one page of one KV head: grid (num_pages, H)."""
    page = tl.program_id(0)
    head = tl.program_id(1)
    t = tl.arange(0, PAGE_SIZE)
    c = tl.arange(0, HEAD_DIM)
    page_ptr = (cache_ptr + tl.load(block_ids_ptr + page).to(tl.int64) * stride_cb
                + head.to(tl.int64) * stride_ch)

    every = t[:, None] >= 0
    codes = unpack_2bit(page_ptr + KEY_LOW_OFFSET, t, c, every, HEAD_DIM)
    if NUM_BOOST > 0:
        boosted, rank = boost_channel_ranks(page_ptr + BOOST_INDEX_OFFSET, c, NUM_BOOST)
        codes += unpack_2bit(page_ptr + KEY_HIGH_OFFSET, t, rank, every & boosted[None, :], NUM_BOOST) << 2
    scale = tl.load((page_ptr + KEY_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + c).to(tl.float32)
    minimum = tl.load((page_ptr + KEY_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + c).to(tl.float32)
    keys = minimum[None, :] + codes.to(tl.float32) * scale[None, :]
    tl.store(keys_ptr + page.to(tl.int64) * stride_kp + head * stride_kh
             + t[:, None] * stride_kt + c[None, :], keys.to(keys_ptr.dtype.element_ty))

    v_codes = unpack_2bit(page_ptr + VALUE_CODES_OFFSET, t, c, every, HEAD_DIM)
    v_scale = tl.load((page_ptr + VALUE_SCALE_OFFSET).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
    v_min = tl.load((page_ptr + VALUE_MIN_OFFSET).to(tl.pointer_type(tl.float16)) + t).to(tl.float32)
    values = v_min[:, None] + v_codes.to(tl.float32) * v_scale[:, None]
    tl.store(values_ptr + page.to(tl.int64) * stride_vp + head * stride_vh
             + t[:, None] * stride_vt + c[None, :], values.to(values_ptr.dtype.element_ty))


def dequantize_pages(cache: torch.Tensor, block_ids: torch.Tensor, config: KittyConfig, head_dim: int,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[num_pages, P, H, D]`` of the pages in ``block_ids`` (int32 [num_pages]) of
    ``cache`` (uint8 [num_blocks, H, page_bytes])."""
    layout = kernel_layout(config, head_dim)
    check_cache(cache, layout)
    if block_ids.dtype != torch.int32 or block_ids.dim() != 1:
        raise ValueError(f"block_ids must be int32 [num_pages], got {block_ids.dtype} {tuple(block_ids.shape)}")
    num_pages, num_heads = block_ids.shape[0], cache.shape[1]
    shape = (num_pages, layout.page_size, num_heads, head_dim)
    keys = torch.empty(shape, dtype=dtype, device=cache.device)
    values = torch.empty(shape, dtype=dtype, device=cache.device)
    if num_pages:
        _dequantize_page_kernel[(num_pages, num_heads)](
            cache, block_ids, keys, values,
            cache.stride(0), cache.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2),
            PAGE_SIZE=layout.page_size, HEAD_DIM=head_dim, NUM_BOOST=layout.num_boost,
            **section_offsets(layout), num_warps=8,
        )
    return keys, values
