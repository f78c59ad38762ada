"""Where a decode step's time goes, through vLLM: the profile behind the W1/W2 figures.

    . /opt/vsite/env.sh
    python benchmarks/step_profile.py [--runs kitty2:512 auto:160 auto:512x256] [--context 2304] [--steps 20]
                                      [--out benchmarks/results]

Each run ``DTYPE:REQUESTS[xCONTEXT]`` starts serving.py's engine (Qwen3-8B shape, dummy weights, CUDA graphs) in a
process of its own, submits REQUESTS random prompts of CONTEXT tokens (default ``--context``, 2,304: W2's mean context)
with ignore_eos, steps the engine until every request has its first token (prefill done, so every
later step is a decode-only batch, as in most of W2), then times ``--steps`` decode steps and profiles
as many more with torch.profiler (GPU activity only). Recorded per step: wall time (unprofiled), GPU
kernel time, and kernel time by category (PATTERNS, by kernel name); ``idle_ms`` is wall time in which
no kernel ran (the host's share of the step: scheduling, input preparation, sampling, output
processing), and ``scheduler_ms`` the part of the step in vLLM's scheduler (``schedule`` and
``update_from_output``, which kitty's two KV-cache groups make longer: vLLM's coordinator walks each group for
each request). ``tok_s`` is REQUESTS output tokens per step. The default runs are W2's kitty2 batch, the
most requests ``auto`` holds at W2's context on an H100, and ``auto`` at kitty2's batch with a context
short enough to fit: the host's share of a step grows with the requests, not the context, so that run
is the host time kitty2's batch would have without kitty.

The roofline of a step is the time to read what it must read at the GPU's copy bandwidth
(decode_kernel.copy_bandwidth): the weights but the token embedding (a step reads only its batch's rows
of it), and for every layer and request the KV cache of its context (decode_kernel.bytes_read: kitty's
packed pages, sinks and ring, or bf16 / fp8 Keys and Values). ``roofline_ratio`` is the step's wall time
over it (1.0 would be at the limit); recorded for auto, fp8 and the kitty dtypes on a GPU.

Records {"benchmark": "step_profile", "kv_cache_dtype", "requests", "context", "step_ms", "gpu_ms",
"idle_ms", "<category>_ms", "top_kernels_ms": {name: ms}, "roofline_ms", "roofline_ratio", ...} merge into
``<out>/<gpu>-<yyyy-mm-dd>.json`` and print as tables (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import report
import serving

# Kernel-name patterns of report.STEP_CATEGORIES, tried in that order (the first match wins).
PATTERNS = {
    "kitty_attention": r"page_decode_kernel|_attention_kernel|_merge_splits_kernel",
    "kitty_store": r"_store_decode_kernel|_quantize_page_kernel|_dequantize_page_kernel",
    "cache_write": r"reshape_and_cache|concat_and_cache",
    "vllm_attention": r"flash|fmha|attn|attention",
    "gemm": r"gemm|nvjet|cutlass|xmma|cublas|splitk",
    "other": r"",
}
# Kernels recorded by name (milliseconds per step), the longest first.
TOP_KERNELS = 12


def run_spec(text: str) -> tuple[str, int, int | None]:
    """``DTYPE:REQUESTS[xCONTEXT]`` as (dtype, requests, context; None: ``--context``)."""
    dtype, _, count = text.rpartition(":")
    numbers = count.split("x")
    if not dtype or len(numbers) > 2 or not all(n.isdigit() and int(n) > 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"expected DTYPE:REQUESTS or DTYPE:REQUESTSxCONTEXT, got {text!r}")
    return dtype, int(numbers[0]), int(numbers[1]) if len(numbers) == 2 else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--runs", nargs="+", type=run_spec,
                        default=[("kitty2", 512, None), ("auto", 160, None), ("auto", 512, 256)],
                        metavar="DTYPE:REQUESTS[xCONTEXT]",
                        help="KV-cache dtype, the number of requests decoding together and their prompt tokens")
    parser.add_argument("--context", type=int, default=2304, help="prompt tokens per request of a run that names none")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed, and as many profiled")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="folder of the results JSON")
    return parser.parse_args(argv)


def category(kernel: str) -> str:
    return next(name for name in report.STEP_CATEGORIES if re.search(PATTERNS[name], kernel, re.IGNORECASE))


def kernel_times(profile) -> dict[str, float]:
    """Microseconds of GPU time per kernel name in ``profile`` (a finished torch.profiler.profile)."""
    from torch.autograd import DeviceType

    return {event.key: event.self_device_time_total for event in profile.key_averages()
            if event.device_type == DeviceType.CUDA and event.self_device_time_total > 0}


def profile_run(llm, requests: int, context: int, steps: int) -> dict:
    """Prefill ``requests`` prompts of ``context`` tokens, then profile ``steps`` decode steps."""
    import numpy
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    vocab = engine.model_config.get_vocab_size()
    tokens = numpy.random.default_rng(0).integers(0, vocab, (requests, context))
    params = SamplingParams(temperature=1.0, max_tokens=2 * steps + 64, ignore_eos=True)
    for i, row in enumerate(tokens):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=row.tolist()), params)
    started: set[str] = set()
    prefill_steps = 0
    while len(started) < requests:
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        prefill_steps += 1
    for _ in range(4):   # the first decode-only steps, out of the profile
        engine.step()
    cuda = torch.cuda.is_available()    # without CUDA (the tests) every step is host time
    synchronize = torch.cuda.synchronize if cuda else lambda: None
    synchronize()
    with scheduler_time(engine) as scheduler_seconds:
        start = time.perf_counter()      # wall time, unprofiled
        for _ in range(steps):
            engine.step()
        synchronize()
        seconds = time.perf_counter() - start
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as profile:
        for _ in range(steps):
            engine.step()
        synchronize()
    while engine.has_unfinished_requests():
        engine.step()
    kernels = {name: us / 1e3 / steps for name, us in kernel_times(profile).items()}
    per_step = {f"{name}_ms": 0.0 for name in report.STEP_CATEGORIES}
    for name, ms in kernels.items():
        per_step[f"{category(name)}_ms"] += ms
    top = dict(sorted(kernels.items(), key=lambda item: -item[1])[:TOP_KERNELS])
    step_ms = 1e3 * seconds / steps
    gpu_ms = sum(per_step.values())
    return {"requests": requests, "context": context, "steps": steps, "prefill_steps": prefill_steps,
            "step_ms": step_ms, "gpu_ms": gpu_ms, "idle_ms": max(0.0, step_ms - gpu_ms),
            "scheduler_ms": 1e3 * scheduler_seconds[0] / steps,
            "tok_s": requests / seconds * steps, **per_step, "top_kernels_ms": top}


@contextlib.contextmanager
def scheduler_time(engine) -> Iterator[list[float]]:
    """Seconds spent in the engine's scheduler (``schedule`` and ``update_from_output``) inside this block, as
    the list's one item. The engine core runs in this process (serving.start_engine)."""
    scheduler = engine.engine_core.engine_core.scheduler
    spent = [0.0]

    def timed(method):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    methods = {name: getattr(scheduler, name) for name in ("schedule", "update_from_output")}
    for name, method in methods.items():
        setattr(scheduler, name, timed(method))
    try:
        yield spent
    finally:
        for name in methods:
            delattr(scheduler, name)


