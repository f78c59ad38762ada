"""Every change kitty_vllm makes to vLLM, in one place, for vLLM 0.32 (``SUPPORTED_VLLM``).

vLLM 0.32 has no plugin hook for a new KV-cache format, so the plugin adapts these points. Each patch
says why it is needed, how it is done, and when it can go. What 0.32 offers and why none of it replaces
a patch: docs/vllm-0.32-map.md (section 1). Its new spec geometry (``tokens_per_state``,
``state_content_bytes``) and ``supported_kv_cache_layouts`` need no patch: kitty's specs and backends
declare them (kitty_vllm.block_manager.spec).

1. ``kv_cache_dtype``: in vLLM 0.32 ``CacheDType`` (vllm/config/cache.py) is a closed ``Literal`` checked
   by pydantic (``CacheConfig.cache_dtype``), by argparse ``choices`` (``engine/arg_utils._compute_kwargs``,
   lru-cached) and by an assert in ``v1/attention/selector.get_attn_backend``. The presets are appended
   to the Literal's arguments in place, ``CacheConfig`` is rebuilt, and the choices cache is cleared.
   ``STR_DTYPE_TO_TORCH_DTYPE`` maps them to uint8 (packed bytes). From 0.33 on, every check reads
   ``KV_CACHE_DTYPES``, a copy of the Literal's arguments made at import, so editing the Literal admits
   nothing; 0.33 also adds the hook that replaces the patch, ``register_kv_cache_dtype``, and kitty
   registers each preset with it (``KittyCacheDType``) wherever it exists. The patch goes with 0.32.
2. Backend selection: CUDA picks no backend for an unknown dtype and the CPU platform always returns
   CPU_ATTN, ignoring ``--attention-backend``. The platform's ``get_attn_backend_cls`` is wrapped to
   return kitty's backend for kitty dtypes (and to refuse models kitty cannot serve, with the reason).
   The backend is registered as ``AttentionBackendEnum.CUSTOM``, the enum slot vLLM keeps for
   out-of-tree backends. Goes when platforms consult registered backends for custom dtypes.
3. ``Attention.get_kv_cache_spec`` hard-codes its spec types (TurboQuant has its own branch); it is
   wrapped to return kitty's packed spec, whose page size is the true compressed size.
4. ``Attention.__init__`` is wrapped to give every kitty decoder layer a staging companion layer
   (``<layer>.kitty_stage``, see kitty_vllm.stage), whose KV-cache group holds the full-precision sinks
   and window of newest tokens, owned and freed by vLLM's KV-cache manager. Before a sliding-window
   layer is built, it adds ``"sliding_window"`` to ``kv_cache_dtype_skip_layers``, so that vLLM keeps
   the layer in the model's dtype (kitty_vllm.block_manager.mixed).
5. The KV-cache manager registry gets managers for both specs (kitty_vllm.block_manager).
6. Every worker must build the same cache as the engine, but a Ray worker on another node (or under the
   older Ray executor, which copies only vLLM's variables) has neither the engine's ``KITTY_CONFIG`` nor
   its file. The platform's ``check_and_update_config``, which ``VllmConfig.__post_init__`` calls in the
   engine's process, is wrapped to resolve the kitty config there (preset, file, ``--additional-config``
   fields; a broken one fails at once, before any worker starts) and to write every field into
   ``additional_config["kitty"]``, which travels to every worker inside the ``VllmConfig``
   (kitty_vllm.config). With speculative decoding it sets ``draft_tokens`` (the ring then holds
   page_size + k tokens, so that rejected drafts overwrite nothing that is still read:
   KittyConfig.ring_slots), keeps the KV cache of draft layers (EAGLE, MTP) in the model's dtype
   (``speculative_config.kv_cache_dtype = "auto"``, beside kitty's pages as in 8) and refuses the
   ``draft_model`` method, whose proposer reads the first KV-cache group's block table. It also drops a
   window that every layer shares (``CacheConfig.sliding_window``: Phi-3's) if it spans max_model_len: it
   excludes no token, and the layers would otherwise all stay in the model's dtype (8). Goes when vLLM
   passes plugin options to workers by itself.
7. Kitty's counters (kitty_vllm.metrics) live in the engine-core process, ``/metrics`` in the API
   server, and the only stats that cross are vLLM's ``SchedulerStats`` (``v1/metrics/stats.py``), a
   fixed dataclass inside the msgspec Struct ``EngineCoreOutputs``, decoded by its declared fields.
   ``Scheduler.make_stats`` is wrapped to return, for kitty dtypes, a ``KittySchedulerStats``: the same
   fields plus a ``kitty`` mapping of the counters. The annotation of ``EngineCoreOutputs.scheduler_stats``
   is set to the subclass before any decoder of it is built (msgspec reads it then), so the API server
   decodes the mapping and ``KittyStatLogger`` (a ``vllm.stat_logger_plugins`` entry point) sets the
   gauges. Goes when ``SchedulerStats`` carries plugin counters.
8. Layers in the model's dtype beside kitty's (sliding-window layers, ``kv_cache_dtype_skip_layers``)
   share the one block pool only if every block has one byte size, and vLLM's way to reach it for a
   quantized dtype (``Platform._align_heterogeneous_kv_block_size``) assumes pages that grow with their
   tokens, which a kitty page does not; the CPU platform does not call it at all. So for kitty dtypes
   it does nothing, and ``Platform.update_block_size_for_backend``, which every worker calls after
   building the model and before the KV-cache specs, is wrapped to set the shared page itself
   (kitty_vllm.block_manager.mixed.share_block_pool). ``Attention.get_kv_cache_spec`` (3) pads kitty's
   blocks and skipped full-attention layers to it; vLLM pads sliding-window layers, which the wrapper
   returns as kitty's subclass of their spec, whose manager keeps the windows kitty's prefix-cache hits
   end on (kitty_vllm.block_manager.manager). Goes when vLLM asks each spec for its page size per block
   instead of per token; the subclass when a kitty group can tell vLLM where its hits end.
9. Hybrid models (Mamba or linear-attention layers: Qwen3-Next, Jamba, Granite 4) prefix-cache their state
   in vLLM's "align" mode, whose hits may end on any 16-token block, and vLLM refuses at start a mix with
   kitty's pages, whose hits end on 128-token pages ("Invalid prefix_match_unit=16 ... alignments=[16,
   128]": ``kv_cache_utils`` checks the Mamba groups' fine-grained hits without asking the other groups'
   managers). ``VllmConfig.try_verify_and_update_config``, where vLLM's per-model hooks choose the Mamba
   cache mode, is wrapped to turn prefix caching off first for kitty dtypes on such a model, with a
   warning, so that the model is served. Goes when kitty's pages can prefix-cache beside aligned Mamba
   state.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import typing

import torch

from kitty_vllm.config import (ADDITIONAL_CONFIG_EXAMPLE, ADDITIONAL_CONFIG_KEY, PRESETS, KittyConfigError,
                               load_config_for)

# Under vLLM's logger, so that vLLM's handler and VLLM_LOGGING_LEVEL apply.
logger = logging.getLogger(f"vllm.{__name__}")

# The releases this version is tested on, a PEP 440 specifier; pyproject.toml requires the same range.
SUPPORTED_VLLM = ">=0.32.0,<0.33"
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

    check_vllm_version(vllm.__version__)
    _extend_cache_dtypes()
    _route_backend_selection()
    _resolve_config_in_the_engine()
    _wrap_attention_layer()
    _share_block_pool_with_model_dtype_layers()
    _no_prefix_caching_on_hybrid_models()
    from kitty_vllm.block_manager import register_kv_cache_managers

    register_kv_cache_managers()
    _carry_kitty_stats()
    _applied = True


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM release outside the tested range, naming the range and how to install it."""
    from packaging.specifiers import SpecifierSet

    spec = SUPPORTED_VLLM
    if not SpecifierSet(spec).contains(version, prereleases=True):
        raise RuntimeError(
            f"kitty_vllm patches vLLM internals and is tested with vllm{spec}, but vLLM {version} is "
            f"installed: pip install 'vllm{spec}', or a kitty_vllm release for your vLLM")


