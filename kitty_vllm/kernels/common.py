"""Helpers shared by the kitty kernels: 2-bit packing and the launch-time checks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import PageLayout, page_layout

SUPPORTED_HEAD_DIMS = (64, 128, 256)
BOOST_POLICY_IDS = {"magnitude": 0, "variance": 1, "random": 2}


def kernel_layout(config: KittyConfig, head_dim: int) -> PageLayout:
    """The page layout, after checking that the kernels handle this head size and boost count."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"kitty kernels support head sizes {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    layout = page_layout(config, head_dim)
    k = layout.num_boost
    if k and (k < 4 or k & (k - 1)):
        raise ValueError(f"kitty kernels need a power-of-two number (>= 4) of boosted channels, got {k} "
                         f"(boost_ratio={config.boost_ratio}, head_dim={head_dim})")
    if layout.page_size & (layout.page_size - 1):
        raise ValueError(f"kitty kernels need a power-of-two page_size, got {layout.page_size}")
    return layout


def section_offsets(layout: PageLayout) -> dict[str, int]:
    """Kernel keyword arguments ``<SECTION>_OFFSET`` for every section of the layout."""
    return {f"{s.name.upper()}_OFFSET": s.offset for s in layout.sections}


def check_cache(cache: torch.Tensor, layout: PageLayout) -> None:
    if cache.dtype != torch.uint8 or cache.dim() != 3 or cache.shape[-1] != layout.page_bytes:
        raise ValueError(f"expected a uint8 cache [num_blocks, num_kv_heads, {layout.page_bytes}], "
                         f"got {cache.dtype} {tuple(cache.shape)}")
    if cache.stride(-1) != 1:
        raise ValueError("the cache's page bytes must be contiguous")


@triton.jit
def pack_2bit(codes, ROWS: tl.constexpr, COLS: tl.constexpr):
    """int32 codes [ROWS, COLS] (0..3) to uint8 [ROWS, COLS // 4], planar as in kitty_vllm.layout."""
    planes = tl.reshape(codes, (ROWS, 4, COLS // 4))
    shifts = 2 * tl.arange(0, 4)
    return tl.sum(planes << shifts[None, :, None], axis=1).to(tl.uint8)


@triton.jit
def unpack_2bit(row_ptr, rows, cols, mask, COLS: tl.constexpr):
    """int32 codes at (rows[:, None], cols[None, :]) of packed rows uint8 [*, COLS // 4] at ``row_ptr``
    (0 where ``mask`` is False)."""
    quarter: tl.constexpr = COLS // 4
    packed = tl.load(row_ptr + rows[:, None] * quarter + (cols % quarter)[None, :], mask=mask, other=0)
    return (packed.to(tl.int32) >> (2 * (cols // quarter))[None, :]) & 3


@triton.jit
def boost_channel_ranks(index_ptr, channels, NUM_BOOST: tl.constexpr):
    """(boosted, rank) over ``channels`` [D]: whether each channel is boosted in this page, and its
    rank in the page's ascending boost_index (uint8 [NUM_BOOST] at ``index_ptr``), which is where its
    high bits sit in the sparse plane."""
    r = tl.arange(0, NUM_BOOST)
    index = tl.load(index_ptr + r).to(tl.int32)
    hit = index[:, None] == channels[None, :]                                  # [K, D]
    return tl.max(hit.to(tl.int32), axis=0) > 0, tl.sum(tl.where(hit, r[:, None], 0), axis=0)
