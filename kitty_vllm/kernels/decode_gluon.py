"""Decode attention over the packed pages in Gluon (Triton 3.6's explicit-layout dialect).

kitty_vllm.kernels.decode_attention uses it on GPUs where :func:`supported` holds (GQA groups up to 4,
head_dim 64 or 128, 0 or at least 16 boosted channels, pages a multiple of TILE): it writes the
split-K partials ``[B, Hq, splits + 1, D + 2]`` (accumulator, max, sum) of splits ``0 .. splits - 1``,
and the Triton kernel the last one (sinks and window, full precision) before the merge. Gluon has no
interpreter, so on the CPU decode stays on the Triton kernel; the GPU tests (tests/test_decode_kernel.py,
``cuda``) and benchmarks/gluon_decode.py check this one against the float32 reference.

Why Gluon: the Triton kernel (kitty_vllm.kernels.attention) unpacks codes in a blocked layout and Triton
then moves every unpacked bfloat16 operand through shared memory into the mma layout (about 46 warp
instructions per token and KV head, benchmarks/kernel_sass.py). Here every tensor has the layout its
use needs, so no operand is re-laid out through shared memory:

* one warp per program, GROUP <= 4 query heads stacked as in the Triton kernel: 16 mma rows = 4 slots
  (three bfloat16 parts of the float32 operand and an empty one) x 4 heads (stacked_layout);
* each tile's bytes are loaded in a *physical* layout where a thread reads consecutive bytes of a token
  (64- or 32-bit loads), then relabeled (a permutation of the index bits: reshape, permute, reshape,
  which moves no data) so that they sit where the mma's B operand wants them. The Key bytes' channel
  order is permuted (kp) and the query is read in the same order, so the dot is unchanged; the Value
  channels (cvp) are permuted and the output is written back in that order;
* the boosted channels' high codes: the 4 threads of a token each read the token's high bytes and take
  their own plane (a per-thread shift), so one mma covers all planes;
* softmax statistics run on the [4, TILE] slot sums (one shuffle), and the scores' mma layout is the
  Value dot's A layout, so probabilities need no conversion either;
* the bytes reach registers through shared memory all the same, but only to hide memory latency: the
  program walks its pages' tiles in order and copies each one (cp.async, _issue_tile) STAGES - 1 tiles
  ahead, with the Key scales, minimums and boost index of each page, so neither a tile's bytes nor a
  page's constants wait on DRAM (loaded straight from global memory, these waits held decode to about
  1.1 TB/s on an H100; with the copies ahead, 1.5-1.6 TB/s, benchmarks/gluon_decode.py).
"""
from __future__ import annotations

import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

# Names Triton 3.9 changed (vLLM 0.32's CPU torch brings 3.9; the GPU image has 3.6), same arguments:
# the cp.async copy into shared memory (async_copy_global_to_shared before), and the CTA barrier
# (thread_barrier before).
async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels.common import LANE_PLANE_PTX, LOG2E, PLANE_PTX, SCORE_FLOOR, section_offsets
from kitty_vllm.layout import PageLayout

GROUP_ROWS = gl.constexpr(4)      # query heads of a GQA group, padded
SLOTS = gl.constexpr(4)           # three bfloat16 parts and an empty slot


