"""vLLM's own maximum concurrency for real models' KV-cache shapes, ``auto`` against the kitty dtypes, beside
what ``kitty_vllm.tools.capacity`` computes for them (issue 28: docs/models.md's table, measured).

    python benchmarks/model_capacity.py [--models Gemma-3-12B gpt-oss-20b] [--kv-cache-dtypes auto kitty2]
                                        [--tokens 32768] [--step-tokens 8192] [--kv-cache-gib 8]

Each model is built from its shape in kitty_vllm.tools.capacity.MODELS: its layer kinds, windows, KV heads and
head size as published, and a small body (hidden size, MLP, vocabulary and experts shrunk, twice as many
query heads as KV heads), written as a config.json under ~/.cache/kitty_vllm/models/ and loaded with dummy
weights. The KV cache depends on the attention shape alone, and a fixed KV-cache budget
(``kv_cache_memory_bytes``) makes the figures independent of the weights' memory, so the shrunk body changes
nothing that is measured. Runs on a GPU or on vLLM's CPU build (bf16 either way; eager, no prefix caching;
with a fixed budget and eager mode vLLM's CPU worker starts without a profiling run, in seconds).

Recorded per (model, dtype), each engine in a fresh process: vLLM's maximum concurrency for ``--tokens``
tokens per request and its KV tokens (``get_kv_cache_capacity`` on the scheduler's KV-cache config, what
vLLM logs at start), the page of its block pool, and the bytes a request holds as
kitty_vllm.tools.capacity computes them for this platform's smallest kernel block (16 tokens on a GPU, 32
on the CPU) and ``--step-tokens``. The table gives the measured capacity ratio against ``auto`` beside
the computed one. Records are merged into ``<out>/<gpu>-<yyyy-mm-dd>.json`` (benchmark "model_capacity").
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import report
import serving

from kitty_vllm.tools import capacity

MODELS = ("Gemma-3-12B", "gpt-oss-20b", "Gemma-2-9B", "Llama-3.1-8B")
DTYPES = ("auto", "kitty2")
TOKENS = 32768
# The scheduler's step (vLLM's default for vllm serve on a GPU): a sliding-window layer holds its window plus
# one step's tokens.
STEP_TOKENS = capacity.STEP_TOKENS
KV_CACHE_GIB = 8.0
# The body, shrunk: none of it is in the KV cache.
BODY = {"hidden_size": 256, "intermediate_size": 256, "vocab_size": 2048}
EXPERTS = 4      # gpt-oss and Qwen3-Next, shrunk
# The architecture and transformers config class of each family that vLLM serves from a config.json.
FAMILIES = {
    "Llama 3": ("LlamaForCausalLM", "LlamaConfig"),
    "Mistral": ("MistralForCausalLM", "MistralConfig"),
    "Gemma 3": ("Gemma3ForCausalLM", "Gemma3TextConfig"),
    "Gemma 2": ("Gemma2ForCausalLM", "Gemma2Config"),
    "gpt-oss": ("GptOssForCausalLM", "GptOssConfig"),
    "Phi-3": ("Phi3ForCausalLM", "Phi3Config"),
    "Qwen3-Next": ("Qwen3NextForCausalLM", "Qwen3NextConfig"),
}


def layer_types(shape: capacity.ModelShape) -> list[str]:
    """Every layer's attention in transformers' words, the full-attention layers spread evenly (Gemma 3's
    five sliding layers before each full one; Gemma 2's and gpt-oss's alternation; Qwen3-Next's three
    linear-attention layers before each full one)."""
    other = shape.sliding + shape.state_layers
    period = (shape.full + other) // shape.full if shape.full else 0
    kind = "linear_attention" if shape.state_layers else "sliding_attention"
    return ["full_attention" if period and (i + 1) % period == 0 else kind for i in range(shape.full + other)]


def model_config(shape: capacity.ModelShape, max_model_len: int) -> dict:
    """The config.json of ``shape`` with the small body (module docstring)."""
    import transformers

    if shape.family not in FAMILIES:
        raise ValueError(f"{shape.model}: no config for the {shape.family} family here "
                         f"(the families: {', '.join(FAMILIES)})")
    architecture, config_class = FAMILIES[shape.family]
    fields = dict(BODY, num_hidden_layers=shape.full + shape.sliding + shape.state_layers,
                  num_attention_heads=2 * shape.kv_heads,
                  num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                  max_position_embeddings=max(max_model_len, 4096), tie_word_embeddings=False)
    if shape.family == "Phi-3":
        # Its window spans max_model_len: every layer is full attention to vLLM (tools.capacity.MODELS' note).
        fields.update(sliding_window=2 * max(max_model_len, 4096))
    elif shape.state_layers:
        # Qwen3-Next's linear-attention heads are its config class's defaults (tools.capacity's state bytes).
        fields.update(layer_types=layer_types(shape), num_experts=EXPERTS, num_experts_per_tok=2,
                      moe_intermediate_size=BODY["intermediate_size"],
                      shared_expert_intermediate_size=BODY["intermediate_size"])
    elif not shape.sliding:
        fields.update(sliding_window=None)    # Mistral's config class has a 4096-token window by default
    else:
        fields.update(sliding_window=shape.window, layer_types=layer_types(shape))
        if shape.family == "gpt-oss":
            fields.update(num_local_experts=EXPERTS, num_experts_per_tok=2)
        if shape.family.startswith("Gemma"):
            fields.update(query_pre_attn_scalar=shape.head_dim)
    config = getattr(transformers, config_class)(**fields).to_dict()
    return {**config, "architectures": [architecture], "torch_dtype": "bfloat16"}


def model_dir(shape: capacity.ModelShape, max_model_len: int) -> Path:
    return serving.config_dir(f"{shape.model.lower()}-kv-shape", model_config(shape, max_model_len))


def platform_kernel_block() -> int:
    """The smallest kernel block of the platform's default attention backend, in tokens."""
    from vllm.platforms import current_platform

    return 32 if current_platform.is_cpu() else capacity.KERNEL_BLOCK


