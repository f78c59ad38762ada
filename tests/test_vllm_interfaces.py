"""The vLLM internals that kitty_vllm overrides or wraps still have the signatures it was written for.

A vLLM release that renames or adds a parameter of one of them fails here, naming the function, instead
of deep inside an engine start (or silently, where kitty's override would shadow a new argument).

* Every method a kitty class overrides takes the parameters of the vLLM method it overrides, by name
  and kind, in order (kitty may add defaults, never drop or rename a parameter).
* Every vLLM function that kitty_vllm.patches wraps or calls by keyword has the parameters the patch
  passes.

A signature cannot show a change of behaviour, such as vLLM 0.33 checking cache dtypes against a list
copied at import (patch 1): test_vllm_versions.py builds what vLLM builds from kitty's dtypes.
"""

import inspect

import pytest

from kitty_vllm.backend import KittyAttentionBackend, KittyAttentionImpl, KittyMetadataBuilder
from kitty_vllm.block_manager import KittyPackedManager, KittySlidingWindowManager, KittyStageManager
from kitty_vllm.stage import KittyStageBackend, KittyStageCache, KittyStageMetadataBuilder
from kitty_vllm.warmup import warmup_kernel

KITTY_CLASSES = (KittyPackedManager, KittyStageManager, KittySlidingWindowManager, KittyAttentionBackend,
                 KittyAttentionImpl, KittyMetadataBuilder, KittyStageBackend, KittyStageCache,
                 KittyStageMetadataBuilder, type(warmup_kernel()))


def _overrides():
    """(kitty class, method name, the vLLM class it overrides it from)."""
    for cls in KITTY_CLASSES:
        for name, member in vars(cls).items():
            if not callable(getattr(cls, name)) or name.startswith("__") and name != "__init__":
                continue
            base = next((b for b in cls.__mro__[1:] if name in vars(b) and b.__module__.startswith("vllm.")), None)
            if base is not None:
                yield pytest.param(cls, name, base, id=f"{cls.__name__}.{name}")


def _parameters(function) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@pytest.mark.parametrize("cls, name, base", list(_overrides()))
def test_overrides_take_the_parameters_of_vllm(cls, name, base):
    ours, theirs = _parameters(getattr(cls, name)), _parameters(getattr(base, name))
    passes_the_rest = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(getattr(cls, name)).parameters.values())
    # (self, spec, **kwargs) hands what it does not name to vLLM's method: only the named ones must match.
    expected = theirs[:len(ours)] if passes_the_rest else theirs
    assert ours[:len(expected)] == expected, (
        f"{base.__module__}.{base.__qualname__}.{name} is now {inspect.signature(getattr(base, name))}; "
        f"kitty's {cls.__qualname__}.{name} has {inspect.signature(getattr(cls, name))}")


def _vllm(path: str):
    module, _, qualname = path.partition(":")
    obj = __import__(module, fromlist=["_"])
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# What kitty_vllm.patches (and the block managers) call, with the parameters they rely on.
WRAPPED = {
    "vllm.config.cache:CacheConfig": ["sliding_window", "kv_cache_dtype_skip_layers", "skip_page_size_padded"],
    "vllm.config.vllm:VllmConfig.try_verify_and_update_config": ["self"],
    "vllm.model_executor.layers.attention.attention:Attention.__init__":
        ["self", "cache_config", "per_layer_sliding_window"],
    "vllm.model_executor.layers.attention.attention:Attention.get_kv_cache_spec": ["self", "vllm_config"],
    "vllm.model_executor.warmup.jit_warmup:VllmJitKernel.register_warmup": ["self"],
    "vllm.model_executor.layers.attention.attention:_largest_kernel_block_within":
        ["attn_backend", "per_token_bytes", "page_budget", "fallback", "kv_cache_spec"],
    "vllm.platforms.interface:Platform.get_attn_backend_cls":
        ["selected_backend", "attn_selector_config", "num_heads"],
    "vllm.platforms.interface:Platform.check_and_update_config": ["vllm_config"],
    "vllm.platforms.interface:Platform.update_block_size_for_backend": ["vllm_config"],
    "vllm.platforms.interface:Platform._align_heterogeneous_kv_block_size": ["vllm_config", "backend_cls"],
    "vllm.v1.attention.backend:CommonAttentionMetadata": ["query_start_loc_cpu", "seq_lens_cpu_upper_bound"],
    "vllm.v1.core.block_pool:BlockPool.cache_full_blocks":
        ["self", "request", "blocks", "num_cached_blocks", "num_full_blocks", "block_size", "kv_cache_group_id"],
    "vllm.v1.core.kv_cache_utils:resolve_block_hashes": ["block_hashes", "hash_block_size", "block_size"],
    "vllm.v1.core.single_type_kv_cache_manager:SlidingWindowManager.cache_blocks":
        ["self", "request", "num_tokens", "retention_interval", "replay_boundaries"],
    "vllm.v1.kv_cache_interface:replace_as": ["spec", "target_cls"],
    "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register":
        ["kvcache_spec_cls", "manager_class", "uniform_type_base_spec"],
    "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered": [],
    "vllm.v1.metrics.utils:create_metric_per_engine": ["metric", "per_engine_labelvalues"],
}


@pytest.mark.parametrize("path", sorted(WRAPPED))
def test_wrapped_functions_take_what_kitty_passes(path):
    names = [name for name, _ in _parameters(_vllm(path))]
    missing = [name for name in WRAPPED[path] if name not in names]
    assert not missing, f"{path} is now {inspect.signature(_vllm(path))}: no parameter {missing}"


def test_scheduler_stats_cross_in_engine_core_outputs():
    """Patch 7 re-annotates EngineCoreOutputs.scheduler_stats and copies SchedulerStats' fields."""
    import dataclasses

    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats

    assert "scheduler_stats" in EngineCoreOutputs.__struct_fields__
    assert dataclasses.is_dataclass(SchedulerStats)
    assert "make_stats" in vars(_vllm("vllm.v1.core.sched.scheduler:Scheduler"))
