"""The staging companion of a kitty attention layer: the full-precision sinks and newest tokens.

Choice: the full-precision tokens live in a second vLLM KV-cache group, owned by vLLM's own KV-cache
manager, rather than in a side pool keyed by block id. Why:

* Memory follows the requests: each request holds ``StageLayout.blocks_per_request`` staging blocks
  (sinks + a ring for the newest page of tokens), allocated and freed by vLLM with the request (finish,
  abort, preemption), and counted by vLLM's memory budget and its "Maximum concurrency" line through
  ``KittyStageSpec.max_memory_usage_bytes``. A side pool would sit outside vLLM's budget, would be
  sized for ``max_num_seqs`` rather than for the requests that run, and would learn of frees only
  indirectly (the worker is not told when a block is freed).
* Prefix caching: the sink blocks are cached under the request's own block hashes, so a prefix hit
  (page-aligned, one page short of the cached prefix, so that the request's own steps fill its ring
  before a decode reads it: kitty_vllm.block_manager) finds both its packed pages and its sinks. A side pool could not restore
  sinks on a hit without recomputing them.
* The cost: a companion layer per attention layer (this module), equal page sizes across the two
  groups (a staging block is exactly one layer's packed page), and reliance on vLLM's hybrid
  KV-cache manager, which must stay enabled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionMetadataBuilder,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.kv_cache_interface import KVCacheSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from kitty_vllm.block_manager.spec import KV_CACHE_LAYOUTS
from kitty_vllm.config import load_config_for
from kitty_vllm.warmup import warmup_kernel

STAGE_SUFFIX = "kitty_stage"


class KittyStageCache(torch.nn.Module, AttentionLayerBase):
    """Carries the staging KV-cache group of one attention layer; it never runs a forward."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer_name = layer.layer_name
        self.prefix = f"{layer.layer_name}.{STAGE_SUFFIX}"
        self.num_kv_heads = layer.num_kv_heads
        self.head_size = layer.head_size
        self.dtype = layer.dtype
        self.kv_cache_dtype = layer.kv_cache_dtype
        self.kitty_pages_per_block = 1     # the layer's (kitty_vllm.block_manager.mixed.fit_blocks_to_state)
        self.kv_cache = torch.tensor([])
        context = get_current_vllm_config().compilation_config.static_forward_context
        if self.prefix in context:
            raise ValueError(f"Duplicate layer name: {self.prefix}")
        context[self.prefix] = self
        # The layer's kernels compile in vLLM's start-up warm-up (the model is built in its registry's scope).
        warmup_kernel().register_warmup(layer)

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        from kitty_vllm.block_manager import kitty_specs, layer_kitty_config

        scheduler = vllm_config.scheduler_config
        step_tokens = scheduler.max_num_batched_tokens
        if scheduler.long_prefill_token_threshold > 0:
            step_tokens = min(step_tokens, scheduler.long_prefill_token_threshold)
        config = layer_kitty_config(load_config_for(self.kv_cache_dtype, vllm_config), self.layer_name)
        return kitty_specs(config, self.num_kv_heads,
                           self.head_size, self.dtype, step_tokens,
                           shared_page_bytes=vllm_config.cache_config.skip_page_size_padded,
                           pages_per_block=self.kitty_pages_per_block)[1]

    def get_attn_backend(self) -> type[AttentionBackend]:
        return KittyStageBackend

    def forward(self) -> None:
        raise RuntimeError("the kitty staging layer holds a cache; its attention layer reads it")


@dataclass
class KittyStageMetadata:
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]: sink blocks, then ring blocks


class KittyStageMetadataBuilder(AttentionMetadataBuilder[KittyStageMetadata]):
    # Only a view of vLLM's persistent block table: fine in any CUDA graph (kitty's attention group
    # sets the real limit).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KittyStageMetadata:
        return KittyStageMetadata(block_table=common_attn_metadata.block_table_tensor)


class KittyStageBackend(AttentionBackend):
    """Static facts of the staging group. Its generic slot mapping means nothing (rows are in role
    order, not position order): only kitty's attention layer writes these blocks."""

    @staticmethod
    def get_name() -> str:
        return "KITTY_STAGE"

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the kitty staging group has no attention of its own")

    @staticmethod
    def get_builder_cls() -> type[KittyStageMetadataBuilder]:
        return KittyStageMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return KV_CACHE_LAYOUTS