class KittyCacheDType:
    """vLLM's ``KVCacheDTypeHandler`` for a preset (vLLM 0.33 on): ``_extend_cache_dtypes`` registers one
    subclass per preset, naming it in ``name``.

    The storage is packed bytes, so uint8. The quant mode is ``NONE``, which is what vLLM 0.32 computes
    for a dtype it does not know: kitty's backend stores and reads its own pages, and none of vLLM's
    paths for quantized caches (fp8 scales, its own store kernels) may act on them, on any release.
    Not ``KVQuantMode.CUSTOM``, which the handler protocol suggests for backends that dispatch their
    own kernels: in 0.33 and 0.34 it is declared with ``OCTAVE_K3V4``'s value in an ``IntEnum``, so it
    is an alias of ``OCTAVE_K3V4`` and vLLM would take kitty's pages for Octave's.
    """

    name: str

    def torch_dtype(self) -> torch.dtype:
        return torch.uint8

    def quant_mode(self):
        from vllm.v1.kv_cache_interface import KVQuantMode

        return KVQuantMode.NONE


def _extend_cache_dtypes() -> None:
    from vllm.config import cache as cache_module

    # vLLM 0.33 on, told by the hook itself rather than by the version: its checks read KV_CACHE_DTYPES,
    # which only the hook extends.
    if hasattr(cache_module, "register_kv_cache_dtype"):
        for preset in PRESETS:
            handler = type(f"KittyCacheDType[{preset}]", (KittyCacheDType,), {"name": preset})
            cache_module.register_kv_cache_dtype(preset)(handler)
        return

    from pydantic.dataclasses import rebuild_dataclass

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

        from vllm.config import get_current_vllm_config

        config = load_config_for(dtype, get_current_vllm_config())
        reasons = KittyAttentionBackend.unsupported_reasons(attn_selector_config, config)
        if reasons:
            raise ValueError(f"--kv-cache-dtype {dtype} cannot serve this model: {'; '.join(reasons)}")
        return BACKEND_PATH

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _wrap_attention_layer() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    from kitty_vllm.block_manager.mixed import keep_sliding_window_in_model_dtype, spec_beside_kitty_pages

    original_init = Attention.__init__
    original_spec = Attention.get_kv_cache_spec
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        cache_config = arguments.get("cache_config")
        sliding_window = arguments.get("per_layer_sliding_window")
        if sliding_window is None and cache_config is not None:
            sliding_window = cache_config.sliding_window
        keep_sliding_window_in_model_dtype(cache_config, sliding_window)
        original_init(self, *args, **kwargs)
        if is_kitty_dtype(self.kv_cache_dtype) and self.kv_sharing_target_layer_name is None:
            from kitty_vllm.stage import KittyStageCache

            from kitty_vllm.block_manager import layer_kitty_config

            # The layer's own format: its boost ratio with per-layer ratios (KittyConfig.layer_boost).
            self.impl.config = layer_kitty_config(self.impl.config, self.layer_name)
            self.kitty_stage = KittyStageCache(self)
            # Pages per packed block: more on hybrid models (kitty_vllm.block_manager.mixed.fit_blocks_to_state).
            self.kitty_pages_per_block = 1

    @functools.wraps(original_spec)
    def get_kv_cache_spec(self, vllm_config):
        if not is_kitty_dtype(self.kv_cache_dtype):
            return spec_beside_kitty_pages(self, original_spec(self, vllm_config), vllm_config)
        from kitty_vllm.block_manager import kitty_specs, layer_kitty_config

        config = layer_kitty_config(load_config_for(self.kv_cache_dtype, vllm_config), self.layer_name)
        return kitty_specs(config, self.num_kv_heads,
                           self.head_size, self.dtype, shared_page_bytes=vllm_config.cache_config.skip_page_size_padded,
                           pages_per_block=self.kitty_pages_per_block)[0]

    Attention.__init__ = __init__
    Attention.get_kv_cache_spec = get_kv_cache_spec


