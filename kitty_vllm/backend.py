"""The kitty attention backend for vLLM: Metadata, MetadataBuilder, Backend, Impl.

The packed 2-bit pages live in this backend's KV-cache group; the full-precision sinks and window of
newest tokens live in the staging group of the layer's companion (kitty_vllm.stage). ``Impl.forward`` only
orchestrates: requests with one new token go, on the GPU, through the decode store and paged-decode
kernels together (a decode-only batch without any host work, so vLLM captures it in a full CUDA graph);
every other request goes, all together, to ``PagedKittyCache.prefill`` (kitty_vllm.paged), which stores,
packs and attends in the order the cache schedule needs. That order is why the backend updates the cache
inside ``forward`` (``forward_includes_kv_cache_update``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata,
                                       MultipleOf)
from vllm.v1.kv_cache_layout import KVCacheLayout

from kitty_vllm import reference
from kitty_vllm.block_manager.spec import KV_CACHE_LAYOUTS
from kitty_vllm.kernels.common import SUPPORTED_HEAD_DIMS
from kitty_vllm.paged import MixedBatch, PagedKittyCache, StorePlan, page_table_of_blocks, verification_rows
from kitty_vllm.config import PRESETS, KittyConfig, KittyConfigError, load_config_for


@dataclass
class KittyMetadata:
    num_reqs: int
    # Every request reads the cache as decodes do (one new token, or a verification step of speculative
    # decoding): the decode kernels take the batch whole, without host work (the batches CUDA graphs capture).
    decode_only: bool
    max_query_len: int
    seq_lens: torch.Tensor           # int32 [num_reqs], device: context + this step's tokens
    block_table: torch.Tensor        # int32 [num_reqs, max_pages], device: packed page of each page index
    query_start: torch.Tensor        # int32 [num_reqs + 1], device: each request's first token
    query_start_host: torch.Tensor   # the same on the host (vLLM's copy)
    # vLLM's host copy of seq_lens, exact for the rows not read as decodes (None: none given)
    seq_lens_host: torch.Tensor | None = None
    draft_tokens: int = 0            # KittyConfig.draft_tokens: verification steps read as decodes
    # Mixed batches, built by the first layer and reused by the rest: the split (per whether the cache
    # runs the kernels) and the prefill StorePlan per PagedKittyCache.plan_key.
    mixed: dict[bool, MixedBatch] = field(default_factory=dict)
    store_plans: dict[tuple, StorePlan] = field(default_factory=dict)
    # A decode-only batch of verification steps: each token's seq_len and table rows (paged.verification_rows),
    # built by the first layer and reused by the rest (under CUDA graph capture, the first layer's ops
    # recompute them at every replay), per (page table, staging table).
    verification: dict[tuple[int, int, int], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def split(self, kernels: bool, device: torch.device) -> MixedBatch:
        """The MixedBatch of this step: with the kernels, the requests read as decodes (one token, or a
        verification step) go through the decode kernels together, the others are spans, whose lengths come
        from vLLM's host copy (exact for them), so that no step waits on the GPU; without the kernels (CPU),
        every request is a span."""
        if kernels not in self.mixed:
            host = self.seq_lens_host if kernels and self.seq_lens_host is not None else self.seq_lens
            self.mixed[kernels] = MixedBatch.split(self.query_start_host.tolist(), host,
                                                   1 + self.draft_tokens if kernels else 0, device)
        return self.mixed[kernels]

    def verification_rows(self, num_tokens: int, page_table: torch.Tensor,
                          stage_table: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """paged.verification_rows of this decode-only batch, once per pair of tables (None: one token each)."""
        if self.max_query_len <= 1:
            return None
        key = (num_tokens, page_table.data_ptr(), stage_table.data_ptr())
        if key not in self.verification:
            self.verification[key] = verification_rows(self.query_start, self.seq_lens, num_tokens, page_table,
                                                       stage_table)
        return self.verification[key]


class KittyMetadataBuilder(AttentionMetadataBuilder[KittyMetadata]):
    """Views of vLLM's persistent device buffers, and nothing read on the host, so vLLM can capture
    decode-only batches in full CUDA graphs; mixed batches are split by the first layer, on the host, from
    vLLM's host copies (KittyMetadata.split; the prefill path runs outside graphs)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """With speculative decoding, verification steps (1 + k tokens per request) read as decodes do
        (KittyConfig.draft_tokens), so uniform batches of them are captured in full graphs too."""
        if load_config_for(vllm_config.cache_config.cache_dtype, vllm_config).draft_tokens:
            return AttentionCGSupport.UNIFORM_BATCH
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.draft_tokens = load_config_for(vllm_config.cache_config.cache_dtype, vllm_config).draft_tokens
        self.pages_per_block = kv_cache_spec.pages_per_block
        # With several pages per block (hybrid models), the page table: a persistent buffer, so that
        # captured graphs read this step's pages (page_table).
        self.pages: torch.Tensor | None = None

    def page_table(self, block_table: torch.Tensor) -> torch.Tensor:
        """int32 [num_reqs, max_pages]: the packed page of each page index (page_table_of_blocks)."""
        if self.pages_per_block == 1:
            return block_table
        rows, blocks = block_table.shape
        if self.pages is None or self.pages.shape[0] < rows or self.pages.shape[1] != blocks * self.pages_per_block:
            self.pages = torch.empty(max(rows, self.vllm_config.scheduler_config.max_num_seqs),
                                     blocks * self.pages_per_block, dtype=block_table.dtype, device=block_table.device)
        return page_table_of_blocks(block_table, self.pages_per_block, self.pages[:rows])

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KittyMetadata:
        cm = common_attn_metadata
        return KittyMetadata(num_reqs=cm.num_reqs, decode_only=cm.max_query_len <= 1 + self.draft_tokens,
                             max_query_len=cm.max_query_len, seq_lens=cm.seq_lens[: cm.num_reqs],
                             block_table=self.page_table(cm.block_table_tensor[: cm.num_reqs]),
                             query_start=cm.query_start_loc[: cm.num_reqs + 1],
                             query_start_host=cm.query_start_loc_cpu[: cm.num_reqs + 1],
                             seq_lens_host=(None if cm.seq_lens_cpu_upper_bound is None
                                            else cm.seq_lens_cpu_upper_bound[: cm.num_reqs]),
                             draft_tokens=self.draft_tokens)


SERVE_OTHERWISE = "serve it with --kv-cache-dtype auto or fp8"
# The oldest GPUs the kernels compile for (compute capability 8.0: cp.async, bfloat16 tensor cores).
MIN_CAPABILITY = 80
# The attention kinds kitty does not cache, in the words a user knows their model by.
NOT_DECODER = {
    AttentionType.ENCODER: "encoder self-attention of an encoder-decoder model",
    AttentionType.ENCODER_ONLY: "encoder-only attention (BERT-style models)",
    AttentionType.ENCODER_DECODER: "cross-attention of an encoder-decoder model (such as Whisper)",
}


class KittyAttentionBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(PRESETS)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KittyAttentionImpl]:
        return KittyAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KittyMetadataBuilder]:
        return KittyMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supports_sink(cls) -> bool:
        """Learned attention sinks (gpt-oss) join kitty's softmax (reference.schedule_attention)."""
        return True

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return KV_CACHE_LAYOUTS

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def unsupported_reasons(cls, selector_config, config: KittyConfig) -> list[str]:
        """Why this model cannot use kitty, in words a user can act on (empty if it can).

        Sliding-window layers never get here: kitty keeps them in the model's dtype
        (kitty_vllm.block_manager.mixed)."""
        reasons = []
        if selector_config.use_mla:
            reasons.append(f"MLA attention (DeepSeek-V2/V3-style: its cache is one latent vector per token, while "
                           f"kitty quantizes per-head Keys and Values; {SERVE_OTHERWISE})")
        if selector_config.use_sparse:
            reasons.append(f"sparse attention ({SERVE_OTHERWISE})")
        if selector_config.attn_type not in (None, AttentionType.DECODER):
            reasons.append(f"{NOT_DECODER[selector_config.attn_type]} (kitty caches decoder self-attention only; "
                           f"{SERVE_OTHERWISE})")
        if selector_config.head_size not in SUPPORTED_HEAD_DIMS:
            reasons.append(f"head size {selector_config.head_size} (kitty supports head sizes "
                           f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
        else:
            try:
                for ratio in {config.boost_ratio, *config.layer_boost}:
                    config.replace(boost_ratio=ratio).num_boost_channels(selector_config.head_size)
            except KittyConfigError as e:
                reasons.append(str(e))
            if config.value_rotation == "hadamard" and selector_config.head_size & (selector_config.head_size - 1):
                reasons.append(f"head size {selector_config.head_size} with value_rotation=hadamard (the Hadamard "
                               f"rotation needs a power-of-two head size; set value_rotation: none)")
        if selector_config.dtype not in cls.supported_dtypes:
            reasons.append(f"model dtype {selector_config.dtype}")
        capability = current_platform.get_device_capability() if current_platform.is_cuda() else None
        if capability is not None and capability.to_int() < MIN_CAPABILITY:
            reasons.append(f"a GPU of compute capability {capability.major}.{capability.minor} (kitty's kernels need "
                           f"{MIN_CAPABILITY // 10}.{MIN_CAPABILITY % 10} or newer, Ampere on: they copy pages with "
                           f"cp.async and multiply in bfloat16 on tensor cores; {SERVE_OTHERWISE})")
        return reasons


class KittyAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "kitty2",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks: torch.Tensor | None = None, **extra) -> None:
        if alibi_slopes is not None or sliding_window is not None:
            raise ValueError("kitty attention supports neither ALiBi nor sliding windows")
        if kv_sharing_target_layer_name is not None:
            raise ValueError("kitty attention does not support KV-cache sharing between layers")
        if sinks is not None and tuple(sinks.shape) != (num_heads,):
            raise ValueError(f"learned attention sinks must be one logit per query head of the layer, "
                             f"[{num_heads}], got {tuple(sinks.shape)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.config = load_config_for(kv_cache_dtype, get_current_vllm_config())
        # Gemma 2's logit soft-cap (0: none), and gpt-oss's learned sinks: the layer's parameter itself,
        # which the model's weights are loaded into after this, as vLLM's FlashAttention backend keeps it.
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        self.sinks = sinks
        # KittyConfig.value_rotation: the matrix, moved to the device of the first forward that stores.
        self.rotation = reference.value_rotation(self.config, head_size)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: KittyMetadata | None,
                output=None, output_scale=None, output_block_scale=None):
        assert output is not None
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kitty attention does not produce quantized outputs")
        if attn_metadata is None:  # profiling run: no cache yet
            return output.fill_(0)
        if self.rotation is None:
            return self._attend(layer, query, key, value, kv_cache, attn_metadata, output)
        self.rotation = self.rotation.to(query.device)
        self._attend(layer, query, key, reference.rotate(value, self.rotation), kv_cache, attn_metadata, output)
        return output.copy_(reference.rotate(output, self.rotation))

    def _attend(self, layer, query, key, value, kv_cache, attn_metadata: KittyMetadata, output) -> torch.Tensor:
        """Store this step's Keys and Values and write its attention into ``output`` (forward's orchestration:
        decode-only batches on the decode path, else the split into requests read as decodes and spans)."""
        stage = layer.kitty_stage
        stage_metadata = get_forward_context().attn_metadata
        if isinstance(stage_metadata, list):
            stage_metadata = stage_metadata[0]
        cache = PagedKittyCache.of_layer(self.config, self.head_size, self.num_kv_heads, kv_cache, stage.kv_cache,
                                         query.dtype, self.logits_soft_cap, self.sinks)
        stage_table = stage_metadata[stage.prefix].block_table
        if attn_metadata.decode_only and cache.kernels:
            n = attn_metadata.num_reqs
            rows = attn_metadata.verification_rows(query.shape[0], attn_metadata.block_table, stage_table[:n])
            cache.decode(query, key, value, attn_metadata.query_start, attn_metadata.seq_lens,
                         attn_metadata.max_query_len, attn_metadata.block_table, stage_table[:n], self.scale, output,
                         rows)
            return output
        batch = attn_metadata.split(cache.kernels, query.device)
        plans, form = attn_metadata.store_plans, cache.plan_key
        if batch.spans and form not in plans:
            plans[form] = cache.plan(batch.spans, query.device, self.num_heads)
        cache.mixed_step(query, key, value, batch, attn_metadata.seq_lens, attn_metadata.block_table, stage_table,
                         self.scale, output, plans.get(form))
        return output
