"""Capacity and serving throughput of the kitty KV-cache dtypes against vLLM's own formats, on one GPU.

    . /opt/vsite/env.sh
    python benchmarks/serving.py [--benchmarks capacity w1 w2] [--kv-cache-dtypes auto fp8 ... kivi2]
                                 [--max-model-lens 4624 32768] [--out benchmarks/results] [--quick]

The model has Qwen3-8B's shape (36 layers, hidden 4096, 32 query and 8 KV heads of 128, bf16) with dummy
weights: only a config.json is written, under ~/.cache/kitty_vllm/models/qwen3-8b-shape, and prompts
are random token ids (no tokenizer). Engines use gpu_memory_utilization 0.9, CUDA graphs (vLLM's
default compilation), no prefix caching, and skip FlashInfer's autotuning (about 80 s per engine start
on an H100).

- capacity: vLLM's "Maximum concurrency for N tokens per request" and "GPU KV cache size: N tokens",
  from the function that logs them (``kv_cache_utils.get_kv_cache_capacity``) applied to the engine's
  own KV-cache config. The engine runs at max_model_len 4,624; other lengths are evaluated on the same
  config with max_model_len set for the call, as vLLM's ``estimate_max_model_len`` does.
- w1: 256 requests of 4,096 prompt tokens and 512 output tokens; w2: 512 requests of 256 prompt tokens
  and 4,096 output tokens. All requests are submitted at once with ignore_eos and temperature 1 (as
  ``vllm bench throughput``), after a short warm-up. Recorded: seconds for the whole batch, output
  tokens/s, preemptions (``vllm:num_preemptions``), the kernels compiled in the warm-up and the timed run
  (``jit_compiles``: vLLM's JIT monitor, which should see none after start-up), and the capacity at 4,624.

Each dtype runs in its own process, with one engine for all its benchmarks: GPU memory is freed between
dtypes, and a dtype that fails becomes an error record. The engine core runs inside that process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its scheduler's KV-cache config can be read. Records are
merged into ``<out>/<gpu>-<yyyy-mm-dd>.json`` as soon as each is measured (``...-quick.json`` with
--quick), then the tables of the whole file are printed and its plots drawn (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import report

DTYPES = ("auto", "fp8", "int4_per_token_head", "turboquant_4bit_nc", "kitty2", "kitty2-lite", "kivi2")
MAX_MODEL_LENS = (4624, 32768)
# The engine's max_model_len, for every benchmark: W1's 4,096 + 512 tokens plus a margin (W2 needs 4,352).
ENGINE_MAX_MODEL_LEN = 4624
MODEL_NAME = "qwen3-8b-shape"
QWEN3_8B_SHAPE = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


@dataclass(frozen=True)
class Workload:
    requests: int
    prompt_tokens: int
    output_tokens: int


WORKLOADS = {"w1": Workload(256, 4096, 512), "w2": Workload(512, 256, 4096)}
# --quick: the same shapes, scaled down to check the whole path in a few seconds per workload.
QUICK_WORKLOADS = {"w1": Workload(16, 1024, 32), "w2": Workload(32, 256, 128)}
# The warm-up compiles the Triton kernels for the workload's shapes before the clock starts.
WARMUP_REQUESTS, WARMUP_OUTPUT_TOKENS = 4, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--benchmarks", nargs="+", choices=report.SERVING_BENCHMARKS,
                        default=list(report.SERVING_BENCHMARKS))
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=list(DTYPES), metavar="DTYPE",
                        help=f"vLLM --kv-cache-dtype values (default: {' '.join(DTYPES)})")
    parser.add_argument("--max-model-lens", nargs="+", type=int, default=list(MAX_MODEL_LENS),
                        help="max_model_len values for the capacity benchmark")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="folder of the results JSON")
    parser.add_argument("--quick", action="store_true",
                        help=f"scaled-down workloads ({', '.join(f'{k}: {asdict(w)}' for k, w in QUICK_WORKLOADS.items())})"
                             " written to <gpu>-<date>-quick.json")
    parser.add_argument("--model", type=Path,
                        help=f"a model folder to use instead of the {MODEL_NAME} config (dummy weights either way)")
    return parser.parse_args(argv)


def config_dir(name: str, config: dict) -> Path:
    """A model folder under ~/.cache/kitty_vllm/models holding only ``config`` as its config.json (written
    once, atomically), for dummy weights."""
    from kitty_vllm.tools.assets import cache_dir

    folder = cache_dir() / "models" / name
    text = json.dumps(config, indent=1) + "\n"
    path = folder / "config.json"
    if not path.exists() or path.read_text() != text:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name("config.json.partial")
        partial.write_text(text)
        os.replace(partial, path)
    return folder


def model_dir() -> Path:
    """The folder holding the Qwen3-8B-shaped config.json."""
    return config_dir(MODEL_NAME, QWEN3_8B_SHAPE)


def results_file(out: Path, quick: bool = False, **fields) -> tuple[Path, dict]:
    """This GPU's results file of today under ``out``, and what every record of the run carries: the GPU,
    vLLM's version, the date, the model and ``fields``."""
    from vllm import __version__ as vllm_version
    from vllm.platforms import current_platform

    gpu = current_platform.get_device_name()   # through NVML: this process never touches CUDA
    date = datetime.date.today().isoformat()
    environment = {"gpu": gpu, "vllm_version": vllm_version, "date": date, "model": MODEL_NAME, **fields}
    return report.result_path(out, gpu, date, quick), environment