def _share_block_pool_with_model_dtype_layers() -> None:
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original_update = platform_cls.update_block_size_for_backend
    original_align = platform_cls._align_heterogeneous_kv_block_size

    def update_block_size_for_backend(cls, vllm_config) -> None:
        original_update(vllm_config)
        if is_kitty_dtype(vllm_config.cache_config.cache_dtype):
            from kitty_vllm.block_manager.mixed import share_block_pool

            share_block_pool(vllm_config)

    def _align_heterogeneous_kv_block_size(cls, vllm_config, backend_cls) -> None:
        # Its arithmetic takes pages to grow with tokens; share_block_pool does this for kitty dtypes.
        if not is_kitty_dtype(vllm_config.cache_config.cache_dtype):
            original_align(vllm_config, backend_cls)

    platform_cls.update_block_size_for_backend = classmethod(update_block_size_for_backend)
    platform_cls._align_heterogeneous_kv_block_size = classmethod(_align_heterogeneous_kv_block_size)


def _carry_kitty_stats() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats

    from kitty_vllm.metrics import KittySchedulerStats, kv_stats

    # msgspec reads the annotation when a decoder is built; apply() runs before vLLM builds one.
    EngineCoreOutputs.__annotations__["scheduler_stats"] = KittySchedulerStats | None
    names = [field.name for field in dataclasses.fields(SchedulerStats)]
    original = Scheduler.make_stats

    @functools.wraps(original)
    def make_stats(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        if stats is None or not is_kitty_dtype(self.cache_config.cache_dtype):
            return stats
        gauges = kv_stats(self.kv_cache_manager.block_pool).gauges(self.kv_cache_config.kv_cache_groups)
        return KittySchedulerStats(**{name: getattr(stats, name) for name in names}, kitty=gauges)

    Scheduler.make_stats = make_stats


def _resolve_config_in_the_engine() -> None:
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config

    def check_and_update_config(cls, vllm_config) -> None:
        original(vllm_config)
        dtype = vllm_config.cache_config.cache_dtype
        if not is_kitty_dtype(dtype):
            return
        if not isinstance(vllm_config.additional_config, dict):
            raise KittyConfigError(
                f"--kv-cache-dtype {dtype} keeps its options in --additional-config as a JSON mapping "
                f"(for example '{ADDITIONAL_CONFIG_EXAMPLE}'), not {type(vllm_config.additional_config).__name__}")
        config = load_config_for(dtype, vllm_config)
        _full_attention_under_a_window_longer_than_requests(vllm_config)
        speculative = vllm_config.speculative_config
        if speculative is not None:
            if speculative.uses_draft_model():
                raise ValueError(
                    f"--kv-cache-dtype {dtype} does not support speculative method 'draft_model': vLLM's draft-model "
                    "proposer addresses its cache through the first KV-cache group's block table, which with "
                    "kitty holds the packed pages, not the draft's layers. Speculate with an EAGLE or MTP head "
                    "(method eagle, eagle3 or mtp) or without draft layers (ngram, suffix), or serve the draft "
                    "model with --kv-cache-dtype auto or fp8")
            if speculative.uses_draft_kv_cache():
                if is_kitty_dtype(speculative.kv_cache_dtype):
                    raise ValueError(
                        f"speculative kv_cache_dtype {speculative.kv_cache_dtype}: the draft layers of speculative "
                        f"method {speculative.method!r} cannot keep their KV cache in kitty pages yet. Leave it "
                        "unset (they then keep the model's dtype) or set auto or fp8 in --speculative-config")
                if speculative.kv_cache_dtype is None:
                    # A draft head is one or a few layers: its cache is small, and it only proposes.
                    speculative.kv_cache_dtype = "auto"
                    logger.info("--kv-cache-dtype %s: the draft layers of speculative method %r keep their KV "
                                "cache in the model's dtype", dtype, speculative.method)
            config = config.replace(draft_tokens=speculative.num_speculative_tokens)
        if config.layer_boost:
            _pages_of_each_layers_size(vllm_config, config)
        # A new mapping: the one given may be the caller's (EngineArgs.additional_config).
        vllm_config.additional_config = {**vllm_config.additional_config,
                                         ADDITIONAL_CONFIG_KEY: dataclasses.asdict(config)}

    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def _pages_of_each_layers_size(vllm_config, config: KittyConfig) -> None:
    """Per-layer boost ratios (KittyConfig.layer_boost) give each layer a page of its own size. Check that the
    ratios are the model's, and choose vLLM's block-outermost KV-cache layout, the one in which vLLM packs the
    pages of different sizes side by side in each block, so that a block costs the sum of the layers' pages
    (a layer-outermost layout would pad every page to the largest)."""
    from vllm import envs

    from kitty_vllm.block_manager.spec import PACKED_LAYOUT

    dtype, model_config = vllm_config.cache_config.cache_dtype, vllm_config.model_config
    num_layers = model_config.get_total_num_hidden_layers()
    fix = ("calibrate a profile for this model with python -m kitty_vllm.tools.calibrate and set layer_boost to it, "
           "or leave layer_boost unset")
    if len(config.layer_boost) != num_layers:
        raise KittyConfigError(f"--kv-cache-dtype {dtype}: layer_boost has {len(config.layer_boost)} ratios, but "
                               f"{model_config.model} has {num_layers} layers: {fix}")
    cache_config = vllm_config.cache_config
    layer_types = getattr(model_config.hf_text_config, "layer_types", None) or ()
    if (model_config.is_hybrid or cache_config.kv_cache_dtype_skip_layers or cache_config.sliding_window is not None
            or "sliding_attention" in layer_types):
        raise KittyConfigError(f"--kv-cache-dtype {dtype}: layer_boost is not supported yet beside layers that kitty "
                               "does not store in its pages (Mamba or linear-attention layers, sliding-window "
                               "layers, kv_cache_dtype_skip_layers), whose blocks would pad every page to the "
                               f"largest: leave layer_boost unset for {model_config.architecture}")
    requested = cache_config.kv_cache_layout or envs.VLLM_KV_CACHE_LAYOUT
    if requested not in (None, PACKED_LAYOUT.name):
        raise KittyConfigError(f"--kv-cache-dtype {dtype}: layer_boost needs vLLM's KV-cache layout "
                               f"{PACKED_LAYOUT.name} (pages of each layer's size packed in one block), not "
                               f"{requested}: unset VLLM_KV_CACHE_LAYOUT, or leave layer_boost unset")
    cache_config.kv_cache_layout = PACKED_LAYOUT.name
    logger.info("--kv-cache-dtype %s: layer_boost gives each of the %d layers its own boost ratio (%s of head_dim), "
                "in pages of its own size, which vLLM packs side by side in each block (KV-cache layout %s)", dtype,
                num_layers, "/".join(f"{r:g}" for r in sorted(set(config.layer_boost))), PACKED_LAYOUT.name)


def _no_prefix_caching_on_hybrid_models() -> None:
    from vllm.config import VllmConfig

    original = VllmConfig.try_verify_and_update_config

    @functools.wraps(original)
    def try_verify_and_update_config(self):
        cache_config, model_config = self.cache_config, self.model_config
        if (model_config is not None and is_kitty_dtype(cache_config.cache_dtype) and model_config.is_hybrid
                and cache_config.enable_prefix_caching):
            logger.warning("--kv-cache-dtype %s: prefix caching is off for %s, a hybrid model: vLLM prefix-caches "
                           "its Mamba or linear-attention state in 16-token steps, which kitty's 128-token pages "
                           "cannot follow yet", cache_config.cache_dtype, model_config.architecture)
            cache_config.enable_prefix_caching = False
        return original(self)

    VllmConfig.try_verify_and_update_config = try_verify_and_update_config


def _full_attention_under_a_window_longer_than_requests(vllm_config) -> None:
    """A window that every layer shares (``CacheConfig.sliding_window``, which vLLM sets for models without
    ``layer_types``: Phi-3-mini-128k, Phi-3.5-mini and Phi-4-mini declare 262144 tokens) of at least
    max_model_len tokens excludes no token of any request: every layer is full attention. Drop it, so that
    the layers are stored in kitty pages, not kept in the model's dtype as sliding-window layers
    (kitty_vllm.block_manager.mixed), which would leave kitty nothing to store."""
    cache_config, max_model_len = vllm_config.cache_config, vllm_config.model_config.max_model_len
    if cache_config.sliding_window is not None and cache_config.sliding_window >= max_model_len:
        logger.info("--kv-cache-dtype %s: the model's %d-token sliding window spans max_model_len (%d tokens), so "
                    "its layers are full attention, in kitty pages", cache_config.cache_dtype,
                    cache_config.sliding_window, max_model_len)
        cache_config.sliding_window = None
