"""Every change kitty_vllm makes to vLLM, in one place, for vLLM 0.26.0 only.

vLLM 0.26.0 has no plugin hook for a new KV-cache format, so the plugin adapts these points. Each
patch says why it is needed, how it is done, and when it can go.

1. ``kv_cache_dtype``: ``CacheDType`` (vllm/config/cache.py) is a closed ``Literal`` checked by pydantic
   (``CacheConfig.cache_dtype``), by argparse ``choices`` (``engine/arg_utils._compute_kwargs``,
   lru-cached) and by an assert in ``v1/attention/selector.get_attn_backend``. The presets are appended
   to the Literal's arguments in place, ``CacheConfig`` is rebuilt, and the choices cache is cleared.
   ``STR_DTYPE_TO_TORCH_DTYPE`` maps them to uint8 (packed bytes). Goes when vLLM accepts
   plugin-registered cache dtypes.
2. Backend selection: CUDA picks no backend for an unknown dtype and the CPU platform always returns
   CPU_ATTN, ignoring ``--attention-backend``. The platform's ``get_attn_backend_cls`` is wrapped to
   return kitty's backend for kitty dtypes (and to refuse models kitty cannot serve, with the reason).
   The backend is registered as ``AttentionBackendEnum.CUSTOM``, the enum slot vLLM keeps for
   out-of-tree backends. Goes when platforms consult registered backends for custom dtypes.
3. ``Attention.get_kv_cache_spec`` hard-codes its spec types (TurboQuant has its own branch); it is
   wrapped to return kitty's packed spec, whose page size is the true compressed size.
4. ``Attention.__init__`` is wrapped to give every kitty decoder layer a staging companion layer
   (``<layer>.kitty_stage``, see kitty_vllm.stage), whose KV-cache group holds the full-precision sinks
   and window of newest tokens, owned and freed by vLLM's KV-cache manager.
5. The KV-cache manager registry gets managers for both specs (kitty_vllm.block_manager).
6. Ray workers build the KV-cache specs, so they must read the same ``KITTY_CONFIG`` as the engine.
   vLLM's default Ray executor (``RayExecutorV2``) hands them the driver's whole environment, but the
   older one (``VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0``) copies only vLLM's own variables
   (``vllm/ray/ray_env.py``). The name is added to ``DEFAULT_EXTRA_ENV_VARS``, the set it copies besides.
   Goes with that executor (until then ``VLLM_RAY_EXTRA_ENV_VARS_TO_COPY=KITTY_CONFIG`` does the same).
"""

from __future__ import annotations

import functools
import logging
import typing

import torch

from kitty_vllm.config import CONFIG_FILE_ENV, PRESETS, load_config

logger = logging.getLogger(__name__)

SUPPORTED_VLLM_VERSION = "0.26.0"
BACKEND_PATH = "kitty_vllm.backend.KittyAttentionBackend"
_applied = False


def is_kitty_dtype(kv_cache_dtype: object) -> bool:
    return isinstance(kv_cache_dtype, str) and kv_cache_dtype in PRESETS


def apply() -> None:
    """Apply every patch once per process (vLLM loads plugins several times per process)."""
    global _applied
    if _applied:
        return
    import vllm

    if vllm.__version__ != SUPPORTED_VLLM_VERSION:
        raise RuntimeError(
            f"kitty_vllm patches vLLM {SUPPORTED_VLLM_VERSION} internals, but vLLM {vllm.__version__} is "
            f"installed: install vllm=={SUPPORTED_VLLM_VERSION} or a kitty_vllm release for your vLLM")
    _extend_cache_dtypes()
    _route_backend_selection()
    _wrap_attention_layer()
    _copy_config_to_ray_workers()
    from kitty_vllm.block_manager import register_kv_cache_managers

    register_kv_cache_managers()
    _applied = True


def _extend_cache_dtypes() -> None:
    from pydantic.dataclasses import rebuild_dataclass

    from vllm.config import cache as cache_module
    from vllm.engine import arg_utils
    from vllm.utils import torch_utils

    literal = cache_module.CacheDType
    missing = tuple(p for p in PRESETS if p not in typing.get_args(literal))
    if missing:
        literal.__args__ = literal.__args__ + missing
    rebuild_dataclass(cache_module.CacheConfig, force=True)
    arg_utils._compute_kwargs.cache_clear()
    for preset in PRESETS:
        torch_utils.STR_DTYPE_TO_TORCH_DTYPE[preset] = torch.uint8


def _route_backend_selection() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        dtype = attn_selector_config.kv_cache_dtype
        if not is_kitty_dtype(dtype):
            return original(selected_backend, attn_selector_config, num_heads)
        from kitty_vllm.backend import KittyAttentionBackend

        config = load_config(dtype)  # a broken KITTY_CONFIG file fails here, naming file and field
        reasons = KittyAttentionBackend.unsupported_reasons(attn_selector_config, config)
        if reasons:
            raise ValueError(f"--kv-cache-dtype {dtype} cannot serve this model: {'; '.join(reasons)}")
        return BACKEND_PATH

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _wrap_attention_layer() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    original_init = Attention.__init__
    original_spec = Attention.get_kv_cache_spec

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if is_kitty_dtype(self.kv_cache_dtype) and self.kv_sharing_target_layer_name is None:
            from kitty_vllm.stage import KittyStageCache

            self.kitty_stage = KittyStageCache(self)

    @functools.wraps(original_spec)
    def get_kv_cache_spec(self, vllm_config):
        if not is_kitty_dtype(self.kv_cache_dtype):
            return original_spec(self, vllm_config)
        from kitty_vllm.block_manager import kitty_specs

        return kitty_specs(load_config(self.kv_cache_dtype), self.num_kv_heads, self.head_size,
                           self.dtype)[0]

    Attention.__init__ = __init__
    Attention.get_kv_cache_spec = get_kv_cache_spec


def _copy_config_to_ray_workers() -> None:
    from vllm.ray import ray_env

    ray_env.DEFAULT_EXTRA_ENV_VARS.add(CONFIG_FILE_ENV)