def require_flash_attention_2() -> None:
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import FA2_AVAILABLE, FA2_UNAVAILABLE_REASON
    except ImportError as error:
        FA2_AVAILABLE, FA2_UNAVAILABLE_REASON = False, str(error)
    if not FA2_AVAILABLE:
        raise RuntimeError(f"turboquant_* needs FlashAttention 2 (vllm/vllm_flash_attn/_vllm_fa2_C), which is "
                           f"missing ({FA2_UNAVAILABLE_REASON}): build the bundle with make-bundle --with-fa2 "
                           f"and install its chunks 4 and 5")


def start_engine(dtype: str, model: Path, **engine_args):
    """An ``LLM`` of ``model`` with dummy weights and ``dtype`` KV cache; ``engine_args`` add to or replace the
    settings above."""
    from kitty_vllm.patches import is_kitty_dtype

    if is_kitty_dtype(dtype):
        import kitty_vllm

        kitty_vllm.register()   # the plugin's entry point, in case kitty_vllm is not pip-installed
    if dtype.startswith("turboquant"):
        require_flash_attention_2()
    from vllm import LLM

    start = time.perf_counter()
    settings = dict(load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", kv_cache_dtype=dtype,
                    max_model_len=ENGINE_MAX_MODEL_LEN, gpu_memory_utilization=0.9, enforce_eager=False,
                    enable_prefix_caching=False, disable_log_stats=False, seed=0,
                    kernel_config={"enable_flashinfer_autotune": False})
    llm = LLM(model=str(model), **{**settings, **engine_args})
    progress(f"{dtype}: engine started in {time.perf_counter() - start:.0f} s")
    return llm


@contextlib.contextmanager
def jit_compiles() -> Iterator[list[str]]:
    """The kernels that vLLM's JIT monitor (vllm.utils.jit_monitor, active after the engine's warm-up and
    CUDA-graph capture unless enforce_eager) reports compiled inside this block, as "backend: kernel", one
    entry per compile. The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    from vllm.utils import jit_monitor

    compiled: list[str] = []
    report_event = jit_monitor._handle_jit_event

    def count(*, backend: str, event: str, fn_name: str, detail: str | None = None) -> None:
        compiled.append(f"{backend}: {fn_name}")
        report_event(backend=backend, event=event, fn_name=fn_name, detail=detail)

    jit_monitor._handle_jit_event = count
    try:
        yield compiled
    finally:
        jit_monitor._handle_jit_event = report_event


def kv_cache_capacity(llm, max_model_len: int) -> dict:
    """vLLM's maximum concurrency and KV-cache tokens of the engine's KV-cache config at ``max_model_len``."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    core = llm.llm_engine.engine_core.engine_core
    model_config = core.vllm_config.model_config
    engine_max_model_len = model_config.max_model_len
    model_config.max_model_len = max_model_len
    try:
        kv_tokens, max_concurrency = get_kv_cache_capacity(core.vllm_config, core.scheduler.kv_cache_config)
    finally:
        model_config.max_model_len = engine_max_model_len
    return {"max_concurrency": max_concurrency, "kv_tokens": kv_tokens}


def preemptions(llm) -> int:
    return int(next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def run_workload(llm, workload: Workload) -> dict:
    """Generate ``workload`` at once; seconds, output tokens/s and preemptions of that batch."""
    import numpy
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = llm.llm_engine.model_config.get_vocab_size()
    tokens = numpy.random.default_rng(0).integers(0, vocab, (workload.requests, workload.prompt_tokens))
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in tokens]
    warmup = SamplingParams(max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=workload.output_tokens, ignore_eos=True)
    with jit_compiles() as compiled:
        llm.generate(prompts[:WARMUP_REQUESTS], warmup, use_tqdm=False)
        preempted = preemptions(llm)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {**asdict(workload), "seconds": seconds, "output_tok_s": output_tokens / seconds,
            "preemptions": preemptions(llm) - preempted, "jit_compiles": compiled}


