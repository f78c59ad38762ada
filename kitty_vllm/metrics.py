"""Kitty's KV-cache counters, kept by the scheduler-side block managers, and where they are reported.

Per engine (per block pool), as gauges on ``/metrics`` (labels ``model_name`` and ``engine``, like
vLLM's own) and, for the first two, as a log line:

* ``kitty:staging_blocks_held``: the full-precision staging blocks (sinks and the ring of newest
  tokens, see kitty_vllm.stage) that live requests hold; a prefix-cached sink block counts once per
  request holding it. It must return to 0 when the server is idle: anything else is a leak.
* ``kitty:pages_packed``: 128-token pages handed to the worker to quantize, since the engine started. A
  page is packed in the step that stores its last token (kitty_vllm.paged), so the scheduler counts it
  when it schedules the tokens that fill it; pages restored from the prefix cache are not packed again,
  pages of a preempted request are packed again when it is recomputed. With ``--scheduling-policy
  priority`` a request preempted in the step it was scheduled in has that step counted although it did
  not run.
* ``kitty:full_precision_bytes``: the bytes of KV cache those staging blocks occupy.
* ``kitty:packed_bytes``: the bytes of the packed pages live requests hold: the pages filled so far
  (packed, or restored from the prefix cache), not the page being filled, whose tokens are still in
  the staging ring. A page shared through the prefix cache counts once per request holding it.

Bytes: a vLLM block id of a KV-cache group holds one page of every layer in the group, so a block
counts the group's page size times its number of layers. They are the bytes of one worker's KV cache
(the scheduler knows the first worker's layers; with tensor parallelism every rank holds as much).

How they reach ``/metrics``: the block managers live in the engine-core process, ``/metrics`` is
served by the API-server process. The engine core sends them with vLLM's own per-step stats, as a
``KittySchedulerStats`` (kitty_vllm.patches), and ``KittyStatLogger``, a
``vllm.stat_logger_plugins`` entry point, sets the gauges from them in the API server; vLLM's own
Prometheus logger runs beside it. The gauges exist only when ``--kv-cache-dtype`` is a kitty preset.
Like vLLM's gauges, they are updated after every engine step (vLLM runs one more step once requests
finish or are aborted, so an idle server shows their blocks released).

The log line, under vLLM's logger (INFO) in the engine-core process:

    kitty KV cache: 27 staging blocks held by requests, 1520 pages packed

at most once per ``VLLM_LOG_STATS_INTERVAL`` seconds (vLLM's stats interval, 10 s by default) while
the numbers change, plus one line as soon as the last staging block is released, so the last line of an
idle server always reads 0 staging blocks. An idle server logs nothing.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import vllm.envs as envs
from prometheus_client import REGISTRY, Gauge
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import KVCacheGroupSpec
from vllm.v1.metrics.loggers import AggregateStatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats
from vllm.v1.metrics.utils import create_metric_per_engine

from kitty_vllm.config import PRESETS

# Under vLLM's "vllm" logger, so the line reaches vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = init_logger(f"vllm.{__name__}")

LOG_LINE = "kitty KV cache: %d staging blocks held by requests, %d pages packed"
LOG_LINE_PATTERN = re.compile(r"kitty KV cache: (\d+) staging blocks held by requests, (\d+) pages packed")

METRIC_PREFIX = "kitty:"
# The gauges, without METRIC_PREFIX: the keys of KittySchedulerStats.kitty.
GAUGES = {
    "staging_blocks_held": "Full-precision staging blocks (sinks and newest tokens) held by requests.",
    "pages_packed": "Pages quantized since the engine started (cumulative).",
    "full_precision_bytes": "Bytes of KV cache held by the staging blocks, in full precision.",
    "packed_bytes": "Bytes of packed (quantized) pages held by requests.",
}


class KittyKVStats:
    """The counters of one block pool (one engine), updated by its kitty block managers.

    Blocks and pages held are kept per KV-cache group: what a block id weighs depends on its group.
    """

    def __init__(self) -> None:
        self.staging_blocks: dict[int, int] = {}  # by KV-cache group id
        self.pages_held: dict[int, int] = {}      # packed pages held by requests, by group id
        self.pages_packed = 0
        self._interval_s = envs.VLLM_LOG_STATS_INTERVAL
        self._logged: tuple[int, int] = (0, 0)
        self._logged_at = time.monotonic()

    @property
    def staging_blocks_held(self) -> int:
        return sum(self.staging_blocks.values())

    def add_staging_blocks(self, group_id: int, count: int) -> None:
        self.staging_blocks[group_id] = self.staging_blocks.get(group_id, 0) + count

    def add_pages_held(self, group_id: int, count: int) -> None:
        self.pages_held[group_id] = self.pages_held.get(group_id, 0) + count

    def add_pages_packed(self, count: int) -> None:
        self.pages_packed += count

    def gauges(self, kv_cache_groups: Sequence[KVCacheGroupSpec]) -> dict[str, int]:
        """The value of every gauge in GAUGES, bytes weighed by the engine's ``kv_cache_groups``."""

        def nbytes(held: dict[int, int], pages: bool = False) -> int:
            # A block id of a group holds one block of every layer of the group; a packed block holds
            # pages_per_block pages (KittyPackedSpec).
            total = 0
            for group_id, count in held.items():
                spec = kv_cache_groups[group_id].kv_cache_spec
                per_block = spec.pages_per_block if pages else 1
                total += count * spec.page_size_bytes // per_block * len(kv_cache_groups[group_id].layer_names)
            return total

        return {
            "staging_blocks_held": self.staging_blocks_held,
            "pages_packed": self.pages_packed,
            "full_precision_bytes": nbytes(self.staging_blocks),
            "packed_bytes": nbytes(self.pages_held, pages=True),
        }

    def log(self) -> None:
        """Log the counters if they changed, at most once per interval, or at once on draining to 0.

        Called where the counts are consistent: when a scheduler step starts (between the step
        before, and its frees, and this one) and when a request frees its staging blocks.
        """
        now = time.monotonic()
        state = (self.staging_blocks_held, self.pages_packed)
        drained = state[0] == 0 and self._logged[0] != 0
        due = now - self._logged_at >= self._interval_s
        if state != self._logged and (drained or due):
            logger.info(LOG_LINE, *state)
            self._logged, self._logged_at = state, now


