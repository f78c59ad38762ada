"""The kitty KV-cache specs and managers, driven through vLLM's real scheduler-side classes.

No model and no GPU: vLLM's own ``get_kv_cache_configs`` sizes the pool, and a small stand-in for the
scheduler calls ``KVCacheManager`` (-> ``HybridKVCacheCoordinator`` -> ``BlockPool``) the way
``vllm/v1/core/sched/scheduler.py`` does, while recording the block-table rows a worker would hold.
"""

import pickle
import types

import pytest
import torch
from vllm.config import VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.utils.math_utils import cdiv
from vllm.v1 import kv_cache_spec_registry
from vllm.v1.core import kv_cache_utils
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    SlidingWindowManager,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.request import Request, RequestStatus

from kitty_vllm.block_manager import (
    KittyPackedManager,
    KittyPackedSpec,
    KittySlidingWindowManager,
    KittySlidingWindowSpec,
    KittyStageManager,
    KittyStageSpec,
    kitty_specs,
    register_kv_cache_managers,
)
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout, stage_layout

# Qwen3-8B
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE = 36, 8, 128, torch.bfloat16
KITTY2 = KittyConfig.from_preset("kitty2")
MAX_MODEL_LEN = 4624
POOL_BLOCKS = 2000
GiB = 2**30


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_kv_cache_managers()
    kv_cache_utils.init_none_hash(sha256)


def make_vllm_config(max_model_len: int, enable_prefix_caching: bool = True) -> VllmConfig:
    """A VllmConfig with a stand-in model config: only what KV-cache sizing reads (from vLLM 0.33 also
    ``supports_kv_cache_grouping``, which Qwen3's class does not declare: vLLM groups the layers)."""
    config = VllmConfig()
    config.model_config = types.SimpleNamespace(
        max_model_len=max_model_len, original_max_model_len=max_model_len, runner_type="generate",
        is_hybrid=False, is_attention_free=False, architectures=["Qwen3ForCausalLM"],
        is_moe=False, is_diffusion=False, supports_kv_cache_grouping=False,
    )
    config.cache_config.enable_prefix_caching = enable_prefix_caching
    config.cache_config.kv_cache_layout = "LBNHC"   # the engine core resolves it from the backends
    return config


def kitty_layer_specs() -> dict:
    packed, stage = kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE)
    specs = {}
    for i in range(NUM_LAYERS):
        specs[f"model.layers.{i}.self_attn.attn"] = packed
        specs[f"model.layers.{i}.self_attn.attn.kitty_stage"] = stage
    return specs


def bf16_layer_specs() -> dict:
    spec = FullAttentionSpec(block_size=16, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM,
                             dtype=torch.bfloat16)
    return {f"model.layers.{i}.self_attn.attn": spec for i in range(NUM_LAYERS)}


def plan_kv_cache(vllm_config: VllmConfig, specs: dict, memory: int) -> KVCacheConfig:
    """The KV-cache config that vLLM's engine core plans for one worker with ``specs`` and ``memory``.

    vLLM 0.33 moved the planning from ``kv_cache_utils`` to ``kv_cache_planning``, whose
    ``get_kv_cache_configs`` takes the model's KV-cache groups, which the engine core computes first.
    """
    try:
        from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
    except ImportError:  # vLLM 0.32
        return kv_cache_utils.get_kv_cache_configs(vllm_config, [specs], [memory])[0]
    return get_kv_cache_configs(vllm_config, [specs], [memory], get_global_kv_cache_groups(vllm_config, [specs]))[0]


def max_concurrency(vllm_config: VllmConfig, specs: dict, memory: int) -> float:
    kv_cache_config = plan_kv_cache(vllm_config, specs, memory)
    return kv_cache_utils.get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config)


# ---- specs -----------------------------------------------------------------------------------------

