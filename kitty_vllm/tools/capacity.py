"""KV-cache bytes per request of real models' layer mixes, with ``auto`` (bf16) and a kitty dtype, as
vLLM 0.32 sizes them on a GPU: the table of docs/models.md.

    python -m kitty_vllm.tools.capacity [--tokens 32768] [--preset kitty2]

Each model is its shape only (layer kinds, KV heads, head size, window, recurrent state), from its
published config.json. What a request of ``--tokens`` tokens holds, in blocks of the pool's one page:

* ``auto``: full-attention layers every token, sliding-window layers the window plus one step's tokens
  (``--step-tokens``, vLLM's admission bound) and a block, in 16-token blocks (FlashAttention's kernel
  block); a model with Mamba or linear-attention layers grows its attention blocks until their page
  covers one layer's recurrent state, which is padded to that page (vLLM's
  ``Platform._align_hybrid_block_size``), one state block per such layer.
* the kitty dtype: full-attention layers in kitty pages (a 128-token page per KV head) plus their
  staging blocks (kitty_vllm.layout.StageLayout); sliding-window layers, and the full-attention layers
  that ``kv_cache_dtype_skip_layers`` names (``skipped``), in bf16, every token in the blocks of most
  tokens that fit the shared page; every block padded to one shared page, at least a kitty block, a
  16-token bf16 block and the recurrent state, chosen as kitty_vllm.block_manager.mixed chooses it
  (vLLM pads Mamba pages itself). A kitty block is one page, or on a model with Mamba or linear-attention
  layers the fewest whole pages that cover the recurrent state's block (pages_per_block). ``lagged_values`` (issue 30's value lag, kitty_vllm.tools.levers): that
  many more of a request's newest Values per full-attention layer in full precision beside the ring, in
  staging blocks, which hold twice as many Values alone as they hold tokens.

Both count vLLM's padding of its KV-cache groups to equal numbers of layers (vllm_layer_counts). The
capacity ratio is ``auto``'s bytes over the kitty dtype's: how many more requests of that length fit in the
same memory. ``benchmarks/model_capacity.py`` measures vLLM's own figures for these shapes beside these.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kitty_vllm.block_manager.mixed import MAX_PAGE_GROWTH
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import model_page_layouts, page_layout, stage_layout

BF16_BYTES = 2
KERNEL_BLOCK = 16      # FlashAttention's (and Triton's) smallest kernel block, in tokens
STEP_TOKENS = 8192     # vLLM's default max_num_batched_tokens for vllm serve on a GPU


@dataclass(frozen=True)
class ModelShape:
    """The KV-cache shape of one model. ``state_bytes``: one Mamba / linear-attention layer's
    recurrent state per request (convolution and SSM state, bf16). ``note``: what the layer mix alone
    decides (which features a model needs from kitty's kernels is docs/models.md's first table)."""

    model: str
    family: str
    full: int
    kv_heads: int
    head_dim: int
    sliding: int = 0
    window: int = 0
    state_layers: int = 0
    state_bytes: int = 0
    note: str = ""

    @property
    def layers(self) -> str:
        kinds = [f"{self.full} full"]
        if self.sliding:
            kinds.append(f"{self.sliding} sliding ({self.window})")
        if self.state_layers:
            kinds.append(f"{self.state_layers} linear")
        return " + ".join(kinds) + f"; {self.kv_heads} KV heads x {self.head_dim}"


def gated_delta_net_state(key_heads: int, value_heads: int, key_dim: int, value_dim: int, conv_kernel: int) -> int:
    """Bytes of one Gated DeltaNet layer's state per request: [value_heads, key_dim, value_dim] plus the
    convolution's last ``conv_kernel - 1`` inputs of the q, k and v channels, bf16."""
    conv_channels = 2 * key_heads * key_dim + value_heads * value_dim
    return (value_heads * key_dim * value_dim + (conv_kernel - 1) * conv_channels) * BF16_BYTES


