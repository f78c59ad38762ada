"""Scheduler-side block managers of the two kitty KV-cache groups and of sliding-window layers beside
them, and their registration with vLLM.

Prefix caching. A hit ends on a page boundary (the scheduler block is the page), one page short of
the cached prefix, and the first step after it must compute at least a whole page:
KittyStageManager.get_num_blocks_to_allocate refuses a shorter one, so the request waits for a step
with room (a waiting request is never preempted for it). Why: a decode reads its window, the newest
``page_size`` tokens, in full precision from the ring, which is per request and not cached; a step of
several tokens that starts on a page boundary reads no full-precision token from before it but the
sinks (kitty_vllm.reference). So the hitting request's ring holds only tokens it computed itself before
any one-token step reads it. The page given up guarantees that at least page_size + 1 tokens are left to
compute. With ``exact_prefill``, whose queries read their windows in prefill too, or a scheduler that
never gives a request a whole page in one step, every lookup misses (KittyStageSpec.prefix_hits).

The packed group gives the page up (KittyPackedManager.find_longest_cache_hit). vLLM's hybrid
coordinator asks each group in turn for its longest hit within a candidate length, and asks the others
again whenever one shortens it, until none does; it asks a full-attention group such as the packed one
only once, then trims its blocks. So every other group must answer a candidate it can serve with that
candidate: a group that gave up a page on each call would shorten the hit to a miss.

Sinks are cached under the request's own block hashes, and a hit is granted only when the sinks are
cached too. vLLM publishes a block when it schedules it, so a hit may land on a page that another
request packs in the same step: the backend stores every request of a batch before any attends
(PagedKittyCache.store).

Sliding-window layers (kitty_vllm.block_manager.mixed) are vLLM's, except that KittySlidingWindowManager
also keeps the window where a kitty hit on a repeated prompt ends (its docstring).

Pinned to vLLM 0.32: these classes lean on ``SingleTypeKVCacheManager`` internals, marked below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from vllm.utils.math_utils import round_down
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHashList, KVCacheBlock, resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    SingleTypeKVCacheManager,
    SlidingWindowManager,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.request import Request

from kitty_vllm.block_manager.spec import KittyPackedSpec, KittySlidingWindowSpec, KittyStageSpec
from kitty_vllm.metrics import kv_stats


class KittyPackedManager(FullAttentionManager):
    """Full attention over packed pages, except that an unfinished page is never cached.

    Counts the pages it hands to the worker to pack, and the full pages requests hold
    (kitty_vllm.metrics): a request's pages up to its prefix-cache hit came packed; each later page is
    packed in the step that fills it.
    """

    # A hit ends on a page boundary (module docstring), never inside a page at the finer granularity of
    # the staging group's block hashes.
    supports_fine_grained_hash_lookup: ClassVar[bool] = False

    def __init__(self, kv_cache_spec: KittyPackedSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.stats = kv_stats(self.block_pool)
        self.page_size = kv_cache_spec.tokens_per_state    # block_size on hybrid models holds several pages
        self._full_pages: dict[str, int] = {}

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock],
                                  num_local_computed_tokens: int,
                                  num_external_computed_tokens: int) -> None:
        # add_local_computed_blocks (semi-private): where the coordinator hands a new request its
        # prefix-cache hit; the hit ends on a page boundary.
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)
        self._full_pages[request_id] = num_local_computed_tokens // self.page_size
        self.stats.add_pages_held(self.kv_cache_group_id, self._full_pages[request_id])

    def allocate_new_blocks(self, request_id: str, num_tokens: int,
                            num_tokens_main_model: int) -> list[KVCacheBlock]:
        new_blocks = super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        # num_tokens_main_model: the request's tokens once this step has stored them.
        full_pages = num_tokens_main_model // self.page_size
        packed = full_pages - self._full_pages.get(request_id, 0)
        if packed > 0:
            self._full_pages[request_id] = full_pages
            self.stats.add_pages_packed(packed)
            self.stats.add_pages_held(self.kv_cache_group_id, packed)
        return new_blocks

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        # pop_blocks_for_free (semi-private): every free (finish, abort, preemption) goes through it.
        self.stats.add_pages_held(self.kv_cache_group_id, -self._full_pages.pop(request_id, 0))
        return super().pop_blocks_for_free(request_id)

    def cache_blocks(self, request: Request, num_tokens: int, retention_interval: int | None = None, *,
                     replay_boundaries: Sequence[int] = ()) -> None:
        # Skip FullAttentionManager._cache_partial_tail_block: it would publish the prompt's last,
        # partly filled page, whose tokens still live in the staging ring and are not packed.
        SingleTypeKVCacheManager.cache_blocks(self, request, num_tokens, retention_interval=retention_interval,
                                              replay_boundaries=replay_boundaries)

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: BlockHashList,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool: BlockPool,
        kv_cache_spec: KittyPackedSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """The cached pages less the last one, ending on a multiple of ``alignment_tokens`` (the module
        docstring says why, and why here rather than in another group)."""
        hits, cached_length = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, drop_eagle_block,
            alignment_tokens, dcp_world_size, pcp_world_size)
        hit_length = max(round_down(cached_length - kv_cache_spec.block_size, alignment_tokens), 0)
        for group_hits in hits:
            del group_hits[hit_length // kv_cache_spec.block_size:]
        return hits, hit_length


class KittyStageManager(SingleTypeKVCacheManager):
    """A request's staging row: sink blocks then ring blocks, held until the request ends.

    Blocks are appended in role order and never freed or reordered before the request finishes,
    because the worker's block table rows are append-only (a resumed request gets a fresh row).
    The blocks requests hold are counted in kitty_vllm.metrics.
    """

    def __init__(self, kv_cache_spec: KittyStageSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        if self.dcp_world_size > 1 or self.pcp_world_size > 1:
            raise ValueError("kitty: decode/prefill context parallelism is not supported (the "
                             "staging blocks are per request, not sharded by position)")
        self.layout = kv_cache_spec.layout
        self.stats = kv_stats(self.block_pool)

    def add_local_computed_blocks(self, request_id: str, new_computed_blocks: Sequence[KVCacheBlock],
                                  num_local_computed_tokens: int,
                                  num_external_computed_tokens: int) -> None:
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)
        self.stats.add_staging_blocks(self.kv_cache_group_id, len(self.req_to_blocks[request_id]))

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        if new_computed_blocks and num_tokens_main_model - total_computed_tokens < self.layout.page.page_size:
            # The first step after a prefix-cache hit computes a whole page (module docstring): a
            # count above the pool leaves the request waiting for a step with room.
            return self.block_pool.num_gpu_blocks + 1
        held = len(self.req_to_blocks.get(request_id, ())) + len(new_computed_blocks)
        if held >= self.layout.blocks_per_request and not new_computed_blocks:
            return 0                                       # a running request whose row is full
        new_blocks = max(self.layout.blocks_needed(num_tokens) - held, 0)
        # Cached sink blocks with no owner leave the free queue when touched, like new blocks.
        return new_blocks + self._get_num_evictable_blocks(new_computed_blocks)

    def allocate_new_blocks(self, request_id: str, num_tokens: int,
                            num_tokens_main_model: int) -> list[KVCacheBlock]:
        blocks = self.req_to_blocks[request_id]
        if len(blocks) >= self.layout.blocks_per_request:
            return []
        num_new = self.layout.blocks_needed(num_tokens) - len(blocks)
        if num_new <= 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(num_new)
        blocks.extend(new_blocks)
        self.stats.add_staging_blocks(self.kv_cache_group_id, num_new)
        return new_blocks

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        blocks = super().pop_blocks_for_free(request_id)
        self.stats.add_staging_blocks(self.kv_cache_group_id, -len(blocks))
        self.stats.log()
        return blocks

    def new_step_starts(self) -> None:
        # new_step_starts (semi-private): the scheduler calls it at the start of every step.
        self.stats.log()

    def allocate_external_computed_blocks(self, request_id: str, num_local_computed_tokens: int,
                                          num_external_computed_tokens: int, record_for_zeroing: bool = True) -> None:
        if num_external_computed_tokens > 0:
            raise NotImplementedError("kitty: KV connectors cannot fill the staging blocks")

    def cache_blocks(self, request: Request, num_tokens: int, retention_interval: int | None = None, *,
                     replay_boundaries: Sequence[int] = ()) -> None:
        """Cache the sink blocks only: ring contents depend on the request's length, not its prefix."""
        request_id = request.request_id
        # num_cached_block (semi-private): also marks the request as running for the coordinator.
        num_cached = self.num_cached_block.get(request_id, 0)
        if num_cached >= self.layout.sink_blocks:
            return
        # From vLLM 0.33, with EAGLE or MTP and prefix caching, a block is hashed only once the drafter's
        # lookahead past it exists, so the hashes can end before the tokens; cache_full_blocks needs a hash
        # per block. SingleTypeKVCacheManager.cache_blocks stops at the hashed tokens in the same way. On
        # 0.32 every full block of the request is hashed, and this is num_tokens // block_size.
        num_hashed_tokens = len(request.block_hashes) * self.block_pool.hash_block_size
        num_full = min(min(num_tokens, num_hashed_tokens) // self.block_size, self.layout.sink_blocks)
        if num_full <= num_cached:
            return
        # BlockPool.cache_full_blocks (semi-private signature): hashes blocks[i] under the
        # request's i-th block hash at this group's block size.
        self.block_pool.cache_full_blocks(
            request=request,
            blocks=self.req_to_blocks[request_id],
            num_cached_blocks=num_cached,
            num_full_blocks=num_full,
            block_size=self.block_size,
            kv_cache_group_id=self.kv_cache_group_id,
        )
        self.num_cached_block[request_id] = num_full

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: BlockHashList,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool: BlockPool,
        kv_cache_spec: KittyStageSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        """The sink blocks for the candidate length ``max_length``, or a miss.

        The packed group has already given up its last page (module docstring), so the candidate is
        granted as it is: a missing sink block turns the whole hit into a miss, since pages are useless
        without their sinks.
        """
        miss = tuple([] for _ in kv_cache_group_ids), 0
        if not kv_cache_spec.prefix_hits:
            return miss
        hit_length = round_down(max_length, alignment_tokens)
        sink_blocks = kv_cache_spec.layout.sink_blocks
        if hit_length < sink_blocks * kv_cache_spec.block_size:
            return miss
        hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size,
                                      kv_cache_spec.block_size)
        if len(hashes) < sink_blocks:
            return miss
        hits: tuple[list[KVCacheBlock], ...] = tuple([] for _ in kv_cache_group_ids)
        for block_hash in hashes[:sink_blocks]:
            cached = block_pool.get_cached_block(block_hash, kv_cache_group_ids)
            if cached is None:
                return miss
            for group_hits, block in zip(hits, cached):
                group_hits.append(block)
        return hits, hit_length