def weight_bytes_read(model) -> int:
    """Bytes of ``model``'s weights that a decode step reads: every parameter but the token embedding."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)


def roofline(llm, dtype: str, record: dict) -> dict:
    """The step's roofline (module docstring) for ``record`` of profile_run; empty where it is not defined."""
    import decode_kernel
    import torch

    from kitty_vllm.config import load_config
    from kitty_vllm.patches import is_kitty_dtype

    if not torch.cuda.is_available() or not (dtype in ("auto", "fp8") or is_kitty_dtype(dtype)):
        return {}
    shape = serving.QWEN3_8B_SHAPE
    # The measured steps' mean context: the prompt, the first token, 4 unmeasured steps, then 2 x steps.
    context = record["context"] + 5 + record["steps"]
    if is_kitty_dtype(dtype):
        kv = decode_kernel.bytes_read("kitty", load_config(dtype), record["requests"], context)
    else:
        kv = decode_kernel.bytes_read("flash", None, record["requests"], context, 1 if dtype == "fp8" else 2)
    weights = llm.apply_model(weight_bytes_read)[0]
    copy_gb_s = decode_kernel.copy_bandwidth()
    total = weights + shape["num_hidden_layers"] * kv
    roofline_ms = total / copy_gb_s / 1e6
    return {"weight_bytes": weights, "kv_bytes": total - weights, "copy_gb_s": copy_gb_s, "roofline_ms": roofline_ms,
            "roofline_ratio": record["step_ms"] / roofline_ms}


def engine_process(dtype: str, requests: int, context: int, steps: int) -> Iterator[dict]:
    """The step profile of ``requests`` requests for ``dtype``, measured on one engine."""
    llm = serving.start_engine(dtype, serving.model_dir())
    record = profile_run(llm, requests, context, steps)
    yield {"benchmark": "step_profile", "kv_cache_dtype": dtype, **record, **roofline(llm, dtype, record)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path, environment = serving.results_file(args.out)
    records = []

    def save(record: dict) -> None:
        records.append({**record, **environment})
        report.write_records(path, records[-1:])

    for dtype, requests, context in args.runs:
        context = context or args.context
        print(f"[step_profile] {dtype}: {requests} requests of {context:,} tokens", flush=True)
        measured, error = serving.run_in_process(engine_process, (dtype, requests, context, args.steps), save)
        if not measured:
            save({"benchmark": "step_profile", "kv_cache_dtype": dtype, "requests": requests, "context": context,
                  "error": error})
    print(f"\n{report.markdown_tables(records)}\n\nmerged into {path}", flush=True)


if __name__ == "__main__":
    main()
