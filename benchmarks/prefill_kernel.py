"""Time one layer's prefill step, cache writes included: kitty's against vLLM's FlashAttention on bf16.

    . /opt/vsite/env.sh
    python benchmarks/prefill_kernel.py [--preset kitty2] [--exact-prefill] [--kernels kitty flash]
                                        [--cells 2x4096@0 1x2048@4096 16x512@0 1x8192@0]
                                        [--out benchmarks/results]

One Qwen3-8B layer (32 query heads, 8 KV heads of 128, bf16). A cell ``RxN@C`` is R requests of N new
tokens each, after C tokens already in their cache (C > 0: a chunk of chunked prefill):
- kitty: ``PagedKittyCache.prefill``, the whole step of kitty's backend for the batch (sink writes, the
  quantization of the pages the step completes, prefill attention, ring writes) over random packed pages
  and staging blocks, with the StorePlan built once outside the timed call, as the backend builds it once
  per step for every layer; then the step's attention alone on the same cache
  (``PagedKittyCache.attend``, "attention_ms": the pages before the step dequantized into one bf16
  sequence with the sinks, ring and new tokens, and FlashAttention over it, ``context_attention``; with
  ``--exact-prefill``, ``prefill_attention`` reads everything from the cache), so that the table shows
  the share of the step that is attention;
- flash: vLLM's FLASH_ATTN step on a bf16 paged cache (16-token blocks, K and V side by side in each
  token's row): ``reshape_and_cache_flash`` as its ``do_kv_cache_update`` calls it, then
  ``flash_attn_varlen_func`` as its ``forward`` calls it (causal, the version vLLM picks for the GPU; as in
  decode_kernel.py, without the FA3 scheduler metadata that vLLM's builder may precompute per step).

Prints a markdown table and merges records {"benchmark": "prefill_kernel", "kv_cache_dtype": the preset or
"auto-flash", "requests", "new_tokens", "context", "ms", "attention_ms" (kitty), "tokens_per_s", ...} into
``<out>/<gpu>-<yyyy-mm-dd>.json``, then draws the plots of that file (benchmarks/report.py). Needs a CUDA
GPU; vLLM is needed only for flash (imported when it runs).
"""

from __future__ import annotations

import argparse
import re
import traceback
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton

import report
from decode_kernel import (BF16_BLOCK_SIZE, HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, bf16_paged_inputs, kernel_parser,
                           kernel_run, random_kitty_cache)
from kitty_vllm.config import KittyConfig
from kitty_vllm.paged import Span

KERNEL_DTYPES = {"flash": "auto-flash"}   # kitty's is its preset name
SCALE = HEAD_DIM ** -0.5


class Cell(NamedTuple):
    """``requests`` requests of ``new_tokens`` tokens each, at positions from ``context`` on."""

    requests: int
    new_tokens: int
    context: int

    def __str__(self) -> str:
        return f"{self.requests}x{self.new_tokens}@{self.context}"


# W1's prefill, a chunk of chunked prefill, many short prompts, one long prompt.
DEFAULT_CELLS = (Cell(2, 4096, 0), Cell(1, 2048, 4096), Cell(16, 512, 0), Cell(1, 8192, 0))


def parse_cell(text: str) -> Cell:
    match = re.fullmatch(r"(\d+)x(\d+)@(\d+)", text)
    if match is None or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not REQUESTSxNEW_TOKENS@CONTEXT with at least one request "
                                         "and one new token, e.g. 2x4096@0")
    return Cell(*map(int, match.groups()))


