"""One attention layer's step over the paged kitty cache, for the requests of a batch that it prefills.

The step follows the cache schedule of kitty_vllm.reference, in this order, each stage for every
request at once (a few kernel launches per layer, however many requests the batch holds):

1. this step's sink tokens (positions < sink_tokens) are written to their requests' sink blocks;
2. every page that fills in this step is quantized, from the ring (its older tokens) plus this step's
   tokens, into its packed block;
3. attention: a one-token step (decode), a verification step of speculative decoding, and with
   ``exact_prefill`` every query, reads sinks and its window (its newest ``page_size`` positions) in
   full precision and the older tokens dequantized, from pages packed in step 2 too
   (kitty_vllm.kernels.prefill_attention; KittyConfig.reads_as_decode). Otherwise
   (kitty_vllm.reference) a request's step of several tokens reads only the pages complete before it
   dequantized: those pages, dequantized into the model dtype, the sinks and ring before the step and
   the step's tokens are copied into one sequence, over which vLLM's FlashAttention runs
   (kitty_vllm.kernels.context_attention);
4. each request's newest ``page_size`` tokens of the step are written to the ring. This comes last
   because they take ring slots that steps 2 and 3 still read.

Every request stores (1, 2) before any attends (3): vLLM publishes a block for prefix-cache hits when
it is scheduled, so a request may read, in the same step, a page another one packs.

Tensors: ``packed`` uint8 [num_blocks, H, page_bytes] (one page per block and KV head); ``stage``
[num_blocks, 2, tokens_per_block, H, D] in the model dtype (kitty_vllm.layout.StageLayout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kitty_vllm import reference
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import StageLayout, page_layout, stage_layout


def page_table_of_blocks(block_table: torch.Tensor, pages_per_block: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` (int32 [R, B * P]) set to the pages of ``block_table`` (int32 [R, B]): block ``b`` of ``P`` pages
    holds pages ``b * P`` to ``b * P + P - 1`` of the cache viewed as pages (KittyPackedSpec)."""
    rows, blocks = block_table.shape
    offsets = torch.arange(pages_per_block, dtype=block_table.dtype, device=block_table.device)
    torch.add(block_table[:, :, None] * pages_per_block, offsets, out=out.view(rows, blocks, pages_per_block))
    return out


def layer_stage_layout(config: KittyConfig, head_dim: int, num_kv_heads: int, dtype: torch.dtype,
                       packed_block_bytes: int) -> StageLayout:
    """The stage layout of a layer whose packed blocks hold ``packed_block_bytes`` (padding aside): one page
    per KV head, or several pages on hybrid models (KittyPackedSpec)."""
    pages_per_block = packed_block_bytes // (num_kv_heads * page_layout(config, head_dim).page_bytes)
    return stage_layout(config, head_dim, num_kv_heads, dtype.itemsize, pages_per_block)


@dataclass(frozen=True)
class Span:
    """This step's tokens of one request: ``first:end`` of the batch's tokens, at positions from
    ``context`` on (the tokens already cached), with row ``row`` of the block tables."""

    row: int
    first: int
    end: int
    context: int


