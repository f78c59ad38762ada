"""One attention layer's step over the paged kitty cache of one request.

The step follows the cache schedule of kitty_vllm.reference, in this order:

1. this step's sink tokens (positions < sink_tokens) are written to the request's sink blocks;
2. every page that fills in this step is quantized, from the ring (its older tokens) plus this step's
   tokens, into its packed block;
3. attention: each query reads sinks in full precision, pages complete at its position dequantized
   (pages packed in step 2 included, so a prefix-cache hit sees what a miss sees), and the rest of its
   own page in full precision;
4. the tokens of the new unfinished page are written to the ring. This comes last because they may
   take ring slots of the page packed in step 2, which step 3 still read.

Tensors: ``packed`` uint8 [num_blocks, H, page_bytes] (one page per block and KV head); ``stage``
[num_blocks, 2, tokens_per_block, H, D] in the model dtype (kitty_vllm.layout.StageLayout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kitty_vllm import reference
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import StageLayout


@dataclass
class PagedKittyCache:
    config: KittyConfig
    stage_layout: StageLayout
    packed: torch.Tensor   # uint8 [num_blocks, H, page_bytes]
    stage: torch.Tensor    # [num_blocks, 2, tokens_per_block, H, D], model dtype
    kernels: bool          # pack and attend with the Triton kernels (else kitty_vllm.reference)

    @classmethod
    def from_raw(cls, config: KittyConfig, stage_layout: StageLayout, packed: torch.Tensor,
                 stage_cache: torch.Tensor, dtype: torch.dtype, kernels: bool | None = None) -> PagedKittyCache:
        """Views over vLLM's tensors: packed [num_blocks, H, page_bytes] and the staging group's
        [num_blocks, block_bytes] bytes, as uint8 or already viewed as ``dtype``. ``kernels`` defaults
        to whether the cache is on a GPU (tests run them on the CPU in Triton's interpreter)."""
        s = stage_layout
        tokens, heads, dim = s.tokens_per_block, s.num_kv_heads, s.page.head_dim
        stage = stage_cache.view(dtype)[:, : 2 * tokens * heads * dim]
        return cls(config, s, packed, stage.view(stage_cache.shape[0], 2, tokens, heads, dim),
                   packed.is_cuda if kernels is None else kernels)

    def _sink_slots(self, positions: torch.Tensor, stage_row: torch.Tensor):
        """(block, slot) of sink positions in one request's staging row."""
        return stage_row[positions // self.stage_layout.block_tokens], positions % self.stage_layout.block_tokens

    def _ring_slots(self, positions: torch.Tensor, stage_row: torch.Tensor):
        """(block, slot) of unfinished-page positions in one request's staging row."""
        s = self.stage_layout
        slot = positions % self.config.page_size
        return stage_row[s.sink_blocks + slot // s.tokens_per_block], slot % s.tokens_per_block

    def store_decode(self, key: torch.Tensor, value: torch.Tensor, seq_lens: torch.Tensor,
                     page_table: torch.Tensor, stage_table: torch.Tensor) -> None:
        """Store one new token per request, before decode attention reads the cache: key/value [B, H, D]
        at positions ``seq_lens - 1`` (int32 [B]; 0 skips the row), page_table int32 [B, pages] and
        stage_table int32 [B, stage blocks] (kitty_vllm.kernels.store: no host synchronization)."""
        from kitty_vllm.kernels import store_decode

        store_decode(key, value, seq_lens, page_table, stage_table, self.packed, self.stage, self.config,
                     self.stage_layout)

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context_len: int,
             page_row: torch.Tensor, stage_row: torch.Tensor, scale: float) -> torch.Tensor:
        """Store this step's tokens of one request and attend. query [Tq, Hq, D] and key/value
        [Tq, H, D] at positions context_len..context_len+Tq-1; page_row / stage_row: the request's
        block table rows of the two groups. Returns float32 [Tq, Hq, D]."""
        recent = self.store(key, value, context_len, page_row, stage_row)
        return self.attend(query, key, value, context_len, page_row, stage_row, scale, recent)

    def store(self, key: torch.Tensor, value: torch.Tensor, context_len: int, page_row: torch.Tensor,
              stage_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first half of :meth:`step`: write the step's sinks and pack the pages it completes. A
        batch stores every request before any attends: vLLM publishes a block for prefix-cache hits
        when it is scheduled, so a request may read, in the same step, a page another one packs.
        Returns the full-precision Keys and Values from the start of the ring's page to the step's end."""
        page, sinks = self.config.page_size, self.config.sink_tokens
        device = key.device
        end = context_len + key.shape[0]
        positions = torch.arange(context_len, end, device=device)

        if context_len < sinks:                                              # 1. sinks
            p = positions[: min(end, sinks) - context_len]
            blocks, slots = self._sink_slots(p, stage_row)
            self.stage[blocks, 0, slots] = key[: len(p)]
            self.stage[blocks, 1, slots] = value[: len(p)]

        ring_start = context_len // page * page                              # 2. pack full pages
        old = torch.arange(ring_start, context_len, device=device)
        blocks, slots = self._ring_slots(old, stage_row)
        recent_k = torch.cat([self.stage[blocks, 0, slots], key])            # positions ring_start..end-1
        recent_v = torch.cat([self.stage[blocks, 1, slots], value])
        first_new_page, full_pages = ring_start // page, end // page
        if full_pages > first_new_page:
            count = full_pages - first_new_page
            span = slice(0, count * page)
            self._quantize(recent_k[span].unflatten(0, (count, page)), recent_v[span].unflatten(0, (count, page)),
                           first_new_page, page_row[first_new_page:full_pages])
        return recent_k, recent_v

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context_len: int,
               page_row: torch.Tensor, stage_row: torch.Tensor, scale: float,
               recent: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The second half of :meth:`step`, after :meth:`store` (which returned ``recent``): attend,
        then write the step's tokens of the unfinished page to the ring."""
        end = context_len + query.shape[0]
        out = self._attend(query, key, value, context_len, page_row, stage_row, scale, *recent)   # 3.
        tail = torch.arange(max(context_len, end // self.config.page_size * self.config.page_size), end,
                            device=query.device)                                                 # 4. ring
        blocks, slots = self._ring_slots(tail, stage_row)
        self.stage[blocks, 0, slots] = key[tail - context_len]
        self.stage[blocks, 1, slots] = value[tail - context_len]
        return out

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor, first_page: int, blocks: torch.Tensor) -> None:
        """Pack keys/values [num_pages, P, H, D] of consecutive pages from page ``first_page`` on."""
        first = torch.arange(first_page, first_page + keys.shape[0], device=keys.device) * self.config.page_size
        if self.kernels:
            from kitty_vllm.kernels import quantize_pages

            quantize_pages(keys.contiguous(), values.contiguous(), first.to(torch.int32), blocks.to(torch.int32),
                           self.packed, self.config)
            return
        for i in range(keys.shape[0]):
            self.packed[blocks[i]] = reference.quantize_page(keys[i], values[i], self.config, int(first[i]))

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context_len: int,
                page_row: torch.Tensor, stage_row: torch.Tensor, scale: float, recent_k: torch.Tensor,
                recent_v: torch.Tensor) -> torch.Tensor:
        """Step 3: float32 [Tq, Hq, D]. recent_k/recent_v: positions from the start of the ring's page
        to the step's end, full precision."""
        page, sinks = self.config.page_size, self.config.sink_tokens
        end = context_len + query.shape[0]
        if self.kernels:
            from kitty_vllm.kernels import prefill_attention

            out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
            return prefill_attention(query, key, value, self.packed, self.stage, page_row[None].to(torch.int32),
                                     stage_row[None].to(torch.int32), [0, query.shape[0]], [context_len],
                                     self.config, self.stage_layout, scale, out=out)
        ring_start, full_pages = context_len // page * page, end // page
        keys = torch.zeros(end, *key.shape[1:], dtype=key.dtype, device=key.device)
        values = torch.zeros_like(keys)
        keys[ring_start:], values[ring_start:] = recent_k, recent_v
        stored_sinks = min(sinks, ring_start)
        if stored_sinks:
            blocks, slots = self._sink_slots(torch.arange(stored_sinks, device=key.device), stage_row)
            keys[:stored_sinks], values[:stored_sinks] = self.stage[blocks, 0, slots], self.stage[blocks, 1, slots]
        keys_q, values_q = torch.zeros_like(keys, dtype=torch.float32), torch.zeros_like(keys, dtype=torch.float32)
        if full_pages:
            k_deq, v_deq = reference.dequantize_pages(self.packed[page_row[:full_pages].long()], self.config,
                                                      key.shape[-1])
            keys_q[: full_pages * page], values_q[: full_pages * page] = k_deq.flatten(0, 1), v_deq.flatten(0, 1)
        positions = torch.arange(context_len, end, device=key.device)
        return reference.schedule_attention(query, keys, values, keys_q, values_q, positions, self.config, scale)
