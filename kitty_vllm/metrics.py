"""Kitty's KV-cache counters, kept by the scheduler-side block managers, and the log line that reports them.

Two numbers per engine (per block pool):

* **staging blocks held**: the full-precision staging blocks (sinks and the ring of newest tokens, see
  kitty_vllm.stage) that live requests hold; a prefix-cached sink block counts once per request
  holding it. It must return to 0 when the server is idle: anything else is a leak.
* **pages packed**: 128-token pages handed to the worker to quantize, since the engine started. A page
  is packed in the step that stores its last token (kitty_vllm.paged), so the scheduler counts it when
  it schedules the tokens that fill it; pages restored from the prefix cache are not packed again, pages
  of a preempted request are packed again when it is recomputed. With ``--scheduling-policy priority``
  a request preempted in the step it was scheduled in has that step counted although it did not run.

Why a log line and not Prometheus: in ``vllm serve`` the block managers live in the engine-core
process, while ``/metrics`` is served by the API-server process from its own registry. The only stats
that cross between them are vLLM's ``SchedulerStats``, a fixed dataclass encoded field by field, and
stat-logger plugins (``vllm.stat_logger_plugins``) only receive those; vLLM 0.26.0 offers a plugin no
field to carry its own counters. So the engine core logs them, under vLLM's logger (INFO):

    kitty KV cache: 27 staging blocks held by requests, 1520 pages packed

at most once per ``VLLM_LOG_STATS_INTERVAL`` seconds (vLLM's stats interval, 10 s by default) while
the numbers change, plus one line as soon as the last staging block is released, so the last line of an
idle server always reads 0 staging blocks. An idle server logs nothing.
"""

from __future__ import annotations

import re
import time
import weakref

import vllm.envs as envs
from vllm.logger import init_logger

# Under vLLM's "vllm" logger, so the line reaches vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = init_logger(f"vllm.{__name__}")

LOG_LINE = "kitty KV cache: %d staging blocks held by requests, %d pages packed"
LOG_LINE_PATTERN = re.compile(r"kitty KV cache: (\d+) staging blocks held by requests, (\d+) pages packed")


class KittyKVStats:
    """The counters of one block pool (one engine), updated by its kitty block managers."""

    def __init__(self) -> None:
        self.staging_blocks_held = 0
        self.pages_packed = 0
        self._interval_s = envs.VLLM_LOG_STATS_INTERVAL
        self._logged: tuple[int, int] = (0, 0)
        self._logged_at = time.monotonic()

    def add_staging_blocks(self, count: int) -> None:
        self.staging_blocks_held += count

    def add_pages_packed(self, count: int) -> None:
        self.pages_packed += count

    def log(self) -> None:
        """Log the counters if they changed, at most once per interval, or at once on draining to 0.

        Called where the counts are consistent: when a scheduler step starts (between the step
        before, and its frees, and this one) and when a request frees its staging blocks.
        """
        now = time.monotonic()
        state = (self.staging_blocks_held, self.pages_packed)
        drained = self.staging_blocks_held == 0 and self._logged[0] != 0
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