def test_spec_sizes_come_from_the_layout():
    packed, stage = kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE)
    layout = stage_layout(KITTY2, HEAD_DIM, NUM_KV_HEADS, 2)
    assert packed.block_size == KITTY2.page_size == 128
    assert packed.dtype == torch.uint8
    assert packed.packed_page_bytes == page_layout(KITTY2, HEAD_DIM).page_bytes == 10_272
    assert packed.page_size_bytes == stage.page_size_bytes == layout.block_bytes == 82_176
    assert stage.layout == layout
    assert stage.block_size == layout.block_tokens == 16
    assert (stage.dtype, stage.model_dtype) == (torch.uint8, MODEL_DTYPE)   # one dtype in the pool
    assert (layout.tokens_per_block, layout.sink_blocks, layout.ring_blocks) == (20, 2, 7)


def test_blocks_of_several_pages():
    """On hybrid models a packed block holds P whole pages (kitty_vllm.block_manager.mixed.fit_blocks_to_state):
    one head slot of P page states of every KV head, so the block is [P, H, page_bytes] in any layout; a
    staging block has its bytes and holds more tokens."""
    packed, stage = kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE, pages_per_block=3)
    one_page = stage_layout(KITTY2, HEAD_DIM, NUM_KV_HEADS, 2)
    assert (packed.block_size, packed.pages_per_block, packed.num_heads, packed.num_states) == (384, 3, 1, 3)
    assert packed.packed_page_bytes == page_layout(KITTY2, HEAD_DIM).page_bytes
    assert packed.page_size_bytes == stage.page_size_bytes == stage.layout.block_bytes == 3 * 82_176
    assert stage.layout.tokens_per_block == 3 * one_page.tokens_per_block
    assert stage.layout.ring_blocks < one_page.ring_blocks
    assert kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE)[0].pages_per_block == 1


def test_shared_page_pads_both_specs():
    """Beside layers in the model's dtype, both groups' blocks are padded to the pool's shared page
    (kitty_vllm.block_manager.mixed); the staging layout keeps its unpadded tokens."""
    packed, stage = kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE, shared_page_bytes=131_072)
    assert packed.page_size_bytes == stage.page_size_bytes == 131_072
    assert packed.real_page_size_bytes == stage.layout.block_bytes == 82_176
    assert stage.max_memory_usage_bytes(make_vllm_config(4096)) == stage.layout.blocks_needed(4096) * 131_072
    assert kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE, shared_page_bytes=82_176) == \
        kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE)


def test_specs_are_hashable_picklable_and_merge():
    packed, stage = kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE)
    for spec in (packed, stage):
        copy = pickle.loads(pickle.dumps(spec))
        assert copy == spec and hash(copy) == hash(spec)
        assert type(spec).merge([spec, copy]) == spec
    other = kitty_specs(KITTY2.replace(boost_ratio=0.125), NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE)[0]
    with pytest.raises(AssertionError, match="page layout"):
        KittyPackedSpec.merge([packed, other])
    with pytest.raises(ValueError, match="block_size"):
        stage.copy_with_new_block_size(32)


# ---- capacity as vLLM reports it -----------------------------------------------------------------

@pytest.mark.parametrize("max_model_len, min_ratio", [(4624, 4.8), (32768, 6.0)])
def test_reported_concurrency_beats_bf16(max_model_len, min_ratio):
    vllm_config = make_vllm_config(max_model_len)
    memory = 40 * GiB
    kv_cache_config = plan_kv_cache(vllm_config, kitty_layer_specs(), memory)
    packed, stage = kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE)
    # Two groups of 36 layers with the specs unchanged: no padding, no block-size scaling.
    assert [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups] == [packed, stage]
    assert all(len(g.layer_names) == NUM_LAYERS for g in kv_cache_config.kv_cache_groups)
    assert kv_cache_config.num_blocks == memory // packed.page_size_bytes // NUM_LAYERS
    assert kv_cache_utils.resolve_kv_cache_block_sizes(kv_cache_config, vllm_config) == (128, 16)

    kitty = kv_cache_utils.get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config)
    bf16 = max_concurrency(make_vllm_config(max_model_len), bf16_layer_specs(), memory)
    print(f"max_model_len {max_model_len}: kitty {kitty:.2f}x, bf16 {bf16:.2f}x, "
          f"ratio {kitty / bf16:.3f}")
    assert kitty / bf16 >= min_ratio


# ---- the scheduler's view ------------------------------------------------------------------------

