"""Time kitty's paged-decode kernel and compare its achieved bandwidth with a device-to-device copy.

    python benchmarks/decode_kernel.py [--preset kitty2] [--batches 1 16 64] [--contexts 1024 8192]

Achieved bandwidth = bytes the kernel must read (the packed pages, sinks and ring of every request, and
the queries) / kernel time. Prints a markdown table. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse

import torch
import triton

from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels import decode_attention
from kitty_vllm.layout import stage_layout
from kitty_vllm.paged import PagedKittyCache

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128   # a Qwen3-8B layer


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * num_bytes / ms / 1e6   # GB/s, bytes read and written


def bench(config: KittyConfig, batch: int, context: int) -> tuple[float, float]:
    """(milliseconds, GB/s) for ``batch`` requests of ``context`` tokens each."""
    layout = stage_layout(config, HEAD_DIM, NUM_KV_HEADS, 2)
    pages = context // config.page_size
    packed = torch.randint(0, 255, (batch * pages + 1, NUM_KV_HEADS, layout.page.page_bytes),
                           dtype=torch.uint8, device="cuda")
    packed.view(torch.float16).nan_to_num_(0.0).clamp_(-1, 1)   # finite scales and minima
    stage_blocks = batch * layout.blocks_per_request
    stage = torch.randn(stage_blocks, layout.block_bytes // 2, dtype=torch.bfloat16, device="cuda")
    cache = PagedKittyCache.from_raw(config, layout, packed, stage, torch.bfloat16)
    page_table = torch.arange(batch * pages, dtype=torch.int32, device="cuda").view(batch, pages)
    stage_table = torch.arange(stage_blocks, dtype=torch.int32, device="cuda").view(batch, -1)
    seq_lens = torch.full((batch,), context - 1, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: decode_attention(
        query, cache.packed, cache.stage, page_table, stage_table, seq_lens, config, layout, HEAD_DIM ** -0.5))
    full_pages = (context - 1) // config.page_size
    ring = context - 1 - full_pages * config.page_size
    read = batch * (full_pages * NUM_KV_HEADS * layout.page.page_bytes
                    + (config.sink_tokens + ring) * NUM_KV_HEADS * HEAD_DIM * 2 * 2
                    + NUM_HEADS * HEAD_DIM * 2)
    return ms, read / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="kitty2")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    args = parser.parse_args()
    config = KittyConfig.from_preset(args.preset)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy:.0f} GB/s\n")
    print("| batch | context | ms | GB/s | % of copy |\n|---|---|---|---|---|")
    for batch in args.batches:
        for context in args.contexts:
            ms, gbs = bench(config, batch, context)
            print(f"| {batch} | {context} | {ms:.3f} | {gbs:.0f} | {100 * gbs / copy:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
