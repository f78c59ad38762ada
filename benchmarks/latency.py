"""Batch-1 latency: time to first token and time per output token of one request, by context (issue 31).

    . /opt/vsite/env.sh
    python benchmarks/latency.py [--kv-cache-dtypes auto fp8 kitty2] [--contexts 1024 2048 ... 32768]
                                 [--output-tokens 128] [--repeats 3] [--out benchmarks/results]

serving.py's model (Qwen3-8B shape, dummy weights, CUDA graphs), one engine per dtype in a process of its
own, with max_model_len covering the longest context and its output, and no prefix caching. At each
context, one random prompt of that many tokens is generated alone, once for 1 token (the prefill and the
first token: the time to first token) and once for 1 + ``--output-tokens`` tokens (ignore_eos); the
difference divided by ``--output-tokens`` is the time per output token, batch-1 decode steps only. Each
is the median of ``--repeats`` runs, after one unmeasured run at that context, whose kernel compiles
vLLM's JIT monitor reports are recorded (``jit_compiles``: a first request of this length would wait for
them; serving.jit_compiles).

Records {"benchmark": "latency", "kv_cache_dtype", "context", "ttft_ms", "request_ms" (the whole request of
1 + ``--output-tokens`` tokens), "tpot_ms"} merge into
``<out>/<gpu>-<yyyy-mm-dd>.json`` and print as a table against ``auto`` (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import report
import serving

DTYPES = ("auto", "fp8", "kitty2")
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=list(DTYPES), metavar="DTYPE")
    parser.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS), help="prompt tokens")
    parser.add_argument("--output-tokens", type=int, default=128, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per context; the median is kept")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="folder of the results JSON")
    return parser.parse_args(argv)


def measure(llm, context: int, output_tokens: int, repeats: int) -> dict:
    """Median seconds of one request of ``context`` random tokens for 1 and for 1 + ``output_tokens`` tokens."""
    import numpy
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = numpy.random.default_rng(context)

    def seconds(max_tokens: int) -> float:
        prompt = TokensPrompt(prompt_token_ids=rng.integers(0, vocab, context).tolist())
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    with serving.jit_compiles() as compiled:
        seconds(1 + output_tokens)
    first = statistics.median(seconds(1) for _ in range(repeats))
    whole = statistics.median(seconds(1 + output_tokens) for _ in range(repeats))
    return {"ttft_ms": 1e3 * first, "request_ms": 1e3 * whole, "tpot_ms": 1e3 * (whole - first) / output_tokens,
            "jit_compiles": compiled}


def engine_process(dtype: str, contexts: list[int], output_tokens: int, repeats: int) -> Iterator[dict]:
    """The record of every context, measured on one engine for ``dtype``."""
    llm = serving.start_engine(dtype, serving.model_dir(), max_model_len=max(contexts) + output_tokens + 16)
    for context in contexts:
        yield {"benchmark": "latency", "kv_cache_dtype": dtype, "context": context, "output_tokens": output_tokens,
               "repeats": repeats, **measure(llm, context, output_tokens, repeats)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path, environment = serving.results_file(args.out)
    records = []

    def save(record: dict) -> None:
        records.append({**record, **environment})
        report.write_records(path, records[-1:])
        serving.progress(f"{record['kv_cache_dtype']} at {record['context']:,}: "
                         + (f"error: {record['error']}" if "error" in record else
                            f"{record['ttft_ms']:.1f} ms to the first token, {record['tpot_ms']:.2f} ms per token"))

    for dtype in args.kv_cache_dtypes:
        measured, error = serving.run_in_process(engine_process, (dtype, args.contexts, args.output_tokens,
                                                                  args.repeats), save)
        for context in sorted(set(args.contexts) - {r["context"] for r in measured}):
            save({"benchmark": "latency", "kv_cache_dtype": dtype, "context": context, "error": error})
    print(f"\n{report.latency_table(records)}\n\nmerged into {path}", flush=True)


if __name__ == "__main__":
    main()
