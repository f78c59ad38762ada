"""Helpers shared by the kitty kernels: 2-bit packing and the launch-time checks."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import PageLayout, page_layout

# Every head size a model family uses (issue 28) that the kernels handle: a multiple of 16 from 64 on, so
# that a plane's padded quarter (padded_sizes) is a dot operand of at least 16 channels.
SUPPORTED_HEAD_DIMS = (64, 80, 96, 112, 128, 160, 192, 256)
LOG2E = 1.4426950408889634
# Scores start here instead of -inf, so a tile whose tokens are all masked yields exp2(-inf) = 0, not NaN.
SCORE_FLOOR = tl.constexpr(-1.0e30)
BOOST_POLICY_IDS = {"magnitude": 0, "variance": 1, "random": 2, "range": 3}
# Integer arguments whose value changes from launch to launch (block-table widths differ between vLLM's
# tables and the gathered rows of a mixed batch; split counts follow the batch): never specialized, so that
# Triton compiles a kernel once, not once for 1, once for multiples of 16 and once for the rest. Every other
# integer argument is fixed for a layer, so the kernels a layer runs are those kitty_vllm.warmup compiles at
# start-up.
TABLE_STRIDES = ("stride_page_table", "stride_stage_table")
# PTX that turns four packed bytes ($2) into the bfloat16 values 1 + code / 4 of one 2-bit plane ($0, $1:
# two bfloat16 pairs), exact and with no integer-to-float conversion: move the plane's bits to bits 5-6
# of each byte and set bit 7 (a shift and a LOP3), then interleave the bytes with 0x3F (two PRMT).
# PLANE_PTX[j] is plane j (bits 2j, 2j + 1); LANE_PLANE_PTX takes the plane's bit as $3.
_TO_BF16 = (" lop3.b32 t, t, 0x60606060, 0x80808080, 0xEA;"
            " prmt.b32 $0, t, 0x3F, 0x4140; prmt.b32 $1, t, 0x3F, 0x4342; }")
PLANE_PTX = tl.constexpr(tuple("{ .reg .b32 t; " + move + _TO_BF16 for move in (
    "shl.b32 t, $2, 5;", "shl.b32 t, $2, 3;", "shl.b32 t, $2, 1;", "shr.b32 t, $2, 1;")))
LANE_PLANE_PTX = tl.constexpr("{ .reg .b32 t; shr.b32 t, $2, $3; shl.b32 t, t, 5;" + _TO_BF16)


def kernel_layout(config: KittyConfig, head_dim: int) -> PageLayout:
    """The page layout, after checking that the kernels handle this head size and page size (the layout
    itself checks the boost count: a multiple of 4)."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"kitty kernels support head sizes {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    layout = page_layout(config, head_dim)
    if layout.page_size & (layout.page_size - 1):
        raise ValueError(f"kitty kernels need a power-of-two page_size, got {layout.page_size}")
    return layout


def num_splits(num_requests: int, num_kv_heads: int, max_pages: int, device: torch.device,
               programs_per_sm: int, max_splits: int) -> int:
    """Programs per request and KV head for decode: enough to give every streaming multiprocessor
    ``programs_per_sm`` programs, at most one per page and ``max_splits``. Depends only on shapes, never
    on sequence lengths, so one CUDA graph serves every batch of its size."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = triton.cdiv(programs_per_sm * processors, max(1, num_requests * num_kv_heads))
    return max(1, min(wanted, max_pages, max_splits))


def padded_sizes(layout: PageLayout) -> dict[str, int]:
    """Kernel keyword arguments PADDED_DIM and PADDED_BOOST: the channels and boosted channels of a page,
    each of the four 2-bit planes (a quarter, kitty_vllm.layout) padded to a power of two, as Triton's
    tensors need. Kernels index channel ``j * D / 4 + i`` at ``j * PADDED_DIM / 4 + i`` and mask
    ``i >= D / 4`` (the same for boosted ranks): the pages keep the true head size, so head sizes such as
    96 (quarters of 24, padded to 32) cost no stored bit, only idle lanes. For 64, 128 and 256 nothing is
    padded."""
    boost_quarter = layout.num_boost // 4
    return dict(PADDED_DIM=4 * triton.next_power_of_2(layout.head_dim // 4),
                PADDED_BOOST=4 * triton.next_power_of_2(boost_quarter) if boost_quarter else 0)


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