class KittySlidingWindowManager(SlidingWindowManager):
    """vLLM's sliding-window manager that also keeps, in the prefix cache, the window before the point
    where a kitty hit on a repeated prompt ends.

    A hit on a sliding-window group needs the blocks of the window that ends where the hit does. vLLM
    caches those only where a hit can end (``reachable_block_mask``): by default
    (``prefix_cache_retention_interval=0``) at the request's replay boundaries (the prompt less its last
    token, rounded down to the scheduler block) and at shared-prefix junctions. A kitty hit ends a page
    short of the cached prefix (module docstring), where no window was kept: a repeated prompt missed.
    Each replay boundary is kept one scheduler block earlier too, which is where a kitty hit on it ends:
    the scheduler block is the least common multiple of every group's block, so a multiple of the page.
    Junctions need no shift: vLLM sets one at the longest hit of any group, the packed group's, which is
    already a page short.
    """

    def cache_blocks(self, request: Request, num_tokens: int, retention_interval: int | None = None, *,
                     replay_boundaries: Sequence[int]) -> None:
        block = self.cache_hit_alignment_tokens
        kitty_boundaries = [boundary - block for boundary in replay_boundaries if boundary >= block]
        super().cache_blocks(request, num_tokens, retention_interval,
                             replay_boundaries=[*replay_boundaries, *kitty_boundaries])


def register_kv_cache_managers() -> None:
    """Tell vLLM which manager serves each kitty spec. Idempotent; call it in every process."""
    # KVCacheSpecRegistry._ensure_registered (semi-private): the registry adds vLLM's built-in specs
    # only while it is empty, so registering ours first would hide FullAttentionSpec & co.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(KittyPackedSpec, KittyPackedManager,
                                 uniform_type_base_spec=FullAttentionSpec)
    KVCacheSpecRegistry.register(KittyStageSpec, KittyStageManager,
                                 uniform_type_base_spec=KittyStageSpec)
    KVCacheSpecRegistry.register(KittySlidingWindowSpec, KittySlidingWindowManager,
                                 uniform_type_base_spec=SlidingWindowSpec)