class SchedulerStandIn:
    """Calls KVCacheManager as the scheduler does and keeps the worker's append-only block rows."""

    def __init__(self, enable_caching: bool = True):
        vllm_config = make_vllm_config(MAX_MODEL_LEN, enable_caching)
        layer_page = kitty_layer_specs()["model.layers.0.self_attn.attn"].page_size_bytes
        kv_cache_config = plan_kv_cache(vllm_config, kitty_layer_specs(), POOL_BLOCKS * layer_page * NUM_LAYERS)
        scheduler_block, hash_block = kv_cache_utils.resolve_kv_cache_block_sizes(
            kv_cache_config, vllm_config)
        self.concurrency = kv_cache_utils.get_max_concurrency_for_kv_cache_config(
            vllm_config, kv_cache_config)
        self.hasher = kv_cache_utils.get_request_block_hasher(hash_block, sha256)
        self.manager = KVCacheManager(
            kv_cache_config, MAX_MODEL_LEN, scheduler_block_size=scheduler_block,
            hash_block_size=hash_block, max_in_flight_tokens=vllm_config.max_in_flight_tokens,
            enable_caching=enable_caching)
        self.pool = self.manager.block_pool
        self.layout = kv_cache_config.kv_cache_groups[1].kv_cache_spec.layout
        self.rows: dict[str, tuple[list[int], list[int]]] = {}

    def request(self, request_id: str, prompt: list[int]) -> Request:
        return Request(request_id, prompt, SamplingParams(max_tokens=10_000), None,
                       block_hasher=self.hasher)

    def admit(self, request: Request, budget: int) -> int | None:
        """Schedule a waiting or preempted request; returns the prefix-hit length, None if no room."""
        hit_blocks, num_hit, _ = self.manager.get_computed_blocks(request)
        num_new = min(budget, request.num_tokens - num_hit)
        if self.manager.allocate_slots(request, num_new, num_new_computed_tokens=num_hit,
                                       new_computed_blocks=hit_blocks,
                                       full_sequence_must_fit=True) is None:
            return None
        # A (re)admitted request gets a whole new row on the worker.
        self.rows[request.request_id] = tuple(list(ids) for ids in self.block_ids(request))
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_hit + num_new
        return num_hit

    def step(self, request: Request, num_new: int) -> bool:
        """Schedule a running request; the worker appends the new block ids to its rows."""
        new_blocks = self.manager.allocate_slots(request, num_new)
        if new_blocks is None:
            return False
        for row, ids in zip(self.rows[request.request_id], new_blocks.get_block_ids()):
            row.extend(ids)
        request.num_computed_tokens += num_new
        return True

    def decode(self, request: Request, num_tokens: int) -> None:
        for token in range(num_tokens):
            request.append_output_token_ids(7 + token)
            assert self.step(request, 1)
            self.check(request)

    def preempt(self, request: Request) -> None:
        self.manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0

    def block_ids(self, request: Request) -> tuple[list[int], list[int]]:
        packed, stage = self.manager.get_blocks(request.request_id).get_block_ids()
        return packed, stage

    def check(self, request: Request) -> None:
        """Pages by position, staging by role, and the worker's rows equal the scheduler's lists."""
        packed, stage = self.block_ids(request)
        num_tokens = request.num_computed_tokens
        assert len(packed) == cdiv(num_tokens, KITTY2.page_size)
        assert len(stage) == self.layout.blocks_needed(num_tokens)
        assert self.rows[request.request_id] == (packed, stage)

    def sink_ids(self, request: Request) -> list[int]:
        return self.block_ids(request)[1][:self.layout.sink_blocks]

    def staging_hash_entries(self) -> int:
        return sum(1 for block in self.pool.blocks if block.block_hash is not None
                   and kv_cache_utils.get_group_id(block.block_hash) == 1)

    def assert_all_free(self) -> None:
        assert self.pool.get_num_free_blocks() == POOL_BLOCKS - 1  # all but the null block
        assert all(block.ref_cnt == 0 for block in self.pool.blocks if not block.is_null)


PROMPT = list(range(1000, 1700))  # 700 tokens: 5 full pages and part of a sixth


@pytest.fixture
def sim() -> SchedulerStandIn:
    return SchedulerStandIn()