# Shapes from the models' config.json files.
MODELS = (
    ModelShape("Llama-3.1-8B", "Llama 3", full=32, kv_heads=8, head_dim=128),
    ModelShape("Gemma-3-4B", "Gemma 3", full=5, sliding=29, window=1024, kv_heads=4, head_dim=256),
    ModelShape("Gemma-3-12B", "Gemma 3", full=8, sliding=40, window=1024, kv_heads=8, head_dim=256),
    ModelShape("Gemma-3-27B", "Gemma 3", full=10, sliding=52, window=1024, kv_heads=16, head_dim=128),
    ModelShape("Gemma-2-9B", "Gemma 2", full=21, sliding=21, window=4096, kv_heads=8, head_dim=256),
    ModelShape("Mistral-7B-v0.1", "Mistral", full=0, sliding=32, window=4096, kv_heads=8, head_dim=128,
               note="served as auto serves it (a warning says so)"),
    ModelShape("Mistral-7B-v0.3", "Mistral", full=32, kv_heads=8, head_dim=128),
    ModelShape("gpt-oss-20b", "gpt-oss", full=12, sliding=12, window=128, kv_heads=8, head_dim=64),
    ModelShape("Qwen3-Next-80B-A3B", "Qwen3-Next", full=12, kv_heads=2, head_dim=256, state_layers=36,
               state_bytes=gated_delta_net_state(16, 32, 128, 128, 4)),
    ModelShape("Phi-3-mini-128k", "Phi-3", full=32, kv_heads=32, head_dim=96,
               note="its 262144-token window spans the context: full attention"),
)
# The models of the accuracy evaluation (kitty_vllm.tools.assets), for the studies of docs/accuracy.md.
EVAL_MODELS = (
    ModelShape("SmolLM2-135M", "Llama", full=30, kv_heads=3, head_dim=64),
    ModelShape("Qwen2.5-Coder-1.5B", "Qwen2.5", full=28, kv_heads=2, head_dim=128),
)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sliding_blocks(shape: ModelShape, block: int, tokens: int, step_tokens: int) -> int:
    return _cdiv(min(shape.window - 1 + step_tokens, tokens), block) + 1


def vllm_layer_counts(counts: list[int]) -> list[int]:
    """The layers of each kind (each KV-cache spec that vLLM groups apart) as vLLM 0.32 allocates them: with
    two kinds or more, every kind is padded to whole groups of one size, the fewest layers of a kind, or the
    most where that is under 1.5 times the fewest (``kv_cache_utils._get_kv_cache_groups_uniform_page_size``;
    Gemma-3-27B's 52 sliding-window layers are held as 60 beside its 10 full-attention layers)."""
    kinds = [count for count in counts if count]
    if len(kinds) < 2:
        return counts
    group = min(kinds) if max(kinds) >= 1.5 * min(kinds) else max(kinds)
    return [_cdiv(count, group) * group for count in counts]


def auto_bytes(shape: ModelShape, tokens: int, step_tokens: int = STEP_TOKENS, kernel_block: int = KERNEL_BLOCK) -> int:
    """KV-cache bytes one request of ``tokens`` tokens holds with ``--kv-cache-dtype auto`` (bf16);
    ``kernel_block``: the attention backend's smallest block (16 on a GPU, 32 for vLLM's CPU backend)."""
    token_bytes = 2 * shape.kv_heads * shape.head_dim * BF16_BYTES
    block = kernel_block * _cdiv(shape.state_bytes, kernel_block * token_bytes) if shape.state_bytes else kernel_block
    full, sliding, state = vllm_layer_counts([shape.full, shape.sliding, shape.state_layers])
    blocks = full * _cdiv(tokens, block) + state
    if shape.sliding:
        blocks += sliding * _sliding_blocks(shape, block, tokens, step_tokens)
    return blocks * block * token_bytes


def state_page(shape: ModelShape, kernel_block: int = KERNEL_BLOCK) -> int:
    """A Mamba or linear-attention layer's block: its state, padded by vLLM to its uint8 attention block."""
    uint8_token = 2 * shape.kv_heads * shape.head_dim
    return kernel_block * _cdiv(shape.state_bytes, kernel_block * uint8_token) * uint8_token


def pages_per_block(shape: ModelShape, config: KittyConfig, kernel_block: int = KERNEL_BLOCK) -> int:
    """Kitty pages per packed block: on a hybrid model the fewest that cover the state's block
    (kitty_vllm.block_manager.mixed.fit_blocks_to_state), else one."""
    page = shape.kv_heads * page_layout(config, shape.head_dim).page_bytes
    return max(1, _cdiv(state_page(shape, kernel_block), page)) if shape.state_bytes else 1


def shared_pages(shape: ModelShape, config: KittyConfig, skipped: int = 0, kernel_block: int = KERNEL_BLOCK) -> list[int]:
    """The pages kitty_vllm.block_manager.mixed tries for the pool: the smallest that holds a kitty
    page, a ``kernel_block``-token bf16 block of a layer in bf16 (sliding-window or ``skipped``) and the
    recurrent state (padded by vLLM to its uint8 attention block), and whole bf16 blocks up to
    MAX_PAGE_GROWTH x that."""
    pages = [pages_per_block(shape, config, kernel_block) * shape.kv_heads * page_layout(config, shape.head_dim).page_bytes]
    sliding_block = kernel_block * 2 * shape.kv_heads * shape.head_dim * BF16_BYTES
    bf16_layers = bool(shape.sliding or skipped)
    if bf16_layers:
        pages.append(sliding_block)
    smallest = max(pages)
    larger = range(_cdiv(smallest + 1, sliding_block) * sliding_block, MAX_PAGE_GROWTH * smallest + 1, sliding_block)
    return [smallest, *(larger if bf16_layers else ())]