_STATS: weakref.WeakKeyDictionary[object, KittyKVStats] = weakref.WeakKeyDictionary()


def kv_stats(block_pool: object) -> KittyKVStats:
    """The counters of the engine that owns ``block_pool`` (its managers share this one pool)."""
    stats = _STATS.get(block_pool)
    if stats is None:
        stats = _STATS[block_pool] = KittyKVStats()
    return stats


def last_logged(log_text: str) -> tuple[int, int] | None:
    """(staging blocks held, pages packed) from the last kitty line in a server log, or None."""
    matches = LOG_LINE_PATTERN.findall(log_text)
    return tuple(map(int, matches[-1])) if matches else None


@dataclass
class KittySchedulerStats(SchedulerStats):
    """vLLM's per-step scheduler stats plus kitty's gauges (GAUGES keys), sent by a kitty engine core."""

    kitty: dict[str, int] | None = None


class KittyStatLogger(AggregateStatLoggerBase):
    """Sets the ``kitty:`` gauges from the stats of every engine; inert unless the engine uses kitty."""

    def __init__(self, vllm_config: VllmConfig, engine_indexes: list[int]) -> None:
        self.gauges: dict[str, dict[int, Gauge]] = {}
        if vllm_config.cache_config.cache_dtype not in PRESETS:
            return
        _unregister_kitty_metrics()
        labelnames = ["model_name", "engine"]
        model_name = vllm_config.model_config.served_model_name
        per_engine_labelvalues = {idx: [model_name, str(idx)] for idx in engine_indexes}
        for name, documentation in GAUGES.items():
            gauge = Gauge(name=METRIC_PREFIX + name, documentation=documentation,
                          multiprocess_mode="mostrecent", labelnames=labelnames)
            self.gauges[name] = create_metric_per_engine(gauge, per_engine_labelvalues)

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None,
               mm_cache_stats: MultiModalCacheStats | None = None, engine_idx: int = 0) -> None:
        values = getattr(scheduler_stats, "kitty", None)
        # None: no stats in this output, or stats that Scheduler.make_stats did not make.
        if values is None:
            return
        for name, per_engine in self.gauges.items():
            per_engine[engine_idx].set(values[name])

    def log_engine_initialized(self) -> None:
        pass  # abstract in StatLoggerBase; the gauges need no start-up record


def _unregister_kitty_metrics() -> None:
    """Drop the ``kitty:`` gauges of an earlier logger in this process (tests start several engines).

    vLLM's PrometheusStatLogger does the same for its own names (``unregister_vllm_metrics``), which
    leaves ours alone: registering a name twice fails.
    """
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith(METRIC_PREFIX):
            REGISTRY.unregister(collector)