def verification_rows(query_start: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, page_table: torch.Tensor,
                      stage_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each of ``num_tokens`` tokens of a batch read as decodes (PagedKittyCache.decode; query_start int32
    [B + 1], seq_lens int32 [B], tables int32 [B, blocks]) as a decode of its own: its seq_len (int32
    [num_tokens]; 0 for padding past the last request and for positions below 0), and its request's rows of
    page_table and stage_table. On the device, no host synchronization."""
    ends = query_start[1:].long()
    tokens = torch.arange(num_tokens, device=seq_lens.device)
    request = torch.searchsorted(ends, tokens, right=True)
    real = request < seq_lens.shape[0]
    request = request.clamp(max=seq_lens.shape[0] - 1)
    token_lens = seq_lens[request] - ends[request] + tokens + 1
    token_lens = torch.where(real & (token_lens > 0), token_lens, 0)
    return token_lens.to(torch.int32), page_table[request], stage_table[request]


@dataclass(frozen=True)
class MixedBatch:
    """A step's requests as :meth:`PagedKittyCache.mixed_step` runs them: those of at most ``decode_tokens``
    tokens (with the kernels, one token or a verification step of speculative decoding, which read as decodes)
    through the decode kernels together, on the device; every other request as a span."""

    decode_rows: torch.Tensor | None          # int64 [D]: their rows of the batch (None: no such request)
    decode_tokens: torch.Tensor | None        # int64 [T]: their tokens of the batch, row after row
    decode_query_start: torch.Tensor | None   # int32 [D + 1]: each one's first token among decode_tokens
    decode_max_query_len: int
    spans: list[Span]

    @classmethod
    def split(cls, query_start: list[int], seq_lens: torch.Tensor, decode_tokens: int,
              device: torch.device) -> MixedBatch:
        """The split of a step whose request r has tokens ``query_start[r]:query_start[r + 1]`` and
        ``seq_lens[r]`` tokens with them; ``seq_lens`` is read (on the host) only for the spans' rows, so it
        may be a host copy exact only there. 0 ``decode_tokens``: every request is a span."""
        lengths = [b - a for a, b in zip(query_start, query_start[1:])]
        decodes = [r for r, n in enumerate(lengths) if 0 < n <= decode_tokens]
        others = [r for r, n in enumerate(lengths) if n > decode_tokens]
        totals = seq_lens.tolist() if others else []
        spans = [Span(r, query_start[r], query_start[r + 1], totals[r] - lengths[r]) for r in others]
        if not decodes:
            return cls(None, None, None, 0, spans)
        tokens = [t for r in decodes for t in range(query_start[r], query_start[r + 1])]
        bounds = [0]
        for r in decodes:
            bounds.append(bounds[-1] + lengths[r])
        rows, tokens, bounds = torch.tensor(decodes + tokens + bounds, device=device).split(
            [len(decodes), len(tokens), len(bounds)])
        return cls(rows, tokens, bounds.to(torch.int32), max(lengths[r] for r in decodes), spans)


@dataclass
class StorePlan:
    """Where step 1, 2 and 4 read and write, for all requests (built on the host, moved in one copy).

    Staging slots are int64 ``[4, n]`` columns (table row, staging-table column, slot in the block,
    token of the batch; reads have no token); pages are ``[3, n]`` (table row, page index, first
    position); ``sources`` [num_pages * P] indexes, for every row of every page to pack, the
    concatenation of the ring reads and the batch's tokens. Step 3, with the kernels (else all empty):
    ``query_blocks`` (kitty_vllm.kernels.prefill_blocks) of the spans the attention kernel reads, all
    that read as decodes do (KittyConfig.reads_as_decode); the other spans' sequences for context_attention,
    positions from 0, one after another: ``context_pages`` [2, n] (table row, page index) of the pages
    complete before the step, ``context_rows`` [n] the place of each one's first row,
    ``context_stage`` [4, m] (table row, staging-table column, slot, place) of the sinks and ring before
    the step, ``context_tokens`` [2, k] (batch token, place) of the step's tokens (the queries, in
    order), and ``cu_seqlens`` int32 [2, spans + 1] the bounds of their queries and of their sequences
    (``host_seqlens`` on the host); ``host_tokens``: those tokens' range of the batch, first and end,
    where they follow one another (else None).
    """

    sink_writes: torch.Tensor
    ring_reads: torch.Tensor
    pages: torch.Tensor
    sources: torch.Tensor
    ring_writes: torch.Tensor
    query_blocks: torch.Tensor
    context_pages: torch.Tensor
    context_rows: torch.Tensor
    context_stage: torch.Tensor
    context_tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    host_seqlens: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    host_tokens: tuple[int, int] | None = None


@dataclass
class PagedKittyCache:
    config: KittyConfig
    stage_layout: StageLayout
    packed: torch.Tensor   # uint8 [num_blocks, H, page_bytes]
    stage: torch.Tensor    # [num_blocks, 2, tokens_per_block, H, D], model dtype
    kernels: bool          # pack and attend with the Triton kernels (else kitty_vllm.reference)
    # The layer's softmax options (reference.schedule_attention): logit soft-cap (0: none) and learned
    # sink logits [Hq] (None: none).
    soft_cap: float = 0.0
    sinks: torch.Tensor | None = None

    @classmethod
    def from_raw(cls, config: KittyConfig, stage_layout: StageLayout, packed: torch.Tensor,
                 stage_cache: torch.Tensor, dtype: torch.dtype, kernels: bool | None = None,
                 soft_cap: float = 0.0, sinks: torch.Tensor | None = None) -> PagedKittyCache:
        """Views over vLLM's tensors, each one layer's contiguous blocks: the packed group's
        [num_blocks, H, (1,) page_bytes] uint8, or [num_blocks, 1, P, H * page_bytes] with P pages per block
        (``stage_layout.pages_per_block``, KittyPackedSpec), either viewed as pages [num_pages, H, page_bytes],
        and the staging group's blocks of the same byte size, as uint8 or already viewed as ``dtype``. ``kernels`` defaults to whether the cache is on a GPU (tests
        run them on the CPU in Triton's interpreter); ``soft_cap`` and ``sinks``: the layer's softmax
        options."""
        s = stage_layout
        tokens, heads, dim = s.tokens_per_block, s.num_kv_heads, s.page.head_dim
        num_blocks = stage_cache.shape[0]
        stage = stage_cache.view(num_blocks, -1).view(dtype)[:, : 2 * tokens * heads * dim]
        pages = (packed.reshape(-1, heads, s.page.page_bytes) if s.pages_per_block > 1
                 else packed.view(packed.shape[0], heads, -1))
        return cls(config, s, pages,
                   stage.view(num_blocks, 2, tokens, heads, dim), packed.is_cuda if kernels is None else kernels,
                   soft_cap, sinks)

    @classmethod
    def of_layer(cls, config: KittyConfig, head_dim: int, num_kv_heads: int, packed: torch.Tensor,
                 stage_cache: torch.Tensor, dtype: torch.dtype, soft_cap: float = 0.0,
                 sinks: torch.Tensor | None = None, kernels: bool | None = None) -> PagedKittyCache:
        """:meth:`from_raw` over an attention layer's two caches as vLLM binds them (:func:`layer_stage_layout`)."""
        layout = layer_stage_layout(config, head_dim, num_kv_heads, dtype, packed[0].numel())
        return cls.from_raw(config, layout, packed, stage_cache, dtype, kernels, soft_cap, sinks)

    def _ring_columns(self, row: int, positions: torch.Tensor) -> list[torch.Tensor]:
        """(row, staging-table column, slot) of window positions: ring slot ``p % ring_slots``."""
        s = self.stage_layout
        slot = positions % s.ring_slots
        return [torch.full_like(positions, row), s.sink_blocks + slot // s.tokens_per_block, slot % s.tokens_per_block]

    @property
    def plan_key(self) -> tuple:
        """What :meth:`plan` reads besides its arguments, so that a step plans once for the layers that share it,
        whatever their pages' boost (KittyConfig.layer_boost)."""
        c, s = self.config, self.stage_layout
        return (c.page_size, c.sink_tokens, c.exact_prefill, c.draft_tokens, self.kernels, s.block_tokens,
                s.tokens_per_block, s.ring_slots, s.num_kv_heads)

    def plan(self, spans: list[Span], device: torch.device, num_heads: int) -> StorePlan:
        """The StorePlan of ``spans`` for ``num_heads`` query heads: host arithmetic on their lengths,
        then one copy to ``device``."""
        page, sinks, block_tokens = self.config.page_size, self.config.sink_tokens, self.stage_layout.block_tokens
        sink_writes, ring_reads, pages, sources, ring_writes = [], [], [], [], []
        num_reads = 0
        for span in spans:
            end = span.context + span.end - span.first
            token = span.first - span.context            # + position: the position's token in the batch
            if span.context < sinks:                                                   # 1.
                p = torch.arange(span.context, min(end, sinks))
                sink_writes.append(torch.stack([torch.full_like(p, span.row), p // block_tokens, p % block_tokens,
                                                p + token]))
            ring_start, full_pages = span.context // page * page, end // page
            if full_pages > ring_start // page:                                        # 2.
                old = torch.arange(ring_start, span.context)
                ring_reads.append(torch.stack(self._ring_columns(span.row, old)))
                # Ring reads are numbered from 0; tokens are marked negative until the reads are counted.
                sources += [torch.arange(num_reads, num_reads + len(old)),
                            -1 - (torch.arange(span.context, full_pages * page) + token)]
                num_reads += len(old)
                j = torch.arange(ring_start // page, full_pages)
                pages.append(torch.stack([torch.full_like(j, span.row), j, j * page]))
            tail = torch.arange(max(span.context, end - page), end)                    # 4.
            ring_writes.append(torch.stack([*self._ring_columns(span.row, tail), tail + token]))
        source = torch.cat(sources) if sources else torch.zeros(0, dtype=torch.int64)
        source = torch.where(source < 0, num_reads - 1 - source, source)
        blocks = torch.zeros(0, 5, dtype=torch.int64)
        exact, sequences = [], []
        for s in spans if self.kernels else ():
            (exact if self.config.reads_as_decode(s.end - s.first) else sequences).append(s)
        if exact:
            from kitty_vllm.kernels import prefill_blocks

            blocks = prefill_blocks([(s.row, s.first, s.end, s.context) for s in exact], page, num_heads,
                                    self.stage_layout.num_kv_heads)
        context, seqlens = self._context_plan(sequences)
        follow = all(a.end == b.first for a, b in zip(sequences, sequences[1:]))
        host_tokens = (sequences[0].first, sequences[-1].end) if sequences and follow else None
        parts = [_columns(sink_writes, 4), _columns(ring_reads, 3), _columns(pages, 3), source,
                 _columns(ring_writes, 4), blocks, *context, torch.tensor(seqlens, dtype=torch.int64).view(2, -1)]
        # Each part on a 16-byte boundary (an even number of int64s before it): kernels take parts as pointers,
        # and Triton compiles a kernel once per pointer alignment.
        sizes = [p.numel() for p in parts]
        flat = torch.cat([torch.cat([p.flatten(), p.new_zeros(n % 2)]) for p, n in zip(parts, sizes)]).to(device)
        moved = [m[:n] for m, n in zip(flat.split([n + n % 2 for n in sizes]), sizes)]
        *stores, cu_seqlens = (m.view(p.shape) for m, p in zip(moved, parts))
        return StorePlan(*stores, cu_seqlens.to(torch.int32), seqlens, host_tokens)

    def _context_plan(self, spans: list[Span]) -> tuple[list[torch.Tensor], tuple[tuple[int, ...], ...]]:
        """StorePlan's context_pages, context_rows, context_stage and context_tokens for ``spans`` (host
        int64), and the host bounds of their queries and sequences."""
        page, sinks, block_tokens = self.config.page_size, self.config.sink_tokens, self.stage_layout.block_tokens
        pages, rows, stage, tokens = [], [], [], []
        bounds_q, bounds_k = [0], [0]
        for span in spans:
            start, ring_start = bounds_k[-1], span.context // page * page
            j = torch.arange(ring_start // page)
            pages.append(torch.stack([torch.full_like(j, span.row), j]))
            rows.append(start + j * page)
            stored_sinks = torch.arange(min(sinks, ring_start))
            ring = torch.arange(ring_start, span.context)
            stage += [torch.stack([torch.full_like(stored_sinks, span.row), stored_sinks // block_tokens,
                                   stored_sinks % block_tokens, start + stored_sinks]),
                      torch.stack([*self._ring_columns(span.row, ring), start + ring])]
            tokens.append(torch.stack([torch.arange(span.first, span.end),
                                       start + torch.arange(span.context, span.context + span.end - span.first)]))
            bounds_q.append(bounds_q[-1] + span.end - span.first)
            bounds_k.append(start + span.context + span.end - span.first)
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        return [_columns(pages, 2), rows, _columns(stage, 4), _columns(tokens, 2)], (tuple(bounds_q), tuple(bounds_k))

    def store_decode(self, key: torch.Tensor, value: torch.Tensor, seq_lens: torch.Tensor,
                     page_table: torch.Tensor, stage_table: torch.Tensor,
                     query_start: torch.Tensor | None = None) -> None:
        """Store the step's tokens, before decode attention reads the cache: key/value [B, H, D], one new
        token per request at positions ``seq_lens - 1`` (int32 [B]; 0 skips the row), or with
        ``query_start`` (int32 [B + 1]) [N, H, D], each request's tokens up to that position;
        page_table int32 [B, pages] and stage_table int32 [B, stage blocks] (kitty_vllm.kernels.store: no
        host synchronization)."""
        from kitty_vllm.kernels import store_decode

        store_decode(key, value, seq_lens, page_table, stage_table, self.packed, self.stage, self.config,
                     self.stage_layout, query_start)

    def decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_start: torch.Tensor,
               seq_lens: torch.Tensor, max_query_len: int, page_table: torch.Tensor, stage_table: torch.Tensor,
               scale: float, out: torch.Tensor,
               rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Store and attend a batch whose every request reads the cache as decodes do: one token, or a
        verification step of speculative decoding (up to ``max_query_len`` tokens; KittyConfig.reads_as_decode),
        through the decode kernels, without host work (CUDA graphs can capture it).

        query/out [N, Hq, D] and key/value [N, H, D]: the requests' tokens in order, then any padding;
        query_start int32 [B + 1] (request r's tokens are ``query_start[r]:query_start[r + 1]``); seq_lens
        int32 [B] (context plus the step's tokens; 0: padding); page_table / stage_table int32 [B, blocks].

        The decode store stores each request's tokens in order, in one launch: a token that completes a page
        packs it from the ring, where the request's earlier tokens of the step already are. The ring keeps
        every slot the step's queries read (KittyConfig.ring_slots), so all of them then attend at once, each
        as a decode at its position. A row whose seq_len is shorter than its step (vLLM's dummy batches, as
        CUDA graphs are captured) stores and attends nothing at negative positions. ``rows``: the step's
        :func:`verification_rows`, where the caller keeps them for the layers that share the tables."""
        if max_query_len == 1:
            rows = seq_lens.shape[0]
            self.store_decode(key[:rows], value[:rows], seq_lens, page_table, stage_table)
            self._decode_attention(query[:rows], seq_lens, page_table, stage_table, scale, out[:rows])
            return
        self.store_decode(key, value, seq_lens, page_table, stage_table, query_start)
        if rows is None:
            rows = verification_rows(query_start, seq_lens, query.shape[0], page_table, stage_table)
        self._decode_attention(query, *rows, scale, out)

    def mixed_step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: MixedBatch,
                   seq_lens: torch.Tensor, page_table: torch.Tensor, stage_table: torch.Tensor, scale: float,
                   out: torch.Tensor, plan: StorePlan | None = None) -> None:
        """Store and attend a step of several kinds of request, split as ``batch`` says: first the requests
        read as decodes, through :meth:`decode` (a span may read, in the same step, a page one of them packs:
        a prefix-cache hit on a page completed in this step), then the spans, through :meth:`prefill` (with
        ``plan``, :meth:`plan` of the spans, if given). Tensors as in :meth:`decode`, for the whole batch."""
        if batch.decode_rows is not None:
            rows, tokens = batch.decode_rows, batch.decode_tokens
            step = torch.empty_like(query[tokens])
            self.decode(query[tokens], key[tokens], value[tokens], batch.decode_query_start, seq_lens[rows],
                        batch.decode_max_query_len, page_table[rows], stage_table[rows], scale, step)
            out[tokens] = step.to(out.dtype)
        if batch.spans:
            self.prefill(query, key, value, batch.spans, page_table, stage_table, scale, out, plan)

    def _decode_attention(self, query: torch.Tensor, seq_lens: torch.Tensor, page_table: torch.Tensor,
                          stage_table: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        from kitty_vllm.kernels import decode_attention

        decode_attention(query, self.packed, self.stage, page_table, stage_table, seq_lens, self.config,
                         self.stage_layout, scale, out=out, soft_cap=self.soft_cap, sinks=self.sinks)

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context_len: int,
             page_row: torch.Tensor, stage_row: torch.Tensor, scale: float) -> torch.Tensor:
        """:meth:`prefill` of one request: query [Tq, Hq, D] and key/value [Tq, H, D] at positions
        context_len..context_len+Tq-1; page_row / stage_row: its block table rows of the two groups.
        Returns float32 [Tq, Hq, D]."""
        out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
        self.prefill(query, key, value, [Span(0, 0, query.shape[0], context_len)], page_row[None], stage_row[None],
                     scale, out)
        return out

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[Span],
                page_table: torch.Tensor, stage_table: torch.Tensor, scale: float, out: torch.Tensor,
                plan: StorePlan | None = None) -> None:
        """Store and attend the tokens of ``spans`` (module docstring): query/out [N, Hq, D] and
        key/value [N, H, D] hold the batch's tokens; page_table / stage_table [rows, blocks] the block
        tables of the two groups; ``plan``: :meth:`plan` of ``spans``, if the caller keeps it for other
        layers. Writes ``out[span.first:span.end]`` of every span."""
        plan = self.plan(spans, key.device, query.shape[1]) if plan is None else plan
        self._write_stage(key, value, plan.sink_writes, stage_table)                       # 1.
        if plan.pages.shape[1]:                                                             # 2.
            blocks = stage_table[plan.ring_reads[0], plan.ring_reads[1]].long()
            keys = torch.cat([self.stage[blocks, 0, plan.ring_reads[2]], key])[plan.sources]
            values = torch.cat([self.stage[blocks, 1, plan.ring_reads[2]], value])[plan.sources]
            page_blocks = page_table[plan.pages[0], plan.pages[1]]
            self._quantize(keys.unflatten(0, (-1, self.config.page_size)),
                           values.unflatten(0, (-1, self.config.page_size)), plan.pages[2], page_blocks)
        self.attend(query, key, value, spans, page_table, stage_table, scale, out, plan)      # 3.
        self._write_stage(key, value, plan.ring_writes, stage_table)                       # 4.

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[Span],
               page_table: torch.Tensor, stage_table: torch.Tensor, scale: float, out: torch.Tensor,
               plan: StorePlan) -> None:
        """Step 3 of :meth:`prefill` alone (arguments as there), over a cache that already holds what
        the step stores before it."""
        if self.kernels:
            from kitty_vllm.kernels import context_attention, prefill_attention

            if plan.query_blocks.shape[0]:
                prefill_attention(query, key, value, self.packed, self.stage, page_table.to(torch.int32),
                                  stage_table.to(torch.int32), plan.query_blocks, self.config, self.stage_layout,
                                  scale, out=out, soft_cap=self.soft_cap, sinks=self.sinks)
            if plan.context_tokens.shape[1]:
                tokens = plan.context_tokens[0] if plan.host_tokens is None else slice(*plan.host_tokens)
                if plan.host_tokens is not None and plan.host_seqlens[0] == plan.host_seqlens[1]:
                    keys, values = key[tokens], value[tokens]   # nothing cached before: the step's own tokens
                else:
                    keys, values = self._context_sequences(key, value, page_table, stage_table, plan)
                out[tokens] = context_attention(query[tokens], keys, values, plan.cu_seqlens[0], plan.cu_seqlens[1],
                                                *plan.host_seqlens, scale, self.soft_cap, self.sinks).to(out.dtype)
        else:
            for s in spans:
                out[s.first:s.end] = self._reference_attend(query[s.first:s.end], key[s.first:s.end],
                                                            value[s.first:s.end], s.context, page_table[s.row],
                                                            stage_table[s.row], scale)

    def _context_sequences(self, key: torch.Tensor, value: torch.Tensor, page_table: torch.Tensor,
                           stage_table: torch.Tensor, plan: StorePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and Values [L, H, D] of the sequences of ``plan`` (StorePlan), in the model dtype: the
        pages complete before the step dequantized, then the sinks and ring, then the step's tokens."""
        from kitty_vllm.kernels import dequantize_pages

        sequences = torch.empty(2, plan.host_seqlens[1][-1], *key.shape[1:], dtype=key.dtype, device=key.device)
        dequantize_pages(self.packed, page_table[plan.context_pages[0], plan.context_pages[1]].to(torch.int32),
                         plan.context_rows, sequences[0], sequences[1], self.config)
        row, column, slot, place = plan.context_stage
        sequences[:, place] = self.stage[stage_table[row, column].long(), :, slot].transpose(0, 1)
        tokens, places = plan.context_tokens
        sequences[0, places], sequences[1, places] = key[tokens], value[tokens]
        return sequences[0], sequences[1]

    def _write_stage(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                     stage_table: torch.Tensor) -> None:
        """Write the batch's tokens ``slots[3]`` to staging slots (row, column, slot) ``slots[:3]``."""
        if slots.shape[1]:
            blocks = stage_table[slots[0], slots[1]].long()
            self.stage[blocks, 0, slots[2]] = key[slots[3]]
            self.stage[blocks, 1, slots[2]] = value[slots[3]]

    def _quantize(self, keys: torch.Tensor, values: torch.Tensor, first: torch.Tensor, blocks: torch.Tensor) -> None:
        """Pack keys/values [num_pages, P, H, D] of pages starting at positions ``first`` [num_pages]."""
        if self.kernels:
            from kitty_vllm.kernels import quantize_pages

            quantize_pages(keys.contiguous(), values.contiguous(), first.to(torch.int32), blocks.to(torch.int32),
                           self.packed, self.config)
            return
        for i in range(keys.shape[0]):
            self.packed[blocks[i]] = reference.quantize_page(keys[i], values[i], self.config, int(first[i]))

    def _reference_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, context_len: int,
                          page_row: torch.Tensor, stage_row: torch.Tensor, scale: float) -> torch.Tensor:
        """Step 3 of one request through kitty_vllm.reference: float32 [Tq, Hq, D]. Sinks and the ring
        (the positions before ``context_len`` that the step reads in full precision) are read from the
        staging blocks."""
        page, sinks, block_tokens = self.config.page_size, self.config.sink_tokens, self.stage_layout.block_tokens
        end = context_len + query.shape[0]
        windowed = self.config.reads_as_decode(query.shape[0])
        window = max(context_len - page, 0) if windowed else context_len // page * page
        full_pages = end // page
        keys = torch.zeros(end, *key.shape[1:], dtype=key.dtype, device=key.device)
        values = torch.zeros_like(keys)
        keys[context_len:], values[context_len:] = key, value
        old = torch.arange(window, context_len, device=key.device)
        _, columns, slots = self._ring_columns(0, old)
        keys[old], values[old] = self.stage[stage_row[columns], 0, slots], self.stage[stage_row[columns], 1, slots]
        stored_sinks = torch.arange(min(sinks, window), device=key.device)
        blocks = stage_row[stored_sinks // block_tokens]
        keys[stored_sinks] = self.stage[blocks, 0, stored_sinks % block_tokens]
        values[stored_sinks] = self.stage[blocks, 1, stored_sinks % block_tokens]
        keys_q, values_q = torch.zeros_like(keys, dtype=torch.float32), torch.zeros_like(keys, dtype=torch.float32)
        if full_pages:
            k_deq, v_deq = reference.dequantize_pages(self.packed[page_row[:full_pages].long()], self.config,
                                                      key.shape[-1])
            keys_q[: full_pages * page], values_q[: full_pages * page] = k_deq.flatten(0, 1), v_deq.flatten(0, 1)
        positions = torch.arange(context_len, end, device=key.device)
        return reference.schedule_attention(query, keys, values, keys_q, values_q, positions, self.config, scale,
                                            self.soft_cap, self.sinks)


def _columns(parts: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The columns of ``parts`` (each int64 [rows, n]) side by side: [rows, total]."""
    return torch.cat(parts, dim=1) if parts else torch.zeros(rows, 0, dtype=torch.int64)
