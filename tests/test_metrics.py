"""Kitty's gauges in process: the counters cross vLLM's engine-core -> front-end stats stream, and
KittyStatLogger sets the ``kitty:`` gauges from them (tests/test_serve.py checks a real server)."""

import types

import torch
from prometheus_client import REGISTRY
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.kv_cache_interface import KVCacheGroupSpec
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

from kitty_vllm import patches
from kitty_vllm.block_manager import kitty_specs
from kitty_vllm.config import KittyConfig
from kitty_vllm.metrics import GAUGES, METRIC_PREFIX, KittyKVStats, KittySchedulerStats, KittyStatLogger

COUNTERS = {"staging_blocks_held": 27, "pages_packed": 1520, "full_precision_bytes": 3 << 20,
            "packed_bytes": 5 << 20}
MODEL = "smollm2"


def _round_trip(stats: SchedulerStats) -> SchedulerStats:
    patches.apply()  # before the decoder is built: msgspec reads the annotation then
    decoder = MsgpackDecoder(EngineCoreOutputs)
    return decoder.decode(MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats))).scheduler_stats


def _config(cache_dtype: str) -> types.SimpleNamespace:
    """The two fields of a VllmConfig that KittyStatLogger reads."""
    return types.SimpleNamespace(cache_config=types.SimpleNamespace(cache_dtype=cache_dtype),
                                 model_config=types.SimpleNamespace(served_model_name=MODEL))


def _gauge(name: str, engine: int) -> float | None:
    return REGISTRY.get_sample_value(METRIC_PREFIX + name, {"model_name": MODEL, "engine": str(engine)})


def test_counters_cross_the_engine_core_output_stream():
    sent = KittySchedulerStats(num_running_reqs=3, kv_cache_usage=0.25, kitty=dict(COUNTERS))
    received = _round_trip(sent)
    assert isinstance(received, KittySchedulerStats)
    assert received.kitty == COUNTERS
    assert (received.num_running_reqs, received.kv_cache_usage) == (3, 0.25)
    # An engine without kitty sends vLLM's own stats: they decode with no counters.
    assert _round_trip(SchedulerStats(num_running_reqs=2)).kitty is None


def test_stat_logger_sets_the_gauges_per_engine():
    KittyStatLogger(_config("kitty2"), [0, 1])
    logger = KittyStatLogger(_config("kitty2"), [0, 1])   # a second engine in one process: no clash
    assert set(logger.gauges) == set(GAUGES)
    logger.record(_round_trip(KittySchedulerStats(kitty=dict(COUNTERS))), None, engine_idx=1)
    assert {name: _gauge(name, 1) for name in GAUGES} == COUNTERS
    assert {name: _gauge(name, 0) for name in GAUGES} == dict.fromkeys(GAUGES, 0)
    logger.record(KittySchedulerStats(), None, engine_idx=1)   # stats without counters change nothing
    logger.record(None, None, engine_idx=1)
    assert _gauge("pages_packed", 1) == COUNTERS["pages_packed"]


def test_stat_logger_is_inert_without_kitty():
    registered = set(REGISTRY._collector_to_names)
    logger = KittyStatLogger(_config("auto"), [0])
    assert logger.gauges == {} and set(REGISTRY._collector_to_names) == registered
    logger.record(KittySchedulerStats(kitty=dict(COUNTERS)), None)


def test_bytes_count_every_layer_of_a_group():
    packed, stage = kitty_specs(KittyConfig.from_preset("kitty2"), 4, 64, torch.bfloat16)
    groups = [KVCacheGroupSpec([f"layers.{i}.attn" for i in range(30)], packed),
              KVCacheGroupSpec([f"layers.{i}.attn.kitty_stage" for i in range(30)], stage)]
    stats = KittyKVStats()
    stats.add_staging_blocks(1, 9)
    stats.add_staging_blocks(1, -2)
    stats.add_pages_held(0, 5)
    stats.add_pages_packed(6)
    assert stats.gauges(groups) == {
        "staging_blocks_held": 7,
        "pages_packed": 6,
        "full_precision_bytes": 7 * 30 * stage.page_size_bytes,
        "packed_bytes": 5 * 30 * packed.page_size_bytes,
    }
