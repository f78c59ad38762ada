"""Every kitty kernel a layer runs, compiled during vLLM's start-up warm-up, never on a user's request.

vLLM's dummy runs attend with no metadata (kitty returns zeros there) and its CUDA-graph capture runs
decode-only batches, so without this the first prompt that packs a page, reads pages dequantized or
arrives beside decodes would compile kernels while a user waits, and vLLM's JIT monitor, active once
start-up ends, would report it. Each kitty attention layer registers itself, as the model is built, in
vLLM's JIT warm-up registry (``vllm.model_executor.warmup.jit_warmup``, the interface vLLM's own kernels
use, in both model runners); vLLM's kernel warm-up, after the KV caches are bound and before graphs are
captured, turns each layer into its :class:`WarmupKey` (the layers of one format and cache geometry share
one) and :func:`warm_up` runs each key through the paths of a step, on a scratch cache of a few blocks laid
out as the layer's own:

* a mixed batch (PagedKittyCache.mixed_step): a first chunk that writes sinks and packs pages, a later chunk
  that reads packed pages (dequantized, or through the prefill kernel with ``exact_prefill``), a one-token
  decode and with speculative decoding a verification step (through the decode kernels);
* decode-only batches (PagedKittyCache.decode, as a mixed batch's one-token requests are attended too), at
  every split count class of this GPU: the merge kernel's constexpr follows the next power of two of the
  splits, so one request at page-table widths 1, 2, 4, ... 64 gives every class that any batch can;
* with speculative decoding, a decode-only batch of verification steps.

The kernels' other arguments are fixed per layer, or never specialized (kitty_vllm.kernels.common:
TABLE_STRIDES; PagedKittyCache.plan keeps its parts 16-byte aligned), so these launches compile every kernel
the layer runs. The data are zeros and random: only the launches matter.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import StageLayout
from kitty_vllm.paged import MixedBatch, PagedKittyCache, layer_stage_layout

# Page-table widths of the decode sweep: up to twice the merge kernel's largest block of splits.
DECODE_WIDTHS = (1, 2, 4, 8, 16, 32, 64)
# Blocks of the scratch cache in each group: the tables' entries wrap around them, since only the launches
# matter, and a block strided as vLLM binds it may span every layer's page (KittyConfig.layer_boost: vLLM's
# block-outermost layout), megabytes a block.
SCRATCH_BLOCKS = 8


@dataclass(frozen=True)
class CacheGeometry:
    """The shape of one block and the strides of a cache tensor as vLLM binds it (padding included: the
    kernels get its strides), and its dtype."""

    block_shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, cache: torch.Tensor) -> CacheGeometry:
        return cls(tuple(cache.shape[1:]), tuple(cache.stride()), cache.dtype)

    def zeros(self, num_blocks: int, device: torch.device | str) -> torch.Tensor:
        """A zeroed cache of ``num_blocks`` blocks with these strides."""
        shape = (num_blocks, *self.block_shape)
        size = 1 + sum((n - 1) * stride for n, stride in zip(shape, self.strides))
        return torch.zeros(size, dtype=self.dtype, device=device).as_strided(shape, self.strides)


@dataclass(frozen=True)
class WarmupKey:
    """What decides which kernels a kitty layer compiles: its format, heads, dtype and softmax options, and
    the geometry of its two caches."""

    config: KittyConfig
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    soft_cap: bool
    sinks_dtype: torch.dtype | None
    packed: CacheGeometry
    stage: CacheGeometry

    @property
    def stage_layout(self) -> StageLayout:
        return layer_stage_layout(self.config, self.head_dim, self.num_kv_heads, self.dtype,
                                  math.prod(self.packed.block_shape))

    @classmethod
    def of_layer(cls, layer: Any) -> WarmupKey:
        """The key of a vLLM attention layer served by kitty (KittyAttentionImpl), whose caches are bound."""
        impl = layer.impl
        return cls(impl.config, impl.num_heads, impl.num_kv_heads, impl.head_size, layer.dtype,
                   impl.logits_soft_cap > 0, None if impl.sinks is None else impl.sinks.dtype,
                   CacheGeometry.of(layer.kv_cache), CacheGeometry.of(layer.kitty_stage.kv_cache))


def scratch_cache(key: WarmupKey, device: torch.device | str, num_pages: int, num_stage_blocks: int) -> PagedKittyCache:
    """A zeroed PagedKittyCache of ``key``'s format and geometry: blocks for ``num_pages`` pages, and
    ``num_stage_blocks`` staging blocks."""
    sinks = None if key.sinks_dtype is None else torch.zeros(key.num_heads, dtype=key.sinks_dtype, device=device)
    return PagedKittyCache.of_layer(key.config, key.head_dim, key.num_kv_heads,
                                    key.packed.zeros(-(-num_pages // key.stage_layout.pages_per_block), device),
                                    key.stage.zeros(num_stage_blocks, device), key.dtype,
                                    30.0 if key.soft_cap else 0.0, sinks, kernels=True)


def warm_up(key: WarmupKey, device: torch.device | str) -> None:
    """Run the kitty kernels of ``key``'s layers on ``device`` (module docstring): on a GPU, this compiles them;
    on the CPU, Triton's interpreter runs them (tests)."""
    config, page = key.config, key.config.page_size
    rows, width = 4, max(DECODE_WIDTHS)
    stage_blocks, num_pages = key.stage_layout.blocks_per_request, SCRATCH_BLOCKS * key.stage_layout.pages_per_block
    cache = scratch_cache(key, device, num_pages, SCRATCH_BLOCKS)
    page_table = (torch.arange(rows * width, dtype=torch.int32, device=device) % num_pages).view(rows, width)
    stage_table = (torch.arange(rows * stage_blocks, dtype=torch.int32, device=device) % SCRATCH_BLOCKS).view(rows, -1)
    scale = key.head_dim ** -0.5

    def tokens(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """query, key, value and out for ``n`` tokens."""
        query = torch.randn(n, key.num_heads, key.head_dim, dtype=key.dtype, device=device)
        new = torch.randn(2, n, key.num_kv_heads, key.head_dim, dtype=key.dtype, device=device)
        return query, new[0], new[1], torch.empty_like(query)

    # A mixed batch: a first chunk (sinks, pages packed), a later one (pages read), a one-token decode and,
    # with speculative decoding, a verification step (both through the decode kernels).
    lengths = [2 * page + 3, page, 1] + ([1 + config.draft_tokens] if config.draft_tokens else [])
    seq_lens = torch.tensor([2 * page + 3, 2 * page + 5, 2 * page + 9, 3 * page + 4][:len(lengths)], dtype=torch.int32)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    batch = MixedBatch.split(starts, seq_lens, 1 + config.draft_tokens, torch.device(device))
    query, new_key, new_value, out = tokens(starts[-1])
    cache.mixed_step(query, new_key, new_value, batch, seq_lens.to(device), page_table, stage_table, scale, out)
    # Decode-only batches at every split class (module docstring), then verification steps.
    query, new_key, new_value, out = tokens(1 + config.draft_tokens + 1)
    for pages_read in DECODE_WIDTHS:
        seq_lens = torch.tensor([pages_read * page], dtype=torch.int32, device=device)
        cache.decode(query, new_key, new_value, torch.tensor([0, 1], dtype=torch.int32, device=device), seq_lens,
                     1, page_table[:1, :pages_read], stage_table[:1], scale, out)
    if config.draft_tokens:
        query_start = torch.tensor([0, 1 + config.draft_tokens, 2 + config.draft_tokens], dtype=torch.int32,
                                   device=device)
        seq_lens = torch.tensor([3 * page, 2 * page], dtype=torch.int32, device=device)
        cache.decode(query, new_key, new_value, query_start, seq_lens, 1 + config.draft_tokens, page_table[:2],
                     stage_table[:2], scale, out)


@functools.cache
def warmup_kernel() -> Any:
    """vLLM's JIT warm-up interface over :func:`warm_up`: a ``VllmJitKernel``, one object, under which vLLM's
    registry collects every kitty layer (``warmup_kernel().register_warmup(layer)``)."""
    from vllm.model_executor.warmup.jit_warmup import VllmJitKernel

    class KittyKernels(VllmJitKernel[WarmupKey]):
        CompileKey = WarmupKey

        def get_warmup_keys(self, layer: Any) -> list[WarmupKey]:
            return [WarmupKey.of_layer(layer)] if layer.kv_cache.numel() else []

        def compile(self, compile_key: WarmupKey) -> None:
            if torch.cuda.is_available():
                warm_up(compile_key, torch.device("cuda", torch.cuda.current_device()))

    return KittyKernels()