def computed_bytes(shape: capacity.ModelShape, dtype: str, tokens: int, step_tokens: int) -> int:
    """What kitty_vllm.tools.capacity says a request of ``tokens`` tokens holds on this platform."""
    from kitty_vllm.config import KittyConfig

    block = platform_kernel_block()
    if dtype == "auto" or not shape.full:
        return capacity.auto_bytes(shape, tokens, step_tokens, kernel_block=block)
    return capacity.kitty_bytes(shape, KittyConfig.from_preset(dtype), tokens, step_tokens, kernel_block=block)


def engine_process(model: str, dtype: str, tokens: int, step_tokens: int, budget: int) -> Iterator[dict]:
    """The record of (``model``, ``dtype``), measured on one engine."""
    from vllm.v1.kv_cache_interface import MambaSpec

    shape = next(s for s in capacity.MODELS if s.model == model)
    llm = serving.start_engine(dtype, model_dir(shape, tokens), max_model_len=tokens,
                               max_num_batched_tokens=step_tokens, kv_cache_memory_bytes=budget, enforce_eager=True)
    kv_cache_config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
    states = [g.kv_cache_spec.real_page_size_bytes for g in kv_cache_config.kv_cache_groups
              if isinstance(g.kv_cache_spec, MambaSpec)]
    if states:
        # The recurrent state as this platform keeps it (vLLM's CPU build keeps Qwen3-Next's in float32).
        shape = replace(shape, state_bytes=max(states))
    computed = computed_bytes(shape, dtype, tokens, step_tokens)
    yield {"benchmark": "model_capacity", "model": model, "kv_cache_dtype": dtype, "max_model_len": tokens,
           "step_tokens": step_tokens, "kv_cache_bytes": budget, **serving.kv_cache_capacity(llm, tokens),
           "pool_page_bytes": max(g.kv_cache_spec.page_size_bytes for g in kv_cache_config.kv_cache_groups),
           "num_blocks": kv_cache_config.num_blocks, "kernel_block": platform_kernel_block(),
           "computed_request_bytes": computed, "computed_max_concurrency": budget / computed}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        choices=[s.model for s in capacity.MODELS if s.family in FAMILIES], metavar="MODEL")
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=list(DTYPES), metavar="DTYPE")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per request (max_model_len)")
    parser.add_argument("--step-tokens", type=int, default=STEP_TOKENS, help="max_num_batched_tokens")
    parser.add_argument("--kv-cache-gib", type=float, default=KV_CACHE_GIB,
                        help="the KV-cache budget (kv_cache_memory_bytes); it must hold one auto request")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="folder of the results JSON")
    return parser.parse_args(argv)


def summary(record: dict) -> str:
    name = f"{record['model']} {record['kv_cache_dtype']}"
    if "error" in record:
        return f"{name}: error: {record['error']}"
    return (f"{name}: max concurrency {record['max_concurrency']:.2f} (computed "
            f"{record['computed_max_concurrency']:.2f}) at {record['max_model_len']:,} tokens, "
            f"{record['kv_tokens']:,} KV tokens, {record['num_blocks']:,} blocks of {record['pool_page_bytes']:,} bytes")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path, environment = serving.results_file(args.out)
    environment.pop("model")
    budget = int(args.kv_cache_gib * 2**30)
    save = serving.record_saver(path, environment, summary)
    for model in args.models:
        for dtype in args.kv_cache_dtypes:
            serving.progress(f"{model} {dtype}: {args.tokens:,} tokens, step {args.step_tokens:,}, "
                             f"{args.kv_cache_gib:g} GiB")
            serving.run_or_record_error(engine_process, (model, dtype, args.tokens, args.step_tokens, budget), save,
                                        {"benchmark": "model_capacity", "model": model, "kv_cache_dtype": dtype,
                                         "max_model_len": args.tokens})
    print(f"\n{report.model_capacity_table(report.load_records(path))}\n", flush=True)


if __name__ == "__main__":
    main()