def prefill(sim: SchedulerStandIn, request: Request, chunk: int = 256) -> int:
    num_hit = sim.admit(request, chunk)
    sim.check(request)
    while request.num_computed_tokens < request.num_prompt_tokens:
        assert sim.step(request, min(chunk, request.num_prompt_tokens - request.num_computed_tokens))
        sim.check(request)
    return num_hit


def test_chunked_prefill_then_decode(sim):
    request = sim.request("r1", PROMPT)
    assert prefill(sim, request) == 0
    _, stage = sim.block_ids(request)
    assert len(stage) == sim.layout.blocks_per_request == 9
    # 700 -> 800 tokens crosses the page boundary at 768: exactly one more page, same staging row.
    sim.decode(request, 100)
    packed, stage_after = sim.block_ids(request)
    assert len(packed) == cdiv(800, 128) == 7
    assert stage_after == stage
    # Only the sink blocks are published, once each.
    assert sim.staging_hash_entries() == sim.layout.sink_blocks


def test_unfinished_page_is_never_cached(sim):
    request = sim.request("r1", PROMPT)
    prefill(sim, request)
    packed_manager = sim.manager.coordinator.single_type_managers[0]
    unfinished_page = sim.pool.blocks[sim.block_ids(request)[0][-1]]
    # The coordinator floors to a page before caching; called unfloored, the stock full-attention
    # manager would publish the prompt's tail (688 tokens) inside the unfinished page.
    packed_manager.cache_blocks(request, request.num_computed_tokens)
    assert unfinished_page.block_hash is None
    FullAttentionManager.cache_blocks(packed_manager, request, request.num_computed_tokens,
                                      replay_boundaries=())
    assert unfinished_page.block_hash is not None  # control: the check above can fail


def test_sinks_are_cached_as_their_block_hashes_arrive(sim):
    """From vLLM 0.33, with EAGLE or MTP and prefix caching, a block is hashed only once the drafter's
    lookahead past it exists, so a request's block hashes can end before the tokens the coordinator asks
    a group to cache. The staging group then caches the sink blocks that have a hash and the rest later,
    as vLLM's own managers do (BlockPool.cache_full_blocks needs a hash per block: IndexError).

    The coordinator asks for whole scheduler blocks (pages), so with kitty2's 128-token pages the lag
    reaches the sinks only past a 96-token lookahead, sooner with smaller pages. The manager is called
    directly here, and dropping a hash stands in for the lag, on any vLLM release."""
    request = sim.request("r1", list(range(40)))          # both 16-token sink blocks full
    sim.admit(request, 40)                                # less than a page: the coordinator caches none
    stage_manager = sim.manager.coordinator.single_type_managers[1]
    sinks = [sim.pool.blocks[i] for i in sim.sink_ids(request)]
    del request.block_hashes[1:]
    stage_manager.cache_blocks(request, 40)
    assert [block.block_hash is not None for block in sinks] == [True, False]
    request.update_block_hashes()                         # the lookahead has arrived
    stage_manager.cache_blocks(request, 40)
    assert all(block.block_hash is not None for block in sinks)
    assert sim.staging_hash_entries() == sim.layout.sink_blocks


def test_short_request_grows_its_ring_block_by_block(sim):
    request = sim.request("short", list(range(10)))
    sim.admit(request, 10)
    sim.check(request)
    assert len(sim.block_ids(request)[1]) == sim.layout.sink_blocks + 1
    sim.decode(request, 130)  # 140 tokens: past the first page, ring at its full size
    assert len(sim.block_ids(request)[1]) == sim.layout.blocks_per_request


def test_prefix_hit_shares_sinks_and_pages(sim):
    first = sim.request("r1", PROMPT)
    prefill(sim, first)
    second = sim.request("r2", PROMPT[:650] + list(range(9000, 9300)))
    assert sim.admit(second, 2048) == 512      # 5 pages cached; the last is recomputed for the ring
    sim.check(second)
    first_packed, first_stage = sim.block_ids(first)
    second_packed, second_stage = sim.block_ids(second)
    assert second_packed[:4] == first_packed[:4] and second_packed[4] != first_packed[4]
    assert second_stage[:2] == first_stage[:2]
    assert not set(second_stage[2:]) & set(first_stage)  # the ring is private
    sinks = [sim.pool.blocks[i] for i in second_stage[:2]]
    assert [b.ref_cnt for b in sinks] == [2, 2]
    sim.manager.free(first)
    assert [b.ref_cnt for b in sinks] == [1, 1]


