"""Store a decode step's tokens into the kitty cache (oracle: PagedKittyCache.step): one token per request,
or the tokens of a verification step of speculative decoding (several per request, read as decodes).

A token at position ``p`` (the last one at ``seq_len - 1``) goes, following the cache schedule of
kitty_vllm.reference:

* to its sink slot too if ``p < sink_tokens``;
* if it completes its page (``seq_len % page_size == 0``): with the page's older tokens, read from the
  ring, into the page's packed block (kitty_vllm.kernels.quantize.pack_page);
* to its ring slot ``p % ring_slots`` (the window: attention reads the newest ``page_size`` tokens there;
  kitty_vllm.config.KittyConfig.ring_slots).

One fused kernel, one program per (request, KV head), nothing decided on the host: the launch is the
same for every batch of the same size, so it can be captured in a CUDA graph. A request's tokens are
stored in order by its program, so that a token completing a page packs it from the ring where the
step's earlier tokens already are. A request with ``seq_len == 0`` (batch padding) is skipped, and so is
every position below 0 (vLLM's dummy rows, shorter than their step, as it captures CUDA graphs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels.common import (BOOST_POLICY_IDS, TABLE_STRIDES, check_cache, kernel_layout, padded_sizes,
                                       section_offsets)
from kitty_vllm.kernels.quantize import pack_page, padded_channels
from kitty_vllm.layout import StageLayout


@triton.jit(do_not_specialize=TABLE_STRIDES)
def _store_decode_kernel(
    key_ptr, value_ptr,  # [N, H, D] the step's tokens (N = B without MANY), model dtype, D contiguous
    query_start_ptr,     # [B + 1] int32, MANY only: request r's tokens are query_start[r]:query_start[r + 1]
    seq_lens_ptr,        # [B] int32: tokens of each request, the step's included
    page_table_ptr,      # [B, max_pages] int32: packed block of each page
    stage_table_ptr,     # [B, max_stage_blocks] int32: sink blocks, then ring blocks
    packed_ptr,          # [num_blocks, H, PAGE_BYTES] uint8
    stage_ptr,           # [num_stage_blocks, 2, tokens_per_block, H, D] model dtype, D contiguous
    stride_kb, stride_kh, stride_vb, stride_vh,
    stride_pb, stride_ph,
    stride_sb, stride_skv, stride_st, stride_sh,
    stride_page_table, stride_stage_table,
    sink_tokens, sink_block_tokens, sink_blocks, ring_tokens_per_block, ring_slots,
    MANY: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_BOOST: tl.constexpr,
    PADDED_DIM: tl.constexpr, PADDED_BOOST: tl.constexpr, BOOST_POLICY: tl.constexpr,
    KEY_LOW_OFFSET: tl.constexpr, KEY_HIGH_OFFSET: tl.constexpr, BOOST_INDEX_OFFSET: tl.constexpr,
    KEY_SCALE_OFFSET: tl.constexpr, KEY_MIN_OFFSET: tl.constexpr, VALUE_CODES_OFFSET: tl.constexpr,
    VALUE_SCALE_OFFSET: tl.constexpr, VALUE_MIN_OFFSET: tl.constexpr,
):
    """Grid (B, H). Channels at their padded columns (quantize.padded_channels; masked where not one)."""
    request = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + request)
    if seq_len == 0:
        return
    if MANY:
        first = tl.load(query_start_ptr + request).to(tl.int64)
        count = tl.load(query_start_ptr + request + 1) - first
    else:
        first = request
        count = 1
    for j in range(count):
        position = seq_len - count + j
        if position >= 0:
            if MANY:
                # This request's earlier tokens of the step, which a page completed here reads from the ring,
                # were stored by other threads of this program.
                tl.debug_barrier()
            _store_token(key_ptr + (first + j) * stride_kb + head * stride_kh,
                         value_ptr + (first + j) * stride_vb + head * stride_vh, position,
                         page_table_ptr + request * stride_page_table, stage_table_ptr + request * stride_stage_table,
                         packed_ptr, stage_ptr, head, stride_pb, stride_ph, stride_sb, stride_skv, stride_st,
                         stride_sh, sink_tokens, sink_block_tokens, sink_blocks, ring_tokens_per_block, ring_slots,
                         PAGE_SIZE, HEAD_DIM, NUM_BOOST, PADDED_DIM, PADDED_BOOST, BOOST_POLICY, KEY_LOW_OFFSET,
                         KEY_HIGH_OFFSET, BOOST_INDEX_OFFSET, KEY_SCALE_OFFSET, KEY_MIN_OFFSET, VALUE_CODES_OFFSET,
                         VALUE_SCALE_OFFSET, VALUE_MIN_OFFSET)


@triton.jit
def _store_token(
    key_ptr, value_ptr,  # [D] the token's Key and Value of this KV head
    position,            # the token's position in its request
    page_row_ptr,        # [max_pages] int32: the request's packed blocks
    stage_row_ptr,       # [max_stage_blocks] int32: the request's sink blocks, then ring blocks
    packed_ptr, stage_ptr, head,
    stride_pb, stride_ph, stride_sb, stride_skv, stride_st, stride_sh,
    sink_tokens, sink_block_tokens, sink_blocks, ring_tokens_per_block, ring_slots,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_BOOST: tl.constexpr,
    PADDED_DIM: tl.constexpr, PADDED_BOOST: tl.constexpr, BOOST_POLICY: tl.constexpr,
    KEY_LOW_OFFSET: tl.constexpr, KEY_HIGH_OFFSET: tl.constexpr, BOOST_INDEX_OFFSET: tl.constexpr,
    KEY_SCALE_OFFSET: tl.constexpr, KEY_MIN_OFFSET: tl.constexpr, VALUE_CODES_OFFSET: tl.constexpr,
    VALUE_SCALE_OFFSET: tl.constexpr, VALUE_MIN_OFFSET: tl.constexpr,
):
    """One token of one KV head: its sink slot, its ring slot, and the page it completes (module docstring)."""
    c, real = padded_channels(PADDED_DIM, HEAD_DIM)
    key = tl.load(key_ptr + c, mask=real, other=0.0)
    value = tl.load(value_ptr + c, mask=real, other=0.0)
    head_offset = head * stride_sh
    if position < sink_tokens:
        sink_block = tl.load(stage_row_ptr + position // sink_block_tokens).to(tl.int64)
        sink_ptr = stage_ptr + sink_block * stride_sb + (position % sink_block_tokens) * stride_st + head_offset
        tl.store(sink_ptr + c, key, mask=real)
        tl.store(sink_ptr + stride_skv + c, value, mask=real)
    slot = position % ring_slots
    ring_block = tl.load(stage_row_ptr + sink_blocks + slot // ring_tokens_per_block).to(tl.int64)
    ring_ptr = stage_ptr + ring_block * stride_sb + (slot % ring_tokens_per_block) * stride_st + head_offset
    tl.store(ring_ptr + c, key, mask=real)
    tl.store(ring_ptr + stride_skv + c, value, mask=real)
    if (position + 1) % PAGE_SIZE == 0:
        # The page is complete: its first PAGE_SIZE - 1 tokens are in the ring, the last one is this.
        first_pos = position - (PAGE_SIZE - 1)
        t = tl.arange(0, PAGE_SIZE)
        older = t < PAGE_SIZE - 1
        slots = (first_pos + t) % ring_slots
        blocks = tl.load(stage_row_ptr + sink_blocks + slots // ring_tokens_per_block, mask=older, other=0)
        row = blocks.to(tl.int64) * stride_sb + (slots % ring_tokens_per_block) * stride_st + head_offset
        ring = stage_ptr + row[:, None] + c[None, :]
        read = older[:, None] & real[None, :]
        x = tl.where(older[:, None], tl.load(ring, mask=read, other=0.0), key[None, :])
        y = tl.where(older[:, None], tl.load(ring + stride_skv, mask=read, other=0.0), value[None, :])
        page_block = tl.load(page_row_ptr + first_pos // PAGE_SIZE)
        page_ptr = packed_ptr + page_block.to(tl.int64) * stride_pb + head.to(tl.int64) * stride_ph
        pack_page(x.to(tl.float32), y.to(tl.float32), first_pos, page_ptr, sink_tokens,
                  PAGE_SIZE, HEAD_DIM, NUM_BOOST, PADDED_DIM, PADDED_BOOST, BOOST_POLICY,
                  KEY_LOW_OFFSET, KEY_HIGH_OFFSET, BOOST_INDEX_OFFSET, KEY_SCALE_OFFSET, KEY_MIN_OFFSET,
                  VALUE_CODES_OFFSET, VALUE_SCALE_OFFSET, VALUE_MIN_OFFSET)


def store_decode(key: torch.Tensor, value: torch.Tensor, seq_lens: torch.Tensor, page_table: torch.Tensor,
                 stage_table: torch.Tensor, packed: torch.Tensor, stage: torch.Tensor, config: KittyConfig,
                 stage_layout: StageLayout, query_start: torch.Tensor | None = None) -> None:
    """Store the step's tokens of each request (module docstring), before decode attention reads the cache.

    key/value [N, H, D] in the stage's dtype: without ``query_start`` each request's newest token (N = B),
    else request r's tokens ``query_start[r]:query_start[r + 1]`` (int32 [B + 1]; rows past the last are
    not read), the last at position ``seq_lens[r] - 1``; seq_lens int32 [B] (the step's tokens included;
    0 skips the row); page_table int32 [B, max_pages]; stage_table int32 [B, max_stage_blocks]; packed uint8
    [num_blocks, H, page_bytes] and stage [num_stage_blocks, 2, tokens_per_block, H, D]
    (``PagedKittyCache.stage``), written in place.
    """
    num_requests = seq_lens.shape[0]
    _, num_kv_heads, head_dim = key.shape
    layout = kernel_layout(config, head_dim)
    check_cache(packed, layout)
    if value.shape != key.shape or key.dtype != stage.dtype or value.dtype != stage.dtype:
        raise ValueError(f"key {key.dtype} {tuple(key.shape)} and value {value.dtype} {tuple(value.shape)} "
                         f"must both be [B, H, D] in the stage's {stage.dtype}")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or stage.stride(-1) != 1:
        raise ValueError("key, value and stage need a contiguous head_dim")
    if query_start is None and key.shape[0] != num_requests:
        raise ValueError(f"one token per request: key and value need {num_requests} rows, got {key.shape[0]}")
    rows = (("seq_lens", seq_lens, num_requests), ("page_table", page_table, num_requests),
            ("stage_table", stage_table, num_requests))
    if query_start is not None:
        rows += (("query_start", query_start, num_requests + 1),)
    for name, tensor, count in rows:
        if tensor.dtype != torch.int32 or tensor.shape[0] != count or tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous int32 with {count} rows, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
    if num_requests == 0:
        return
    _store_decode_kernel[(num_requests, num_kv_heads)](
        key, value, seq_lens if query_start is None else query_start, seq_lens, page_table, stage_table, packed, stage,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        packed.stride(0), packed.stride(1),
        stage.stride(0), stage.stride(1), stage.stride(2), stage.stride(3),
        page_table.stride(0), stage_table.stride(0),
        config.sink_tokens, stage_layout.block_tokens, stage_layout.sink_blocks, stage_layout.tokens_per_block,
        stage_layout.ring_slots, MANY=query_start is not None, PAGE_SIZE=layout.page_size, HEAD_DIM=head_dim,
        NUM_BOOST=layout.num_boost,
        **padded_sizes(layout),
        BOOST_POLICY=BOOST_POLICY_IDS[config.boost_policy],
        **section_offsets(layout), num_warps=8,
    )
