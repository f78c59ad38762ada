"""Time decode attention over a paged KV cache, kitty's kernel against vLLM's bf16 kernels, and compare
each kernel's achieved bandwidth with a device-to-device copy.

    python benchmarks/decode_kernel.py [--preset kitty2] [--kernels kitty store flash triton]
                                       [--batches 1 16 64 256] [--contexts 1024 8192 32768]
                                       [--programs-per-sm N] [--out benchmarks/results]

One Qwen3-8B layer (32 query heads, 8 KV heads of 128, bf16 queries), one new token per request:
- kitty: ``kitty_vllm.kernels.decode_attention`` over random packed pages, sinks and ring;
- store: kitty's decode store (``kitty_vllm.kernels.store_decode``), recorded as ``<preset>-store``, in a
  step where one request in 128 (request 0 at least) completes its page, which the store then packs: as
  every step of a large batch (W2's 512 requests complete 4 pages a step), no attention, no bandwidth;
- flash: vLLM's FlashAttention (``vllm.vllm_flash_attn.flash_attn_varlen_func``, the version vLLM picks
  for the GPU) on a bf16 paged cache, called as vLLM's FLASH_ATTN backend calls it for decode;
- triton: vLLM's TRITON_ATTN op (``vllm.v1.attention.ops.triton_unified_attention.unified_attention``)
  on the same cache, with the split-softmax buffers and threshold its backend uses.
The bf16 cache has vLLM's layout for both: 16-token blocks, K and V side by side in each token's row.
Every kernel is timed replaying a CUDA graph of its call (``triton.testing.do_bench``, which clears
the L2 cache between replays), as vLLM replays decode steps.

Every request holds ``context - 1`` tokens (for kitty: full packed pages, the sinks and a nearly full
ring). Achieved bandwidth = bytes the kernel must read (kitty: packed pages, sinks and ring; bf16: K and
V of every token; plus the queries) / kernel time, against the measured copy bandwidth (bytes read and
written / time). A cell whose cache does not fit in free GPU memory is recorded as skipped.

``--programs-per-sm`` sets the split-K target of the Gluon page kernel (``decode_gluon.PROGRAMS_PER_SM``:
programs per streaming multiprocessor before a request's pages split further) for a sweep; its records
carry the value (put each value's run in its own ``--out``).

Prints a markdown table and merges records {"benchmark": "decode_kernel", "kv_cache_dtype": the preset,
"auto-flash" or "auto-triton", "batch", "context", "ms", "gb_s", "copy_gb_s", "pct_of_copy", ...} into
``<out>/<gpu>-<yyyy-mm-dd>.json``, then draws the plots of that file. Needs a CUDA GPU; vLLM is needed
only for flash and triton (imported when they run).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import triton

import report
from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels import decode_attention, decode_gluon, store_decode
from kitty_vllm.layout import stage_layout
from kitty_vllm.paged import PagedKittyCache

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128   # a Qwen3-8B layer
BF16_BLOCK_SIZE = 16   # vLLM's default block size for FLASH_ATTN and TRITON_ATTN on CUDA
KERNEL_DTYPES = {"flash": "auto-flash", "triton": "auto-triton"}   # kitty's is its preset name
KITTY_KERNELS = {"kitty": "", "store": "-store"}   # the suffix of each one's record after the preset name
# Leave room for the queries, outputs and do_bench's cache-flush buffer next to the KV cache.
FREE_MEMORY_FRACTION = 0.8


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * num_bytes / ms / 1e6   # GB/s, bytes read and written


def bytes_read(kernel: str, config: KittyConfig | None, batch: int, context: int, kv_element_bytes: int = 2) -> int:
    """Bytes a decode step must read for ``batch`` requests of ``context - 1`` tokens (a kernel other than
    kitty reads Keys and Values of ``kv_element_bytes``: 2 for bf16, 1 for fp8)."""
    tokens = context - 1
    if kernel == "kitty":
        page_bytes = stage_layout(config, HEAD_DIM, NUM_KV_HEADS, 2).page.page_bytes
        full_pages = tokens // config.page_size
        ring = tokens - full_pages * config.page_size
        cache = (full_pages * NUM_KV_HEADS * page_bytes
                 + (config.sink_tokens + ring) * NUM_KV_HEADS * HEAD_DIM * 2 * 2)
    else:
        cache = tokens * NUM_KV_HEADS * HEAD_DIM * 2 * kv_element_bytes
    return batch * (cache + NUM_HEADS * HEAD_DIM * 2)


def random_kitty_cache(config: KittyConfig, batch: int, pages: int
                       ) -> tuple[PagedKittyCache, torch.Tensor, torch.Tensor]:
    """A kitty cache of random bytes with finite fp16 scales and minima and valid boosted channels,
    ``pages`` packed pages and a full staging row (sinks and ring) per request, and its page and staging
    tables (int32 [batch, ...])."""
    layout = stage_layout(config, HEAD_DIM, NUM_KV_HEADS, 2)
    packed = torch.randint(0, 255, (batch * pages + 1, NUM_KV_HEADS, layout.page.page_bytes),
                           dtype=torch.uint8, device="cuda")
    packed.view(torch.float16).nan_to_num_(0.0).clamp_(-1, 1)   # finite scales and minima
    # Distinct ascending channels below head_dim, as the quantizer writes them (attention indexes with them).
    boost_index = layout.page.views(packed)["boost_index"]
    channels = torch.rand(*boost_index.shape[:-1], HEAD_DIM, device="cuda").topk(layout.page.num_boost).indices
    boost_index.copy_(channels.sort(-1).values)
    stage_blocks = batch * layout.blocks_per_request
    stage = torch.randn(stage_blocks, layout.block_bytes // 2, dtype=torch.bfloat16, device="cuda")
    cache = PagedKittyCache.from_raw(config, layout, packed, stage, torch.bfloat16)
    page_table = torch.arange(batch * pages, dtype=torch.int32, device="cuda").view(batch, pages)
    stage_table = torch.arange(stage_blocks, dtype=torch.int32, device="cuda").view(batch, -1)
    return cache, page_table, stage_table


def kitty_decode(config: KittyConfig, batch: int, context: int) -> Callable[[], object]:
    cache, page_table, stage_table = random_kitty_cache(config, batch, context // config.page_size)
    seq_lens = torch.full((batch,), context - 1, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return lambda: decode_attention(query, cache.packed, cache.stage, page_table, stage_table, seq_lens, config,
                                    cache.stage_layout, HEAD_DIM ** -0.5)


def kitty_store(config: KittyConfig, batch: int, context: int) -> Callable[[], object]:
    """Request i stores its token at position ``context - 1 - i % page_size``: request 0 and every
    page_size-th one complete their last page."""
    cache, page_table, stage_table = random_kitty_cache(config, batch, context // config.page_size)
    seq_lens = (context - torch.arange(batch, device="cuda") % config.page_size).to(torch.int32)
    key, value = torch.randn(2, batch, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return lambda: store_decode(key, value, seq_lens, page_table, stage_table, cache.packed, cache.stage, config,
                                cache.stage_layout)


def bf16_paged_inputs(batch: int, new_tokens: int, seq_len: int) -> dict:
    """The arguments vLLM's FLASH_ATTN and TRITON_ATTN backends pass for one step on a bf16 cache: each
    request holds ``seq_len`` tokens, of which the last ``new_tokens`` are the step's queries."""
    blocks = triton.cdiv(seq_len, BF16_BLOCK_SIZE)
    # The backends' physical layout: [num_blocks, block_size, H, 2 * D], K and V split off the last dim.
    cache = torch.empty(batch * blocks, BF16_BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM, dtype=torch.bfloat16,
                        device="cuda").normal_()
    key, value = cache.split(HEAD_DIM, dim=-1)
    query = torch.randn(batch * new_tokens, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return dict(q=query, k=key, v=value, out=torch.empty_like(query),
                cu_seqlens_q=torch.arange(0, batch * new_tokens + 1, new_tokens, dtype=torch.int32, device="cuda"),
                max_seqlen_q=new_tokens,
                seqused_k=torch.full((batch,), seq_len, dtype=torch.int32, device="cuda"), max_seqlen_k=seq_len,
                softmax_scale=HEAD_DIM ** -0.5, causal=True,
                block_table=torch.arange(batch * blocks, dtype=torch.int32, device="cuda").view(batch, blocks))


def flash_decode(batch: int, context: int) -> Callable[[], object]:
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    inputs = bf16_paged_inputs(batch, 1, context - 1)
    fa_version = get_flash_attn_version(head_size=HEAD_DIM)
    return lambda: flash_attn_varlen_func(**inputs, fa_version=fa_version)


def triton_decode(batch: int, context: int) -> Callable[[], object]:
    from vllm.v1.attention.backends.triton_attn import MIN_LAUNCH_GRID_SIZE_2D, NUM_PAR_SOFTMAX_SEGMENTS
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    inputs = bf16_paged_inputs(batch, 1, context - 1)
    # As TritonAttentionMetadataBuilder: batches up to this size take the 3D (split-softmax) kernel.
    threshold = MIN_LAUNCH_GRID_SIZE_2D // NUM_KV_HEADS
    segments = (threshold, NUM_HEADS, NUM_PAR_SOFTMAX_SEGMENTS)
    split_softmax = dict(
        seq_threshold_3D=threshold, num_par_softmax_segments=NUM_PAR_SOFTMAX_SEGMENTS,
        softmax_segm_output=torch.empty(*segments, triton.next_power_of_2(HEAD_DIM), dtype=torch.float32,
                                        device="cuda"),
        softmax_segm_max=torch.empty(segments, dtype=torch.float32, device="cuda"),
        softmax_segm_expsum=torch.empty(segments, dtype=torch.float32, device="cuda"))
    return lambda: unified_attention(**inputs, window_size=(-1, -1), softcap=0, q_descale=None, k_descale=None,
                                     v_descale=None, **split_softmax)


def time_kernel(kernel: str, config: KittyConfig, batch: int, context: int) -> float:
    """Milliseconds of one decode step, replayed from a CUDA graph as vLLM runs decode, so that the time
    is the GPU's and not the host's launch overhead (its inputs are freed on return)."""
    if kernel in KITTY_KERNELS:
        call = {"kitty": kitty_decode, "store": kitty_store}[kernel](config, batch, context)
    else:
        call = {"flash": flash_decode, "triton": triton_decode}[kernel](batch, context)
    call()   # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return triton.testing.do_bench(graph.replay)


def bench(kernel: str, preset: str, batch: int, context: int, copy_gb_s: float) -> dict:
    """One record: the kernel's time and bandwidth for ``batch`` x ``context``, or why it has none."""
    config = KittyConfig.from_preset(preset)
    dtype = preset + KITTY_KERNELS[kernel] if kernel in KITTY_KERNELS else KERNEL_DTYPES[kernel]
    record = {"benchmark": "decode_kernel", "kv_cache_dtype": dtype, "batch": batch, "context": context}
    read = bytes_read("kitty" if kernel in KITTY_KERNELS else kernel, config, batch, context)
    torch.cuda.empty_cache()   # the previous cell's cache back to the device, so that it counts as free
    free = torch.cuda.mem_get_info()[0]
    if read > FREE_MEMORY_FRACTION * free:
        return {**record, "skipped": f"needs {read / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
    try:
        ms = time_kernel(kernel, config, batch, context)
    except torch.OutOfMemoryError:
        return {**record, "skipped": "out of memory"}
    except Exception as error:   # recorded, so that one failing kernel does not lose the other cells
        traceback.print_exc()
        return {**record, "error": f"{type(error).__name__}: {error}"}
    if kernel == "store":
        return {**record, "ms": ms}
    gb_s = read / ms / 1e6
    return {**record, "ms": ms, "gb_s": gb_s, "copy_gb_s": copy_gb_s, "pct_of_copy": 100 * gb_s / copy_gb_s}


def describe(record: dict) -> str:
    cell = f"batch {record['batch']}, context {record['context']}, {record['kv_cache_dtype']}"
    if "ms" not in record:
        return f"{cell}: {record.get('skipped') or 'error: ' + record['error']}"
    if "gb_s" not in record:
        return f"{cell}: {record['ms']:.3f} ms"
    return f"{cell}: {record['ms']:.3f} ms, {record['gb_s']:.0f} GB/s ({record['pct_of_copy']:.1f}% of copy)"


def vllm_version() -> str | None:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def kernel_parser(doc: str, kernel_dtypes: dict[str, str], kitty_kernels: tuple[str, ...] = ("kitty",)
                  ) -> argparse.ArgumentParser:
    """The options every kernel benchmark takes (its module docstring as help): --preset, --kernels
    (``kitty_kernels`` and those of ``kernel_dtypes``), --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(doc.splitlines()[1:]))
    parser.add_argument("--preset", default="kitty2")
    parser.add_argument("--kernels", nargs="+", choices=(*kitty_kernels, *kernel_dtypes),
                        default=[*kitty_kernels, *kernel_dtypes])
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="folder of the results JSON")
    return parser


def kernel_run(args: argparse.Namespace, kernel_dtypes: dict[str, str]) -> tuple[list[str], dict, Path]:
    """After kernel_parser's options are parsed: the kernels to time (vLLM's only if it is installed),
    the environment fields of every record, and the results file."""
    KittyConfig.from_preset(args.preset)   # an unknown preset fails here, before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times GPU kernels and needs a CUDA GPU; torch sees none")
    version = vllm_version()
    kernels = args.kernels
    if version is None and set(kernels) & set(kernel_dtypes):
        print("vLLM is not installed: timing the kitty kernels only")
        kernels = [k for k in kernels if k not in kernel_dtypes]
    environment = {"gpu": torch.cuda.get_device_name(), "vllm_version": version,
                   "date": datetime.date.today().isoformat()}
    return kernels, environment, report.result_path(args.out, environment["gpu"], environment["date"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = kernel_parser(__doc__, KERNEL_DTYPES, tuple(KITTY_KERNELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--programs-per-sm", type=int, default=None,
                        help=f"split-K target of the Gluon page kernel (default {decode_gluon.PROGRAMS_PER_SM})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kernels, environment, path = kernel_run(args, KERNEL_DTYPES)
    if args.programs_per_sm is not None:
        decode_gluon.PROGRAMS_PER_SM = args.programs_per_sm
        environment["programs_per_sm"] = args.programs_per_sm
    copy = copy_bandwidth()
    print(f"{environment['gpu']}: device-to-device copy {copy:.0f} GB/s\n", flush=True)
    records = report.record_each(path, (lambda b=batch, c=context, k=kernel: bench(k, args.preset, b, c, copy)
                                        for batch in args.batches for context in args.contexts
                                        for kernel in kernels), environment, describe)
    report.finish(path, report.decode_kernel_table(records))


if __name__ == "__main__":
    main()
