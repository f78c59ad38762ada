"""Kitty's KV-cache specs and block managers: true bytes per page, and the full-precision staging
blocks (sinks and the window of newest tokens) as a second vLLM KV-cache group sharing the one block pool."""

from kitty_vllm.block_manager.manager import (
    KittyPackedManager,
    KittySlidingWindowManager,
    KittyStageManager,
    register_kv_cache_managers,
)
from kitty_vllm.block_manager.spec import (KittyPackedSpec, KittySlidingWindowSpec, KittyStageSpec, kitty_specs,
                                         layer_kitty_config)

__all__ = [
    "KittyPackedManager",
    "KittyPackedSpec",
    "KittySlidingWindowManager",
    "KittySlidingWindowSpec",
    "KittyStageManager",
    "KittyStageSpec",
    "kitty_specs",
    "layer_kitty_config",
    "register_kv_cache_managers",
]