def new_tokens(cell: Cell) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 query [R * N, Hq, D] and key, value [R * N, H, D] of the cell's new tokens."""
    tokens = cell.requests * cell.new_tokens
    return (torch.randn(tokens, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
            *torch.randn(2, tokens, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"))


def kitty_prefill(config: KittyConfig, cell: Cell) -> tuple[Callable[[], object], Callable[[], object]]:
    """The step and its attention alone, over a cache with the cell's context and the pages it completes."""
    requests, new, context = cell
    cache, page_table, stage_table = random_kitty_cache(config, requests, (context + new) // config.page_size)
    query, key, value = new_tokens(cell)
    out = torch.empty_like(query)
    spans = [Span(r, r * new, (r + 1) * new, context) for r in range(requests)]
    plan = cache.plan(spans, query.device, NUM_HEADS)
    return (lambda: cache.prefill(query, key, value, spans, page_table, stage_table, SCALE, out, plan),
            lambda: cache.attend(query, key, value, spans, page_table, stage_table, SCALE, out, plan))


def flash_prefill(cell: Cell) -> Callable[[], object]:
    from vllm.v1.attention.backends.fa_utils import (flash_attn_varlen_func, get_flash_attn_version,
                                                     reshape_and_cache_flash)

    requests, new, context = cell
    inputs = bf16_paged_inputs(requests, new, context + new)
    _, key, value = new_tokens(cell)
    positions = torch.arange(context, context + new, device="cuda")
    slot_mapping = (inputs["block_table"][:, positions // BF16_BLOCK_SIZE] * BF16_BLOCK_SIZE
                    + positions % BF16_BLOCK_SIZE).flatten().to(torch.int64)
    unit_scale = torch.ones((), dtype=torch.float32, device="cuda")   # the layer's _k_scale, _v_scale for bf16
    fa_version = get_flash_attn_version(head_size=HEAD_DIM)

    def step() -> None:
        reshape_and_cache_flash(key, value, inputs["k"], inputs["v"], slot_mapping, "auto", unit_scale, unit_scale)
        flash_attn_varlen_func(**inputs, fa_version=fa_version)

    return step


def time_kernel(kernel: str, config: KittyConfig, cell: Cell) -> dict:
    """{"ms": the step's milliseconds, "attention_ms" for kitty} (the inputs are freed on return)."""
    if kernel == "flash":
        return {"ms": triton.testing.do_bench(flash_prefill(cell))}
    step, attention = kitty_prefill(config, cell)
    ms = triton.testing.do_bench(step)   # first: the cache then holds what attention expects of this step
    return {"ms": ms, "attention_ms": triton.testing.do_bench(attention)}


def bench(kernel: str, preset: str, exact: bool, cell: Cell) -> dict:
    """One record: the kernel's times for the cell, or why it has none."""
    config = KittyConfig.from_preset(preset).replace(exact_prefill=exact)
    label = f"{preset} (exact prefill)" if exact else preset
    record = {"benchmark": "prefill_kernel", "kv_cache_dtype": KERNEL_DTYPES.get(kernel, label),
              "requests": cell.requests, "new_tokens": cell.new_tokens, "context": cell.context}
    torch.cuda.empty_cache()   # the previous cell's cache back to the device
    try:
        times = time_kernel(kernel, config, cell)
    except torch.OutOfMemoryError:
        return {**record, "skipped": "out of memory"}
    except Exception as error:   # recorded, so that one failing kernel does not lose the other cells
        traceback.print_exc()
        return {**record, "error": f"{type(error).__name__}: {error}"}
    return {**record, **times, "tokens_per_s": cell.requests * cell.new_tokens / times["ms"] * 1e3}


def describe(record: dict) -> str:
    cell = (f"{record['requests']} x {record['new_tokens']} new tokens at context {record['context']}, "
            f"{record['kv_cache_dtype']}")
    if "ms" not in record:
        return f"{cell}: {record.get('skipped') or 'error: ' + record['error']}"
    attention = f" ({record['attention_ms']:.3f} ms attention)" if "attention_ms" in record else ""
    return f"{cell}: {record['ms']:.3f} ms{attention}, {record['tokens_per_s']:,.0f} tokens/s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = kernel_parser(__doc__, KERNEL_DTYPES)
    parser.add_argument("--cells", type=parse_cell, nargs="+", default=list(DEFAULT_CELLS),
                        metavar="RxN@C", help="R requests of N new tokens after C cached tokens (default: "
                        f"{' '.join(map(str, DEFAULT_CELLS))})")
    parser.add_argument("--exact-prefill", action="store_true",
                        help="run kitty with exact_prefill (kitty_vllm.config): the step's own tokens read from the "
                        "cache as decoding would, instead of in full precision")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kernels, environment, path = kernel_run(args, KERNEL_DTYPES)
    print(f"{environment['gpu']}: prefill of one Qwen3-8B layer, cells {' '.join(map(str, args.cells))}\n",
          flush=True)
    records = report.record_each(path, (lambda c=cell, k=kernel: bench(k, args.preset, args.exact_prefill, c)
                                        for cell in args.cells for kernel in kernels), environment, describe)
    report.finish(path, report.prefill_kernel_table(records))


if __name__ == "__main__":
    main()