def test_first_step_after_a_hit_computes_a_page(sim):
    """A hit request whose first step would compute less than a page waits (kitty_vllm.block_manager:
    its decodes must find only its own tokens in the ring), then takes the hit in a longer step."""
    first = sim.request("r1", PROMPT)
    prefill(sim, first)
    second = sim.request("r2", PROMPT[:650] + list(range(9000, 9300)))
    free = sim.pool.get_num_free_blocks()
    assert sim.admit(second, KITTY2.page_size - 1) is None
    assert sim.pool.get_num_free_blocks() == free
    assert sim.admit(second, KITTY2.page_size) == 512
    sim.check(second)


@pytest.mark.parametrize("config, step_tokens, hits", [
    (KITTY2, None, True), (KITTY2, 128, True), (KITTY2, 127, False),
    (KITTY2.replace(exact_prefill=True), None, False)])
def test_prefix_hits_need_page_steps_and_the_default_schedule(config, step_tokens, hits):
    stage = kitty_specs(config, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE, step_tokens)[1]
    assert stage.prefix_hits is hits


def test_preemption_abort_and_finish_free_the_pool(sim):
    first = sim.request("r1", PROMPT)
    prefill(sim, first)
    sinks = sim.sink_ids(first)
    second = sim.request("r2", PROMPT[:650] + list(range(9000, 9300)))
    sim.admit(second, 2048)
    sim.manager.free(first)  # finish

    sim.preempt(second)
    assert sim.admit(second, 2048) == 768  # everything computed before, down to a page boundary, less a page
    sim.check(second)
    assert sim.sink_ids(second) == sinks

    aborted = sim.request("r3", list(range(50_000, 53_000)))
    sim.admit(aborted, 512)
    sim.check(aborted)
    sim.manager.free(aborted)  # abort mid-prefill
    sim.manager.free(second)
    sim.assert_all_free()


@pytest.mark.parametrize("evicted_sink", [0, 1])
def test_no_hit_without_the_sinks(sim, evicted_sink):
    first = sim.request("r1", PROMPT)
    prefill(sim, first)
    sinks = sim.sink_ids(first)
    sim.manager.free(first)
    sim.pool.evict_blocks({sinks[evicted_sink]})
    later = sim.request("r4", PROMPT[:650] + [1, 2, 3])
    blocks, num_hit, _ = sim.manager.get_computed_blocks(later)
    assert num_hit == 0  # the pages are still cached, but useless without their sinks
    assert all(len(group) == 0 for group in blocks.blocks)


def test_evicted_page_shortens_the_hit_but_keeps_the_sinks(sim):
    first = sim.request("r1", PROMPT)
    prefill(sim, first)
    packed, _ = sim.block_ids(first)
    sinks = sim.sink_ids(first)
    sim.manager.free(first)
    sim.pool.evict_blocks({packed[3]})
    later = sim.request("r4", PROMPT[:650])
    assert sim.admit(later, 2048) == 2 * 128   # pages 0-2 cached, page 2 recomputed
    assert sim.sink_ids(later) == sinks


def test_admission_matches_reported_concurrency(sim):
    admitted = []
    while True:
        k = len(admitted)
        request = sim.request(f"a{k}", [(k * 7919 + i) % 30_000 + 40_000
                                        for i in range(MAX_MODEL_LEN - 1)])
        if sim.admit(request, MAX_MODEL_LEN - 1) is None:
            break
        request.append_output_token_ids(3)
        if not sim.step(request, 1):  # grow to exactly max_model_len
            break
        admitted.append(request)
    assert len(admitted) == int(sim.concurrency)
    for request in admitted:
        sim.manager.free(request)
    sim.assert_all_free()


def test_without_prefix_caching():
    sim = SchedulerStandIn(enable_caching=False)
    request = sim.request("r1", PROMPT)
    prefill(sim, request)
    sim.decode(request, 70)
    assert sim.staging_hash_entries() == 0
    sim.manager.free(request)
    sim.assert_all_free()


