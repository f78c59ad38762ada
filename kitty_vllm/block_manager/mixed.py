"""Models whose attention layers are not all kitty layers: sliding-window layers, and layers that
``kv_cache_dtype_skip_layers`` names, stay in the model's dtype beside kitty's pages.

Choice: with a kitty dtype, sliding-window layers are kept in the model's dtype, as vLLM's
``kv_cache_dtype_skip_layers=["sliding_window"]`` does for its own quantized formats. Their window (128
to 4096 tokens in Gemma 2/3, gpt-oss, Mistral) holds a few pages at most, and vLLM's sliding-window
manager frees what leaves it, so the full-attention layers, which hold all of the context, are where a
2-bit cache pays. A model whose every layer stays in the model's dtype (Mistral 7B v0.1) is served as
``auto`` would serve it, with a warning that kitty stores nothing.

How the two share vLLM's one block pool. Every block of the pool has one byte size. A kitty block
cannot hold more tokens to grow (it is one 128-token page per KV head), and a kitty page is never a whole
multiple or divisor of a bf16 or float32 page (its metadata sections make it 16 x an odd number of
bytes), so pages must be padded. Left to itself, vLLM 0.32 pads every page to the largest whatever it
costs (on the CPU a 128-token float32 block padded kitty's pages 12-fold). So kitty chooses the shared
page: at least a kitty page and the smallest block (the backend's smallest kernel block) of every
model-dtype layer, and among that and whole model-dtype blocks up to MAX_PAGE_GROWTH times it, the one
that makes a request of max_model_len tokens smallest by vLLM's own accounting (each spec's
``max_memory_usage_bytes``). vLLM's skip-layer path (``CacheConfig.skip_page_size_padded``) pads
sliding-window layers to it, with the most tokens per block that fit, and kitty pads its packed and
staging blocks and skipped full-attention layers the same way. Padding is counted in every spec's page
size, so vLLM's "Maximum concurrency" stays honest. What it costs per model: docs/models.md.

Prefix caching: a sliding-window layer beside kitty's pages gets kitty's subclass of vLLM's spec
(KittySlidingWindowSpec), the same bytes, whose manager also keeps the window where a kitty hit on a
repeated prompt ends, a page before vLLM's own (kitty_vllm.block_manager.manager).

Mamba and linear-attention layers are not attention layers here: vLLM keeps their state as it is, one
block per request, and gives every block the size of the largest page: a kitty block then holds several
pages (fit_blocks_to_state), rather than one page padded to the state's block.
"""

from __future__ import annotations

from dataclasses import replace

from vllm.logger import init_logger
from vllm.v1.attention.backend import MultipleOf

# Under vLLM's "vllm" logger, so the line reaches vLLM's handler, format and VLLM_LOGGING_LEVEL.
logger = init_logger(f"vllm.{__name__}")

SLIDING_WINDOW = "sliding_window"
# The largest shared page tried, as a multiple of the smallest that fits every layer.
MAX_PAGE_GROWTH = 4


def keep_sliding_window_in_model_dtype(cache_config, sliding_window: int | None) -> None:
    """Before a sliding-window layer is built with a kitty dtype, add ``"sliding_window"`` to
    ``kv_cache_dtype_skip_layers``, so vLLM gives it the model's dtype as for any skipped layer."""
    from kitty_vllm.patches import is_kitty_dtype

    if (cache_config is not None and sliding_window is not None and is_kitty_dtype(cache_config.cache_dtype)
            and SLIDING_WINDOW not in cache_config.kv_cache_dtype_skip_layers):
        cache_config.kv_cache_dtype_skip_layers = [*cache_config.kv_cache_dtype_skip_layers, SLIDING_WINDOW]


def _smallest_block_tokens(layer, spec) -> int:
    sizes = layer.get_attn_backend().get_supported_kernel_block_sizes(spec)
    return min(size.base if isinstance(size, MultipleOf) else size for size in sizes)


