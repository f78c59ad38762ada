"""Speculative decoding with the kitty KV-cache dtypes against vLLM's own, on one GPU (issue 29).

    . /opt/vsite/env.sh
    python benchmarks/speculative.py [--kv-cache-dtypes auto kitty2] [--methods eagle3 none] [--quick]

Target: serving.py's Qwen3-8B shape. Draft: an EAGLE-3 head of the shape published for Qwen3-8B (one Llama
decoder layer of hidden 4,096, 32 query and 8 KV heads of 128, a 32,000-token draft vocabulary; vLLM's
``eagle3`` method drafting ``DRAFT_TOKENS`` tokens), written as a config.json under
~/.cache/kitty_vllm/models/. Both have dummy weights, so the KV-cache layouts, kernels and step shapes are
real and the acceptance is not: a random head's drafts are almost always rejected. The draft layer keeps its
KV cache in the model's dtype (kitty dtypes leave draft layers unquantized, kitty_vllm.patches).

Workload: ``WORKLOAD`` (requests x prompt tokens, greedy output tokens with ignore_eos), all at once after a
short warm-up, in one engine per (dtype, method), each in a fresh process. Recorded: seconds, output tokens/s,
the kernels compiled in the warm-up and the timed run (serving.jit_compiles),
vLLM's speculative-decoding counters over the timed run (verification steps, draft tokens, accepted tokens)
and the mean acceptance length L (tokens a request gains per step: 1 + accepted / steps; 1 without a
draft). A verification step costs the same whether its drafts are accepted or not, so the tokens/s that an
acceptance length L* would give is the steps per second times L*: ``output_tok_s x L* / L``, recorded for
each of ``ACCEPTANCE_LENGTHS`` as ``adjusted_tok_s`` ("acceptance-adjusted"; without a draft L* = 1).
Records are merged into ``<out>/<gpu>-<yyyy-mm-dd>.json`` (benchmark "speculative").
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import report
import serving

METHODS = ("eagle3", "none")
DTYPES = ("auto", "kitty2")
DRAFT_TOKENS = 3
# Acceptance lengths to adjust to, for 3 draft tokens (at most 4): EAGLE-3 heads of 8B models are
# reported between these on chat and code benchmarks.
ACCEPTANCE_LENGTHS = (2.0, 3.0)
WORKLOAD = serving.Workload(64, 2048, 512)
QUICK_WORKLOAD = serving.Workload(8, 512, 64)
EAGLE3_HEAD_NAME = "qwen3-8b-eagle3-shape"
EAGLE3_HEAD = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 1,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "draft_vocab_size": 32000,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=list(DTYPES), metavar="DTYPE")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="eagle3: the EAGLE-3 head drafts; none: no speculation")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="folder of the results JSON")
    parser.add_argument("--quick", action="store_true",
                        help=f"the scaled-down workload {asdict(QUICK_WORKLOAD)}, written to <gpu>-<date>-quick.json")
    return parser.parse_args(argv)


def eagle3_head_dir() -> Path:
    """The folder holding the EAGLE-3 head's config.json."""
    return serving.config_dir(EAGLE3_HEAD_NAME, EAGLE3_HEAD)


def counters(llm) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics() if m.name in COUNTERS}


def run_workload(llm, workload: serving.Workload, speculating: bool) -> dict:
    """Generate ``workload`` greedily at once; seconds, output tokens/s and the speculative counters of that run."""
    import numpy
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = llm.llm_engine.model_config.get_vocab_size()
    tokens = numpy.random.default_rng(0).integers(0, vocab, (workload.requests, workload.prompt_tokens))
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in tokens]
    warmup = SamplingParams(temperature=0.0, max_tokens=serving.WARMUP_OUTPUT_TOKENS, ignore_eos=True)
    params = SamplingParams(temperature=0.0, max_tokens=workload.output_tokens, ignore_eos=True)
    with serving.jit_compiles() as compiled:
        llm.generate(prompts[:serving.WARMUP_REQUESTS], warmup, use_tqdm=False)
        before = counters(llm)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    record = {**asdict(workload), "seconds": seconds, "output_tok_s": output_tokens / seconds,
              "jit_compiles": compiled}
    if speculating:
        steps, drafted, accepted = (counters(llm)[name] - before[name] for name in COUNTERS)
        length = 1 + accepted / steps
        record.update(verification_steps=int(steps), draft_tokens=int(drafted), accepted_tokens=int(accepted),
                      acceptance_length=length,
                      adjusted_tok_s={f"{target:g}": record["output_tok_s"] * target / length
                                      for target in ACCEPTANCE_LENGTHS})
    else:
        record.update(acceptance_length=1.0, adjusted_tok_s={f"{target:g}": record["output_tok_s"]
                                                             for target in ACCEPTANCE_LENGTHS})
    return record


def engine_process(dtype: str, method: str, workload: serving.Workload) -> Iterator[dict]:
    """The record of ``workload`` for (``dtype``, ``method``), measured on one engine."""
    speculative = None if method == "none" else {
        "method": method, "model": str(eagle3_head_dir()), "num_speculative_tokens": DRAFT_TOKENS}
    # max_num_seqs = the workload's requests: fewer CUDA graphs to capture at start.
    llm = serving.start_engine(dtype, serving.model_dir(), speculative_config=speculative,
                               max_num_seqs=workload.requests)
    yield {"benchmark": "speculative", "kv_cache_dtype": dtype, "speculative": method,
           "num_speculative_tokens": DRAFT_TOKENS if speculative else 0, "max_model_len": serving.ENGINE_MAX_MODEL_LEN,
           **serving.kv_cache_capacity(llm, serving.ENGINE_MAX_MODEL_LEN), **run_workload(llm, workload, bool(speculative))}


def summary(record: dict) -> str:
    name = f"{record['kv_cache_dtype']} + {record['speculative']}"
    if "error" in record:
        return f"{name}: error: {record['error']}"
    drafts = (f", {record['verification_steps']:,} steps, {record['accepted_tokens']:,} of "
              f"{record['draft_tokens']:,} drafts accepted" if "verification_steps" in record else "")
    adjusted = ", ".join(f"L={k}: {v:,.0f}" for k, v in record["adjusted_tok_s"].items())
    return (f"{name}: {record['seconds']:.1f} s, {record['output_tok_s']:,.0f} output tok/s, acceptance length "
            f"{record['acceptance_length']:.3f}{drafts}; adjusted tok/s {adjusted}; max concurrency "
            f"{record['max_concurrency']:.1f}x")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = QUICK_WORKLOAD if args.quick else WORKLOAD
    path, environment = serving.results_file(args.out, args.quick, draft_model=EAGLE3_HEAD_NAME)
    save = serving.record_saver(path, environment, summary)
    for dtype in args.kv_cache_dtypes:
        for method in args.methods:
            serving.progress(f"{dtype} + {method}: {asdict(workload)}")
            serving.run_or_record_error(engine_process, (dtype, method, workload), save,
                                        {"benchmark": "speculative", "kv_cache_dtype": dtype, "speculative": method,
                                         "max_model_len": serving.ENGINE_MAX_MODEL_LEN})


if __name__ == "__main__":
    main()