def kitty_bytes(shape: ModelShape, config: KittyConfig, tokens: int, step_tokens: int = STEP_TOKENS,
                skipped: int = 0, lagged_values: int = 0, kernel_block: int = KERNEL_BLOCK) -> int:
    """KV-cache bytes one request of ``tokens`` tokens holds with the kitty dtype ``config`` and
    ``skipped`` of the full-attention layers in bf16 (``kv_cache_dtype_skip_layers``), in the shared
    page that makes it smallest; ``lagged_values``: full-precision Values beyond the ring (module
    docstring); ``kernel_block`` as for auto_bytes."""
    per_block = pages_per_block(shape, config, kernel_block)
    stage = stage_layout(config, shape.head_dim, shape.kv_heads, BF16_BYTES, per_block)
    lagged = min(tokens, config.ring_slots + lagged_values) - min(tokens, config.ring_slots)
    staging = stage.blocks_needed(tokens) + _cdiv(lagged, 2 * stage.tokens_per_block)
    token_bytes = 2 * shape.kv_heads * shape.head_dim * BF16_BYTES

    kitty = shape.full - skipped
    counts = [kitty, kitty, skipped, shape.sliding, shape.state_layers]

    def at(page: int, layers: list[int]) -> int:
        packed, staged, bf16_full, sliding, state = layers
        block = max(kernel_block, page // token_bytes // kernel_block * kernel_block)
        blocks = (packed * _cdiv(tokens, per_block * config.page_size) + staged * staging
                  + bf16_full * _cdiv(tokens, block) + state)
        if shape.sliding:
            blocks += sliding * _sliding_blocks(shape, block, tokens, step_tokens)
        return blocks * page

    if config.layer_boost:
        # Pages of each layer's size, packed side by side in a block (kitty_vllm.patches): a block costs their
        # sum, and kitty refuses the ratios beside layers in the model's dtype or recurrent state.
        if skipped or shape.sliding or shape.state_layers:
            raise ValueError(f"{shape.model}: layer_boost is for models whose layers all store kitty pages")
        pages = model_page_layouts(config, shape.head_dim, shape.full)
        return at(shape.kv_heads * sum(layout.page_bytes for layout in pages), [1, 1, 0, 0, 0])
    # The page kitty chooses by the specs' own accounting, then what vLLM's groups of it hold.
    page = min(shared_pages(shape, config, skipped, kernel_block), key=lambda page: at(page, counts))
    return at(page, vllm_layer_counts(counts))


def table(preset: str = "kitty2", tokens: int = 32768, step_tokens: int = STEP_TOKENS) -> str:
    """docs/models.md's table, in Markdown."""
    config = KittyConfig.from_preset(preset)
    rows = [f"| model | family | attention layers | {preset} stores | MiB per request, auto | MiB per request, "
            f"{preset} | capacity vs auto | note |",
            "|---|---|---|---|---|---|---|---|"]
    for shape in MODELS:
        stores = ["full layers in kitty pages" if shape.full else "nothing in kitty pages"]
        if shape.sliding:
            stores.append("sliding in bf16")
        if shape.state_layers:
            stores.append("linear-attention state untouched")
        note = shape.note
        if shape.state_bytes:
            pages = pages_per_block(shape, config)
            note = f"a kitty block holds {pages} pages ({pages * config.page_size:,} tokens), a state's block"
        auto = auto_bytes(shape, tokens, step_tokens)
        kitty = kitty_bytes(shape, config, tokens, step_tokens) if shape.full else auto
        rows.append(f"| {shape.model} | {shape.family} | {shape.layers} | {', '.join(stores)} | {auto / 2**20:,.0f} | "
                    f"{kitty / 2**20:,.0f} | {auto / kitty:.2f}x | {note} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="kitty2")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per request")
    parser.add_argument("--step-tokens", type=int, default=STEP_TOKENS, help="vLLM's max_num_batched_tokens")
    args = parser.parse_args()
    print(table(args.preset, args.tokens, args.step_tokens))


if __name__ == "__main__":
    main()
