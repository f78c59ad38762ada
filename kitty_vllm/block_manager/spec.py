"""The two KV-cache specs of a kitty layer: what vLLM's block manager learns about its memory.

Each kitty attention layer owns one block in each of two vLLM KV-cache groups:

* ``KittyPackedSpec`` (group "packed"): one block is one quantized page, ``page_size`` tokens of
  every KV head, position-indexed like any full-attention cache.
* ``KittyStageSpec`` (group "staging"): full-precision blocks for the sink tokens and the window of
  newest tokens, in fixed roles rather than by position (see ``kitty_vllm.layout.StageLayout``).

A staging block has the byte size of a packed page, so both groups share vLLM's one block pool with
no padding and no block-size scaling. Every byte count comes from ``kitty_vllm.layout``. Beside layers
in the model's dtype (sliding-window or skipped layers) both are padded to the pool's shared page
(kitty_vllm.block_manager.mixed), and sliding-window layers get ``KittySlidingWindowSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from typing_extensions import Self
from vllm.utils.torch_utils import get_dtype_size
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, SlidingWindowSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import StageLayout, page_layout, stage_layout

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# The layouts (vLLM's choice for the whole model) that kitty's caches can be bound in: a layer's cache is a
# [num_blocks, H, 1, page_bytes] tensor, whose pages and staging blocks kitty's kernels address by block id
# through its strides. Layer outermost (each layer's blocks contiguous; with one state per block the two orders
# are the same bytes), vLLM's choice by default; or block outermost (each block holds a page of every layer,
# side by side), which kitty chooses for pages of each layer's size (KittyConfig.layer_boost, kitty_vllm.patches).
PACKED_LAYOUT = KVCacheLayout.BLHNC
KV_CACHE_LAYOUTS = (KVCacheLayout.LBNHC, KVCacheLayout.LBHNC, PACKED_LAYOUT)


@dataclass(frozen=True, kw_only=True)
class KittyPackedSpec(FullAttentionSpec):
    """Full attention over quantized pages: block ``i`` of a request holds its pages ``i * P`` to
    ``i * P + P - 1``, ``P = pages_per_block``.

    A block holds one page per KV head (``P = 1``; ``block_size`` is the kitty page size): in vLLM's page
    geometry ``[H, N, C]``, ``H = num_kv_heads`` slots of ``N = 1`` state (``tokens_per_state`` =
    ``block_size``) of ``C = state_content_bytes`` = the page's bytes, as uint8. On hybrid models a block
    holds ``P`` pages (kitty_vllm.block_manager.mixed): one slot (``num_head_slots``) of ``N = P`` states,
    each one page of every KV head (``C = num_kv_heads`` pages), so that the block is ``P`` whole pages
    ``[P, H, page_bytes]`` in any of vLLM's layouts: page ``p`` of block ``b`` is page ``b * P + p`` of the
    layer's cache viewed as pages (kitty_vllm.paged).
    """

    @property
    def pages_per_block(self) -> int:
        return self.block_size // self.tokens_per_state

    @property
    def packed_page_bytes(self) -> int:
        """Bytes of one page of one KV head."""
        return self.state_content_bytes if self.num_head_slots is None else self.state_content_bytes // self.num_kv_heads

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        # vLLM reads an AssertionError from merge as "these layers cannot share a group"; kitty's own
        # message names the reason.
        assert all(spec.state_content_bytes == specs[0].state_content_bytes for spec in specs), (
            "kitty layers of one KV-cache group must share one page layout")
        return super().merge(specs)


@dataclass(frozen=True, kw_only=True)
class KittyStageSpec(AttentionSpec):
    """Full-precision staging blocks: sink tokens, then a ring for the newest page_size tokens.

    A request's row is ``[sink blocks..., ring blocks...]`` and grows to
    ``layout.blocks_needed(num_tokens)``, never beyond ``layout.blocks_per_request``. ``block_size``
    (``layout.block_tokens``) is nominal: it sets the hash granularity of the sink blocks and the
    worker's block-table row length, while the kitty kernels address tokens inside blocks themselves.

    The spec keeps the ``KittyConfig`` rather than copies of the derived sizes, so ``layout`` is
    rebuilt by ``kitty_vllm.layout`` alone; the config is frozen, so the spec stays hashable and
    picklable (vLLM compares specs and ships them between processes).
    """

    kitty_config: KittyConfig
    # The dtype of the staged Keys and Values. ``dtype`` is uint8, as for the packed group: vLLM zeroes
    # every new block of a pool whose groups differ in dtype, and kitty writes each byte before it
    # reads it.
    model_dtype: torch.dtype
    # Whether KittyStageManager may grant prefix-cache hits (kitty_specs' ``step_tokens``).
    prefix_hits: bool = True
    # The packed group's pages per block, whose bytes a staging block has (StageLayout).
    pages_per_block: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size != self.layout.block_tokens:
            raise ValueError(f"KittyStageSpec block_size={self.block_size}: the staging layout needs "
                             f"{self.layout.block_tokens} (StageLayout.block_tokens)")

    @property
    def layout(self) -> StageLayout:
        return stage_layout(self.kitty_config, self.head_size, self.num_kv_heads,
                            get_dtype_size(self.model_dtype), self.pages_per_block)

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        # What a request of max_model_len holds: this is what vLLM's capacity report and admission
        # check count, so it must match KittyStageManager.get_num_blocks_to_allocate.
        max_model_len = vllm_config.model_config.max_model_len
        return self.layout.blocks_needed(max_model_len) * self.page_size_bytes


@dataclass(frozen=True, kw_only=True)
class KittySlidingWindowSpec(SlidingWindowSpec):
    """A sliding-window layer in the model's dtype beside kitty's pages: vLLM's spec, byte for byte, served
    by ``KittySlidingWindowManager``, which also keeps the windows where kitty's prefix-cache hits end
    (kitty_vllm.block_manager.manager)."""


def layer_kitty_config(config: KittyConfig, layer_name: str) -> KittyConfig:
    """The config of the attention layer ``layer_name`` (its module path, e.g. ``model.layers.3.self_attn.attn``):
    with per-layer boost ratios (KittyConfig.layer_boost), that of the layer index in the name."""
    if not config.layer_boost:
        return config
    from vllm.model_executor.models.utils import extract_layer_index

    return config.for_layer(extract_layer_index(layer_name))


def kitty_specs(config: KittyConfig, num_kv_heads: int, head_dim: int, model_dtype: torch.dtype,
                step_tokens: int | None = None, shared_page_bytes: int | None = None,
                pages_per_block: int = 1) -> tuple[KittyPackedSpec, KittyStageSpec]:
    """The packed and staging specs of one kitty attention layer (per-rank ``num_kv_heads``).

    ``step_tokens``: the most tokens the scheduler gives one request in a step (None: no limit).
    Prefix-cache hits are granted only where the first step after one can compute a whole page and
    ``exact_prefill`` is off (kitty_vllm.block_manager.manager).

    ``shared_page_bytes``: the block pool's page where layers in the model's dtype share it
    (kitty_vllm.block_manager.mixed); a larger one pads both specs' blocks to it, so that vLLM counts
    the padding in its memory budget.

    ``pages_per_block``: consecutive pages per packed block (KittyPackedSpec), and a staging block as large."""
    if not model_dtype.is_floating_point:
        raise ValueError(f"model_dtype={model_dtype}: staged Keys and Values need a floating dtype")
    page_bytes = page_layout(config, head_dim).page_bytes
    geometry = (dict(num_head_slots=1, state_content_bytes=num_kv_heads * page_bytes) if pages_per_block > 1
                else dict(state_content_bytes=page_bytes))
    packed = KittyPackedSpec(
        block_size=pages_per_block * config.page_size,
        num_kv_heads=num_kv_heads,
        head_size=head_dim,
        dtype=torch.uint8,
        tokens_per_state=config.page_size,
        **geometry,
    )
    layout = stage_layout(config, head_dim, num_kv_heads, get_dtype_size(model_dtype), pages_per_block)
    # The bytes of a packed block, [num_kv_heads, 1, pages_per_block * page_bytes] uint8: kitty's kernels address
    # the staged tokens inside it themselves (kitty_vllm.layout.StageLayout).
    stage = KittyStageSpec(
        block_size=layout.block_tokens,
        num_kv_heads=num_kv_heads,
        head_size=head_dim,
        dtype=torch.uint8,
        tokens_per_state=layout.block_tokens,
        state_content_bytes=layout.block_bytes // num_kv_heads,
        model_dtype=model_dtype,
        kitty_config=config,
        pages_per_block=pages_per_block,
        prefix_hits=not config.exact_prefill and (step_tokens is None or step_tokens >= config.page_size),
    )
    # Equal pages are what lets vLLM put both groups in one pool without padding. With per-layer boost ratios
    # (KittyConfig.layer_boost) a staging block holds the smallest page's bytes, padded to this layer's page: in
    # vLLM's block-outermost layout a block holds every layer's page side by side, or every layer's staging block,
    # and both groups' layers have the same sizes, so that vLLM splits them into groups alike.
    assert stage.page_size_bytes == layout.block_bytes <= packed.page_size_bytes
    if packed.page_size_bytes > layout.block_bytes:
        stage = replace(stage, page_size_padded=packed.page_size_bytes)
    if shared_page_bytes is not None and shared_page_bytes > packed.page_size_bytes:
        packed, stage = (replace(spec, page_size_padded=shared_page_bytes) for spec in (packed, stage))
    return packed, stage