def engine_process(dtype: str, model: Path, benchmarks: list[str], max_model_lens: list[int],
                   workloads: dict[str, Workload]) -> Iterator[dict]:
    """The records of ``benchmarks`` for ``dtype``, measured on one engine."""
    llm = start_engine(dtype, model)
    if "capacity" in benchmarks:
        for max_model_len in max_model_lens:
            yield {"benchmark": "capacity", "kv_cache_dtype": dtype, "max_model_len": max_model_len,
                   **kv_cache_capacity(llm, max_model_len)}
    capacity = kv_cache_capacity(llm, ENGINE_MAX_MODEL_LEN)
    for name in (b for b in benchmarks if b in workloads):
        progress(f"{dtype}: {name} {asdict(workloads[name])}")
        yield {"benchmark": name, "kv_cache_dtype": dtype, "max_model_len": ENGINE_MAX_MODEL_LEN, **capacity,
               **run_workload(llm, workloads[name])}


def expected_keys(benchmarks: list[str], max_model_lens: list[int]) -> list[tuple[str, int]]:
    """(benchmark, max_model_len) of every record one dtype should produce."""
    return [(b, n) for b in benchmarks for n in (max_model_lens if b == "capacity" else [ENGINE_MAX_MODEL_LEN])]


def _child(measure, args: tuple, conn) -> None:
    """In the spawned process: the engine in this process (so that its scheduler can be read), each record
    of ``measure(*args)`` sent as ("record", dict) as soon as it is measured, and an exception as ("error", str)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        for record in measure(*args):
            conn.send(("record", record))
    except Exception as error:
        traceback.print_exc()
        conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


def run_in_process(measure, args: tuple, save) -> tuple[list[dict], str | None]:
    """Run the generator ``measure(*args)`` in a fresh spawned process (so that its GPU memory is freed when
    it ends), ``save`` every record it yields; return the records and its error (None if it ended cleanly)."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(measure, args, send))
    process.start()
    send.close()
    records, error = [], None
    while True:
        try:
            kind, payload = receive.recv()
        except EOFError:
            break
        if kind == "record":
            records.append(payload)
            save(payload)
        else:
            error = payload
    process.join()
    if error is None and process.exitcode != 0:
        error = f"engine process exited with code {process.exitcode}"
    return records, error


def record_saver(path: Path, environment: dict, summary):
    """A ``save`` for run_in_process: merges each record, with the run's ``environment``, into ``path`` and
    prints ``summary(record)``."""

    def save(record: dict) -> None:
        record = {**record, **environment}
        report.write_records(path, [record])
        progress(summary(record))

    return save


def run_or_record_error(measure, args: tuple, save, failed: dict) -> None:
    """run_in_process; if ``measure`` yields nothing, ``save`` the record ``failed`` with the error."""
    records, error = run_in_process(measure, args, save)
    if not records:
        save({**failed, "error": error})


def run_dtype(dtype: str, args: argparse.Namespace, model: Path, workloads: dict[str, Workload], save) -> None:
    """Run one dtype's engine in a fresh process; ``save`` every record, and an error record for each
    benchmark it could not measure."""
    records, error = run_in_process(engine_process, (dtype, model, args.benchmarks, args.max_model_lens, workloads),
                                    save)
    measured = {(r["benchmark"], r["max_model_len"]) for r in records}
    for benchmark, max_model_len in expected_keys(args.benchmarks, args.max_model_lens):
        if (benchmark, max_model_len) not in measured:
            save({"benchmark": benchmark, "kv_cache_dtype": dtype, "max_model_len": max_model_len, "error": error})


def progress(message: str) -> None:
    print(f"[serving] {message}", flush=True)


def summary(record: dict) -> str:
    if "error" in record:
        return f"{record['kv_cache_dtype']} {record['benchmark']}: error: {record['error']}"
    figures = f"max concurrency {record['max_concurrency']:.2f}x at {record['max_model_len']:,} tokens, " \
              f"{record['kv_tokens']:,} KV tokens"
    if record["benchmark"] != "capacity":
        figures = (f"{record['seconds']:.1f} s, {record['output_tok_s']:,.0f} output tok/s, "
                   f"{record['preemptions']} preemptions; {figures}")
    return f"{record['kv_cache_dtype']} {record['benchmark']}: {figures}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    model = args.model or model_dir()
    path, environment = results_file(args.out, args.quick, model=model.name)
    progress(f"{environment['gpu']}, vLLM {environment['vllm_version']}: {' '.join(args.benchmarks)} for "
             f"{' '.join(args.kv_cache_dtypes)} -> {path}")

    def save(record: dict) -> None:
        record = {**record, **environment}
        report.write_records(path, [record])
        progress(summary(record))

    for i, dtype in enumerate(args.kv_cache_dtypes, 1):
        progress(f"[{i}/{len(args.kv_cache_dtypes)}] {dtype}")
        run_dtype(dtype, args, model, workloads, save)
    records = report.load_records(path)
    print(f"\n{report.markdown_tables(records)}\n", flush=True)
    for png in report.plot_records(records, path.with_suffix("")):
        progress(f"wrote {png}")


if __name__ == "__main__":
    main()