def share_block_pool(vllm_config) -> None:
    """Set the shared page (``cache_config.skip_page_size_padded``) of a kitty model with layers in
    the model's dtype, after the model is built and before the KV-cache specs are (the platform's
    ``update_block_size_for_backend``, in every worker); log the mix once (a warning if no layer is left
    in kitty pages)."""
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backend import AttentionType

    from kitty_vllm.patches import is_kitty_dtype

    cache_config = vllm_config.cache_config
    dtype = cache_config.cache_dtype
    layers = [layer for layer in vllm_config.compilation_config.static_forward_context.values()
              if isinstance(layer, Attention) and layer.attn_type == AttentionType.DECODER
              and layer.kv_sharing_target_layer_name is None]
    kitty = [layer for layer in layers if is_kitty_dtype(layer.kv_cache_dtype)]
    plain = [layer for layer in layers if not is_kitty_dtype(layer.kv_cache_dtype)]
    fit_blocks_to_state(vllm_config, kitty, plain)
    if not plain:
        return
    sliding = sum(layer.sliding_window is not None for layer in plain)
    skipped = f"kv_cache_dtype_skip_layers={cache_config.kv_cache_dtype_skip_layers}"
    if not kitty:
        windows = sorted({layer.sliding_window for layer in plain if layer.sliding_window is not None})
        disable = (f" With --disable-sliding-window every layer is full attention in kitty pages, and vLLM caps "
                   f"--max-model-len at the window ({windows[-1]} tokens).") if windows else ""
        logger.warning(
            "--kv-cache-dtype %s stores none of this model's %d attention layers in kitty pages (%d sliding-window "
            "layers, which kitty keeps in the model's dtype; %d others skipped by %s): its KV cache holds what "
            "--kv-cache-dtype auto holds.%s", dtype, len(plain), sliding, len(plain) - sliding, skipped, disable)
        return
    cache_config.skip_page_size_padded = None
    kitty_pages = {layer.get_kv_cache_spec(vllm_config).page_size_bytes for layer in kitty}
    plain_blocks = set()     # (bytes per token, smallest block in tokens) of each layer in the model's dtype
    for layer in plain:
        spec = layer.get_kv_cache_spec(vllm_config)
        plain_blocks.add((spec.real_page_size_bytes // spec.block_size, _smallest_block_tokens(layer, spec)))
    smallest = max(kitty_pages | {token_bytes * tokens for token_bytes, tokens in plain_blocks})
    # A larger page holds more model-dtype tokens per block, with less padding, but pads kitty's pages
    # more: try whole blocks of each model-dtype layer up to MAX_PAGE_GROWTH x the smallest page.
    candidates = {smallest} | {token_bytes * tokens * n for token_bytes, tokens in plain_blocks
                               for n in range(1, MAX_PAGE_GROWTH * smallest // (token_bytes * tokens) + 1)
                               if token_bytes * tokens * n > smallest}

    def request_bytes(page: int) -> int:
        cache_config.skip_page_size_padded = page
        specs = [layer.get_kv_cache_spec(vllm_config) for layer in layers]
        specs += [layer.kitty_stage.get_kv_cache_spec(vllm_config) for layer in kitty]
        return sum(spec.max_memory_usage_bytes(vllm_config) for spec in specs)

    shared = min(sorted(candidates), key=request_bytes)
    cache_config.skip_page_size_padded = shared
    logger.info(
        "--kv-cache-dtype %s stores %d of %d attention layers in kitty pages and %d in the model's dtype %s "
        "(%d sliding-window, %d others skipped by %s). Every KV-cache block is padded to %d bytes (kitty page "
        "%s; model-dtype blocks of %s bytes per token), the page that makes a request of max_model_len "
        "tokens smallest", dtype, len(kitty), len(layers), len(plain), vllm_config.model_config.dtype, sliding,
        len(plain) - sliding, skipped, shared, "/".join(map(str, sorted(kitty_pages))),
        "/".join(str(token_bytes) for token_bytes, _ in sorted(plain_blocks)))


def fit_blocks_to_state(vllm_config, kitty, plain) -> None:
    """Mamba and linear-attention layers keep their recurrent state untouched, one block per request, and
    vLLM gives every block of the pool one size, at least that state's: a kitty block of one 128-token
    page would be padded to it (25x on Qwen3-Next). So on such a model a kitty block holds the fewest whole
    pages that cover the state's block (KittyPackedSpec), and vLLM pads the state's block to it, by less
    than a page. Not beside layers in the model's dtype (``plain``), whose shared page may pad kitty's
    blocks: a padded block of several pages is not a run of whole pages (kitty_vllm.paged), so there each
    kitty page is padded to the state's block, with a warning."""
    from vllm.model_executor.layers.mamba.abstract import MambaBase

    states = [layer.get_kv_cache_spec(vllm_config) for layer in
              vllm_config.compilation_config.static_forward_context.values() if isinstance(layer, MambaBase)]
    state_page = max((spec.page_size_bytes for spec in states if spec is not None), default=0)
    for layer in kitty:
        layer.kitty_pages_per_block = layer.kitty_stage.kitty_pages_per_block = 1
        page = layer.get_kv_cache_spec(vllm_config).real_page_size_bytes
        if not plain:
            layer.kitty_pages_per_block = layer.kitty_stage.kitty_pages_per_block = max(1, -(-state_page // page))
    if kitty and state_page and plain:
        logger.warning("--kv-cache-dtype %s: this model's Mamba or linear-attention state takes a %d-byte block per "
                       "layer and request, and beside its layers in the model's dtype every kitty page is padded to "
                       "it", vllm_config.cache_config.cache_dtype, state_page)
    elif kitty and state_page:
        spec = kitty[0].get_kv_cache_spec(vllm_config)
        logger.info("--kv-cache-dtype %s: this model's Mamba or linear-attention state takes a %d-byte block per "
                    "layer and request; a kitty block holds %d pages (%d tokens, %d bytes), so that blocks of one "
                    "size serve both", vllm_config.cache_config.cache_dtype, state_page, spec.pages_per_block,
                    spec.block_size, spec.page_size_bytes)


def spec_beside_kitty_pages(layer, spec, vllm_config):
    """The spec of a layer in the model's dtype beside kitty's pages (the shared page is set): a
    full-attention layer that ``kv_cache_dtype_skip_layers`` keeps in the model's dtype in a block padded
    to the shared page with the most tokens that fit (vLLM pads only sliding-window layers); with a kitty
    dtype, a sliding-window layer as a KittySlidingWindowSpec. Other specs are returned as they are."""
    from vllm.model_executor.layers.attention.attention import _largest_kernel_block_within
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec, replace_as

    from kitty_vllm.block_manager.spec import KittySlidingWindowSpec
    from kitty_vllm.patches import is_kitty_dtype

    shared = vllm_config.cache_config.skip_page_size_padded
    if shared is None:
        return spec
    if type(spec) is SlidingWindowSpec and is_kitty_dtype(vllm_config.cache_config.cache_dtype):
        return replace_as(spec, KittySlidingWindowSpec)
    if type(spec) is not FullAttentionSpec or spec.page_size_bytes == shared:
        return spec
    per_token = spec.real_page_size_bytes // spec.block_size
    block = _largest_kernel_block_within(layer.get_attn_backend(), per_token, shared, spec.block_size, spec)
    return replace(spec, block_size=block, page_size_padded=shared)