# ---- beside sliding-window layers ----------------------------------------------------------------

# A Gemma-3-like mix: one kitty layer, then sliding-window layers in bf16 with 32-token blocks padded to
# the shared page (kitty_vllm.block_manager.mixed). The window spans 2 of the 4 blocks of a 128-token
# scheduler block, so vLLM keeps a window only where a hit can end, not every block.
WINDOW, WINDOW_BLOCK = 64, 32
SHARED_PAGE = WINDOW_BLOCK * 2 * NUM_KV_HEADS * HEAD_DIM * 2


def serve_alone(manager: KVCacheManager, request: Request, chunk: int = 256) -> int:
    """Prefill ``request`` in ``chunk``-token steps, then finish it; returns its prefix-hit length."""
    hit_blocks, num_hit, _ = manager.get_computed_blocks(request)
    num_new = min(chunk, request.num_tokens - num_hit)
    assert manager.allocate_slots(request, num_new, num_new_computed_tokens=num_hit, new_computed_blocks=hit_blocks,
                                  full_sequence_must_fit=True) is not None
    request.status = RequestStatus.RUNNING
    request.num_computed_tokens = num_hit + num_new
    while request.num_computed_tokens < request.num_tokens:
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        assert manager.allocate_slots(request, num_new) is not None
        request.num_computed_tokens += num_new
    manager.free(request)
    return num_hit


@pytest.mark.parametrize("window_spec, hits", [(KittySlidingWindowSpec, True), (SlidingWindowSpec, False)])
def test_hits_beside_sliding_window_layers(window_spec, hits):
    """A repeated prompt and a longer one hit all but the last of the 5 pages cached before the repeat's
    last token, 512 tokens: the packed group gives that page up, the staging group grants the length as
    it is (had it given up another page on each of the coordinator's repeated asks, the hit would have
    shrunk to nothing), and KittySlidingWindowManager kept the window before token 512. vLLM's own manager
    keeps only the window before 640, where a kitty hit cannot end: every lookup misses."""
    vllm_config = make_vllm_config(MAX_MODEL_LEN)
    packed, stage = kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE, shared_page_bytes=SHARED_PAGE)
    window = window_spec(block_size=WINDOW_BLOCK, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=MODEL_DTYPE,
                         sliding_window=WINDOW, page_size_padded=SHARED_PAGE)
    specs = {"model.layers.0.self_attn.attn": packed, "model.layers.0.self_attn.attn.kitty_stage": stage,
             "model.layers.1.self_attn.attn": window}
    kv_cache_config = plan_kv_cache(vllm_config, specs, POOL_BLOCKS * SHARED_PAGE * 3)
    scheduler_block, hash_block = kv_cache_utils.resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    manager = KVCacheManager(kv_cache_config, MAX_MODEL_LEN, scheduler_block_size=scheduler_block,
                             hash_block_size=hash_block, max_in_flight_tokens=vllm_config.max_in_flight_tokens,
                             enable_caching=True)
    assert scheduler_block == KITTY2.page_size
    assert [type(m) for m in manager.coordinator.single_type_managers] == [
        KittyPackedManager, KittyStageManager, KittySlidingWindowManager if hits else SlidingWindowManager]
    hasher = kv_cache_utils.get_request_block_hasher(hash_block, sha256)
    prompts = {"first": PROMPT, "repeat": PROMPT, "longer": PROMPT + list(range(9000, 9300))}
    served = {name: serve_alone(manager, Request(name, prompt, SamplingParams(max_tokens=1), None,
                                                 block_hasher=hasher))
              for name, prompt in prompts.items()}
    assert served == {"first": 0, "repeat": 512 if hits else 0, "longer": 512 if hits else 0}


# ---- registration --------------------------------------------------------------------------------