@gluon.constexpr_function
def stacked_layout(n: int) -> gl.DistributedLinearLayout:
    """[SLOTS, GROUP_ROWS, n] with the mma layout of [16, n] (row = slot * 4 + head): reshaping it to
    [16, n] is free (the mma accumulator and A operand layouts of one warp are the same)."""
    regs = [[0, 0, 1], [2, 0, 0]] + [[0, 0, 8 << i] for i in range((n // 8).bit_length() - 1)]
    lanes = [[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [1, 0, 0]]
    return gl.DistributedLinearLayout(regs, lanes, [], [], [SLOTS, GROUP_ROWS, n])


@gluon.constexpr_function
def _log2(n: int) -> int:
    return n.bit_length() - 1


@gluon.constexpr_function
def key_load_layout(t: int, q: int):
    """Physical [t, q] Key bytes: each thread reads q / 4 consecutive bytes of a token."""
    m = _log2(q // 4)
    regs = [[0, 1 << b] for b in range(m)] + [[8 << x, 0] for x in range(_log2(t // 8))]
    lanes = [[0, 1 << m], [0, 2 << m], [1, 0], [2, 0], [4, 0]]
    return gl.DistributedLinearLayout(regs, lanes, [], [], [t, q])


@gluon.constexpr_function
def key_relabel(t: int, q: int):
    """(shape, order, out shape) turning the physical [t, q] Key bytes into the B operand [q, t] whose
    row k is byte column kp(k) (page_decode_kernel)."""
    n, m = _log2(q), _log2(q // 4)
    kc = {0: 0, 1: m, 2: m + 1, **{3 + x: 1 + x for x in range(m - 1)}}
    dim = lambda b: 1 + (n - 1 - b)
    return (tuple([t] + [2] * n), tuple([dim(kc[b]) for b in reversed(range(n))] + [0]), (q, t))


@gluon.constexpr_function
def value_load_layout(t: int, q: int):
    """Physical [t, q] Value bytes: each thread reads q / 8 consecutive bytes of a token."""
    r = _log2(q // 8)
    regs = [[0, 1 << b] for b in range(r)] + [[1, 0]] + [[8 << x, 0] for x in range(_log2(t // 8))]
    lanes = [[2, 0], [4, 0], [0, 1 << r], [0, 2 << r], [0, 4 << r]]
    return gl.DistributedLinearLayout(regs, lanes, [], [], [t, q])


@gluon.constexpr_function
def value_lv_layout(t: int, q: int):
    """The relabeled Value bytes [t, q] as unpacked: the B operand's layout with the next token's register
    bit first and then the columns', so that four consecutive elements are two columns of two
    consecutive tokens and the bfloat16 pairs come out as the mma pairs them (token, token + 1)."""
    col_regs = [[0, 8 << i] for i in range(_log2(q // 8))]
    tok_regs = [[8 << i, 0] for i in range(_log2(t // 8))]
    lanes = [[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]]
    return gl.DistributedLinearLayout([[1, 0]] + col_regs + tok_regs, lanes, [], [], [t, q])


@gluon.constexpr_function
def value_relabel(t: int, q: int):
    n, r = _log2(q), _log2(q // 8)
    nc = {**{x: r + x for x in range(3)}, **{3 + b: b for b in range(r)}}
    dim = lambda b: 1 + (n - 1 - b)
    return (tuple([t] + [2] * n), tuple([0] + [dim(nc[b]) for b in reversed(range(n))]), (t, q))


@gluon.constexpr_function
def boost_load_layout(t: int, quarter: int):
    """Physical [t, 4, quarter] high bytes, the plane axis on lanes (each of 4 threads reads a token's
    bytes and takes its own plane)."""
    regs = [[0, 0, 1 << b] for b in range(_log2(quarter))] + [[8 << x, 0, 0] for x in range(_log2(t // 8))]
    lanes = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    return gl.DistributedLinearLayout(regs, lanes, [], [], [t, 4, quarter])


@gluon.constexpr_function
def boost_relabel(t: int, quarter: int):
    nb = _log2(quarter)
    nk = nb + 2
    dims = {"p1": 1, "p0": 2, **{f"b{b}": 3 + (nb - 1 - b) for b in range(nb)}}
    kc = {0: "b0", 1: "p0", 2: "p1", **{3 + x: f"b{1 + x}" for x in range(nb - 1)}}
    return (tuple([t, 2, 2] + [2] * nb), tuple([dims[kc[b]] for b in reversed(range(nk))] + [0]), (4 * quarter, t))


@gluon.constexpr_function
def quarter_bits(n: int) -> dict:
    """The column order of the stacked operands (kp for Key channels, arank for boosted ones) as a map
    of index bits: bit b of a stacked column is bit kc[b] of the byte column, i.e. stacked column k is
    byte column (k & 1) + 2 (k >> 3) + (n / 4) ((k >> 1) & 3)."""
    bits, m = _log2(n), _log2(n // 4)
    return {0: 0, 1: m, 2: m + 1, **{3 + x: 1 + x for x in range(bits - 3)}}


@gluon.constexpr_function
def natural_column_layout(n: int):
    """[n] in byte-column order, laid out so that relabeling it by quarter_bits (column_relabel) gives
    SliceLayout(0, SliceLayout(0, stacked_layout(n))) in stacked order; each thread's elements are
    consecutive (one shared-memory load)."""
    kc = quarter_bits(n)
    regs = [[1], [0]] + [[8 << i] for i in range(_log2(n // 8))]   # the stacked layout's column bases
    lanes = [[2], [4], [0], [0], [0]]
    move = lambda v: [1 << kc[_log2(v[0])]] if v[0] else [0]   # noqa: E731
    return gl.DistributedLinearLayout([move(v) for v in regs], [move(v) for v in lanes], [], [], [n])


@gluon.constexpr_function
def column_relabel(n: int):
    """(shape, order, out shape) turning [n] in byte-column order into stacked order (quarter_bits)."""
    bits, kc = _log2(n), quarter_bits(n)
    return (tuple([2] * bits), tuple([bits - 1 - kc[b] for b in reversed(range(bits))]), (n,))


@gluon.constexpr_function
def copy_layout(rows: int, cols: int):
    """[rows, cols] bytes for cp.async: each thread copies up to 16 consecutive bytes of a row."""
    vec = min(cols, 16)
    lanes = min(32, cols // vec)
    return gl.BlockedLayout([1, vec], [32 // lanes, lanes], [1, 1], [1, 0])


@gluon.jit
def _relabel(x, HOW: gl.constexpr, LAYOUT: gl.constexpr, TRIVIAL: gl.constexpr = True):
    """x with its indices' bits permuted (HOW: reshape to bits, permute, reshape back; free), in LAYOUT."""
    return gl.convert_layout(gl.reshape(gl.permute(gl.reshape(x, HOW[0]), HOW[1]), HOW[2]), LAYOUT,
                             assert_trivial=TRIVIAL)


@gluon.jit
def _trunc_bf16(x):
    return (x.to(gl.uint32, bitcast=True) & 0xFFFF0000).to(gl.float32, bitcast=True)


@gluon.jit
def _as_bf16(x):
    return (x.to(gl.uint32, bitcast=True) >> 16).to(gl.uint16).to(gl.bfloat16, bitcast=True)


@gluon.jit
def _stack_parts(x, L3: gl.constexpr, A: gl.constexpr):
    """float32 x [4, N] (layout SliceLayout(0, L3)) as the [16, N] bfloat16 A operand whose slot s rows
    hold part s of x (high, middle, low, zero): one mma gives every part in its own rows."""
    high = _trunc_bf16(x)
    rest = x - high
    middle = _trunc_bf16(rest)
    low = rest - middle
    slot = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))[:, None, None]
    part = gl.where(slot == 0, high[None, :, :], gl.where(slot == 1, middle[None, :, :],
                    gl.where(slot == 2, low[None, :, :], 0.0)))
    return gl.convert_layout(gl.reshape(_as_bf16(part), [16, x.shape[1]]), A, assert_trivial=True)


@gluon.jit
def _slot_sum(x, L3: gl.constexpr):
    """x [16, N] (mma layout) whose slot rows are partial sums: [4, N] in SliceLayout(0, L3)."""
    return gl.sum(gl.convert_layout(gl.reshape(x, [4, 4, x.shape[1]]), L3, assert_trivial=True), axis=0)


@gluon.jit
def _plane_values(packed, PLANE: gl.constexpr):
    """uint8 codes to bfloat16 1 + code / 4 of 2-bit plane PLANE (see kernels.attention._plane_values)."""
    return gl.inline_asm_elementwise(PLANE_PTX[PLANE], "=r,=r,r", [packed], dtype=gl.bfloat16, is_pure=True,
                                     pack=4)


@gluon.jit
def _lane_plane_values(packed, shift):
    """uint8 codes to bfloat16 1 + code / 4 of the 2-bit plane at bit ``shift`` (int32, the same for
    the four elements of a pack)."""
    return gl.inline_asm_elementwise(LANE_PLANE_PTX, "=r,=r,r,r,r,r,r", [packed, shift], dtype=gl.bfloat16,
                                     is_pure=True, pack=4)


@gluon.jit
def _issue_tile(t, first_tile, end_tile, page_row_ptr, head_base, stride_pb, stages, OFFSETS: gl.constexpr,
                PAGE_SIZE: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_BOOST: gl.constexpr, TILE: gl.constexpr,
                STAGES: gl.constexpr):
    """Start copying tile t (numbered over the request's pages; page_row_ptr: its row of the page table,
    head_base: the KV head's byte 0 of block 0) into stage t % STAGES of ``stages`` (page_decode_kernel):
    its Key low and high bytes, Value bytes, Value scales and minimums, and, for the first tile of a page
    that the program reads, the page's Key scales, minimums and boost index. A tile from end_tile on
    copies nothing, but its group is committed all the same, so that tile t is always group t."""
    key, high, value, value_scale, value_min, key_scale, key_min, index = stages
    KEY_LOW, KEY_HIGH, BOOST_INDEX, KEY_SCALE, KEY_MIN, VALUE_CODES, VALUE_SCALE, VALUE_MIN = OFFSETS
    Q: gl.constexpr = HEAD_DIM // 4
    QUARTER: gl.constexpr = NUM_BOOST // 4
    TPP: gl.constexpr = PAGE_SIZE // TILE
    valid = t < end_tile
    slot = t % STAGES
    start = (t % TPP) * TILE
    page_ptr = head_base + gl.load(page_row_ptr + t // TPP, mask=valid, other=0).to(gl.int64) * stride_pb
    LC: gl.constexpr = copy_layout(TILE, Q)
    codes = (gl.arange(0, TILE, layout=gl.SliceLayout(1, LC))[:, None] * Q
             + gl.arange(0, Q, layout=gl.SliceLayout(0, LC))[None, :] + start * Q)
    async_load(key.index(slot), page_ptr + KEY_LOW + codes, mask=valid)
    async_load(value.index(slot), page_ptr + VALUE_CODES + codes, mask=valid)
    tokens = gl.arange(0, TILE, layout=gl.BlockedLayout([max(2, TILE // 32)], [32], [1], [0])) + start
    async_load(value_scale.index(slot), _halves(page_ptr + VALUE_SCALE) + tokens,
                                           mask=valid)
    async_load(value_min.index(slot), _halves(page_ptr + VALUE_MIN) + tokens, mask=valid)
    page_start = valid & ((start == 0) | (t == first_tile))
    channels = gl.arange(0, HEAD_DIM, layout=gl.BlockedLayout([HEAD_DIM // 32], [32], [1], [0]))
    async_load(key_scale.index(slot), _halves(page_ptr + KEY_SCALE) + channels,
                                           mask=page_start)
    async_load(key_min.index(slot), _halves(page_ptr + KEY_MIN) + channels,
                                           mask=page_start)
    if NUM_BOOST > 0:
        LH: gl.constexpr = copy_layout(TILE, QUARTER)
        high_bytes = (gl.arange(0, TILE, layout=gl.SliceLayout(1, LH))[:, None] * QUARTER
                      + gl.arange(0, QUARTER, layout=gl.SliceLayout(0, LH))[None, :] + start * QUARTER)
        async_load(high.index(slot), page_ptr + KEY_HIGH + high_bytes, mask=valid)
        boosted = gl.arange(0, NUM_BOOST, layout=gl.BlockedLayout([4], [32], [1], [0]))
        async_load(index.index(slot), page_ptr + BOOST_INDEX + boosted, mask=page_start)
    async_copy.commit_group()


@gluon.jit
def _halves(byte_ptr):
    return byte_ptr.to(gl.pointer_type(gl.float16))


@gluon.jit(do_not_specialize=("stride_page_table",))
def page_decode_kernel(
    query_ptr,        # [B, Hq, D] any float dtype, D contiguous
    packed_ptr,       # [num_blocks, H, PAGE_BYTES] uint8
    page_table_ptr,   # [B, max_pages] int32
    seq_lens_ptr,     # [B] int32
    partial_ptr,      # [B, Hq, num_splits + 1, D + 2] float32: splits 0.. num_splits - 1 written here
    stride_qt, stride_qh, stride_pb, stride_ph, stride_page_table,
    scale_log2, sink_tokens,
    GROUP: gl.constexpr, PAGE_SIZE: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_BOOST: gl.constexpr,
    TILE: gl.constexpr, STAGES: gl.constexpr,
    KEY_LOW_OFFSET: gl.constexpr, KEY_HIGH_OFFSET: gl.constexpr, BOOST_INDEX_OFFSET: gl.constexpr,
    KEY_SCALE_OFFSET: gl.constexpr, KEY_MIN_OFFSET: gl.constexpr, VALUE_CODES_OFFSET: gl.constexpr,
    VALUE_SCALE_OFFSET: gl.constexpr, VALUE_MIN_OFFSET: gl.constexpr,
):
    Q: gl.constexpr = HEAD_DIM // 4
    QUARTER: gl.constexpr = NUM_BOOST // 4
    BOOST_K: gl.constexpr = max(16, NUM_BOOST)
    TPP: gl.constexpr = PAGE_SIZE // TILE
    # Layouts are built here from integers (constexpr functions): a layout passed as an argument would
    # not survive Triton's JSON hooks (vLLM installs one).
    LQ3: gl.constexpr = stacked_layout(Q)
    LT3: gl.constexpr = stacked_layout(TILE)
    LB3: gl.constexpr = stacked_layout(BOOST_K)
    LV: gl.constexpr = value_lv_layout(TILE, Q)
    LKX: gl.constexpr = key_load_layout(TILE, Q)
    KEY_RELABEL: gl.constexpr = key_relabel(TILE, Q)
    LVX: gl.constexpr = value_load_layout(TILE, Q)
    VALUE_RELABEL: gl.constexpr = value_relabel(TILE, Q)
    LHX: gl.constexpr = boost_load_layout(TILE, max(4, QUARTER))
    HIGH_RELABEL: gl.constexpr = boost_relabel(TILE, max(4, QUARTER))
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    LGQ: gl.constexpr = gl.SliceLayout(0, LQ3)      # [4, Q]
    LGT: gl.constexpr = gl.SliceLayout(0, LT3)      # [4, TILE]
    LGB: gl.constexpr = gl.SliceLayout(0, LB3)      # [4, BOOST_K]
    SHARED2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    SHARED1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])

    request = gl.program_id(0).to(gl.int64)
    head = gl.program_id(1)
    split = gl.program_id(2)
    num_splits = gl.num_programs(2)
    seq_len = gl.load(seq_lens_ptr + request)
    packed_end = seq_len - PAGE_SIZE      # positions before the window (the newest PAGE_SIZE) are read here
    pages = gl.cdiv(gl.maximum(packed_end, 0), PAGE_SIZE)
    per_split = gl.cdiv(pages, num_splits)
    first_page = split * per_split
    end_page = gl.minimum(first_page + per_split, pages)
    # Tiles, numbered over the request's pages, that hold a token past the sinks and before the window.
    first_tile = gl.maximum(first_page * TPP, sink_tokens // TILE)
    end_tile = gl.minimum(end_page * TPP, gl.cdiv(packed_end, TILE))

    # Query [4, Q] per plane, in the order of the key bytes each thread reads: B row k of a plane's
    # dot is byte column kp (Q / 4 consecutive bytes per thread and token).
    g = gl.arange(0, GROUP_ROWS, layout=gl.SliceLayout(1, LGQ))
    k = gl.arange(0, Q, layout=gl.SliceLayout(0, LGQ))
    kp = (Q // 4) * ((k >> 1) & 3) + (k & 1) + ((k >> 3) << 1)
    q_rows = request * stride_qt + (head * GROUP + g).to(gl.int64) * stride_qh
    g_valid = g < GROUP
    query = ()
    for j in gl.static_range(4):
        query = query + (gl.load(query_ptr + q_rows[:, None] + (j * Q + kp)[None, :], mask=g_valid[:, None],
                                 other=0.0).to(gl.float32) * scale_log2,)
    if NUM_BOOST > 0:
        ga = gl.arange(0, GROUP_ROWS, layout=gl.SliceLayout(1, LGB))
        qb_rows = request * stride_qt + (head * GROUP + ga).to(gl.int64) * stride_qh
        hk = gl.arange(0, BOOST_K, layout=gl.SliceLayout(1, B))
        high_shift = (2 * ((hk >> 1) & 3))[:, None] + gl.zeros([BOOST_K, TILE], gl.int32, B)
    tt = gl.arange(0, TILE, layout=gl.SliceLayout(0, LGT))

    # Stages of the copy pipeline: tile t's bytes go to stage t % STAGES, STAGES - 1 tiles ahead.
    key_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, TILE, Q], SHARED2)
    value_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, TILE, Q], SHARED2)
    high_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, TILE, max(4, QUARTER)], SHARED2)
    value_scale_smem = gl.allocate_shared_memory(gl.float16, [STAGES, TILE], SHARED1)
    value_min_smem = gl.allocate_shared_memory(gl.float16, [STAGES, TILE], SHARED1)
    key_scale_smem = gl.allocate_shared_memory(gl.float16, [STAGES, HEAD_DIM], SHARED1)
    key_min_smem = gl.allocate_shared_memory(gl.float16, [STAGES, HEAD_DIM], SHARED1)
    index_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BOOST_K], SHARED1)
    stages = (key_smem, high_smem, value_smem, value_scale_smem, value_min_smem, key_scale_smem, key_min_smem,
              index_smem)
    OFFSETS: gl.constexpr = (KEY_LOW_OFFSET, KEY_HIGH_OFFSET, BOOST_INDEX_OFFSET, KEY_SCALE_OFFSET, KEY_MIN_OFFSET,
                             VALUE_CODES_OFFSET, VALUE_SCALE_OFFSET, VALUE_MIN_OFFSET)
    page_row_ptr = page_table_ptr + request * stride_page_table
    head_base = packed_ptr + head.to(gl.int64) * stride_ph
    for i in gl.static_range(STAGES - 1):
        _issue_tile(first_tile + i, first_tile, end_tile, page_row_ptr, head_base, stride_pb, stages, OFFSETS,
                    PAGE_SIZE, HEAD_DIM, NUM_BOOST, TILE, STAGES)

    m_i = gl.full([GROUP_ROWS], SCORE_FLOOR, gl.float32, gl.SliceLayout(1, LGT))
    l_i = gl.zeros([GROUP_ROWS], gl.float32, gl.SliceLayout(1, LGT))
    acc = ()
    for j in gl.static_range(4):
        acc = acc + (gl.zeros([16, Q], gl.float32, mma),)

    LKC: gl.constexpr = natural_column_layout(Q)
    for page in range(first_page, end_page):
        page_first = gl.maximum(page * TPP, first_tile)
        meta = page_first % STAGES
        async_copy.wait_group(STAGES - 2)
        bias = gl.zeros([GROUP_ROWS], gl.float32, gl.SliceLayout(1, LGQ))
        key_parts = ()
        for j in gl.static_range(4):
            scale = _relabel(key_scale_smem.index(meta).slice(j * Q, Q).load(LKC), column_relabel(Q),
                             gl.SliceLayout(0, LGQ)).to(gl.float32)
            minimum = _relabel(key_min_smem.index(meta).slice(j * Q, Q).load(LKC), column_relabel(Q),
                               gl.SliceLayout(0, LGQ)).to(gl.float32)
            scaled = query[j] * (4.0 * scale)[None, :]
            bias += gl.sum(query[j] * minimum[None, :] - scaled, axis=1)
            key_parts = key_parts + (_stack_parts(scaled, LQ3, A),)
        page_bias = gl.convert_layout(bias, gl.SliceLayout(1, LGT), assert_trivial=True)
        if NUM_BOOST > 0:
            block = gl.load(page_row_ptr + page)
            key_scale_ptr = (head_base + block.to(gl.int64) * stride_pb + KEY_SCALE_OFFSET).to(
                gl.pointer_type(gl.float16))
            index = _relabel(index_smem.index(meta).load(natural_column_layout(BOOST_K)), column_relabel(BOOST_K),
                             gl.SliceLayout(0, LGB)).to(gl.int32)
            boost_scale = gl.load(key_scale_ptr + index).to(gl.float32)
            boost_query = gl.load(query_ptr + qb_rows[:, None] + index[None, :], mask=(ga < GROUP)[:, None],
                                  other=0.0).to(gl.float32)
            boost_query = boost_query * (scale_log2 * 16.0) * boost_scale[None, :]
            page_bias += gl.convert_layout(-gl.sum(boost_query, axis=1), gl.SliceLayout(1, LGT), assert_trivial=True)
            boost_parts = _stack_parts(boost_query, LB3, A)
        for t in range(page_first, gl.minimum((page + 1) * TPP, end_tile)):
            async_copy.wait_group(STAGES - 2)
            cta_barrier()
            _issue_tile(t + STAGES - 1, first_tile, end_tile, page_row_ptr, head_base, stride_pb, stages, OFFSETS,
                        PAGE_SIZE, HEAD_DIM, NUM_BOOST, TILE, STAGES)
            # Key bytes: physical [TILE, Q] (LKX), relabeled to the B operand [Q, TILE] whose row k is byte
            # column kp(k). High bytes: [TILE, QUARTER], read by the 4 threads of a token (one per plane),
            # relabeled to [BOOST_K, TILE] whose row k is plane (k >> 1) & 3 of high byte (k & 1) + 2 (k >> 3).
            # Value bytes: physical [TILE, Q] (LVX), relabeled to LV whose column c is byte column cvp(c).
            slot = t % STAGES
            key_bytes = _relabel(key_smem.index(slot).load(LKX), KEY_RELABEL, B)                 # [Q, TILE]
            scores = gl.zeros([16, TILE], gl.float32, mma)
            for j in gl.static_range(4):
                scores = mma_v2(key_parts[j], _plane_values(key_bytes, j), scores)
            if NUM_BOOST > 0:
                high = high_smem.index(slot).load(gl.SliceLayout(1, LHX))                       # [TILE, QUARTER]
                high = gl.broadcast(gl.expand_dims(high, 1), gl.zeros([TILE, 4, QUARTER], gl.uint8, LHX))[0]
                high = _relabel(high, HIGH_RELABEL, B)                                        # [BOOST_K, TILE]
                scores = mma_v2(boost_parts, _lane_plane_values(high, high_shift), scores)
            s = _slot_sum(scores, LT3) + page_bias[:, None]                                   # [4, TILE]
            s = gl.where(((t * TILE + tt >= sink_tokens) & (t * TILE + tt < packed_end))[None, :], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            correction = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            l_i = l_i * correction + gl.sum(p, axis=1)
            m_i = m_new
            # Values: p . (min + scale * code) = (4 p scale) . values + p . (min - 4 scale).
            vs = value_scale_smem.index(slot).load(gl.SliceLayout(0, LGT)).to(gl.float32)
            vm = value_min_smem.index(slot).load(gl.SliceLayout(0, LGT)).to(gl.float32)
            value_bias = gl.sum(p * (vm - 4.0 * vs)[None, :], axis=1)                      # [4]
            p_parts = _stack_parts(p * (4.0 * vs)[None, :], LT3, A)
            value_bytes = _relabel(value_smem.index(slot).load(LVX), VALUE_RELABEL, LV, False)   # [TILE, Q]
            ROWQ: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, LQ3))
            corr3 = gl.convert_layout(correction, ROWQ, assert_trivial=True)[None, :, None]
            slot_q = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, LQ3)))[:, None, None]
            vb3 = gl.where(slot_q == 0, gl.convert_layout(value_bias, ROWQ, assert_trivial=True)[None, :, None], 0.0)
            updated = ()
            for j in gl.static_range(4):
                values = gl.convert_layout(_plane_values(value_bytes, j), B)
                acc3 = gl.convert_layout(gl.reshape(acc[j], [4, 4, Q]), LQ3, assert_trivial=True) * corr3 + vb3
                acc_j = gl.convert_layout(gl.reshape(acc3, [16, Q]), mma, assert_trivial=True)
                updated = updated + (mma_v2(p_parts, values, acc_j),)
            acc = updated
    async_copy.wait_group(0)

    # Partial of this split: acc summed over slots, max and sum, per query head.
    num_q_heads = gl.num_programs(1) * GROUP
    go = gl.arange(0, GROUP_ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(0, LQ3)))
    base = ((request * num_q_heads + head * GROUP + go) * (num_splits + 1) + split) * (HEAD_DIM + 2)
    co = gl.arange(0, Q, layout=gl.SliceLayout(0, gl.SliceLayout(0, LQ3)))
    cop = (Q // 8) * (co & 7) + (co >> 3)
    for j in gl.static_range(4):
        out = _slot_sum(acc[j], LQ3)                                                          # [4, Q]
        gl.store(partial_ptr + base[:, None] + (j * Q + cop)[None, :], out, mask=(go < GROUP)[:, None])
    ms = gl.convert_layout(m_i, gl.SliceLayout(1, gl.SliceLayout(0, LQ3)))
    ls = gl.convert_layout(l_i, gl.SliceLayout(1, gl.SliceLayout(0, LQ3)))
    gl.store(partial_ptr + base + HEAD_DIM, ms, mask=go < GROUP)
    gl.store(partial_ptr + base + HEAD_DIM + 1, ls, mask=go < GROUP)


# Tokens per tile: with TILE 64 and head_dim 128 a thread holds 224 registers (no spills); head_dim 256
# spills, so it stays on the Triton kernel.
TILE = 64
# Tiles in the copy pipeline: one being read, STAGES - 1 on their way (2, 3 and 4 ran within 2% on an H100).
STAGES = 3
HEAD_DIMS = (64, 128)
# Programs (one warp each) per streaming multiprocessor that decode aims for before it splits pages.
PROGRAMS_PER_SM = 16
# At most 128 splits: a split of one page costs about as much as one of two. On an H200 (Qwen3-8B's shape,
# batch 1, 32k context: 256 pages) 256 splits took 0.0503 and 0.0496 ms, 132 took 0.0439 and 66 took 0.0451
# (benchmarks/results/gpu-h200-2026-12-07). With 132 SMs it binds only where fewer than 17 (request, KV head)
# pairs read more than 128 pages (16k tokens).
MAX_SPLITS = 128


def supported(layout: PageLayout, group: int, device: torch.device, soft_cap: float = 0.0) -> bool:
    """Whether decode_pages serves this page layout and GQA group on ``device``. Not for soft-capped
    scores (``soft_cap`` > 0): the cap applies to every score and this kernel does not cap (a tanh per
    score after the mma would do it, but Gluon has no interpreter to test it against the reference), so
    soft-capped layers decode with the Triton kernel alone. Learned sinks need nothing here: the Triton
    kernel's split, merged with these, starts from them."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and not soft_cap
            and group <= GROUP_ROWS
            and layout.head_dim in HEAD_DIMS and layout.page_size % TILE == 0
            and (layout.num_boost == 0 or layout.num_boost >= 16))


def decode_pages(query: torch.Tensor, packed: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
                 partial: torch.Tensor, splits: int, config: KittyConfig, layout: PageLayout, scale: float) -> None:
    """Splits 0 .. splits - 1 of ``partial`` [B, Hq, splits + 1, D + 2] (float32, contiguous): each
    request's packed positions before its window (sinks excluded) for the query [B, Hq, D] at position
    seq_lens - 1.
    Arguments as kitty_vllm.kernels.decode_attention."""
    num_requests, num_heads, head_dim = query.shape
    num_kv_heads = packed.shape[1]
    page_decode_kernel[(num_requests, num_kv_heads, splits)](
        query, packed, page_table, seq_lens, partial, query.stride(0), query.stride(1), packed.stride(0),
        packed.stride(1), page_table.stride(0), scale * LOG2E, config.sink_tokens,
        GROUP=num_heads // num_kv_heads, PAGE_SIZE=layout.page_size, HEAD_DIM=head_dim, NUM_BOOST=layout.num_boost,
        TILE=TILE, STAGES=STAGES, **section_offsets(layout), num_warps=1)