def test_registration_is_idempotent_and_keeps_the_builtins(monkeypatch):
    # A fresh process: vLLM's registry is empty until someone asks it for a manager.
    monkeypatch.setattr(kv_cache_spec_registry, "_REGISTRY_KVCACHESPEC_LIST", {})
    register_kv_cache_managers()
    register_kv_cache_managers()
    packed, stage = kitty_specs(KITTY2, NUM_KV_HEADS, HEAD_DIM, MODEL_DTYPE)
    full = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    window = SlidingWindowSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
                               sliding_window=64)
    packed_bytes = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.uint8,
                                     state_content_bytes=136)
    assert KVCacheSpecRegistry.get_manager_class(full) is FullAttentionManager
    assert KVCacheSpecRegistry.get_manager_class(packed_bytes) is FullAttentionManager
    assert KVCacheSpecRegistry.get_manager_class(window) is SlidingWindowManager
    assert KVCacheSpecRegistry.get_manager_class(packed) is KittyPackedManager
    assert KVCacheSpecRegistry.get_manager_class(stage) is KittyStageManager
    kitty_window = KittySlidingWindowSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
                                          sliding_window=64)
    assert KVCacheSpecRegistry.get_manager_class(kitty_window) is KittySlidingWindowManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(kitty_window) is SlidingWindowSpec
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(packed) is FullAttentionSpec
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(stage) is KittyStageSpec


def test_pages_of_each_layers_size_share_one_block():
    """Per-layer boost ratios (KittyConfig.layer_boost) give each layer a page of its own size; in vLLM's
    block-outermost layout, which kitty chooses for them (kitty_vllm.patches), vLLM packs them side by side, so
    a block costs the sum of the layers' pages, not the largest page times the layers. Staging blocks hold the
    smallest page's tokens in every layer, padded to the layer's page, and vLLM counts what a request takes."""
    from kitty_vllm.block_manager import layer_kitty_config

    config = KITTY2.replace(layer_boost=(0.0, 0.25, 0.5) * (NUM_LAYERS // 3))
    vllm_config = make_vllm_config(MAX_MODEL_LEN)
    vllm_config.cache_config.kv_cache_layout = "BLHNC"
    specs = {}
    for i in range(NUM_LAYERS):
        name = f"model.layers.{i}.self_attn.attn"
        specs[name], specs[f"{name}.kitty_stage"] = kitty_specs(layer_kitty_config(config, name), NUM_KV_HEADS,
                                                                HEAD_DIM, MODEL_DTYPE)
    memory = 40 * GiB
    kv_cache_config = plan_kv_cache(vllm_config, specs, memory)
    pages = [NUM_KV_HEADS * page_layout(config.for_layer(i), HEAD_DIM).page_bytes for i in range(NUM_LAYERS)]
    assert len(set(pages)) == 3 and sum(pages) == NUM_LAYERS * NUM_KV_HEADS * page_layout(KITTY2, HEAD_DIM).page_bytes
    assert [len(g.layer_names) for g in kv_cache_config.kv_cache_groups] == [NUM_LAYERS, NUM_LAYERS]
    assert kv_cache_config.num_blocks == memory // sum(pages)
    # Every layer's staging blocks hold the smallest page's tokens, padded to the layer's page.
    stages = [specs[f"model.layers.{i}.self_attn.attn.kitty_stage"] for i in range(NUM_LAYERS)]
    assert [stage.page_size_bytes for stage in stages] == pages
    smallest = stage_layout(KITTY2.replace(boost_ratio=0.0), HEAD_DIM, NUM_KV_HEADS, 2)
    assert {(s.layout.block_bytes, s.layout.tokens_per_block, s.layout.blocks_per_request) for s in stages} == {
        (smallest.block_bytes, smallest.tokens_per_block, smallest.blocks_per_request)}
    per_request = cdiv(MAX_MODEL_LEN, KITTY2.page_size) + smallest.blocks_needed(MAX_MODEL_LEN)
    reported = kv_cache_utils.get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config)
    assert reported == kv_cache_config.num_blocks / per_request
    # What the smaller staging blocks cost against kitty2's one ratio: one staging block per request here.
    uniform = max_concurrency(make_vllm_config(MAX_MODEL_LEN), kitty_layer_specs(), memory)
    assert per_request == cdiv(MAX_MODEL_LEN, KITTY2.page_size) + stage_layout(
        KITTY2, HEAD_DIM, NUM_KV_HEADS, 2).blocks_needed(MAX_MODEL_LEN) + 1
    assert 0.97 * uniform < reported < uniform
